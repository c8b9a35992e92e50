use super::*;
use crate::virtio::features::VIRTIO_F_VERSION_1;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const F_WRITE: u16 = 2;
const MIB: u64 = 1 << 20;
const MIB_USIZE: usize = 1 << 20;

/// The frame number of `addr`.
fn pfn(addr: u64) -> u32 {
    u32::try_from(addr >> 12).unwrap()
}

/// 0..4 MiB and 8..12 MiB: a gap between.
fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 4 * MIB_USIZE),
        (GuestAddress(8 * MIB), 4 * MIB_USIZE),
    ])
    .unwrap()
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn pfns(mem: &GuestMemoryMmap, at: u64, list: &[u32]) -> u32 {
    let bytes: Vec<u8> = list.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    u32::try_from(bytes.len()).unwrap()
}

struct Rig<'a> {
    dev: Balloon,
    inflate: MockSplitQueue<'a, GuestMemoryMmap>,
    deflate: MockSplitQueue<'a, GuestMemoryMmap>,
    report: Option<MockSplitQueue<'a, GuestMemoryMmap>>,
    _irq: Arc<EventFd>,
}

fn rig(mem: &GuestMemoryMmap, cfg: BalloonConfig) -> Rig<'_> {
    let mut dev = Balloon::new(cfg).unwrap();
    dev.set_acked_features(dev.avail_features());
    let inflate = MockSplitQueue::create(mem, GuestAddress(0x10_0000), 16);
    let deflate = MockSplitQueue::create(mem, GuestAddress(0x11_0000), 16);
    let mut queues = vec![
        inflate.create_queue().unwrap(),
        deflate.create_queue().unwrap(),
    ];
    let report = cfg.free_page_reporting.then(|| {
        let q = MockSplitQueue::create(mem, GuestAddress(0x12_0000), 16);
        queues.push(q.create_queue().unwrap());
        q
    });
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    dev.activate(mem.clone(), queues, Arc::new(Interrupt::new(fd.clone())))
        .unwrap();
    Rig {
        dev,
        inflate,
        deflate,
        report,
        _irq: fd,
    }
}

#[test]
fn features_queues_and_config_follow_the_configuration() {
    let plain = Balloon::new(BalloonConfig::default()).unwrap();
    assert_eq!(plain.device_type(), 5);
    assert_ne!(plain.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
    assert_eq!(plain.avail_features() & 0b10_0110, 0);
    assert_eq!(plain.queue_max_sizes().len(), 2);
    let mut all = Balloon::new(BalloonConfig {
        amount_mib: 3,
        deflate_on_oom: true,
        stats_polling_interval_s: 1,
        free_page_reporting: true,
    })
    .unwrap();
    assert_eq!(all.avail_features() & 0b10_0110, 0b10_0110);
    assert_eq!(all.queue_max_sizes().len(), 4);
    let mut cfg = [0u8; 8];
    all.read_config(0, &mut cfg);
    assert_eq!(cfg[..4], 768u32.to_le_bytes(), "num_pages: 3 MiB");
    // The driver writes `actual`; num_pages stays the device's.
    all.write_config(4, &77u32.to_le_bytes());
    all.write_config(0, &1u32.to_le_bytes());
    all.read_config(0, &mut cfg);
    assert_eq!(cfg[..4], 768u32.to_le_bytes());
    assert_eq!(cfg[4..], 77u32.to_le_bytes());
    assert_eq!(all.actual_pages(), 77);
    assert!(matches!(
        all.set_target_mib(5),
        Err(BalloonError::NotActivated)
    ));
}

/// Issue 16 item 3: hostile page frame numbers (outside RAM, in the gap, duplicates, a huge
/// count, a descriptor outside memory, a writable one) are ignored and counted; the valid ones
/// are discarded (read back as zero) and deflate takes them back.
#[test]
fn hostile_pfns_are_ignored_and_counted() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default());
    // A page with data, to see the discard.
    let page: u64 = 0x30_0000;
    mem.write_slice(&[0xab; 4096], GuestAddress(page)).unwrap();
    let list = [
        pfn(page),
        pfn(page) + 1,
        pfn(page),     // duplicate
        pfn(5 * MIB),  // in the gap
        pfn(64 * MIB), // beyond RAM
        u32::MAX,
        pfn(9 * MIB), // the second region
    ];
    let len = pfns(&mem, 0x20_0000, &list);
    let descs = [
        d(0x20_0000, len, 0),
        d(
            0x21_0000,
            4 * (u32::try_from(MAX_PFNS_PER_DESC).unwrap() + 1),
            0,
        ), // huge count
        d(0xffff_0000_0000, 64, 0), // outside memory
        d(0x20_0000, len, F_WRITE), // wrong direction
        d(0x20_0000, 6, 0),         // not whole entries
    ];
    r.inflate.add_desc_chains(&descs, 0).unwrap();
    r.dev.process_all();
    assert_eq!(r.inflate.used().idx().load(), 5, "every chain completed");
    let c = r.dev.counters();
    assert_eq!(c.inflated_pages, 3);
    assert_eq!(c.duplicate_pfns, 1);
    assert_eq!(c.invalid_pfns, 3);
    assert_eq!(c.oversized_descriptors, 1);
    assert_eq!(c.bad_descriptors, 3);
    assert_eq!(c.madvise_failures, 0);
    let mut back = [1u8; 4096];
    mem.read_slice(&mut back, GuestAddress(page)).unwrap();
    assert_eq!(back, [0u8; 4096], "the inflated page was given back");
    // Deflate: the inflated ones come back, the others are duplicates.
    let len = pfns(&mem, 0x22_0000, &[pfn(page), pfn(page), 7]);
    r.deflate
        .add_desc_chains(&[d(0x22_0000, len, 0)], 0)
        .unwrap();
    r.dev.process_all();
    let c = r.dev.counters();
    assert_eq!(c.deflated_pages, 1);
    assert_eq!(c.duplicate_pfns, 3);
}

