//! TSC frequency: KVM's pvclock, CPUID 0x40000010 (hypervisor timing
//! leaf) or CPUID 0x15, cross-checked against a measurement with the PIT;
//! the PIT alone, the LAPIC timer or a guess when nothing is declared.

use crate::cpu::{cpuid, inb, outb, rdtsc, wrmsr};
use crate::sync::Global;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

mod calc;

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static CAL: Global<Calibration> = Global::new(Calibration::EMPTY);

/// Where the frequency in use came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    None,
    KvmClock,
    HvLeaf,
    Leaf15,
    Pit2,
    Pit0,
    LapicTimer,
    Assumed,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::KvmClock => "kvmclock",
            Source::HvLeaf => "cpuid.40000010",
            Source::Leaf15 => "cpuid.15",
            Source::Pit2 => "pit2",
            Source::Pit0 => "pit0",
            Source::LapicTimer => "lapic-timer-at-1GHz",
            Source::Assumed => "assumed-1GHz",
        }
    }
}

/// The cross-check of the frequencies found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Xcheck {
    /// Nothing to compare: one frequency only.
    None,
    /// The PIT's measurement confirms every declared frequency (within
    /// `calc::AGREE_PPM` and its own uncertainty); without a PIT reading,
    /// the declared frequencies match each other to 0.1 %.
    Agree,
    /// A declared frequency is not confirmed: the first confirmed one is
    /// used, else the PIT's (the `tsc` check FAILs).
    Disagree,
}

impl Xcheck {
    fn name(self) -> &'static str {
        match self {
            Xcheck::None => "none",
            Xcheck::Agree => "agree",
            Xcheck::Disagree => "disagree",
        }
    }
}

/// A PIT measurement: kHz, its uncertainty and the channel.
#[derive(Clone, Copy)]
pub struct PitReading {
    khz: u64,
    err_ppm: u64,
    channel: u8,
}

/// Every frequency the probe found at boot, and what it chose.
pub struct Calibration {
    kvmclock: Option<u64>,
    kvmclock_stable: bool,
    hv_leaf: Option<u64>,
    leaf15: Option<u64>,
    pit: Option<PitReading>,
    pit_trials: u32,
    source: Source,
    xcheck: Xcheck,
}

impl Calibration {
    const EMPTY: Calibration = Calibration {
        kvmclock: None,
        kvmclock_stable: false,
        hv_leaf: None,
        leaf15: None,
        pit: None,
        pit_trials: 0,
        source: Source::None,
        xcheck: Xcheck::None,
    };
}

struct Opt(Option<u64>);

impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("none"),
        }
    }
}

impl fmt::Display for Calibration {
    /// `source=.. xcheck=.. kvmclock=.. kvmclock_stable=.. cpuid_40000010=..
    /// cpuid_15=.. pit=<channel>:<khz> pit_err_ppm=.. pit_trials=..`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "source={} xcheck={} kvmclock={} kvmclock_stable={} cpuid_40000010={} cpuid_15={}",
            self.source.name(),
            self.xcheck.name(),
            Opt(self.kvmclock),
            self.kvmclock_stable as u8,
            Opt(self.hv_leaf),
            Opt(self.leaf15),
        )?;
        match self.pit {
            Some(p) => write!(
                f,
                " pit=pit{}:{} pit_err_ppm={}",
                p.channel, p.khz, p.err_ppm
            )?,
            None => f.write_str(" pit=none")?,
        }
        write!(f, " pit_trials={}", self.pit_trials)
    }
}

pub fn khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

pub fn source() -> &'static str {
    CAL.get().source.name()
}

/// What `calibrate` found (for the `tsc` check).
pub fn calibration() -> &'static Calibration {
    CAL.get()
}

/// Whether the sources disagree (the `tsc` check FAILs then).
pub fn disagreement() -> bool {
    matches!(CAL.get().xcheck, Xcheck::Disagree)
}

