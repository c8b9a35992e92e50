//! The balloon's own state in a snapshot (the transport, its queues and interrupt status are
//! saved generically by [`crate::virtio::TransportState`]).
//!
//! What a Firecracker user expects back after a restore: the target and the size the driver
//! reached (`GET /balloon`), the statistics interval and the statistics buffer the device holds
//! (without it the driver waits for it forever and `GET /balloon/statistics` stops changing),
//! the guest's last statistics, the set of inflated pages (a deflate after the restore is a
//! deflate, not a duplicate) and the counters of the metrics' `balloon` section.
//!
//! Every field has a serde default, so a state file written before this existed still loads
//! (the balloon then starts empty, as it did). The inflated pages are stored as runs
//! `(first page frame number, count)`: an inflated balloon is mostly contiguous.

use serde::{Deserialize, Serialize};

use super::{BalloonCounters, GuestStats};

/// A [`super::Balloon`]'s state in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalloonState {
    /// `num_pages`: the target, in 4 KiB pages.
    pub target_pages: u32,
    /// `actual`: the size the driver reported, in 4 KiB pages.
    pub actual_pages: u32,
    /// The statistics interval in seconds (`PATCH /balloon/statistics` may have changed it).
    pub stats_interval_s: u16,
    /// The head of the statistics buffer the device holds until the next poll.
    pub stats_head: Option<u16>,
    /// The guest's latest statistics, by tag.
    pub guest_stats: Vec<Option<u64>>,
    /// The inflated page frames, as runs `(first, count)`, ascending.
    pub inflated: Vec<(u64, u64)>,
    /// The metrics' counters.
    pub counters: BalloonCounters,
}

/// Why a snapshot's balloon state does not fit the balloon it is restored into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BalloonRestoreError {
    /// The statistics are on in one and off in the other.
    #[error(
        "statistics interval {saved} s in the snapshot, but this balloon's statistics are {here}"
    )]
    StatsMismatch {
        /// The interval in the snapshot.
        saved: u16,
        /// "on" or "off".
        here: &'static str,
    },
    /// A held statistics buffer without a running statistics queue, or past its ring.
    #[error("statistics buffer {head} held, but the statistics queue {why}")]
    StatsHead {
        /// The descriptor head.
        head: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// Inflated pages on a device the driver had not started.
    #[error("{0} inflated pages on a balloon whose driver had not started it")]
    NotActive(u64),
    /// An inflated run outside guest memory (or overlapping, or not ascending).
    #[error("inflated pages {first:#x}+{count} are outside guest memory or out of order")]
    BadRun {
        /// First page frame number of the run.
        first: u64,
        /// Its length.
        count: u64,
    },
    /// More statistics tags than the device knows.
    #[error("{0} statistics tags in the snapshot, at most 16")]
    TooManyStats(usize),
}

impl BalloonState {
    /// The guest statistics as the device holds them.
    pub(super) fn stats(&self) -> Result<GuestStats, BalloonRestoreError> {
        let mut s = GuestStats::default();
        if self.guest_stats.len() > s.values.len() {
            return Err(BalloonRestoreError::TooManyStats(self.guest_stats.len()));
        }
        for (slot, v) in s.values.iter_mut().zip(&self.guest_stats) {
            *slot = *v;
        }
        Ok(s)
    }
}

/// The runs `(first, count)` of set bits in `words` (bit `i` of word `w` is frame `64 w + i`).
pub(super) fn runs_of(words: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (wi, &w) in words.iter().enumerate() {
        if w == 0 {
            continue;
        }
        for bit in 0..64u64 {
            if w & (1 << bit) == 0 {
                continue;
            }
            let pfn = wi as u64 * 64 + bit;
            match out.last_mut() {
                Some((first, n)) if *first + *n == pfn => *n += 1,
                _ => out.push((pfn, 1)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_a_bitmap() {
        assert!(runs_of(&[0, 0]).is_empty());
        assert_eq!(runs_of(&[0b1110, 0]), vec![(1, 3)]);
        assert_eq!(
            runs_of(&[1 << 63, 0b11, 0, 1]),
            vec![(63, 3), (192, 1)],
            "a run across words, then another"
        );
        assert_eq!(runs_of(&[u64::MAX, u64::MAX]), vec![(0, 128)]);
    }

    #[test]
    fn an_old_state_file_without_the_balloon_fields_loads() {
        let s: BalloonState = serde_json::from_str("{}").unwrap();
        assert_eq!(s, BalloonState::default());
        let s: BalloonState = serde_json::from_str(r#"{"target_pages": 5}"#).unwrap();
        assert_eq!(s.target_pages, 5);
        assert!(s.inflated.is_empty());
    }

    #[test]
    fn too_many_statistics_are_refused() {
        let s = BalloonState {
            guest_stats: vec![Some(1); 17],
            ..Default::default()
        };
        assert_eq!(s.stats(), Err(BalloonRestoreError::TooManyStats(17)));
        let s = BalloonState {
            guest_stats: vec![None, Some(7)],
            ..Default::default()
        };
        assert_eq!(s.stats().unwrap().get(1), Some(7));
    }
}
