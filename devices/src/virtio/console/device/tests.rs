use super::*;
use crate::virtio::Interrupt;
use crate::virtio::VirtioDevice;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::Mutex;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

const F_WRITE: u16 = 2;
const F_NEXT: u16 = 1;
const MEM_SIZE: u64 = 0x20_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())]).unwrap()
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct Blocked;

impl io::Write for Blocked {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

struct Setup<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    irq_fd: Arc<EventFd>,
}

fn setup(mem: &GuestMemoryMmap) -> Setup<'_> {
    // Rings at different places: the mock allocates from fixed addresses, so give each queue
    // its own start.
    let rx = MockSplitQueue::create(mem, GuestAddress(0x10_0000), 16);
    let tx = MockSplitQueue::create(mem, GuestAddress(0x11_0000), 16);
    Setup {
        mem,
        rx,
        tx,
        irq_fd: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    }
}

fn activate(c: &mut Console, s: &Setup) {
    let irq = Arc::new(Interrupt::new(s.irq_fd.clone()));
    c.activate(
        s.mem.clone(),
        vec![s.rx.create_queue().unwrap(), s.tx.create_queue().unwrap()],
        irq,
    )
    .unwrap();
}

fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

fn read(mem: &GuestMemoryMmap, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

#[test]
fn identity_and_config() {
    let mut c = Console::new(None, Box::new(Sink::default())).unwrap();
    assert_eq!(c.device_type(), 3);
    assert_eq!(c.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(c.queue_events().len(), 2);
    c.set_acked_features(u64::MAX);
    assert_eq!(c.acked_features(), COMMON_FEATURES);
    let mut cfg = [0xffu8; 12];
    cfg.fill(0);
    c.read_config(0, &mut cfg);
    assert_eq!(&cfg[..4], &[0, 0, 0, 0], "cols, rows = 0");
    c.write_config(0, &[9; 4]);
    let mut again = [0u8; 4];
    c.read_config(0, &mut again);
    assert_eq!(again, [0; 4]);
    assert!(!c.wants_input());
    assert_eq!(c.handle_input_ready(), InputOutcome::Inactive);
}

#[test]
fn transmit_goes_to_the_output_and_bad_chains_are_dropped() {
    let mem = mem();
    let s = setup(&mem);
    let sink = Sink::default();
    let mut c = Console::new(None, Box::new(sink.clone())).unwrap();
    mem.write_slice(b"hello ", GuestAddress(0x1000)).unwrap();
    mem.write_slice(b"world\n", GuestAddress(0x2000)).unwrap();
    mem.write_slice(b"XXXX", GuestAddress(0x3000)).unwrap();
    let big: Vec<u8> = (0..10_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    mem.write_slice(&big, GuestAddress(0x4_0000)).unwrap();
    s.tx.add_desc_chains(
        &[
            d(0x1000, 6, F_NEXT, 1),
            d(0x2000, 6, 0, 0),
            // device-writable: dropped
            d(0x3000, 4, F_WRITE, 0),
            // outside memory: dropped
            d(MEM_SIZE - 2, 4, 0, 0),
            // larger than one chunk
            d(0x4_0000, 10_000, 0, 0),
            // loop: dropped
            d(0x3000, 4, F_NEXT, 5),
        ],
        0,
    )
    .unwrap();
    activate(&mut c, &s);
    c.process_tx();
    let mut want = b"hello world\n".to_vec();
    want.extend_from_slice(&big);
    assert_eq!(sink.take(), want);
    assert_eq!(s.tx.used().idx().load(), 5);
    for i in 0..5 {
        assert_eq!(used(&s.tx, i).1, 0);
    }
    assert_eq!(c.tx_bytes(), 12 + 10_000);
    assert_eq!(s.irq_fd.read().unwrap(), 1);
}

#[test]
fn blocked_output_drops_and_never_hangs() {
    let mem = mem();
    let s = setup(&mem);
    let mut c = Console::new(None, Box::new(Blocked)).unwrap();
    s.tx.add_desc_chains(&[d(0x1000, 64, 0, 0), d(0x2000, 64, 0, 0)], 0)
        .unwrap();
    activate(&mut c, &s);
    c.process_tx();
    assert_eq!(s.tx.used().idx().load(), 2, "both completed");
    assert_eq!(c.tx_bytes(), 0);
}

#[test]
fn input_only_into_posted_buffers() {
    let mem = mem();
    let s = setup(&mem);
    let (input, mut peer) = UnixStream::pair().unwrap();
    input.set_nonblocking(true).unwrap();
    let mut c = Console::new(Some(Box::new(input)), Box::new(Sink::default())).unwrap();
    activate(&mut c, &s);
    peer.write_all(b"0123456789abcdefghij").unwrap();
    assert!(!c.wants_input(), "no receive buffer posted");
    assert_eq!(c.handle_input_ready(), InputOutcome::NoBuffers);

    s.rx.add_desc_chains(
        &[
            // read-only: skipped with length 0
            d(0x5000, 8, 0, 0),
            // 4 + 4 bytes in two writable descriptors
            d(0x6000, 4, F_WRITE | F_NEXT, 2),
            d(0x7000, 4, F_WRITE, 0),
            d(0x8000, 100, F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    assert!(c.wants_input());
    assert_eq!(c.handle_input_ready(), InputOutcome::Delivered(8));
    assert_eq!(used(&s.rx, 0), (0, 0));
    assert_eq!(used(&s.rx, 1), (1, 8));
    assert_eq!(read(&mem, 0x6000, 4), b"0123");
    assert_eq!(read(&mem, 0x7000, 4), b"4567");
    assert_eq!(c.handle_input_ready(), InputOutcome::Delivered(12));
    assert_eq!(read(&mem, 0x8000, 12), b"89abcdefghij");
    assert_eq!(c.rx_bytes(), 20);
    assert!(!c.wants_input());

    // A buffer posted but nothing to read: the chain stays available.
    s.rx.add_desc_chains(&[d(0x9000, 16, F_WRITE, 0)], 4)
        .unwrap();
    assert_eq!(c.handle_input_ready(), InputOutcome::WouldBlock);
    assert!(c.wants_input());
    // End of file: closed for good, the chain is not consumed.
    drop(peer);
    assert_eq!(c.handle_input_ready(), InputOutcome::Closed);
    assert_eq!(s.rx.used().idx().load(), 3);
    assert!(!c.wants_input());
    assert_eq!(c.input_fd(), None);
}

/// Through the event loop: input is not read while no buffer is posted, and flows after the
/// guest posts one and kicks.
#[test]
fn event_loop_arms_input_on_receive_kick() {
    let mem = mem();
    let s = setup(&mem);
    let (input, mut peer) = UnixStream::pair().unwrap();
    let sink = Sink::default();
    let mut console = Console::new(Some(Box::new(input)), Box::new(sink.clone())).unwrap();
    activate(&mut console, &s);
    let console = Arc::new(Mutex::new(console));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(console.clone());
    // The activate event.
    em.run_with_timeout(100).unwrap();
    peer.write_all(b"ping\n").unwrap();
    // No buffer: the input is not watched, nothing happens.
    assert_eq!(em.run_with_timeout(50).unwrap(), 0);
    assert!(!console.lock().unwrap().input_watched);

    s.rx.add_desc_chains(&[d(0x6000, 64, F_WRITE, 0)], 0)
        .unwrap();
    console.lock().unwrap().queue_events()[RX_QUEUE]
        .write(1)
        .unwrap();
    em.run_with_timeout(100).unwrap(); // the kick: arms the input
    assert!(console.lock().unwrap().input_watched);
    em.run_with_timeout(100).unwrap(); // the input: delivered
    assert_eq!(s.rx.used().idx().load(), 1);
    assert_eq!(used(&s.rx, 0), (0, 5));
    assert_eq!(read(&mem, 0x6000, 5), b"ping\n");
    assert!(
        !console.lock().unwrap().input_watched,
        "disarmed: no buffer"
    );

    // Transmit through a kick.
    mem.write_slice(b"pong\n", GuestAddress(0x1000)).unwrap();
    s.tx.add_desc_chains(&[d(0x1000, 5, 0, 0)], 0).unwrap();
    console.lock().unwrap().queue_events()[TX_QUEUE]
        .write(1)
        .unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(sink.take(), b"pong\n");
}