/// Finds the TSC frequency (boot CPU, before the APs run). The declared
/// frequencies, in order of trust: KVM's pvclock (what KVM itself converts
/// the TSC with), the hypervisor timing leaf 0x40000010 (the VMM's word),
/// CPUID leaf 0x15 (the CPU's, where the VMM passes it). The first one is
/// used; with none, a measurement with the PIT (channel 2, else 0), then the
/// LAPIC timer, then 1 GHz. Reading the declared ones takes a few gate calls;
/// the PIT measurement takes 30 ms or more of gate calls, so with a declared
/// frequency it waits for `cross_check` (the `tsc` check): every probe boot
/// (the boot and density benchmarks' among them) stays that much shorter.
pub fn calibrate() {
    let c = CAL.get_mut();
    *c = Calibration::EMPTY;
    c.kvmclock = from_kvmclock().map(|(k, stable)| {
        c.kvmclock_stable = stable;
        k
    });
    c.hv_leaf = from_hv_leaf();
    c.leaf15 = from_leaf15();
    if c.declared().next().is_none() {
        measure_pit(c);
    }
    choose(c);
}

/// Measures the TSC against the PIT if that was not done at boot, and
/// chooses again: the first declared frequency that the PIT confirms (within
/// 3 % plus the measurement's uncertainty) is used from now on; if it
/// confirms none, the PIT's. Called by the `tsc` check on the boot CPU
/// (no AP runs a check meanwhile).
pub fn cross_check() {
    let c = CAL.get_mut();
    if c.pit_trials == 0 {
        measure_pit(c);
    }
    choose(c);
}

fn measure_pit(c: &mut Calibration) {
    let (pit, trials) = from_pit();
    c.pit = pit;
    c.pit_trials = trials;
}

impl Calibration {
    /// The declared frequencies found, in order of trust.
    fn declared(&self) -> impl Iterator<Item = (Source, u64)> + Clone {
        [
            (Source::KvmClock, self.kvmclock),
            (Source::HvLeaf, self.hv_leaf),
            (Source::Leaf15, self.leaf15),
        ]
        .into_iter()
        .filter_map(|(s, k)| k.map(|k| (s, k)))
    }
}

/// Picks the frequency from what `c` holds (see `calibrate` and
/// `cross_check`) and judges the agreement: `Agree` when the PIT confirms
/// every declared frequency (or, without a PIT reading, they match each
/// other to 0.1 %), `Disagree` when one is not, `None` with a single
/// frequency to look at.
fn choose(c: &mut Calibration) {
    let pit = c.pit;
    let confirmed = |k: u64| pit.is_none_or(|p| calc::agrees(k, p.khz, p.err_ppm));
    let (khz, source) = match (c.declared().find(|&(_, k)| confirmed(k)), pit) {
        (Some((s, k)), _) => (k, s),
        (None, Some(p)) => (p.khz, pit_source(p)),
        (None, None) => match c.declared().next() {
            Some((s, k)) => (k, s),
            None => match from_lapic_timer() {
                Some(k) => (k, Source::LapicTimer),
                None => (1_000_000, Source::Assumed),
            },
        },
    };
    let (mut compared, mut all_agree) = (0u32, true);
    for (_, k) in c.declared() {
        compared += 1;
        all_agree &= match pit {
            Some(p) => calc::agrees(k, p.khz, p.err_ppm),
            // Nothing measured: the declared values must match each other.
            None => calc::diff_ppm(k, khz) <= calc::DECLARED_AGREE_PPM,
        };
    }
    c.xcheck = match (compared + u32::from(pit.is_some()), all_agree) {
        (0 | 1, _) => Xcheck::None,
        (_, true) => Xcheck::Agree,
        (_, false) => Xcheck::Disagree,
    };
    c.source = source;
    TSC_KHZ.store(khz, Ordering::Relaxed);
}

fn pit_source(p: PitReading) -> Source {
    if p.channel == 2 {
        Source::Pit2
    } else {
        Source::Pit0
    }
}

