//! Rate-limited logging for guest-triggered conditions.
//!
//! Everything a guest does wrong can be repeated by the guest in a tight loop; logging each
//! occurrence would let a guest flood the host's logs. [`warn_ratelimited!`] logs at most
//! [`BURST`] messages per [`WINDOW`] per call site, then reports how many it suppressed.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Length of one rate-limiting window.
pub const WINDOW: Duration = Duration::from_secs(5);
/// Messages allowed per call site and window.
pub const BURST: u32 = 10;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    // +1 so that 0 can mean "no window started yet".
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// Per-call-site state of [`warn_ratelimited!`].
#[derive(Debug)]
pub struct LogLimiter {
    window_start_ms: AtomicU64,
    count: AtomicU32,
    suppressed: AtomicU32,
}

impl LogLimiter {
    /// A limiter with no window started.
    pub const fn new() -> Self {
        LogLimiter {
            window_start_ms: AtomicU64::new(0),
            count: AtomicU32::new(0),
            suppressed: AtomicU32::new(0),
        }
    }

    /// Whether one more message may be logged now.
    pub fn allow(&self) -> bool {
        let now = now_ms();
        let window_ms = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        let start = self.window_start_ms.load(Ordering::Relaxed);
        if (start == 0 || now.saturating_sub(start) >= window_ms)
            && self
                .window_start_ms
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.count.store(1, Ordering::Relaxed);
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            if suppressed > 0 {
                log::warn!("{suppressed} similar guest-triggered warnings were suppressed");
            }
            return true;
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::warn!` limited to [`BURST`] messages per [`WINDOW`] at each call site.
macro_rules! warn_ratelimited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::virtio::log_limit::LogLimiter =
            $crate::virtio::log_limit::LogLimiter::new();
        if LIMITER.allow() {
            log::warn!($($arg)+);
        }
    }};
}
pub(crate) use warn_ratelimited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppressed() {
        let limiter = LogLimiter::new();
        let allowed = (0..100).filter(|_| limiter.allow()).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(limiter.suppressed.load(Ordering::Relaxed), 100 - BURST);
    }

    #[test]
    fn macro_compiles_and_does_not_panic() {
        for i in 0..50 {
            warn_ratelimited!("test message {i}");
        }
    }
}
