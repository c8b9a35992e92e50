//! The virtio-balloon device model.

use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::persist::{runs_of, BalloonRestoreError, BalloonState};
use super::{
    features, BalloonCounters, BalloonError, GuestStats, MAX_PFNS_PER_DESC, MAX_STATS, PAGE_SIZE,
    PFN_SHIFT, QUEUE_SIZE,
};
use crate::virtio::device_core::{DeviceCore, DRAIN_BUDGET};
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::{device_type, ActivateError, Interrupt, VirtioDevice, COMMON_FEATURES};
use crate::GuestMemoryMmap;

/// Bytes of the config space: num_pages, actual, free_page_hint_cmd_id, poison_val.
const CONFIG_LEN: usize = 16;
/// Offset of `actual` (the only field the driver writes).
const ACTUAL_OFFSET: u64 = 4;
/// Bytes of one statistics entry: le16 tag, le64 value.
const STAT_LEN: usize = 10;

/// Queue indexes of the fixed queues.
const INFLATE: usize = 0;
const DEFLATE: usize = 1;

/// How the balloon is set up at boot (`PUT /balloon`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Target size in MiB.
    pub amount_mib: u32,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0 disables the statistics queue.
    pub stats_polling_interval_s: u16,
    /// Offer VIRTIO_BALLOON_F_FREE_PAGE_REPORTING.
    pub free_page_reporting: bool,
}

/// Pages in `mib` MiB.
pub fn mib_to_pages(mib: u32) -> u32 {
    mib.saturating_mul(256)
}

/// The inflated pages, one bit per 4 KiB page frame up to the end of guest memory.
#[derive(Debug, Default)]
struct PageBitmap {
    words: Vec<u64>,
}

impl PageBitmap {
    fn sized_for(mem: &GuestMemoryMmap) -> Self {
        let frames = (mem.last_addr().0 >> PFN_SHIFT) + 1;
        let words = usize::try_from(frames.div_ceil(64)).unwrap_or(0);
        PageBitmap {
            words: vec![0; words],
        }
    }

    /// Sets bit `pfn`; returns whether it was clear. Out-of-range bits are never set.
    fn set(&mut self, pfn: u64) -> bool {
        let Some(w) = usize::try_from(pfn / 64)
            .ok()
            .and_then(|i| self.words.get_mut(i))
        else {
            return false;
        };
        let bit = 1u64 << (pfn % 64);
        let was_clear = *w & bit == 0;
        *w |= bit;
        was_clear
    }

