use super::*;
use crate::virtio::block::request::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use crate::virtio::block::IoGate;
use crate::virtio::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::virtio::VirtioDevice;
use crate::virtio::{ActivateError, Interrupt};
use crate::GuestMemoryMmap;
use std::sync::Arc;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;
use vmm_sys_util::tempfile::TempFile;

const F_WRITE: u16 = 2;
const F_NEXT: u16 = 1;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn image(sectors: u64) -> TempFile {
    let f = TempFile::new().unwrap();
    let data: Vec<u8> = (0..sectors * 512).map(|i| (i % 253) as u8).collect();
    std::fs::write(f.as_path(), data).unwrap();
    f
}

fn block(file: &TempFile, read_only: bool, id: Option<&str>) -> Block {
    Block::new(&BlockConfig {
        path: file.as_path().to_path_buf(),
        read_only,
        id: id.map(str::to_string),
        allow_block_device: false,
    })
    .unwrap()
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn header(mem: &GuestMemoryMmap, at: u64, ty: u32, sector: u64) {
    mem.write_obj(ty.to_le(), GuestAddress(at)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
}

#[test]
fn features_and_config_space() {
    let file = image(100);
    let rw = block(&file, false, Some("serial-1"));
    assert_eq!(rw.device_type(), 2);
    let f = rw.avail_features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_SIZE_MAX), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    // (Another file: the writable device holds the image's write lock.)
    let ro_file = image(100);
    let ro = block(&ro_file, true, None);
    assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);

    let mut cap = [0u8; 8];
    rw.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 100);
    let mut word = [0u8; 4];
    rw.read_config(8, &mut word);
    assert_eq!(u32::from_le_bytes(word), SIZE_MAX);
    rw.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), SEG_MAX);
    rw.read_config(20, &mut word);
    assert_eq!(u32::from_le_bytes(word), 512);
    // Discard and write-zeroes: offered on a writable disk only, limits in config space.
    for bit in [VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES] {
        assert_ne!(f & (1 << bit), 0);
        assert_eq!(ro.avail_features() & (1 << bit), 0);
    }
    for (off, want) in [
        (36, MAX_DISCARD_SECTORS),
        (40, MAX_DISCARD_SEG),
        (44, DISCARD_SECTOR_ALIGNMENT),
        (48, MAX_WRITE_ZEROES_SECTORS),
        (52, MAX_WRITE_ZEROES_SEG),
    ] {
        rw.read_config(off, &mut word);
        assert_eq!(u32::from_le_bytes(word), want, "config offset {off}");
    }
    let mut byte = [0u8; 1];
    rw.read_config(56, &mut byte);
    assert_eq!(byte, [1], "write_zeroes_may_unmap");
    let mut past = [0u8; 4];
    rw.read_config(0x200, &mut past);
    assert_eq!(past, [0; 4]);

    assert_eq!(&rw.id()[..8], b"serial-1");
    assert_eq!(rw.id()[8..], [0u8; 12]);
    assert!(
        ro.id().iter().any(|&b| b != 0),
        "default id derived from the file"
    );
    assert_eq!(rw.queue_max_sizes(), &[QUEUE_SIZE]);
    assert_eq!(rw.queue_events().len(), 1);
}

#[test]
fn acked_features_are_masked_and_reset() {
    let file = image(1);
    let mut b = block(&file, false, None);
    b.set_acked_features(u64::MAX);
    assert_eq!(b.acked_features(), b.avail_features());
    b.reset();
    assert_eq!(b.acked_features(), 0);
}

#[test]
fn config_writes_are_ignored() {
    let file = image(4);
    let mut b = block(&file, false, None);
    b.write_config(0, &[0xff; 8]);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 4);
}

#[test]
fn id_too_long_is_rejected() {
    let file = image(1);
    let err = Block::new(&BlockConfig {
        path: file.as_path().to_path_buf(),
        read_only: false,
        id: Some("x".repeat(21)),
        allow_block_device: false,
    })
    .unwrap_err();
    assert!(
        matches!(err, BlockError::IdTooLong { len: 21, .. }),
        "{err}"
    );
    // Exactly 20 is fine.
    block(&file, false, Some(&"y".repeat(20)));
}

