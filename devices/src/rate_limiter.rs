//! Token-bucket rate limiters with Firecracker's API semantics (issue 16 item 1).
//!
//! A [`TokenBucket`] holds up to `size` tokens and refills continuously, a whole bucket per
//! `refill_time` ms; it starts full, plus `one_time_burst` extra tokens that are spent first and
//! never refilled. A [`RateLimiter`] is two independent buckets, one counting bytes
//! (bandwidth) and one counting operations; a request goes through only when both have its
//! tokens, and then takes them from both. A bucket of size 0 or refill time 0 limits nothing
//! (Firecracker's meaning).
//!
//! A request larger than a whole bucket could never pass by waiting: it goes through when the
//! bucket is full and leaves it in debt, which the refill pays back before anything else passes.
//! So the long-run rate stays `size / refill_time` whatever the request sizes.
//!
//! Time is passed in (nanoseconds on any monotonic clock), so the arithmetic is unit-tested
//! with a fake clock; [`RateLimiter::consume`] reads `CLOCK_MONOTONIC` through
//! [`std::time::Instant`]. Written here rather than taken from a crate: the rust-vmm family
//! publishes none, and Firecracker's sits inside its VMM crate.

use std::time::{Duration, Instant};

const NS_PER_MS: u128 = 1_000_000;

/// Why a [`TokenBucket`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimiterError {
    /// size / refill_time do not fit the bucket's arithmetic.
    #[error("token bucket size {size} with refill time {refill_ms} ms is out of range")]
    OutOfRange {
        /// Tokens.
        size: u64,
        /// Milliseconds.
        refill_ms: u64,
    },
}

/// One token bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    refill_ms: u64,
    /// Tokens available; negative after an over-sized request (debt).
    budget: i128,
    /// One-time burst tokens left.
    burst: u64,
    /// When `budget` was last brought up to date (ns).
    last: u64,
    /// Sub-token refill carried between updates (in token·ns units), so no time is lost.
    carry: u128,
}

impl TokenBucket {
    /// A full bucket at time `now` (ns), or `None` when it limits nothing (size or refill
    /// time 0).
    pub fn new(
        size: u64,
        one_time_burst: u64,
        refill_ms: u64,
        now: u64,
    ) -> Result<Option<Self>, RateLimiterError> {
        if size == 0 || refill_ms == 0 {
            return Ok(None);
        }
        // Keep every product in `refill` within u128: elapsed (u64 ns) * size (u64).
        if refill_ms > u64::MAX / 1_000_000 {
            return Err(RateLimiterError::OutOfRange { size, refill_ms });
        }
        Ok(Some(TokenBucket {
            size,
            refill_ms,
            budget: i128::from(size),
            burst: one_time_burst,
            last: now,
            carry: 0,
        }))
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.refill_ms) * NS_PER_MS
    }

    /// Brings the budget up to `now`: size tokens per refill time, capped at size.
    fn refill(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let scaled = u128::from(elapsed) * u128::from(self.size) + self.carry;
        let tokens = scaled / self.refill_ns();
        self.carry = scaled % self.refill_ns();
        let size = i128::from(self.size);
        // tokens <= u64::MAX * u64::MAX / 1e6 fits i128.
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.budget = self.budget.saturating_add(tokens).min(size);
        if self.budget == size {
            self.carry = 0;
        }
    }

    /// Whether `n` tokens can be taken at `now`, and how long to wait if not.
    fn check(&mut self, n: u64, now: u64) -> Result<(), Duration> {
        self.refill(now);
        let need = i128::from(n.saturating_sub(self.burst));
        if need == 0 || need <= self.budget {
            return Ok(());
        }
        // Over-sized: goes through only on a full bucket.
        if need > i128::from(self.size) && self.budget == i128::from(self.size) {
            return Ok(());
        }
        let missing = need.min(i128::from(self.size)) - self.budget;
        let missing = u128::try_from(missing).unwrap_or(0);
        let ns =
            (missing.saturating_mul(self.refill_ns()) - self.carry).div_ceil(u128::from(self.size));
        Err(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
            .max(Duration::from_micros(100)))
    }

    /// Takes `n` tokens: burst first, then the budget (which may go into debt).
    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(n - from_burst);
    }

    /// Tokens available now (burst included), after refilling to `now`; negative in debt.
    pub fn available(&mut self, now: u64) -> i128 {
        self.refill(now);
        self.budget + i128::from(self.burst)
    }
}

/// Which of a request's resources to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Bytes (the bandwidth bucket).
    pub bytes: u64,
    /// Operations (the ops bucket).
    pub ops: u64,
}

