//! End to end without KVM: a "driver" programs the virtio-mmio registers, puts requests in
//! guest memory and kicks; an event-manager loop drives the block device; the test checks the
//! used ring, the interrupt and the image file.

use std::sync::{Arc, Mutex};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mmio::{reg, MmioTransport, NOTIFY_REG_OFFSET};
use devices::virtio::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK};
use devices::virtio::{VirtioDevice, VIRTIO_MMIO_INT_VRING};
use devices::{BusDevice, GuestMemoryMmap};
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;

struct Vm {
    mem: GuestMemoryMmap,
    transport: MmioTransport,
    irq: Arc<EventFd>,
    em: EventManager<Arc<Mutex<Block>>>,
    block: Arc<Mutex<Block>>,
    file: TempFile,
    next_avail: u16,
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

impl Vm {
    fn new(read_only: bool) -> Vm {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let file = TempFile::new().unwrap();
        let image: Vec<u8> = (0..64 * 512u32)
            .map(|i| u8::try_from(i % 241).unwrap())
            .collect();
        std::fs::write(file.as_path(), image).unwrap();
        let block = Arc::new(Mutex::new(
            Block::new(&BlockConfig {
                path: file.as_path().to_path_buf(),
                read_only,
                id: Some("e2e".into()),
                allow_block_device: false,
            })
            .unwrap(),
        ));
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let transport = MmioTransport::new(mem.clone(), block.clone(), irq.clone()).unwrap();
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(block.clone());
        Vm {
            mem,
            transport,
            irq,
            em,
            block,
            file,
            next_avail: 0,
        }
    }