#[test]
fn activate_checks_queues() {
    let file = image(1);
    let mem = mem();
    let irq = Arc::new(Interrupt::new(Arc::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )));
    let mut b = block(&file, false, None);
    let err = b.activate(mem.clone(), vec![], irq.clone()).unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 1,
            got: 0
        }
    ));
    let q = Queue::new(16).unwrap();
    let err = b.activate(mem.clone(), vec![q], irq.clone()).unwrap_err();
    assert!(matches!(err, ActivateError::QueueNotReady(0)));
    assert!(!b.is_activated());

    let vq = MockSplitQueue::new(&mem, 16);
    b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
        .unwrap();
    assert!(b.is_activated());
    assert_eq!(b.activate_event().read().unwrap(), 1);
    let err = b
        .activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
        .unwrap_err();
    assert!(matches!(err, ActivateError::AlreadyActive));
    b.reset();
    assert!(!b.is_activated());
}

/// Three requests in one kick: a read, a write to a read-only disk, a garbage chain.
#[test]
fn process_queue_completes_every_chain_and_interrupts() {
    let file = image(8);
    let before = std::fs::read(file.as_path()).unwrap();
    let mem = mem();
    let irq_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let irq = Arc::new(Interrupt::new(irq_fd.clone()));
    let mut b = block(&file, true, None);
    let vq = MockSplitQueue::new(&mem, 16);

    header(&mem, 0x1_0000, VIRTIO_BLK_T_IN, 2);
    header(&mem, 0x1_1000, VIRTIO_BLK_T_OUT, 0);
    let descs = [
        // chain 1 (head 0): read sector 2
        d(0x1_0000, 16, F_NEXT, 1),
        d(0x2_0000, 512, F_WRITE | F_NEXT, 2),
        d(0x3_0000, 1, F_WRITE, 0),
        // chain 2 (head 3): write on a read-only disk
        d(0x1_1000, 16, F_NEXT, 4),
        d(0x2_1000, 512, F_NEXT, 5),
        d(0x3_1000, 1, F_WRITE, 0),
        // chain 3 (head 6): loops on itself
        d(0x1_2000, 16, F_NEXT, 6),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
        .unwrap();

    // Not this queue: nothing happens.
    b.process_queue(1);
    assert!(irq_fd.read().is_err());

    b.process_queue(0);
    let used = vq.used();
    assert_eq!(used.idx().load(), 3);
    let e0 = used.ring().ref_at(0).unwrap().load();
    let e1 = used.ring().ref_at(1).unwrap().load();
    let e2 = used.ring().ref_at(2).unwrap().load();
    assert_eq!((e0.id(), e0.len()), (0, 513));
    assert_eq!((e1.id(), e1.len()), (3, 1));
    assert_eq!((e2.id(), e2.len()), (6, 0));
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x3_0000)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x3_1000)).unwrap(),
        VIRTIO_BLK_S_IOERR
    );
    let mut buf = vec![0u8; 512];
    mem.read_slice(&mut buf, GuestAddress(0x2_0000)).unwrap();
    assert_eq!(buf, before[1024..1536]);
    assert_eq!(std::fs::read(file.as_path()).unwrap(), before);
    assert_eq!(irq_fd.read().unwrap(), 1);
    assert_eq!(irq.status(), crate::virtio::VIRTIO_MMIO_INT_VRING);
    // One read of 512 bytes; the refused write and the looping chain are errors.
    let st = b.stats();
    assert_eq!(
        (st.reads, st.read_bytes, st.writes, st.errors),
        (1, 512, 0, 2),
        "{st:?}"
    );

    // Nothing new: no interrupt.
    b.process_queue(0);
    assert!(irq_fd.read().is_err());

    // After reset the device ignores the queue.
    b.reset();
    vq.add_desc_chains(&descs[..3], 0).unwrap();
    b.process_queue(0);
    assert_eq!(vq.used().idx().load(), 3);
}