/// KVM's paravirtual clock: `MSR_KVM_SYSTEM_TIME_NEW` (0x4b564d01, CPUID
/// 0x40000001 EAX bit 3) or the old `MSR_KVM_SYSTEM_TIME` (0x12, bit 0)
/// gets the guest-physical address of a `pvclock_vcpu_time_info` (bit 0:
/// enable); KVM fills it before the vCPU runs again, with the scale
/// (`tsc_to_system_mul`, `tsc_shift`) it converts this vCPU's TSC to
/// nanoseconds with. The probe reads the scale once and turns the clock off
/// again (KVM would otherwise keep writing the page). A WRMSR at CPL0 is
/// fine on every host kind (only a hypercall is not, on kvm-pvm). Returns
/// (kHz, PVCLOCK_TSC_STABLE_BIT).
fn from_kvmclock() -> Option<(u64, bool)> {
    if cpuid(1, 0)[2] & (1 << 31) == 0 {
        return None;
    }
    let [max, b, c, d] = cpuid(0x4000_0000, 0);
    if max < 0x4000_0001 || [b, c, d] != [0x4b4d_564b, 0x564b_4d56, 0x4d] {
        return None; // not "KVMKVMKVM\0\0\0"
    }
    let features = cpuid(0x4000_0001, 0)[0];
    let msr = if features & (1 << 3) != 0 {
        0x4b56_4d01
    } else if features & 1 != 0 {
        0x12
    } else {
        return None;
    };
    for w in &PVCLOCK.0 {
        w.store(0, Ordering::Relaxed);
    }
    let addr = PVCLOCK.0.as_ptr() as u64; // identity mapped: physical
    wrmsr(msr, addr | 1);
    let mut found = None;
    for _ in 0..1_000_000u32 {
        let v1 = PVCLOCK.0[0].load(Ordering::Acquire);
        if v1 != 0 && v1 & 1 == 0 {
            let mul = PVCLOCK.0[6].load(Ordering::Acquire);
            let tail = PVCLOCK.0[7].load(Ordering::Acquire);
            if PVCLOCK.0[0].load(Ordering::Acquire) == v1 {
                let shift = (tail & 0xff) as u8 as i8;
                let stable = tail >> 8 & 1 != 0;
                found = calc::pvclock_khz(mul, shift).map(|k| (k, stable));
                break;
            }
        }
        core::hint::spin_loop();
    }
    wrmsr(msr, 0);
    found.filter(|&(k, _)| plausible(true, k).is_some())
}

/// A `pvclock_vcpu_time_info` (32 bytes) as eight words: version, pad,
/// tsc_timestamp (2), system_time (2), tsc_to_system_mul, and the word of
/// tsc_shift (byte 0) and flags (byte 1). KVM needs it inside one page.
#[repr(C, align(64))]
struct PvClock([AtomicU32; 8]);

static PVCLOCK: PvClock = PvClock([const { AtomicU32::new(0) }; 8]);

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

/// PIT ticks one trial spans: 30 ms.
const PIT_SPAN: u64 = 35_795;
/// The counter's reload value (mode 2 counts it down to 1, then reloads).
const PIT_RELOAD: u16 = 0xffff;
/// Largest uncertainty a trial may have: 1 %.
const PIT_MAX_ERR_PPM: u64 = 10_000;
/// Trials before giving up on the PIT.
const PIT_TRIALS: u32 = 8;