    /// The Linux driver's probe sequence.
    fn bring_up(&mut self) {
        let t = &mut self.transport;
        assert_eq!(r32(t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r32(t, reg::VERSION), 2);
        assert_eq!(r32(t, reg::DEVICE_ID), 2);
        w32(t, reg::STATUS, 0);
        w32(t, reg::STATUS, ACKNOWLEDGE);
        w32(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w32(t, reg::DEVICE_FEATURES_SEL, 1);
        let high = r32(t, reg::DEVICE_FEATURES);
        w32(t, reg::DEVICE_FEATURES_SEL, 0);
        let low = r32(t, reg::DEVICE_FEATURES);
        // Accept everything offered except EVENT_IDX (keeps interrupts unconditional here).
        w32(t, reg::DRIVER_FEATURES_SEL, 1);
        w32(t, reg::DRIVER_FEATURES, high);
        w32(t, reg::DRIVER_FEATURES_SEL, 0);
        w32(t, reg::DRIVER_FEATURES, low & !(1 << 29));
        w32(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r32(t, reg::STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        w32(t, reg::QUEUE_SEL, 0);
        assert_eq!(r32(t, reg::QUEUE_READY), 0);
        assert!(r32(t, reg::QUEUE_NUM_MAX) >= u32::from(QSIZE));
        w32(t, reg::QUEUE_NUM, u32::from(QSIZE));
        w32(t, reg::QUEUE_DESC_LOW, u32::try_from(DESC).unwrap());
        w32(t, reg::QUEUE_DESC_HIGH, 0);
        w32(t, reg::QUEUE_DRIVER_LOW, u32::try_from(AVAIL).unwrap());
        w32(t, reg::QUEUE_DRIVER_HIGH, 0);
        w32(t, reg::QUEUE_DEVICE_LOW, u32::try_from(USED).unwrap());
        w32(t, reg::QUEUE_DEVICE_HIGH, 0);
        w32(t, reg::QUEUE_READY, 1);
        w32(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            r32(t, reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
        // The event loop picks up the activation.
        self.em.run_with_timeout(100).unwrap();
        self.next_avail = 0;
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * u64::from(index);
        self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(at + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at + 12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), GuestAddress(at + 14))
            .unwrap();
    }

    /// Post a 3-descriptor request (header, one data buffer, status) and kick by MMIO.
    fn submit(&mut self, ty: u32, sector: u64, data_len: u32, data_writable: bool) {
        self.mem.write_obj(ty.to_le(), GuestAddress(HDR)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        self.write_desc(0, HDR, 16, 1, 1);
        self.write_desc(1, DATA, data_len, 1 | if data_writable { 2 } else { 0 }, 2);
        self.write_desc(2, STATUS, 1, 2, 0);
        let slot = u64::from(self.next_avail % QSIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        w32(&mut self.transport, NOTIFY_REG_OFFSET, 0);
    }

    /// Run the event loop, then return (used idx, last used len, status byte).
    fn complete(&mut self) -> (u16, u32, u8) {
        self.em.run_with_timeout(1000).unwrap();
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        let slot = u64::from(used_idx.wrapping_sub(1) % QSIZE);
        let len: u32 = self
            .mem
            .read_obj(GuestAddress(USED + 4 + 8 * slot + 4))
            .unwrap();
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (used_idx, len, status)
    }
}

#[test]
fn read_write_flush_through_the_transport_and_event_loop() {
    let mut vm = Vm::new(false);
    vm.bring_up();
    let original = std::fs::read(vm.file.as_path()).unwrap();

    // Capacity from config space.
    let mut cap = [0u8; 8];
    vm.transport.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);

    // IN: sectors 3..5.
    vm.submit(0, 3, 1024, true);
    assert_eq!(vm.complete(), (1, 1025, 0));
    let mut buf = vec![0u8; 1024];
    vm.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, original[1536..2560]);
    assert_eq!(vm.irq.read().unwrap(), 1);
    assert_eq!(
        r32(&mut vm.transport, reg::INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    w32(&mut vm.transport, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut vm.transport, reg::INTERRUPT_STATUS), 0);

    // OUT: sector 10.
    vm.mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA))
        .unwrap();
    vm.submit(1, 10, 512, false);
    assert_eq!(vm.complete(), (2, 1, 0));
    let mut expected = original.clone();
    expected[5120..5632].fill(0x5a);
    assert_eq!(std::fs::read(vm.file.as_path()).unwrap(), expected);

    // FLUSH (the data descriptor is ignored), GET_ID, unknown type, past the end.
    vm.submit(4, 0, 512, false);
    assert_eq!(vm.complete(), (3, 1, 0));
    vm.submit(8, 0, 20, true);
    assert_eq!(vm.complete(), (4, 21, 0));
    let mut id = [0u8; 20];
    vm.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..4], b"e2e\0");
    vm.submit(99, 0, 512, true);
    assert_eq!(vm.complete(), (5, 1, 2));
    vm.submit(0, 64, 512, true);
    assert_eq!(vm.complete(), (6, 1, 1));
    assert_eq!(std::fs::read(vm.file.as_path()).unwrap(), expected);
}

#[test]
fn reset_then_reactivate() {
    let mut vm = Vm::new(true);
    vm.bring_up();
    vm.submit(0, 0, 512, true);
    assert_eq!(vm.complete(), (1, 513, 0));

    // Reset: the device lets go of the queue; a kick is drained and ignored.
    w32(&mut vm.transport, reg::STATUS, 0);
    assert!(!vm.block.lock().unwrap().is_activated());
    vm.submit(0, 0, 512, true);
    let (used_idx, _, status) = vm.complete();
    assert_eq!((used_idx, status), (1, 0xee));

    // The driver starts over (fresh rings), and the same event loop serves it.
    vm.mem
        .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
        .unwrap();
    vm.bring_up();
    vm.mem
        .write_slice(&[0x77; 512], GuestAddress(DATA))
        .unwrap();
    vm.submit(1, 0, 512, false);
    assert_eq!(
        vm.complete(),
        (1, 1, 1),
        "write refused on a read-only disk"
    );
    vm.submit(0, 1, 512, true);
    assert_eq!(vm.complete(), (2, 513, 0));
}

#[test]
fn kick_via_queue_eventfd_like_an_ioeventfd() {
    let mut vm = Vm::new(false);
    vm.bring_up();
    // Post without the MMIO kick, then signal the fd the VMM would give KVM.
    vm.submit(0, 0, 512, true);
    vm.transport.queue_evts()[0].write(1).unwrap();
    assert_eq!(vm.complete(), (1, 513, 0));
}