#[test]
fn event_idx_suppresses_interrupts() {
    let file = image(8);
    let mem = mem();
    let irq_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let irq = Arc::new(Interrupt::new(irq_fd.clone()));
    let mut b = block(&file, false, None);
    let vq = MockSplitQueue::new(&mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    q.set_event_idx(true);
    // (The mock lays the used ring over the avail ring's tail, so this also lands in used
    // element 1, which this test never completes.)
    // used_event (after the avail ring) = 5: the driver wants an interrupt only once
    // used idx passes 5.
    let used_event_addr = vq.avail_addr().0 + 4 + 2 * 16;
    mem.write_obj(5u16, GuestAddress(used_event_addr)).unwrap();
    header(&mem, 0x1_0000, VIRTIO_BLK_T_IN, 0);
    vq.add_desc_chains(
        &[
            d(0x1_0000, 16, F_NEXT, 1),
            d(0x2_0000, 512, F_WRITE | F_NEXT, 2),
            d(0x3_0000, 1, F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    b.activate(mem.clone(), vec![q], irq).unwrap();
    b.process_queue(0);
    assert_eq!(vq.used().idx().load(), 1);
    assert!(irq_fd.read().is_err(), "suppressed by used_event");
    // The device asked to be kicked for the next buffer (avail_event = next avail).
    let avail_event_addr = vq.used_addr().0 + 4 + 8 * 16;
    assert_eq!(
        mem.read_obj::<u16>(GuestAddress(avail_event_addr)).unwrap(),
        1
    );
}

#[test]
fn hostile_avail_index_does_not_hang_or_panic() {
    let file = image(8);
    let mem = mem();
    let irq = Arc::new(Interrupt::new(Arc::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )));
    let mut b = block(&file, false, None);
    let vq = MockSplitQueue::new(&mem, 16);
    b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
        .unwrap();
    assert!(!irq.needs_reset());
    // avail idx claims 1000 new entries in a 16-entry ring; ring entries point anywhere.
    // (Only the first entries: the mock places the used ring over the avail ring's tail.)
    vq.avail().idx().store(1000);
    for i in 0..4u16 {
        vq.avail()
            .ring()
            .ref_at(usize::from(i))
            .unwrap()
            .store(0xffff - i);
    }
    b.process_queue(0);
    assert_eq!(vq.used().idx().load(), 0);
    assert!(
        irq.needs_reset(),
        "a broken queue asks the driver for a reset"
    );
    assert_ne!(irq.status() & crate::virtio::VIRTIO_MMIO_INT_CONFIG, 0);
    // Heads out of range with a sane avail idx: each is consumed with length 0.
    vq.avail().idx().store(4);
    b.process_queue(0);
    assert_eq!(
        vq.used().idx().load(),
        0,
        "heads out of range cannot be completed"
    );
}

#[test]
fn set_backing_switches_image_and_announces_the_new_size() {
    let first = image(8);
    let second = image(32);
    let mem = mem();
    let irq = Arc::new(Interrupt::new(Arc::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )));
    let mut b = block(&first, false, None);
    let vq = MockSplitQueue::new(&mem, 16);
    b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq.clone())
        .unwrap();
    let generation = irq.config_generation();
    b.set_backing(second.as_path()).unwrap();
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 32);
    assert_eq!(irq.config_generation(), generation + 1);
    assert_ne!(irq.status() & crate::virtio::VIRTIO_MMIO_INT_CONFIG, 0);
    // A bad path keeps the old image.
    assert!(b
        .set_backing(std::path::Path::new("/nonexistent/img"))
        .is_err());
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 32);
}

/// An active device over `file` whose driver acked every offered feature but those in
/// `without`, with its mock queue.
fn active<'a>(
    file: &TempFile,
    mem: &'a GuestMemoryMmap,
    without: u64,
) -> (Block, MockSplitQueue<'a, GuestMemoryMmap>) {
    let irq = Arc::new(Interrupt::new(Arc::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )));
    let mut b = block(file, false, None);
    b.set_acked_features(b.avail_features() & !without);
    let vq = MockSplitQueue::new(mem, 64);
    b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
        .unwrap();
    (b, vq)
}

/// Posts one request of type `ty` at `sector` (with one 512-byte data buffer unless FLUSH,
/// readable for OUT, writable for IN), processes the queue and returns its status byte.
/// `n` numbers the request (0, 1, ...): each uses its own descriptors and buffers.
fn submit(
    b: &mut Block,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    n: u16,
    ty: u32,
    sector: u64,
) -> u8 {
    let base = 0x1_0000 + u64::from(n) * 0x1000;
    header(mem, base, ty, sector);
    let status = base + 0x800;
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let chain: Vec<RawDescriptor> = match ty {
        VIRTIO_BLK_T_FLUSH => vec![d(base, 16, F_NEXT, 3 * n + 1), d(status, 1, F_WRITE, 0)],
        _ => {
            let data_flags = if ty == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
            vec![
                d(base, 16, F_NEXT, 3 * n + 1),
                d(base + 0x200, 512, data_flags | F_NEXT, 3 * n + 2),
                d(status, 1, F_WRITE, 0),
            ]
        }
    };
    vq.add_desc_chains(&chain, 3 * n).unwrap();
    b.process_queue(0);
    mem.read_obj::<u8>(GuestAddress(status)).unwrap()
}