    /// How many page frames the bitmap covers.
    fn frames(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// Clears bit `pfn`; returns whether it was set.
    fn clear(&mut self, pfn: u64) -> bool {
        let Some(w) = usize::try_from(pfn / 64)
            .ok()
            .and_then(|i| self.words.get_mut(i))
        else {
            return false;
        };
        let bit = 1u64 << (pfn % 64);
        let was_set = *w & bit != 0;
        *w &= !bit;
        was_set
    }
}

/// Gives the host pages of `[gpa, gpa + len)` back: `MADV_DONTNEED` on their mapping. The range
/// must be page-aligned and lie inside one guest RAM region; returns false (and does nothing)
/// otherwise, or when the host refuses.
pub fn discard_range(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Result<(), DiscardError> {
    if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(DiscardError::Outside);
    }
    let region = mem
        .find_region(GuestAddress(gpa))
        .ok_or(DiscardError::Outside)?;
    let off = gpa - region.start_addr().0;
    if off.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err(DiscardError::Outside);
    }
    let host = mem
        .get_host_address(GuestAddress(gpa))
        .map_err(|_| DiscardError::Outside)?;
    let len = usize::try_from(len).map_err(|_| DiscardError::Outside)?;
    // SAFETY: `host` .. `host + len` lies inside one guest RAM region (checked above against
    // the region's bounds), a private anonymous mapping this process made and keeps for the
    // life of the VM. MADV_DONTNEED drops the pages' contents (the guest gave them up); the
    // mapping stays valid and reads back zeros, so no host reference into it is invalidated.
    let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(DiscardError::Madvise(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Why [`discard_range`] did nothing.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range is not page-aligned inside one RAM region.
    #[error("range outside guest RAM")]
    Outside,
    /// madvise failed.
    #[error("madvise(MADV_DONTNEED): {0}")]
    Madvise(std::io::Error),
}

/// A virtio-balloon device.
#[derive(Debug)]
pub struct Balloon {
    pub(super) core: DeviceCore,
    cfg: BalloonConfig,
    target_pages: u32,
    actual_pages: u32,
    stats_interval_s: u16,
    /// Queue index of the statistics queue, of the reporting queue (from the acked features).
    stats_q: Option<usize>,
    report_q: Option<usize>,
    /// The statistics buffer the device holds until the next poll.
    stats_head: Option<u16>,
    guest_stats: GuestStats,
    inflated: PageBitmap,
    counters: BalloonCounters,
    /// Fires every `stats_interval_s`: the held statistics buffer goes back to the guest.
    pub(super) timer: TimerFd,
}

impl Balloon {
    /// Builds the device for `cfg`: the statistics queue exists when an interval is set, the
    /// reporting queue when free page reporting is on.
    pub fn new(cfg: BalloonConfig) -> Result<Self, BalloonError> {
        let mut avail = COMMON_FEATURES;
        let mut queues = vec![QUEUE_SIZE, QUEUE_SIZE];
        if cfg.stats_polling_interval_s > 0 {
            avail |= 1 << features::STATS_VQ;
            queues.push(QUEUE_SIZE);
        }
        if cfg.deflate_on_oom {
            avail |= 1 << features::DEFLATE_ON_OOM;
        }
        if cfg.free_page_reporting {
            avail |= 1 << features::FREE_PAGE_REPORTING;
            queues.push(QUEUE_SIZE);
        }
        Ok(Balloon {
            core: DeviceCore::new("virtio-balloon", avail, Vec::new(), &queues)
                .map_err(BalloonError::EventFd)?,
            cfg,
            target_pages: mib_to_pages(cfg.amount_mib),
            actual_pages: 0,
            stats_interval_s: cfg.stats_polling_interval_s,
            stats_q: None,
            report_q: None,
            stats_head: None,
            guest_stats: GuestStats::default(),
            inflated: PageBitmap::default(),
            counters: BalloonCounters::default(),
            timer: TimerFd::new().map_err(|e| BalloonError::TimerFd(e.into()))?,
        })
    }

    /// Written once per activation; the event loop reacts by registering the queue events.
    pub fn activate_event(&self) -> &EventFd {
        self.core.activate_event()
    }

    /// What the device did so far.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// The target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// The size the driver reports it has reached, in 4 KiB pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// The statistics polling interval (0: disabled).
    pub fn stats_interval_s(&self) -> u16 {
        self.stats_interval_s
    }

    /// The guest's latest statistics; refused when the statistics queue is off.
    pub fn guest_stats(&self) -> Result<GuestStats, BalloonError> {
        if self.cfg.stats_polling_interval_s == 0 {
            return Err(BalloonError::StatisticsDisabled);
        }
        Ok(self.guest_stats)
    }

    /// Sets a new target (`PATCH /balloon`) and tells the driver (config change interrupt).
    pub fn set_target_mib(&mut self, mib: u32) -> Result<(), BalloonError> {
        let Some(active) = self.core.active() else {
            return Err(BalloonError::NotActivated);
        };
        self.target_pages = mib_to_pages(mib);
        if let Err(e) = active.interrupt.signal_config_change() {
            warn_ratelimited!("virtio-balloon: cannot raise the config-change interrupt: {e}");
        }
        Ok(())
    }

    /// Sets a new statistics interval (`PATCH /balloon/statistics`): the statistics cannot be
    /// turned on or off after boot. The next update is asked for at once.
    pub fn set_stats_interval(&mut self, secs: u16) -> Result<(), BalloonError> {
        if (secs == 0) != (self.cfg.stats_polling_interval_s == 0) {
            return Err(BalloonError::StatisticsStateChange);
        }
        if !self.core.is_activated() {
            return Err(BalloonError::NotActivated);
        }
        self.stats_interval_s = secs;
        self.arm_timer().map_err(BalloonError::Timer)?;
        self.return_stats_buffer();
        Ok(())
    }

    /// The device's own state for a snapshot (the VM paused): target, actual, statistics
    /// interval and held buffer, the guest's statistics, the inflated pages, the counters.
    pub fn state(&self) -> BalloonState {
        BalloonState {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            stats_interval_s: self.stats_interval_s,
            stats_head: self.stats_head,
            guest_stats: self.guest_stats.values.to_vec(),
            inflated: runs_of(&self.inflated.words),
            counters: self.counters,
        }
    }

    /// Takes back a snapshot's [`BalloonState`], after the transport's restore activated the
    /// device again (so the statistics queue and the guest memory are known). A state that
    /// does not fit this balloon is refused and changes nothing. The statistics timer is armed
    /// by the device loop when it sees the activation, with the restored interval.
    pub fn restore_state(&mut self, s: &BalloonState) -> Result<(), BalloonRestoreError> {
        if (s.stats_interval_s == 0) != (self.cfg.stats_polling_interval_s == 0) {
            return Err(BalloonRestoreError::StatsMismatch {
                saved: s.stats_interval_s,
                here: if self.cfg.stats_polling_interval_s == 0 {
                    "off"
                } else {
                    "on"
                },
            });
        }
        let guest_stats = s.stats()?;
        if let Some(head) = s.stats_head {
            let size = self
                .stats_q
                .and_then(|q| self.core.active().and_then(|a| a.queues.get(q)))
                .map(|q| q.size());
            match size {
                None => {
                    return Err(BalloonRestoreError::StatsHead {
                        head,
                        why: "is not running",
                    })
                }
                Some(n) if head >= n => {
                    return Err(BalloonRestoreError::StatsHead {
                        head,
                        why: "is smaller",
                    })
                }
                Some(_) => {}
            }
        }
        let mut inflated = PageBitmap::default();
        if !s.inflated.is_empty() {
            let Some(active) = self.core.active() else {
                let n = s
                    .inflated
                    .iter()
                    .map(|r| r.1)
                    .fold(0u64, u64::saturating_add);
                return Err(BalloonRestoreError::NotActive(n));
            };
            inflated = PageBitmap::sized_for(&active.mem);
            let mut next = 0u64;
            for &(first, count) in &s.inflated {
                let end = first.checked_add(count);
                if count == 0 || first < next || end.is_none_or(|e| e > inflated.frames()) {
                    return Err(BalloonRestoreError::BadRun { first, count });
                }
                next = first + count;
                for pfn in first..next {
                    inflated.set(pfn);
                }
            }
        }
        self.target_pages = s.target_pages;
        self.actual_pages = s.actual_pages;
        self.stats_interval_s = s.stats_interval_s;
        self.stats_head = s.stats_head;
        self.guest_stats = guest_stats;
        if self.core.is_activated() {
            self.inflated = inflated;
        }
        self.counters = s.counters;
        Ok(())
    }

    fn arm_timer(&mut self) -> std::io::Result<()> {
        if self.stats_interval_s == 0 || self.stats_q.is_none() {
            return Ok(());
        }
        let every = Duration::from_secs(u64::from(self.stats_interval_s));
        self.timer
            .reset(every, Some(every))
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    /// Everything the device does when the event loop says a queue (or the activation) is
    /// ready: each queue is drained (bounded per pass).
    pub(super) fn process_all(&mut self) {
        self.process_pfn_queue(INFLATE);
        self.process_pfn_queue(DEFLATE);
        self.process_stats_queue();
        self.process_report_queue();
    }

    pub(super) fn on_activated(&mut self) {
        if let Err(e) = self.arm_timer() {
            warn_ratelimited!("virtio-balloon: cannot arm the statistics timer: {e}");
        }
        self.process_all();
    }

    pub(super) fn on_queue(&mut self, index: usize) {
        match index {
            INFLATE | DEFLATE => self.process_pfn_queue(index),
            i if Some(i) == self.stats_q => self.process_stats_queue(),
            i if Some(i) == self.report_q => self.process_report_queue(),
            _ => {}
        }
    }

    /// The statistics timer fired: hand the held buffer back so the driver refills it.
    pub(super) fn on_timer(&mut self) {
        if let Err(e) = self.timer.wait() {
            warn_ratelimited!("virtio-balloon: cannot read the statistics timer: {e}");
        }
        self.return_stats_buffer();
    }

    fn return_stats_buffer(&mut self) {
        let (Some(q), Some(head)) = (self.stats_q, self.stats_head.take()) else {
            return;
        };
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let mem = &active.mem;
        if let Some(queue) = active.queues.get_mut(q) {
            if let Err(e) = queue.add_used(mem, head, 0) {
                warn_ratelimited!("virtio-balloon: statistics queue: {e}");
            }
        }
        active.signal_used(q);
    }

    /// Inflate (`index` 0) or deflate (1): every chain is a list of le32 page frame numbers.
    fn process_pfn_queue(&mut self, index: usize) {
        let inflate = index == INFLATE;
        let Some(active) = self.core.active_mut() else {
            return;
        };
        if self.inflated.words.is_empty() {
            self.inflated = PageBitmap::sized_for(&active.mem);
        }
        let counters = &mut self.counters;
        let bitmap = &mut self.inflated;
        active.drain_queue(index, |chain, mem| {
            // At most MAX_PFNS_PER_DESC frames per chain, whatever its descriptors: one pass
            // of the device loop stays bounded.
            let mut left = MAX_PFNS_PER_DESC;
            for desc in chain {
                if desc.is_write_only() {
                    counters.bad_descriptors += 1;
                    continue;
                }
                let len = desc.len() as usize;
                if !len.is_multiple_of(4) {
                    counters.bad_descriptors += 1;
                    continue;
                }
                if len / 4 > left {
                    counters.oversized_descriptors += 1;
                    continue;
                }
                left -= len / 4;
                let mut buf = vec![0u8; len];
                if mem.read_slice(&mut buf, desc.addr()).is_err() {
                    counters.bad_descriptors += 1;
                    continue;
                }
                let pfns = buf
                    .chunks_exact(4)
                    .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                apply_pfns(mem, pfns, inflate, bitmap, counters);
            }
            0
        });
    }

    fn process_stats_queue(&mut self) {
        let Some(q) = self.stats_q else {
            return;
        };
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(q) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        // The driver keeps one buffer posted; a second one means it gave up on the first,
        // which then goes back. Bounded by the ring's size.
        for _ in 0..DRAIN_BUDGET {
            let chain = match queue.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    warn_ratelimited!("virtio-balloon: statistics queue: {e}");
                    break;
                }
            };
            let Some(chain) = chain else {
                // Publish avail_event (EVENT_IDX): without it the driver never kicks for its
                // next buffer. More arrived meanwhile: look again.
                match queue.enable_notification(mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        warn_ratelimited!("virtio-balloon: statistics queue: {e}");
                        break;
                    }
                }
            };
            if let Some(old) = self.stats_head.replace(chain.head_index()) {
                if let Err(e) = queue.add_used(mem, old, 0) {
                    warn_ratelimited!("virtio-balloon: statistics queue: {e}");
                }
            }
            self.counters.stats_updates += 1;
            parse_stats(chain, mem, &mut self.guest_stats, &mut self.counters);
        }
    }

