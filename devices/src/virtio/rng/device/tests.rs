use super::*;
use crate::virtio::features::VIRTIO_F_VERSION_1;
use crate::virtio::VirtioDevice;
use crate::virtio::{ActivateError, Interrupt};
use std::sync::Arc;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const F_WRITE: u16 = 2;
const F_NEXT: u16 = 1;
const MEM_SIZE: u64 = 0x20_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())]).unwrap()
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn irq() -> (Arc<EventFd>, Arc<Interrupt>) {
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    (fd.clone(), Arc::new(Interrupt::new(fd)))
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
fn identity_features_and_config() {
    let mut r = Rng::new().unwrap();
    assert_eq!(r.device_type(), 4);
    assert_ne!(r.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
    r.set_acked_features(u64::MAX);
    assert_eq!(r.acked_features(), r.avail_features());
    let mut cfg = [0xaau8; 4];
    cfg.fill(0);
    r.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; 4]);
    r.write_config(0, &[1, 2, 3]);
    assert_eq!(r.queue_max_sizes(), &[QUEUE_SIZE]);
    assert_eq!(r.queue_events().len(), 1);
    r.reset();
    assert_eq!(r.acked_features(), 0);
}

#[test]
fn activate_checks_queues() {
    let mem = mem();
    let (_fd, irq) = irq();
    let mut r = Rng::new().unwrap();
    let err = r.activate(mem.clone(), vec![], irq.clone()).unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    ));
    let err = r
        .activate(mem.clone(), vec![Queue::new(16).unwrap()], irq.clone())
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(0)));
    let vq = MockSplitQueue::new(&mem, 16);
    let two = vec![vq.create_queue().unwrap(), vq.create_queue().unwrap()];
    assert!(r.activate(mem.clone(), two, irq.clone()).is_err());
    r.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
        .unwrap();
    assert!(r.is_activated());
    assert_eq!(r.activate_event().read().unwrap(), 1);
    assert!(matches!(
        r.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq),
        Err(ActivateError::AlreadyActive)
    ));
}

/// Good chains get random bytes; bad ones get used length 0 and leave memory alone.
#[test]
fn fills_good_chains_and_drops_bad_ones() {
    let mem = mem();
    let (fd, irq) = irq();
    let mut r = Rng::new().unwrap();
    let vq = MockSplitQueue::new(&mem, 32);
    let descs = [
        // head 0: two writable buffers, 4 KiB + 100 bytes
        d(0x1_0000, 4096, F_WRITE | F_NEXT, 1),
        d(0x2_0000, 100, F_WRITE, 0),
        // head 2: 4 KiB (compared with head 0)
        d(0x3_0000, 4096, F_WRITE, 0),
        // head 3: device-readable
        d(0x4_0000, 64, 0, 0),
        // head 4: writable, straddles the end of memory
        d(MEM_SIZE - 16, 64, F_WRITE, 0),
        // head 5: writable then readable
        d(0x6_0000, 64, F_WRITE | F_NEXT, 6),
        d(0x6_1000, 64, 0, 0),
        // head 7: zero-length buffer
        d(0x7_0000, 0, F_WRITE, 0),
        // head 8: loops on itself (last: the mock chains descriptors by their NEXT flag)
        d(0x5_0000, 64, F_WRITE | F_NEXT, 8),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    r.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
        .unwrap();
    r.process_queue();
    assert_eq!(vq.used().idx().load(), 7);
    assert_eq!(used(&vq, 0), (0, 4196));
    assert_eq!(used(&vq, 1), (2, 4096));
    assert_eq!(used(&vq, 2), (3, 0));
    assert_eq!(used(&vq, 3), (4, 0));
    assert_eq!(used(&vq, 4), (5, 0));
    assert_eq!(used(&vq, 5), (7, 0));
    assert_eq!(used(&vq, 6), (8, 0));
    let a = read(&mem, 0x1_0000, 4096);
    let b = read(&mem, 0x3_0000, 4096);
    assert_ne!(a, b);
    assert!(a.iter().any(|&x| x != a[0]), "not all bytes equal");
    assert_ne!(read(&mem, 0x2_0000, 100), vec![0u8; 100]);
    assert_eq!(
        read(&mem, 0x5_0000, 64),
        vec![0u8; 64],
        "loop left untouched"
    );
    assert_eq!(
        read(&mem, 0x6_0000, 64),
        vec![0u8; 64],
        "mixed chain untouched"
    );
    assert_eq!(r.bytes_served(), 4196 + 4096);
    assert_eq!(fd.read().unwrap(), 1);

    // Nothing new: no interrupt. After reset the queue is ignored.
    r.process_queue();
    assert!(fd.read().is_err());
    r.reset();
    vq.add_desc_chains(&descs[..2], 0).unwrap();
    r.process_queue();
    assert_eq!(vq.used().idx().load(), 7);
}

#[test]
fn request_is_capped() {
    let mem = mem();
    let (_fd, irq) = irq();
    let mut r = Rng::new().unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    // 3 x 48 KiB = 144 KiB asked for; 64 KiB served, the tail stays zero.
    let descs = [
        d(0x1_0000, 0xc000, F_WRITE | F_NEXT, 1),
        d(0x2_0000, 0xc000, F_WRITE | F_NEXT, 2),
        d(0x3_0000, 0xc000, F_WRITE, 0),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    r.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
        .unwrap();
    r.process_queue();
    assert_eq!(used(&vq, 0), (0, MAX_BYTES_PER_REQUEST));
    let second = read(&mem, 0x2_0000, 0xc000);
    let served_in_second = (MAX_BYTES_PER_REQUEST - 0xc000) as usize;
    assert!(second[served_in_second..].iter().all(|&b| b == 0));
    assert!(second[..served_in_second].iter().any(|&b| b != 0));
    assert!(read(&mem, 0x3_0000, 0xc000).iter().all(|&b| b == 0));
}

#[test]
fn hostile_avail_index_does_not_hang_or_panic() {
    let mem = mem();
    let (_fd, irq) = irq();
    let mut r = Rng::new().unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    r.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
        .unwrap();
    // avail idx far more than a ring ahead.
    vq.avail().idx().store(1000);
    r.process_queue();
    assert_eq!(vq.used().idx().load(), 0);
}

#[test]
fn getrandom_fills_large_buffers() {
    let mut buf = vec![0u8; 1 << 20];
    getrandom(&mut buf).unwrap();
    assert!(buf[buf.len() - 4096..].iter().any(|&b| b != 0));
}