/// Issue 18 item 9a: without VIRTIO_BLK_F_FLUSH the device is write-through, so every write
/// (OUT, WRITE_ZEROES, DISCARD) is fdatasync'ed before it completes; with FLUSH negotiated,
/// writes are not synced until the driver flushes.
#[test]
fn write_through_without_flush_feature_syncs_every_write() {
    let file = image(64);
    let mem = mem();
    let (mut b, vq) = active(&file, &mem, 1 << VIRTIO_BLK_F_FLUSH);
    assert_eq!(
        submit(&mut b, &mem, &vq, 0, VIRTIO_BLK_T_OUT, 1),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        b.disk().syncs,
        1,
        "an OUT without FLUSH negotiated is synced"
    );
    assert_eq!(
        submit(&mut b, &mem, &vq, 1, VIRTIO_BLK_T_IN, 1),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(b.disk().syncs, 1, "a read is not synced");
    // WRITE_ZEROES of sectors 8..16.
    let base = 0x1_0000 + 2 * 0x1000;
    let range = base + 0x200;
    mem.write_obj(8u64, GuestAddress(range)).unwrap();
    mem.write_obj(8u32, GuestAddress(range + 8)).unwrap();
    mem.write_obj(0u32, GuestAddress(range + 12)).unwrap();
    header(&mem, base, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    vq.add_desc_chains(
        &[
            d(base, 16, F_NEXT, 7),
            d(range, 16, F_NEXT, 8),
            d(base + 0x800, 1, F_WRITE, 0),
        ],
        6,
    )
    .unwrap();
    b.process_queue(0);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(base + 0x800)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        b.disk().syncs,
        2,
        "a WRITE_ZEROES without FLUSH negotiated is synced"
    );

    // FLUSH negotiated: write-back, the write is synced by the driver's FLUSH only.
    drop(b);
    let (mut b, vq) = active(&file, &mem, 0);
    assert_eq!(
        submit(&mut b, &mem, &vq, 0, VIRTIO_BLK_T_OUT, 1),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(b.disk().syncs, 0);
    assert_eq!(
        submit(&mut b, &mem, &vq, 1, VIRTIO_BLK_T_FLUSH, 0),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(b.disk().syncs, 1);
}

/// Issue 18 item 9c: once an fdatasync failed, the kernel may have dropped the dirty pages,
/// so a retried FLUSH must not report OK, and later writes fail too; reads still work.
#[test]
fn failed_fdatasync_is_sticky() {
    let file = image(64);
    let mem = mem();
    let (mut b, vq) = active(&file, &mem, 0);
    assert_eq!(
        submit(&mut b, &mem, &vq, 0, VIRTIO_BLK_T_OUT, 1),
        VIRTIO_BLK_S_OK
    );
    b.disk().fail_syncs = true;
    assert_eq!(
        submit(&mut b, &mem, &vq, 1, VIRTIO_BLK_T_FLUSH, 0),
        VIRTIO_BLK_S_IOERR
    );
    // The host's fdatasync would succeed again now: the failure is remembered anyway.
    b.disk().fail_syncs = false;
    assert_eq!(
        submit(&mut b, &mem, &vq, 2, VIRTIO_BLK_T_FLUSH, 0),
        VIRTIO_BLK_S_IOERR,
        "a retried FLUSH after a failed fdatasync reports the failure"
    );
    assert_eq!(
        submit(&mut b, &mem, &vq, 3, VIRTIO_BLK_T_OUT, 2),
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        submit(&mut b, &mem, &vq, 4, VIRTIO_BLK_T_IN, 2),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        b.disk().syncs,
        0,
        "no fdatasync reached the file after the failure"
    );
}

/// Issue 18 item 9b: PATCH /drives syncs the old image before switching, and a failed sync
/// fails the switch (the old image stays, with its size).
#[test]
fn set_backing_syncs_the_old_image_first() {
    let first = image(8);
    let second = image(32);
    let mem = mem();
    let (mut b, _vq) = active(&first, &mem, 0);
    b.disk().fail_syncs = true;
    let err = b.set_backing(second.as_path()).unwrap_err();
    assert!(matches!(err, BlockError::SyncBeforeSwitch(_)), "{err}");
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8, "the old image stays");
    assert!(b.disk().is_file_at(first.as_path()));
    // The failure is sticky: the drive keeps refusing to switch away from the image.
    b.disk().fail_syncs = false;
    assert!(b.set_backing(second.as_path()).is_err());
    // A device whose syncs work switches.
    drop(b);
    let (mut b, _vq) = active(&first, &mem, 1 << VIRTIO_BLK_F_FLUSH);
    b.set_backing(second.as_path()).unwrap();
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 32);
}

/// Issue 18 item 9d: a writable image is locked against every other open of it, a read-only
/// one against writers; switching a drive to the file it already uses (a resized image) works
/// and keeps the lock.
#[test]
fn images_are_locked_while_in_use() {
    let file = image(8);
    let mut rw = block(&file, false, None);
    let config = |read_only| BlockConfig {
        path: file.as_path().to_path_buf(),
        read_only,
        id: None,
        allow_block_device: false,
    };
    let err = Block::new(&config(false)).unwrap_err();
    assert!(matches!(err, BlockError::Locked { .. }), "{err}");
    assert!(!err.to_string().contains('\n'));
    let err = Block::new(&config(true)).unwrap_err();
    assert!(matches!(err, BlockError::Locked { .. }), "{err}");
    // The same file again, grown.
    std::fs::OpenOptions::new()
        .write(true)
        .open(file.as_path())
        .unwrap()
        .set_len(16 * 512)
        .unwrap();
    rw.set_backing(file.as_path()).unwrap();
    assert_eq!(rw.nsectors(), 16);
    let err = Block::new(&config(true)).unwrap_err();
    assert!(
        matches!(err, BlockError::Locked { .. }),
        "still locked: {err}"
    );
    drop(rw);
    // Readers share the image.
    let _ro1 = Block::new(&config(true)).unwrap();
    let _ro2 = Block::new(&config(true)).unwrap();
    let err = Block::new(&config(false)).unwrap_err();
    assert!(matches!(err, BlockError::Locked { .. }), "{err}");
}

/// Waits (at most 5 s) until the used ring's index is `n`.
fn wait_used(vq: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while vq.used().idx().load() != n {
        assert!(
            std::time::Instant::now() < deadline,
            "the I/O thread never completed: used idx {} != {n}",
            vq.used().idx().load()
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Issue 18 item 6, and the per-device thread that replaced the hand-over: with an I/O
/// thread, the thread (named, its start hook run first) polls the queue's kick fd itself and
/// runs the requests, the used ring and the interrupt, inside the gate; process_queue (the
/// device loop's path) does nothing.
#[test]
fn io_thread_owns_the_queue_sync() {
    io_thread_owns_the_queue(IoEngine::Sync, "blk-sync-drive-id", "blk-sync-drive-");
}

/// The same with io_uring.
#[test]
fn io_thread_owns_the_queue_async() {
    io_thread_owns_the_queue(IoEngine::Async, "blk-async-drive-id", "blk-async-drive");
}

fn io_thread_owns_the_queue(engine: IoEngine, name: &str, cut: &str) {
    let file = image(64);
    let before = std::fs::read(file.as_path()).unwrap();
    let mem = mem();
    let irq_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let irq = Arc::new(Interrupt::new(irq_fd.clone()));
    let dev = Arc::new(std::sync::Mutex::new(block(&file, false, None)));
    let started = Arc::new(std::sync::Mutex::new(None::<String>));
    let seen = started.clone();
    let hook: crate::virtio::block::StartHook = Arc::new(move || {
        *seen.lock().unwrap() = std::thread::current().name().map(str::to_string);
    });
    let gate = Arc::new(IoGate::new());
    let used = Block::start_io_thread(&dev, name, hook, gate.clone(), engine).unwrap();
    assert_eq!(used, engine);
    let kick = dev.lock().unwrap().core.queue_events()[0]
        .try_clone()
        .unwrap();
    let vq = MockSplitQueue::new(&mem, 64);
    {
        let mut b = dev.lock().unwrap();
        let f = b.avail_features();
        b.set_acked_features(f);
        b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
            .unwrap();
    }

    // The gate closed (a paused VM): the kicked write is not executed, and guest memory is
    // untouched.
    assert!(gate.close(std::time::Duration::from_secs(1)));
    header(&mem, 0x1_0000, VIRTIO_BLK_T_OUT, 3);
    mem.write_slice(&[0xab; 512], GuestAddress(0x1_0200))
        .unwrap();
    mem.write_obj(0xffu8, GuestAddress(0x1_0800)).unwrap();
    vq.add_desc_chains(
        &[
            d(0x1_0000, 16, F_NEXT, 1),
            d(0x1_0200, 512, F_NEXT, 2),
            d(0x1_0800, 1, F_WRITE, 0),
        ],
        0,
    )
    .unwrap();
    dev.lock().unwrap().process_queue(0);
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1_0800)).unwrap(), 0xff);
    assert_eq!(vq.used().idx().load(), 0);
    assert!(irq_fd.read().is_err());
    assert_eq!(std::fs::read(file.as_path()).unwrap(), before);
    assert_eq!(
        started.lock().unwrap().as_deref(),
        Some(cut),
        "the hook ran on the I/O thread, named within 15 bytes"
    );
    gate.open();
    wait_used(&vq, 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x1_0800)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let e = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((e.id(), e.len()), (0, 1));
    assert_eq!(irq_fd.read().unwrap(), 1);
    assert_eq!(dev.lock().unwrap().stats().writes, 1);
    let mut want = before.clone();
    want[3 * 512..4 * 512].fill(0xab);
    assert_eq!(std::fs::read(file.as_path()).unwrap(), want);

    // A read and a bad chain in one kick.
    header(&mem, 0x1_3000, VIRTIO_BLK_T_IN, 2);
    vq.add_desc_chains(
        &[
            d(0x1_3000, 16, F_NEXT, 8),
            d(0x1_3200, 1024, F_WRITE | F_NEXT, 9),
            d(0x1_3800, 1, F_WRITE, 0),
        ],
        7,
    )
    .unwrap();
    vq.add_desc_chains(&[d(0x1_1000, 1, F_WRITE, 0)], 3)
        .unwrap();
    kick.write(1).unwrap();
    wait_used(&vq, 3);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x1_3800)).unwrap(),
        VIRTIO_BLK_S_OK
    );
    let mut buf = vec![0u8; 1024];
    mem.read_slice(&mut buf, GuestAddress(0x1_3200)).unwrap();
    assert_eq!(buf, want[2 * 512..4 * 512]);
    let st = dev.lock().unwrap().stats();
    assert_eq!((st.reads, st.errors), (1, 1), "{st:?}");

    // Dropping the device ends the thread (it holds only a weak reference).
    let weak = Arc::downgrade(&dev);
    drop(dev);
    assert!(weak.upgrade().is_none());
    let alive = || {
        std::fs::read_dir("/proc/self/task").unwrap().any(|t| {
            let comm = t.unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == cut)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while alive() {
        assert!(
            std::time::Instant::now() < deadline,
            "the I/O thread outlived its device"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// More requests in one kick than a pass takes (80 > DRAIN_BUDGET): the pass ends with a
/// self-kick and the I/O thread comes back for the rest, on either engine (the io_uring one
/// also bounded by its free slots). Every request completes once with its data.
#[test]
fn io_thread_serves_more_than_a_budget_per_kick() {
    for engine in [IoEngine::Sync, IoEngine::Async] {
        let file = image(128);
        let before = std::fs::read(file.as_path()).unwrap();
        let mem = mem();
        let irq_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let irq = Arc::new(Interrupt::new(irq_fd.clone()));
        let dev = Arc::new(std::sync::Mutex::new(block(&file, false, None)));
        let hook: crate::virtio::block::StartHook = Arc::new(|| {});
        let gate = Arc::new(IoGate::new());
        Block::start_io_thread(&dev, "blk-budget", hook, gate, engine).unwrap();
        let kick = dev.lock().unwrap().core.queue_events()[0]
            .try_clone()
            .unwrap();
        let vq = MockSplitQueue::new(&mem, 256);
        const N: u64 = 80;
        const N16: u16 = 80;
        let mut descs = Vec::new();
        for i in 0..N {
            let (h, data, st) = (0x4_0000 + i * 32, 0x5_0000 + i * 512, 0x6_0000 + i);
            header(&mem, h, VIRTIO_BLK_T_IN, i);
            let base = 3 * u16::try_from(i).unwrap();
            descs.push(d(h, 16, F_NEXT, base + 1));
            descs.push(d(data, 512, F_WRITE | F_NEXT, base + 2));
            descs.push(d(st, 1, F_WRITE, 0));
        }
        {
            let mut b = dev.lock().unwrap();
            let f = b.avail_features();
            b.set_acked_features(f);
            b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
                .unwrap();
        }
        // The activation's pass finds nothing; then one kick for all of them.
        std::thread::sleep(std::time::Duration::from_millis(50));
        vq.add_desc_chains(&descs, 0).unwrap();
        kick.write(1).unwrap();
        wait_used(&vq, N16);
        for i in 0..N {
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(0x6_0000 + i)).unwrap(),
                VIRTIO_BLK_S_OK,
                "{engine:?}: request {i}"
            );
            let mut buf = vec![0u8; 512];
            mem.read_slice(&mut buf, GuestAddress(0x5_0000 + i * 512))
                .unwrap();
            let at = usize::try_from(i * 512).unwrap();
            assert_eq!(buf, before[at..at + 512], "{engine:?}: sector {i}");
        }
        let mut heads: Vec<u32> = (0..N16)
            .map(|k| vq.used().ring().ref_at(k.into()).unwrap().load().id())
            .collect();
        heads.sort_unstable();
        heads.dedup();
        assert_eq!(heads.len(), usize::from(N16), "{engine:?}: every head once");
        assert_eq!(dev.lock().unwrap().stats().reads, N, "{engine:?}");
        // Nothing more comes.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(vq.used().idx().load(), N16, "{engine:?}");
    }
}

/// The used ring's flags (VIRTQ_USED_F_NO_NOTIFY is bit 0).
fn used_flags(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    mem.read_obj::<u16>(vq.used_addr()).unwrap()
}

/// Posts a 512-byte read of `sector` as request `n` (descriptors 3n.., buffers at
/// 0x7_0000 + n * 0x1000) on the avail ring, without a kick. Returns its status address.
fn post_read(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    n: u16,
    sector: u64,
) -> u64 {
    let base = 0x7_0000 + u64::from(n) * 0x1000;
    header(mem, base, VIRTIO_BLK_T_IN, sector);
    let status = base + 0x800;
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    vq.add_desc_chains(
        &[
            d(base, 16, F_NEXT, 3 * n + 1),
            d(base + 0x200, 512, F_WRITE | F_NEXT, 3 * n + 2),
            d(status, 1, F_WRITE, 0),
        ],
        3 * n,
    )
    .unwrap();
    status
}

/// The re-check before sleeping: a pass with `keep_off` that empties the ring leaves
/// notifications off (VIRTQ_USED_F_NO_NOTIFY), and `rearm` turns them on again and reports a
/// request posted meanwhile (no kick will come for it), which the next pass serves. With
/// nothing posted it reports nothing, notifications on. Throttled, it leaves them off.
#[test]
fn rearm_turns_notifications_on_and_sees_a_request_posted_while_they_were_off() {
    let file = image(64);
    let mem = mem();
    let (mut b, vq) = active(&file, &mem, 1 << VIRTIO_RING_F_EVENT_IDX);
    let no_notify = || used_flags(&mem, &vq) & 1 != 0;
    post_read(&mem, &vq, 0, 1);
    let batch = b.take_batch(0, DRAIN_BUDGET, true);
    assert_eq!(batch.job.map(|j| j.requests.len()), Some(1));
    assert!(
        no_notify(),
        "the ring was emptied with keep_off: notifications stay off"
    );
    // Posted while the thread polls (or just after it stopped), without a kick.
    post_read(&mem, &vq, 1, 2);
    assert!(
        b.rearm(0),
        "the request posted while notifications were off is seen"
    );
    assert!(!no_notify());
    let batch = b.take_batch(0, DRAIN_BUDGET, true);
    assert_eq!(batch.job.map(|j| j.requests.len()), Some(1));
    assert!(no_notify());
    assert!(!b.rearm(0), "nothing more was posted");
    assert!(
        !no_notify(),
        "notifications are on before the thread sleeps"
    );
    // Without keep_off a pass turns them on itself, as before.
    post_read(&mem, &vq, 2, 3);
    let batch = b.take_batch(0, DRAIN_BUDGET, false);
    assert_eq!(batch.job.map(|j| j.requests.len()), Some(1));
    assert!(!no_notify());
    // Throttled: notifications stay off, the timer brings the thread back.
    b.throttled = true;
    post_read(&mem, &vq, 3, 4);
    assert!(b.take_batch(0, DRAIN_BUDGET, true).job.is_none());
    assert!(!b.rearm(0));
}

/// The thread `comm`'s (utime + stime) in clock ticks, from /proc/self/task.
fn thread_cpu_ticks(comm: &str) -> Option<u64> {
    for t in std::fs::read_dir("/proc/self/task").ok()? {
        let dir = t.ok()?.path();
        let name = std::fs::read_to_string(dir.join("comm")).ok()?;
        if name.trim() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // After the ")" closing comm: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
    }
    None
}

/// Adaptive polling on the I/O thread: after serving a request it polls the ring with
/// notifications off, so a request posted then is served without a kick; the poll ends after
/// its window (notifications on again, and a request posted after that waits for its kick);
/// then the idle thread sleeps (no CPU time). On either engine.
#[test]
fn io_thread_polls_the_ring_for_its_window_then_sleeps() {
    for (engine, comm) in [
        (IoEngine::Sync, "blk-poll-sync"),
        (IoEngine::Async, "blk-poll-async"),
    ] {
        let file = image(64);
        let before = std::fs::read(file.as_path()).unwrap();
        let mem = mem();
        let irq_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let irq = Arc::new(Interrupt::new(irq_fd.clone()));
        let dev = Arc::new(std::sync::Mutex::new(block(&file, false, None)));
        let window = std::time::Duration::from_millis(300);
        dev.lock().unwrap().set_io_poll(window);
        let hook: crate::virtio::block::StartHook = Arc::new(|| {});
        let gate = Arc::new(IoGate::new());
        Block::start_io_thread(&dev, comm, hook, gate, engine).unwrap();
        let kick = dev.lock().unwrap().core.queue_events()[0]
            .try_clone()
            .unwrap();
        let vq = MockSplitQueue::new(&mem, 64);
        {
            let mut b = dev.lock().unwrap();
            let f = b.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX);
            b.set_acked_features(f);
            b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
                .unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let no_notify = || used_flags(&mem, &vq) & 1 != 0;
        assert!(!no_notify(), "{engine:?}: idle, notifications are on");

        // A kicked request: served, then the thread polls.
        let s0 = post_read(&mem, &vq, 0, 1);
        let t0 = std::time::Instant::now();
        kick.write(1).unwrap();
        wait_used(&vq, 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(s0)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        // Posted within the window, without a kick: the poll serves it.
        let s1 = post_read(&mem, &vq, 1, 2);
        assert!(
            t0.elapsed() < window / 2,
            "{engine:?}: too slow a host for this test's window"
        );
        assert!(
            no_notify(),
            "{engine:?}: notifications are off while the thread polls"
        );
        wait_used(&vq, 2);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(s1)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        let mut buf = vec![0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(0x7_1200)).unwrap();
        assert_eq!(buf, before[2 * 512..3 * 512], "{engine:?}");

        // The window ends (bounded wait): notifications on again.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while no_notify() {
            assert!(
                std::time::Instant::now() < deadline,
                "{engine:?}: the thread still polls 5 s after its {window:?} window"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Asleep: no CPU time over 300 ms, and a request without a kick waits.
        let cpu0 = thread_cpu_ticks(comm).expect("the I/O thread's stat");
        let s2 = post_read(&mem, &vq, 2, 3);
        std::thread::sleep(std::time::Duration::from_millis(300));
        let cpu1 = thread_cpu_ticks(comm).expect("the I/O thread's stat");
        assert!(
            cpu1 <= cpu0 + 1,
            "{engine:?}: the idle thread used {} ticks",
            cpu1 - cpu0
        );
        assert_eq!(
            vq.used().idx().load(),
            2,
            "{engine:?}: served without a kick after the window"
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(s2)).unwrap(), 0xff);
        kick.write(1).unwrap();
        wait_used(&vq, 3);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(s2)).unwrap(),
            VIRTIO_BLK_S_OK
        );
        assert_eq!(dev.lock().unwrap().stats().reads, 3, "{engine:?}");
    }
}

/// With a poll window of zero the thread never polls: notifications go on at the end of each
/// pass, and a request posted without a kick is not served.
#[test]
fn io_thread_without_a_poll_window_does_not_poll() {
    let file = image(64);
    let mem = mem();
    let irq_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let irq = Arc::new(Interrupt::new(irq_fd.clone()));
    let dev = Arc::new(std::sync::Mutex::new(block(&file, false, None)));
    dev.lock().unwrap().set_io_poll(std::time::Duration::ZERO);
    let hook: crate::virtio::block::StartHook = Arc::new(|| {});
    Block::start_io_thread(
        &dev,
        "blk-nopoll",
        hook,
        Arc::new(IoGate::new()),
        IoEngine::Sync,
    )
    .unwrap();
    let kick = dev.lock().unwrap().core.queue_events()[0]
        .try_clone()
        .unwrap();
    let vq = MockSplitQueue::new(&mem, 64);
    {
        let mut b = dev.lock().unwrap();
        let f = b.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX);
        b.set_acked_features(f);
        b.activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
            .unwrap();
    }
    post_read(&mem, &vq, 0, 1);
    kick.write(1).unwrap();
    wait_used(&vq, 1);
    assert_eq!(
        used_flags(&mem, &vq) & 1,
        0,
        "notifications on after the pass"
    );
    let s1 = post_read(&mem, &vq, 1, 2);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(
        vq.used().idx().load(),
        1,
        "no poll: the request waits for its kick"
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(s1)).unwrap(), 0xff);
    kick.write(1).unwrap();
    wait_used(&vq, 2);
}