/// Two buckets: bandwidth (bytes) and operations.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    epoch: Instant,
    /// Requests refused for want of tokens (each refusal counts once).
    throttled: u64,
}

/// One bucket's configuration: (size, one_time_burst, refill_time ms).
pub type BucketConfig = (u64, u64, u64);

/// A bucket's configuration from the API's fields (`one_time_burst` absent is 0).
pub fn bucket(size: u64, one_time_burst: Option<u64>, refill_time: u64) -> BucketConfig {
    (size, one_time_burst.unwrap_or(0), refill_time)
}

impl RateLimiter {
    /// A limiter from the two buckets' configurations; both `None` (or disabled) limits
    /// nothing.
    pub fn new(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> Result<Self, RateLimiterError> {
        let epoch = Instant::now();
        Self::new_at(bandwidth, ops, epoch, 0)
    }

    fn new_at(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
        epoch: Instant,
        now: u64,
    ) -> Result<Self, RateLimiterError> {
        let bucket = |c: Option<BucketConfig>| match c {
            Some((size, burst, refill)) => TokenBucket::new(size, burst, refill, now),
            None => Ok(None),
        };
        Ok(RateLimiter {
            bandwidth: bucket(bandwidth)?,
            ops: bucket(ops)?,
            epoch,
            throttled: 0,
        })
    }

    /// Replaces the buckets (a PATCH of a running VM): the new ones start full, as
    /// Firecracker's do. The throttle count is kept.
    pub fn update(
        &mut self,
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> Result<(), RateLimiterError> {
        let now = self.now();
        let new = Self::new_at(bandwidth, ops, self.epoch, now)?;
        self.bandwidth = new.bandwidth;
        self.ops = new.ops;
        Ok(())
    }

    /// Whether this limiter limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes `cost` now if both buckets have it; otherwise takes nothing, counts a throttle
    /// and says how long until it could pass (arm a timer for that).
    pub fn consume(&mut self, cost: Cost) -> Result<(), Duration> {
        let now = self.now();
        self.consume_at(cost, now)
    }

    /// [`RateLimiter::consume`] at time `now` (ns since this limiter's epoch).
    pub fn consume_at(&mut self, cost: Cost, now: u64) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        if let Some(b) = &mut self.bandwidth {
            if let Err(w) = b.check(cost.bytes, now) {
                wait = wait.max(w);
            }
        }
        if let Some(b) = &mut self.ops {
            if let Err(w) = b.check(cost.ops, now) {
                wait = wait.max(w);
            }
        }
        if wait > Duration::ZERO {
            self.throttled = self.throttled.saturating_add(1);
            return Err(wait);
        }
        if let Some(b) = &mut self.bandwidth {
            b.take(cost.bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(cost.ops);
        }
        Ok(())
    }

    /// Requests refused for want of tokens so far.
    pub fn throttled(&self) -> u64 {
        self.throttled
    }

    /// Adds `n` to the throttle count (carried over from a replaced limiter).
    pub fn add_throttled(&mut self, n: u64) {
        self.throttled = self.throttled.saturating_add(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    fn limiter(bw: Option<BucketConfig>, ops: Option<BucketConfig>) -> RateLimiter {
        RateLimiter::new_at(bw, ops, Instant::now(), 0).unwrap()
    }

    fn bytes(n: u64) -> Cost {
        Cost { bytes: n, ops: 1 }
    }

    /// Drives `l` with requests of `size` bytes as fast as it lets them through, jumping the
    /// fake clock by each refusal's wait, for `secs` seconds; returns the bytes let through.
    fn saturate(l: &mut RateLimiter, size: u64, until: u64) -> u64 {
        let mut now = 0;
        let mut passed = 0;
        for _ in 0..10_000_000 {
            if now >= until {
                return passed;
            }
            match l.consume_at(bytes(size), now) {
                Ok(()) => passed += size,
                Err(w) => now += u64::try_from(w.as_nanos()).unwrap(),
            }
        }
        panic!("did not reach {until} ns");
    }

    #[test]
    fn disabled_buckets_limit_nothing() {
        let mut l = limiter(Some((0, 0, 100)), Some((10, 0, 0)));
        assert!(l.is_unlimited());
        for _ in 0..1000 {
            assert_eq!(l.consume_at(bytes(1 << 30), 0), Ok(()));
        }
        assert_eq!(l.throttled(), 0);
    }

    #[test]
    fn bandwidth_is_held_to_size_per_refill_time() {
        // 1000 bytes per 100 ms = 10_000 B/s; 3 s with 100-byte requests.
        let mut l = limiter(Some((1000, 0, 100)), None);
        let passed = saturate(&mut l, 100, 3 * S);
        // The first full bucket plus 3 s of refill.
        assert!((30_000..=31_000).contains(&passed), "{passed}");
        assert!(l.throttled() > 0);
    }

    #[test]
    fn ops_are_held_to_size_per_refill_time() {
        // 50 ops per second over 4 s: 50 + 200.
        let mut l = limiter(None, Some((50, 0, 1000)));
        let mut now = 0;
        let mut ops = 0u64;
        while now < 4 * S {
            match l.consume_at(bytes(4096), now) {
                Ok(()) => ops += 1,
                Err(w) => now += u64::try_from(w.as_nanos()).unwrap(),
            }
        }
        // (the op due at exactly 4 s is not counted)
        assert!((249..=251).contains(&ops), "{ops}");
    }

    #[test]
    fn one_time_burst_passes_first_then_the_rate() {
        let mut l = limiter(Some((1000, 5000, 1000)), None);
        // Burst + full bucket at time 0, nothing more.
        for i in 0..6 {
            assert_eq!(l.consume_at(bytes(1000), 0), Ok(()), "request {i}");
        }
        let wait = l.consume_at(bytes(1000), 0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        // The burst never comes back.
        assert_eq!(l.consume_at(bytes(1000), S), Ok(()));
        assert!(l.consume_at(bytes(1), S).is_err());
    }

    #[test]
    fn both_buckets_must_allow_and_a_refusal_takes_nothing() {
        let mut l = limiter(Some((100, 0, 1000)), Some((1, 0, 1000)));
        assert_eq!(l.consume_at(bytes(10), 0), Ok(()));
        // Bytes are there, the op is not: refused, and the bytes are not taken.
        assert!(l.consume_at(bytes(10), 0).is_err());
        assert_eq!(l.bandwidth.as_mut().unwrap().available(0), 90);
        assert_eq!(l.throttled(), 1);
    }

    #[test]
    fn an_oversized_request_passes_on_a_full_bucket_and_leaves_debt() {
        let mut l = limiter(Some((1000, 0, 1000)), None);
        assert_eq!(l.consume_at(bytes(3000), 0), Ok(()));
        assert_eq!(l.bandwidth.as_mut().unwrap().available(0), -2000);
        // Nothing passes until the debt is paid and the request fits again.
        assert!(l.consume_at(bytes(1), 2 * S).is_err());
        assert_eq!(l.consume_at(bytes(1), 2 * S + MS), Ok(()));
        // Over 10 s with 3000-byte requests the rate is still 1000 B/s.
        let mut l = limiter(Some((1000, 0, 1000)), None);
        let passed = saturate(&mut l, 3000, 10 * S);
        assert!((9_000..=12_000).contains(&passed), "{passed}");
    }

    #[test]
    fn the_wait_is_until_the_tokens_are_there() {
        let mut l = limiter(Some((1000, 0, 1000)), None);
        assert_eq!(l.consume_at(bytes(1000), 0), Ok(()));
        let w = l.consume_at(bytes(500), 0).unwrap_err();
        assert_eq!(w, Duration::from_millis(500));
        assert!(l.consume_at(bytes(500), 499 * MS).is_err());
        assert_eq!(l.consume_at(bytes(500), 500 * MS), Ok(()));
    }

    #[test]
    fn update_replaces_the_rate() {
        let mut l = limiter(Some((1000, 0, 1000)), None);
        assert_eq!(l.consume_at(bytes(1000), 0), Ok(()));
        l.update(Some((10, 0, 1000)), None).unwrap();
        // The new bucket starts full and is small.
        assert_eq!(l.consume(bytes(10)), Ok(()));
        assert!(l.consume(bytes(10)).is_err());
        l.update(None, None).unwrap();
        assert!(l.is_unlimited());
        assert_eq!(l.consume(bytes(1 << 40)), Ok(()));
    }

    #[test]
    fn hostile_values_do_not_overflow() {
        assert!(TokenBucket::new(u64::MAX, u64::MAX, u64::MAX, 0).is_err());
        let mut l = limiter(
            Some((u64::MAX, u64::MAX, u64::MAX / 1_000_000)),
            Some((u64::MAX, 0, 1)),
        );
        assert_eq!(l.consume_at(bytes(u64::MAX), u64::MAX), Ok(()));
        assert_eq!(l.consume_at(bytes(u64::MAX), u64::MAX), Ok(()));
        let _ = l.consume_at(bytes(u64::MAX), u64::MAX);
    }
}