#[test]
fn free_page_reports_discard_ranges_inside_ram_only() {
    let mem = mem();
    let mut r = rig(
        &mem,
        BalloonConfig {
            free_page_reporting: true,
            ..Default::default()
        },
    );
    mem.write_slice(&[0xcd; 8192], GuestAddress(0x30_0000))
        .unwrap();
    let report = r.report.take().unwrap();
    let descs = [
        d(0x30_0000, 0x2000, F_WRITE),
        d(5 * MIB, 0x1000, F_WRITE),          // in the gap
        d(4 * MIB - 0x1000, 0x2000, F_WRITE), // across the end of a region
        d(0x30_0001, 0x1000, F_WRITE),        // unaligned
    ];
    report.add_desc_chains(&descs, 0).unwrap();
    r.dev.process_all();
    let c = r.dev.counters();
    assert_eq!((c.reported_ranges, c.reported_bytes), (1, 0x2000));
    assert_eq!(c.invalid_reports, 3);
    let mut back = [1u8; 8192];
    mem.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(back, [0u8; 8192]);
}

#[test]
fn statistics_changes_follow_firecracker() {
    let mut off = Balloon::new(BalloonConfig::default()).unwrap();
    assert!(matches!(
        off.guest_stats(),
        Err(BalloonError::StatisticsDisabled)
    ));
    assert!(matches!(
        off.set_stats_interval(1),
        Err(BalloonError::StatisticsStateChange)
    ));
    let mut on = Balloon::new(BalloonConfig {
        stats_polling_interval_s: 1,
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(
        on.set_stats_interval(0),
        Err(BalloonError::StatisticsStateChange)
    ));
    assert_eq!(on.guest_stats().unwrap(), GuestStats::default());
}

#[test]
fn bitmap_bounds() {
    let mut b = PageBitmap { words: vec![0; 2] };
    assert!(b.set(127));
    assert!(!b.set(127));
    assert!(!b.set(128), "out of range is never set");
    assert!(b.clear(127));
    assert!(!b.clear(127));
    assert!(!b.clear(u64::MAX));
}

/// Found with Linux: the device holds the statistics buffer outside `drain_queue`, so it must
/// publish avail_event itself (EVENT_IDX), or the driver never kicks for its next buffer and
/// the statistics freeze after the first.
#[test]
fn statistics_buffer_is_held_parsed_returned_and_avail_event_published() {
    use crate::virtio::features::VIRTIO_RING_F_EVENT_IDX;
    let mem = mem();
    let mut dev = Balloon::new(BalloonConfig {
        stats_polling_interval_s: 1,
        ..Default::default()
    })
    .unwrap();
    dev.set_acked_features(dev.avail_features());
    assert_ne!(dev.acked_features() & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    let inflate = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    let deflate = MockSplitQueue::create(&mem, GuestAddress(0x11_0000), 16);
    let stats = MockSplitQueue::create(&mem, GuestAddress(0x12_0000), 16);
    let mut queues = Vec::new();
    for q in [&inflate, &deflate, &stats] {
        let mut q: Queue = q.create_queue().unwrap();
        q.set_event_idx(true);
        queues.push(q);
    }
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    dev.activate(mem.clone(), queues, Arc::new(Interrupt::new(fd.clone())))
        .unwrap();
    // Two entries: MemTotal (5) = 1 GiB, MemFree (4) = 1 MiB, and an unknown tag.
    let mut buf = Vec::new();
    for (tag, v) in [(5u16, 1u64 << 30), (4, 1 << 20), (999, 7)] {
        buf.extend_from_slice(&tag.to_le_bytes());
        buf.extend_from_slice(&v.to_le_bytes());
    }
    mem.write_slice(&buf, GuestAddress(0x20_0000)).unwrap();
    let len = u32::try_from(buf.len()).unwrap();
    stats.add_desc_chains(&[d(0x20_0000, len, 0)], 0).unwrap();
    dev.process_all();
    let g = dev.guest_stats().unwrap();
    assert_eq!(g.get(super::super::tags::MEMTOT), Some(1 << 30));
    assert_eq!(g.get(super::super::tags::MEMFREE), Some(1 << 20));
    assert_eq!(
        stats.used().idx().load(),
        0,
        "the buffer is held until the next poll"
    );
    // avail_event (after the used ring's entries) tells the driver to kick for entry 1.
    let avail_event: u16 = mem
        .read_obj(GuestAddress(stats.used_addr().0 + 4 + 8 * 16))
        .unwrap();
    assert_eq!(avail_event, 1, "avail_event not published");
    // A poll (the timer, or a new interval) returns it.
    dev.set_stats_interval(2).unwrap();
    assert_eq!(stats.used().idx().load(), 1);
}

/// Issue 17 item 2: the balloon's own state crosses a snapshot. A device restored from
/// `state()` has the target, actual, counters and inflated set of the first: a deflate of a
/// page inflated before the snapshot is a deflate (not a duplicate), an inflate of it again
/// a duplicate.
#[test]
fn state_round_trips_into_a_new_device() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default());
    let pages = [pfn(0x30_0000), pfn(0x30_1000), pfn(0x30_2000), pfn(9 * MIB)];
    let len = pfns(&mem, 0x20_0000, &pages);
    r.inflate
        .add_desc_chains(&[d(0x20_0000, len, 0)], 0)
        .unwrap();
    r.dev.process_all();
    r.dev.write_config(4, &4u32.to_le_bytes());
    let saved = r.dev.state();
    assert_eq!(
        saved.inflated,
        vec![(u64::from(pages[0]), 3), (u64::from(pages[3]), 1)]
    );
    assert_eq!(saved.actual_pages, 4);
    assert_eq!(saved.counters.inflated_pages, 4);
    // Through the state file's encoding.
    let saved: BalloonState =
        serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

    let mut n = rig(&mem, BalloonConfig::default());
    n.dev.restore_state(&saved).unwrap();
    assert_eq!(n.dev.state(), saved);
    assert_eq!(n.dev.actual_pages(), 4);
    let len = pfns(&mem, 0x22_0000, &pages[..2]);
    n.deflate
        .add_desc_chains(&[d(0x22_0000, len, 0)], 0)
        .unwrap();
    n.dev.process_all();
    let c = n.dev.counters();
    assert_eq!(c.deflated_pages, 2, "{c:?}");
    assert_eq!(c.duplicate_pfns, 0, "{c:?}");
    let len = pfns(&mem, 0x23_0000, &pages[2..]);
    n.inflate
        .add_desc_chains(&[d(0x23_0000, len, 0)], 0)
        .unwrap();
    n.dev.process_all();
    assert_eq!(n.dev.counters().duplicate_pfns, 2, "still inflated");
}