    fn process_report_queue(&mut self) {
        let Some(q) = self.report_q else {
            return;
        };
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let counters = &mut self.counters;
        active.drain_queue(q, |chain, mem| {
            for desc in chain {
                let (gpa, len) = (desc.addr().0, u64::from(desc.len()));
                match discard_range(mem, gpa, len) {
                    Ok(()) => {
                        counters.reported_ranges += 1;
                        counters.reported_bytes += len;
                    }
                    Err(DiscardError::Outside) => counters.invalid_reports += 1,
                    Err(DiscardError::Madvise(e)) => {
                        counters.madvise_failures += 1;
                        warn_ratelimited!("virtio-balloon: free page report: {e}");
                    }
                }
            }
            0
        });
    }
}

/// Applies a list of page frame numbers: each must be a whole page of guest RAM, and (inflate)
/// not inflated or (deflate) inflated; the others are counted and ignored. Inflated pages are
/// discarded in runs of contiguous frames.
fn apply_pfns(
    mem: &GuestMemoryMmap,
    pfns: impl Iterator<Item = u64>,
    inflate: bool,
    bitmap: &mut PageBitmap,
    counters: &mut BalloonCounters,
) {
    let mut run: Option<(u64, u64)> = None; // (first pfn, count)
    let flush = |run: (u64, u64), counters: &mut BalloonCounters| {
        if let Err(e) = discard_range(mem, run.0 << PFN_SHIFT, run.1 << PFN_SHIFT) {
            counters.madvise_failures += 1;
            warn_ratelimited!("virtio-balloon: inflate: {e}");
        }
    };
    for pfn in pfns {
        let gpa = pfn << PFN_SHIFT;
        let in_ram = mem
            .find_region(GuestAddress(gpa))
            .is_some_and(|r| gpa - r.start_addr().0 + PAGE_SIZE <= r.len());
        if !in_ram {
            counters.invalid_pfns += 1;
            continue;
        }
        if inflate {
            if !bitmap.set(pfn) {
                counters.duplicate_pfns += 1;
                continue;
            }
            counters.inflated_pages += 1;
            run = match run {
                // Contiguous frames inside one region (find_region of the run's first frame
                // holds this one too when it is the next frame: checked by discard_range).
                Some((first, n)) if first + n == pfn => Some((first, n + 1)),
                Some(r) => {
                    flush(r, counters);
                    Some((pfn, 1))
                }
                None => Some((pfn, 1)),
            };
        } else {
            if !bitmap.clear(pfn) {
                counters.duplicate_pfns += 1;
                continue;
            }
            counters.deflated_pages += 1;
        }
    }
    if let Some(r) = run {
        flush(r, counters);
    }
}

