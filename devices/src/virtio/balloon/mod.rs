//! virtio-balloon (virtio 1.2 §5.5), Firecracker-compatible.
//!
//! * [`device`]: the [`Balloon`] model: config space (target and actual size), the inflate
//!   and deflate queues, the statistics queue (when a polling interval is set) and the free
//!   page reporting queue (when enabled).
//! * [`event_handler`]: how the event loop drives a [`Balloon`].
//! * [`persist`]: its own state in a snapshot (target, actual, statistics, inflated pages).
//!
//! Inflating hands guest pages back to the host: each page frame number the guest puts on the
//! inflate queue is checked (inside guest RAM, not already inflated) and its host mapping (a
//! private anonymous mapping) gets `MADV_DONTNEED`, which frees it; the next guest access
//! (after a deflate) faults in a zero page. Free page reporting does the same for the ranges
//! the guest reports free. Everything the guest hands over is hostile input: a page frame
//! number outside RAM or a duplicate is ignored and counted, a descriptor with more page frame
//! numbers than [`MAX_PFNS_PER_DESC`] (in one chain) is ignored whole and counted, a descriptor outside guest
//! memory is counted; none of it stops the device.

pub mod device;
pub mod event_handler;
pub mod persist;

use std::io;

use serde::{Deserialize, Serialize};

pub use device::{Balloon, BalloonConfig};
pub use persist::{BalloonRestoreError, BalloonState};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Page frame numbers are of 4 KiB pages, whatever the guest's page size (virtio 1.2 §5.5.6).
pub const PFN_SHIFT: u32 = 12;
/// Bytes of a balloon page.
pub const PAGE_SIZE: u64 = 1 << PFN_SHIFT;
/// Most page frame numbers one chain may carry (Linux sends at most 256 per request); a
/// descriptor that would go past it is ignored whole and counted in `oversized_descriptors`.
pub const MAX_PFNS_PER_DESC: usize = 1024;
/// Most statistics entries read from one statistics buffer (virtio 1.2 defines 10, Linux 6.12
/// sends 16).
pub const MAX_STATS: usize = 64;

/// Feature bits (virtio 1.2 §5.5.3).
pub mod features {
    /// The driver reports memory statistics on the statistics queue.
    pub const STATS_VQ: u32 = 1;
    /// The guest deflates the balloon when it runs out of memory.
    pub const DEFLATE_ON_OOM: u32 = 2;
    /// Free page hinting (not offered).
    pub const FREE_PAGE_HINT: u32 = 3;
    /// The device reports free pages on the reporting queue.
    pub const FREE_PAGE_REPORTING: u32 = 5;
}

/// Errors creating a [`Balloon`].
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// Creating an event fd failed.
    #[error("cannot create an event fd for the virtio-balloon device: {0}")]
    EventFd(io::Error),
    /// Creating the statistics timer failed.
    #[error("cannot create the virtio-balloon statistics timer: {0}")]
    TimerFd(io::Error),
    /// A runtime change needs the guest's driver, which has not started the device.
    #[error("Device not activated yet.")]
    NotActivated,
    /// The statistics queue was not offered at boot (or was, and cannot go away).
    #[error("Statistics cannot be enabled/disabled after activation.")]
    StatisticsStateChange,
    /// Statistics were asked for and are disabled.
    #[error("Received stats query when stats are disabled.")]
    StatisticsDisabled,
    /// Arming the statistics timer failed.
    #[error("cannot arm the statistics timer: {0}")]
    Timer(io::Error),
}

/// What the device did with what the guest handed it (cumulative; the `balloon` metrics
/// section).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalloonCounters {
    /// Pages inflated (given back to the host).
    pub inflated_pages: u64,
    /// Pages deflated (given back to the guest).
    pub deflated_pages: u64,
    /// Page frame numbers outside guest RAM (beyond it, or in the MMIO gap): ignored.
    pub invalid_pfns: u64,
    /// Page frame numbers inflated while inflated, or deflated while not: ignored.
    pub duplicate_pfns: u64,
    /// Descriptors with more than [`MAX_PFNS_PER_DESC`] page frame numbers: ignored whole.
    pub oversized_descriptors: u64,
    /// Descriptors outside guest memory, of the wrong direction, or of a length that is not a
    /// whole number of entries: ignored.
    pub bad_descriptors: u64,
    /// madvise calls the host refused.
    pub madvise_failures: u64,
    /// Free page reports served.
    pub reported_ranges: u64,
    /// Bytes the free page reports gave back.
    pub reported_bytes: u64,
    /// Free page report ranges outside guest RAM: ignored.
    pub invalid_reports: u64,
    /// Statistics buffers received from the guest.
    pub stats_updates: u64,
}

/// The guest's latest memory statistics (virtio 1.2 §5.5.6.3), `None` until reported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GuestStats {
    /// Indexed by tag (0 swap_in .. 15 direct_reclaim).
    pub values: [Option<u64>; 16],
}

impl GuestStats {
    /// The value of `tag`, if the guest reported it.
    pub fn get(&self, tag: usize) -> Option<u64> {
        self.values.get(tag).copied().flatten()
    }
}

/// Statistics tags (virtio 1.2 §5.5.6.3 and Linux's additions).
pub mod tags {
    /// Pages swapped in.
    pub const SWAP_IN: usize = 0;
    /// Pages swapped out.
    pub const SWAP_OUT: usize = 1;
    /// Major page faults.
    pub const MAJFLT: usize = 2;
    /// Minor page faults.
    pub const MINFLT: usize = 3;
    /// Free memory, bytes.
    pub const MEMFREE: usize = 4;
    /// Total memory, bytes.
    pub const MEMTOT: usize = 5;
    /// Available memory, bytes.
    pub const AVAIL: usize = 6;
    /// Disk caches, bytes.
    pub const CACHES: usize = 7;
    /// Huge page allocations.
    pub const HTLB_PGALLOC: usize = 8;
    /// Huge page allocation failures.
    pub const HTLB_PGFAIL: usize = 9;
    /// OOM kills.
    pub const OOM_KILLS: usize = 10;
    /// Allocation stalls.
    pub const ALLOC_STALL: usize = 11;
    /// Pages scanned by kswapd.
    pub const ASYNC_SCAN: usize = 12;
    /// Pages scanned directly.
    pub const DIRECT_SCAN: usize = 13;
    /// Pages reclaimed by kswapd.
    pub const ASYNC_RECLAIM: usize = 14;
    /// Pages reclaimed directly.
    pub const DIRECT_RECLAIM: usize = 15;
}