/// A snapshot's balloon state that does not fit is refused, naming what is wrong, and changes
/// nothing.
#[test]
fn a_state_that_does_not_fit_is_refused() {
    let mem = mem();
    let mut r = rig(&mem, BalloonConfig::default());
    let before = r.dev.state();
    let bad = [
        (
            BalloonState {
                stats_interval_s: 3,
                ..Default::default()
            },
            "statistics interval 3 s in the snapshot, but this balloon's statistics are off",
        ),
        (
            BalloonState {
                stats_head: Some(2),
                ..Default::default()
            },
            "statistics buffer 2 held, but the statistics queue is not running",
        ),
        (
            BalloonState {
                inflated: vec![(u64::MAX, 2)],
                ..Default::default()
            },
            "inflated pages 0xffffffffffffffff+2 are outside guest memory or out of order",
        ),
        (
            BalloonState {
                inflated: vec![(10, 5), (12, 1)],
                ..Default::default()
            },
            "inflated pages 0xc+1 are outside guest memory or out of order",
        ),
        (
            BalloonState {
                inflated: vec![(3 * 1024, 1024)],
                ..Default::default()
            },
            "inflated pages 0xc00+1024 are outside guest memory or out of order",
        ),
    ];
    for (s, msg) in bad {
        let e = r.dev.restore_state(&s).unwrap_err();
        assert_eq!(e.to_string(), msg);
        assert_eq!(r.dev.state(), before);
    }
    // A device the driver never started takes no inflated pages.
    let mut idle = Balloon::new(BalloonConfig::default()).unwrap();
    let e = idle
        .restore_state(&BalloonState {
            inflated: vec![(1, 2)],
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(e, BalloonRestoreError::NotActive(2));
    // ...but its target comes back.
    idle.restore_state(&BalloonState {
        target_pages: 9,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(idle.target_pages(), 9);
}