/// Reads the statistics of one buffer (device-readable descriptors, le16 tag + le64 value
/// each, at most [`MAX_STATS`] entries); unknown tags are ignored.
fn parse_stats<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    stats: &mut GuestStats,
    counters: &mut BalloonCounters,
) where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut left = MAX_STATS * STAT_LEN;
    for desc in chain {
        if desc.is_write_only() {
            counters.bad_descriptors += 1;
            continue;
        }
        let len = (desc.len() as usize).min(left);
        let len = len - len % STAT_LEN;
        let mut buf = vec![0u8; len];
        if mem.read_slice(&mut buf, desc.addr()).is_err() {
            counters.bad_descriptors += 1;
            continue;
        }
        for e in buf.chunks_exact(STAT_LEN) {
            let tag = usize::from(u16::from_le_bytes([e[0], e[1]]));
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            if let Some(slot) = stats.values.get_mut(tag) {
                *slot = Some(u64::from_le_bytes(v));
            }
        }
        left -= len;
        if left == 0 {
            break;
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn avail_features(&self) -> u64 {
        self.core.avail_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.core.set_acked_features(features);
    }

    fn acked_features(&self) -> u64 {
        self.core.acked_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.core.queue_max_sizes()
    }

    fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[0..4].copy_from_slice(&self.target_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        crate::virtio::read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is the driver's; the bytes of a write that fall on it are taken.
        let mut actual = self.actual_pages.to_le_bytes();
        let mut took = false;
        for (at, b) in (offset..).zip(data) {
            let slot = at
                .checked_sub(ACTUAL_OFFSET)
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| actual.get_mut(i));
            if let Some(slot) = slot {
                *slot = *b;
                took = true;
            }
        }
        if took {
            self.actual_pages = u32::from_le_bytes(actual);
        } else {
            warn_ratelimited!(
                "virtio-balloon: {}-byte write to read-only config space at {offset:#x} ignored",
                data.len()
            );
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.core.is_activated() {
            return Err(ActivateError::AlreadyActive);
        }
        // The driver sets up the queues of the features it acked, numbered in order (virtio
        // 1.2 §5.5.2): inflate, deflate, then statistics and reporting when acked.
        let mut next = 2;
        let mut take = |bit: u32| {
            self.core.acked(bit).then(|| {
                next += 1;
                next - 1
            })
        };
        let stats_q = take(features::STATS_VQ);
        let report_q = take(features::FREE_PAGE_REPORTING);
        if queues.len() != self.core.queue_max_sizes().len() {
            return Err(ActivateError::QueueCount {
                expected: self.core.queue_max_sizes().len(),
                got: queues.len(),
            });
        }
        if let Some(i) = queues.iter().take(next).position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(i));
        }
        self.stats_q = stats_q;
        self.report_q = report_q;
        self.stats_head = None;
        self.inflated = PageBitmap::sized_for(&mem);
        self.core.commit_activate(mem, queues, interrupt)
    }

    fn reset(&mut self) {
        // The timer is left running (this runs on a vCPU thread, whose filter has no
        // timerfd_settime): without a statistics queue its ticks do nothing, and the next
        // activation re-arms it from the device loop.
        self.stats_head = None;
        self.stats_q = None;
        self.report_q = None;
        self.actual_pages = 0;
        self.inflated = PageBitmap::default();
        self.core.reset();
    }

    fn is_activated(&self) -> bool {
        self.core.is_activated()
    }

    fn active_queues(&self) -> Vec<virtio_queue::QueueState> {
        // Without it a snapshot of a running balloon did not load back ("the running device's
        // queues are missing").
        self.core
            .active()
            .map(|a| a.queues.iter().map(Queue::state).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
