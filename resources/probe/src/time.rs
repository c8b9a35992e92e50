//! TSC frequency: CPUID 0x40000010 (hypervisor timing leaf), CPUID 0x15,
//! or a 10 ms measurement against PIT channel 2.

use crate::cpu::{cpuid, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static SOURCE: AtomicU64 = AtomicU64::new(0);

const SOURCES: [&str; 7] = [
    "none",
    "cpuid.40000010",
    "cpuid.15",
    "pit2",
    "pit0",
    "lapic-timer-at-1GHz",
    "assumed-1GHz",
];

pub fn khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

pub fn source() -> &'static str {
    SOURCES[SOURCE.load(Ordering::Relaxed) as usize % SOURCES.len()]
}

pub fn calibrate() {
    let (khz, src) = if let Some(k) = from_hv_leaf() {
        (k, 1)
    } else if let Some(k) = from_leaf15() {
        (k, 2)
    } else if let Some(k) = from_pit2() {
        (k, 3)
    } else if let Some(k) = from_pit0() {
        (k, 4)
    } else if let Some(k) = from_lapic_timer() {
        (k, 5)
    } else {
        (1_000_000, 6)
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    SOURCE.store(src, Ordering::Relaxed);
}

fn from_hv_leaf() -> Option<u64> {
    if cpuid(1, 0)[2] & (1 << 31) == 0 {
        return None;
    }
    if cpuid(0x4000_0000, 0)[0] < 0x4000_0010 {
        return None;
    }
    let k = cpuid(0x4000_0010, 0)[0] as u64;
    (k != 0).then_some(k)
}

fn from_leaf15() -> Option<u64> {
    if cpuid(0, 0)[0] < 0x15 {
        return None;
    }
    let [den, num, hz, _] = cpuid(0x15, 0);
    if den == 0 || num == 0 || hz == 0 {
        return None;
    }
    Some(hz as u64 * num as u64 / den as u64 / 1000)
}

/// PIT channel 2 one-shot, gated and read back through port 0x61.
fn from_pit2() -> Option<u64> {
    const TICKS: u16 = 11932; // 10 ms at 1.193182 MHz
    let ctl = inb(0x61);
    if ctl == 0xff {
        return None;
    }
    outb(0x61, (ctl & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0xb0); // channel 2, lo/hi, mode 0
    outb(0x42, (TICKS & 0xff) as u8);
    outb(0x42, (TICKS >> 8) as u8);
    let t0 = rdtsc();
    let mut done = false;
    for _ in 0..50_000_000u32 {
        if inb(0x61) & 0x20 != 0 {
            done = true;
            break;
        }
    }
    let t1 = rdtsc();
    outb(0x61, ctl);
    plausible(done, t1.wrapping_sub(t0) / 10)
}

fn plausible(done: bool, khz: u64) -> Option<u64> {
    (done && (50_000..=20_000_000).contains(&khz)).then_some(khz)
}

fn pit0_read() -> u16 {
    outb(0x43, 0x00); // latch channel 0
    let lo = inb(0x40) as u16;
    let hi = inb(0x40) as u16;
    hi << 8 | lo
}

/// PIT channel 0 as a free-running counter (when there is no port 0x61).
fn from_pit0() -> Option<u64> {
    outb(0x43, 0x34); // channel 0, lo/hi, mode 2
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let mut prev = pit0_read();
    let t0 = rdtsc();
    let mut elapsed: u64 = 0;
    let mut done = false;
    for _ in 0..5_000_000u32 {
        let cur = pit0_read();
        elapsed += prev.wrapping_sub(cur) as u64;
        prev = cur;
        if elapsed >= 11932 {
            done = true;
            break;
        }
    }
    let t1 = rdtsc();
    // 11932 PIT ticks are 10 ms; scale by what was actually counted.
    plausible(done, t1.wrapping_sub(t0) * 11932 / elapsed.max(1) / 10)
}

/// The local APIC timer, assuming the 1 GHz bus clock that KVM's and
/// QEMU's emulated LAPICs use. Last resort.
fn from_lapic_timer() -> Option<u64> {
    use crate::lapic;
    lapic::check_mode().ok()?;
    lapic::enable();
    lapic::write(lapic::TIMER_DIV, 0xb);
    lapic::write(lapic::LVT_TIMER, 1 << 16 | 0x40);
    lapic::write(lapic::TIMER_INIT, u32::MAX);
    let t0 = rdtsc();
    let mut done = false;
    for _ in 0..50_000_000u32 {
        if u32::MAX - lapic::read(lapic::TIMER_CUR) >= 10_000_000 {
            done = true;
            break;
        }
    }
    let t1 = rdtsc();
    lapic::write(lapic::TIMER_INIT, 0);
    plausible(done, t1.wrapping_sub(t0) / 10)
}

/// TSC ticks in `us` microseconds.
pub fn us_to_tsc(us: u64) -> u64 {
    us.saturating_mul(khz()) / 1000
}

pub fn tsc_to_us(t: u64) -> u64 {
    let k = khz().max(1);
    t.saturating_mul(1000) / k
}

/// Busy-waits `us` microseconds (CPL3 runs natively on the target).
pub fn delay_us(us: u64) {
    let end = rdtsc().saturating_add(us_to_tsc(us));
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// A deadline `us` microseconds from now.
pub fn deadline(us: u64) -> u64 {
    rdtsc().saturating_add(us_to_tsc(us))
}

pub fn passed(deadline: u64) -> bool {
    rdtsc() >= deadline
}
