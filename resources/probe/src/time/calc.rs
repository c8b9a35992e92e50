//! The arithmetic of TSC calibration, with nothing but `core`: unit-tested
//! on the host by `tests/tests/probe_tsc.rs`, which includes this file.

/// The PIT's input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// The TSC frequency (kHz) behind a pvclock scale: KVM converts a TSC delta
/// to nanoseconds as `((delta << shift) * mul) >> 32` (`delta >> -shift`
/// for a negative shift), so one nanosecond is `2^32 / mul` shifted TSC
/// ticks. `None` for a zero multiplier or a shift outside -31..=31 (no
/// real clock has one).
pub fn pvclock_khz(mul: u32, shift: i8) -> Option<u64> {
    if mul == 0 || !(-31..=31).contains(&shift) {
        return None;
    }
    let base = (1_000_000u128 << 32) / mul as u128;
    let by = u32::from(shift.unsigned_abs());
    let khz = if shift < 0 { base << by } else { base >> by };
    u64::try_from(khz).ok().filter(|&k| k != 0)
}

/// TSC kHz from `tsc` TSC ticks over `pit` PIT ticks.
pub fn pit_khz(tsc: u64, pit: u64) -> Option<u64> {
    if pit == 0 {
        return None;
    }
    u64::try_from(tsc as u128 * PIT_HZ as u128 / pit as u128 / 1000).ok()
}

/// PIT ticks between two reads of a counter counting down from `reload`
/// to 1 and reloading (mode 2), assuming less than one period between them.
pub fn pit_ticks_between(prev: u16, cur: u16, reload: u16) -> u64 {
    if cur <= prev {
        (prev - cur) as u64
    } else {
        prev as u64 + reload as u64 - cur as u64
    }
}

/// |a - b| relative to `b`, in parts per million (saturating).
pub fn diff_ppm(a: u64, b: u64) -> u64 {
    if b == 0 {
        return u64::MAX;
    }
    let d = a.abs_diff(b) as u128 * 1_000_000 / b as u128;
    u64::try_from(d).unwrap_or(u64::MAX)
}

/// How far a measured frequency may be from a declared one and still agree:
/// 3 % plus the measurement's own uncertainty.
pub const AGREE_PPM: u64 = 30_000;

/// Whether a measurement (`khz` with uncertainty `err_ppm`) confirms a
/// declared frequency.
pub fn agrees(declared: u64, khz: u64, err_ppm: u64) -> bool {
    diff_ppm(khz, declared) <= AGREE_PPM.saturating_add(err_ppm)
}

/// Two declared frequencies (from different places: KVM's pvclock, the
/// VMM's CPUID) that agree to 0.1 % confirm each other.
pub const DECLARED_AGREE_PPM: u64 = 1_000;

/// A PIT measurement's uncertainty in ppm: the two TSC brackets of its
/// counter reads (the read happened somewhere inside each; the midpoints
/// are used, so half of each bracket) plus one PIT tick of quantisation.
/// `None` when it is too large to use (over `max_ppm`) or the span is empty.
pub fn pit_err_ppm(
    span_tsc: u64,
    bracket0: u64,
    bracket1: u64,
    ticks: u64,
    max_ppm: u64,
) -> Option<u64> {
    if span_tsc == 0 || ticks == 0 {
        return None;
    }
    let half = (bracket0 as u128 + bracket1 as u128) / 2;
    let err = half * 1_000_000 / span_tsc as u128 + 1_000_000 / ticks as u128;
    u64::try_from(err).ok().filter(|&e| e <= max_ppm)
}