/// The TSC frequency measured against the PIT: channel 2 (gated through
/// port 0x61, as KVM's in-kernel PIT with its dummy speaker port and QEMU's
/// have it), else channel 0 when nothing answers at port 0x61. Returns the
/// first trial good enough and the number of trials made.
///
/// Each counter read's latch command (a trip through the service gate) is
/// bracketed by TSC reads; a trial counts the PIT
/// ticks between its first read and the first read at least `PIT_SPAN`
/// ticks later, and is used only if its brackets leave it within
/// `PIT_MAX_ERR_PPM` and no gap between two reads could have hidden a
/// whole counter period. The old measurement (wait until channel 2's
/// output goes high, then read the TSC) counted everything that delayed
/// the last poll: on a busy host (a vCPU thread preempted, a slow trip
/// into emulated CPL0) it read 2.7 to 6.2 GHz for a 2.6 GHz TSC.
fn from_pit() -> (Option<PitReading>, u32) {
    let ctl = inb(0x61);
    let channel = if ctl == 0xff {
        0
    } else {
        outb(0x61, (ctl & !0x02) | 0x01); // gate on, speaker off
        2
    };
    // Mode 2 (rate generator), lo/hi byte, binary.
    outb(0x43, if channel == 2 { 0xb4 } else { 0x34 });
    let port = 0x40 + channel as u16;
    outb(port, PIT_RELOAD as u8);
    outb(port, (PIT_RELOAD >> 8) as u8);
    let mut result = None;
    let mut trials = 0;
    while trials < PIT_TRIALS && result.is_none() {
        trials += 1;
        match pit_trial(channel) {
            Trial::Done(k, e) => result = Some((k, e)),
            Trial::Again => {}
            Trial::GiveUp => break,
        }
    }
    if channel == 2 {
        outb(0x61, ctl);
    } else {
        // Leave channel 0 in one-shot mode: no periodic timer behind it.
        outb(0x43, 0x30);
        outb(0x40, 1);
        outb(0x40, 0);
    }
    (
        result.map(|(khz, err_ppm)| PitReading {
            khz,
            err_ppm,
            channel,
        }),
        trials,
    )
}

/// (TSC at the middle of the latch command, TSC bracket, counter). The
/// latch freezes the count at the command, so only the command is
/// bracketed, not the two reads after it.
fn pit_read(channel: u8) -> (u64, u64, u16) {
    let t0 = rdtsc();
    outb(0x43, channel << 6); // latch
    let t1 = rdtsc();
    let port = 0x40 + channel as u16;
    let lo = inb(port) as u16;
    let hi = inb(port) as u16;
    let bracket = t1.wrapping_sub(t0);
    (t0.wrapping_add(bracket / 2), bracket, hi << 8 | lo)
}

/// The longest a trial may take in TSC ticks: 30 ms at the highest
/// plausible TSC rate (20 GHz) is 0.6e9; 4e9 is 1.5 s at 2.6 GHz.
const PIT_TRIAL_MAX_TSC: u64 = 4_000_000_000;

/// One trial's outcome.
enum Trial {
    /// (kHz, uncertainty in ppm).
    Done(u64, u64),
    /// Spoiled by a delay: try again.
    Again,
    /// The counter did not cover `PIT_SPAN` in `PIT_TRIAL_MAX_TSC` (or in
    /// 200000 reads), or did not move in 1000: no PIT worth waiting for.
    GiveUp,
}

fn pit_trial(channel: u8) -> Trial {
    let (t_start, b_start, mut prev) = pit_read(channel);
    let mut t_prev = t_start;
    let mut ticks = 0u64;
    let mut max_gap = 0u64;
    for n in 0..200_000u32 {
        let (t, b, cur) = pit_read(channel);
        ticks += calc::pit_ticks_between(prev, cur, PIT_RELOAD);
        max_gap = max_gap.max(t.wrapping_sub(t_prev));
        prev = cur;
        t_prev = t;
        let span = t.wrapping_sub(t_start);
        if ticks >= PIT_SPAN {
            // A gap of a whole period (55 ms) would be most of the span
            // and undercount it by one period: refuse gaps of half of it.
            if max_gap > span / 2 {
                return Trial::Again;
            }
            let Some(err) = calc::pit_err_ppm(span, b_start, b, ticks, PIT_MAX_ERR_PPM) else {
                return Trial::Again;
            };
            return match calc::pit_khz(span, ticks).and_then(|k| plausible(true, k)) {
                Some(k) => Trial::Done(k, err),
                None => Trial::Again,
            };
        }
        // A counter that has not moved in 1000 reads (each far longer than
        // a PIT tick) is no counter: nothing answers at its port.
        if span > PIT_TRIAL_MAX_TSC || (n >= 1000 && ticks == 0) {
            break;
        }
    }
    Trial::GiveUp
}

fn plausible(done: bool, khz: u64) -> Option<u64> {
    (done && (50_000..=20_000_000).contains(&khz)).then_some(khz)
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
