//! The check runner and the checks. Output, one line per check on COM1:
//! `PROBE <check> ok|FAIL|skip <details> tsc=<n>`, then `PROBE DONE p/t`.

use crate::bootinfo::{self, Entry, E820_RAM};
use crate::cmdline;
use crate::cpu::{self, cpuid, outb, peek, poke, rdtsc};
use crate::lapic;
use crate::serial::{self, Line, Printable};
use crate::smp::{self, SMP};
use crate::sync::Global;
use crate::time;
use crate::{acpi, mem, paging, println, virtio};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

const MAX_CHECKS: usize = 32;
const NAME_MAX: usize = 24;
const DEFAULT_RUN: &[u8] = b"boot,mem,smp,cpuid,irq,tsc";
const TIMER_VECTOR: u32 = 0x40;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Fail,
    Skip,
}

pub type Details = Line<4096>;
type CheckFn = fn(&mut Details) -> Status;

const CHECKS: &[(&str, CheckFn)] = &[
    ("boot", check_boot),
    ("mem", check_mem),
    ("smp", check_smp),
    ("cpuid", check_cpuid),
    ("irq", check_irq),
    ("tsc", check_tsc),
    ("tick", check_tick),
    ("virtio", check_virtio),
    ("rng", crate::virtio_rng::check_rng),
    ("rngbench", crate::virtio_rng::check_rngbench),
    ("console", crate::virtio_console::check),
    ("blk", crate::virtio_blk::check_blk),
    ("blkhostile", crate::virtio_blk_hostile::check_blkhostile),
    ("blkdiscard", crate::virtio_blk_discard::check_blkdiscard),
    ("blkbench", crate::blk_bench::check_blkbench),
    ("net", crate::virtio_net::check_net),
    ("netbench", crate::net_bench::check_netbench),
    ("vsock", crate::virtio_vsock::check),
    ("balloon", crate::virtio_balloon::check),
    ("balloonsnap", crate::virtio_balloon_snap::check),
    ("kbd", crate::kbd::check),
    ("idle", crate::idle::check),
    ("snapmem", crate::snapmem::check),
    // Self-tests of the failure paths: always FAIL, then the run goes on.
    ("selftest_fault", check_selftest_fault),
    ("selftest_panic", check_selftest_panic),
    ("selftest_stack", check_selftest_stack),
    // These end the run: a failure inside the failure path resets the VM.
    ("selftest_nested_fault", check_selftest_nested_fault),
    ("selftest_nested_panic", check_selftest_nested_panic),
];

struct RunList {
    names: [[u8; NAME_MAX]; MAX_CHECKS],
    lens: [usize; MAX_CHECKS],
    count: usize,
    /// Names beyond MAX_CHECKS.
    dropped: usize,
}

static RUN: Global<RunList> = Global::new(RunList {
    names: [[0; NAME_MAX]; MAX_CHECKS],
    lens: [0; MAX_CHECKS],
    count: 0,
    dropped: 0,
});
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PASSED: AtomicU32 = AtomicU32::new(0);
static TOTAL: AtomicU32 = AtomicU32::new(0);
static FAULTS: AtomicU32 = AtomicU32::new(0);
static INIT_DONE: AtomicBool = AtomicBool::new(false);
static RUNNING: AtomicBool = AtomicBool::new(false);

pub fn init_and_run() -> ! {
    serial::init();
    outb(0x21, 0xff); // mask both 8259s: their reset vector base overlaps exceptions
    outb(0xa1, 0xff);
    bootinfo::parse();
    paging::setup();
    smp::BSP_APIC.store(lapic::id(), Ordering::Relaxed);
    smp::record_self(0);
    time::calibrate();
    let bi = bootinfo::get();
    match acpi::discover(bi.rsdp) {
        Ok(t) => SMP.get_mut().table = Some(t),
        Err(e) => SMP.get_mut().table_error = Some(e),
    }
    parse_run_list(bi.cmdline_problem.is_none());
    INIT_DONE.store(true, Ordering::Release);
    let entry = match bi.entry {
        Entry::Linux64 => "linux64",
        Entry::Pvh => "pvh",
        Entry::Unknown(_) => "unknown",
    };
    println!(
        "PROBE begin entry={} checks={} tsc_khz={} tsc_source={} tsc={}",
        entry,
        RUN.get().count,
        time::khz(),
        time::source(),
        rdtsc()
    );
    run_from(0)
}

fn parse_run_list(have_cmdline: bool) {
    let bi = bootinfo::get();
    let list = if have_cmdline {
        cmdline::get(bi.cmdline(), b"probe.run")
    } else {
        None
    };
    let list = list.unwrap_or(DEFAULT_RUN);
    let run = RUN.get_mut();
    for name in list.split(|&b| b == b',').filter(|n| !n.is_empty()) {
        if run.count == MAX_CHECKS {
            run.dropped += 1;
            continue;
        }
        let n = name.len().min(NAME_MAX);
        run.names[run.count][..n].copy_from_slice(&name[..n]);
        // A name longer than NAME_MAX keeps its length so it stays unknown.
        run.lens[run.count] = name.len();
        run.count += 1;
    }
}

fn name_of(i: usize) -> &'static [u8] {
    let run = RUN.get();
    &run.names[i][..run.lens[i].min(NAME_MAX)]
}

fn report(name: &[u8], status: Status, details: &Details) {
    let s = match status {
        Status::Ok => "ok",
        Status::Fail => "FAIL",
        Status::Skip => "skip",
    };
    TOTAL.fetch_add((status != Status::Skip) as u32, Ordering::Relaxed);
    PASSED.fetch_add((status == Status::Ok) as u32, Ordering::Relaxed);
    let mut out: Line<4200> = Line::new();
    let _ = write!(out, "PROBE {} {} ", Printable(name), s);
    let text = core::str::from_utf8(details.as_bytes()).unwrap_or("?");
    let _ = out.write_str(text.trim_start());
    if details.truncated() {
        let _ = out.write_str("...");
    }
    let _ = write!(out, " tsc={}", rdtsc());
    serial::write_bytes(out.as_bytes());
    serial::write_bytes(b"\n");
}

fn run_from(start: usize) -> ! {
    RUNNING.store(true, Ordering::Release);
    let count = RUN.get().count;
    for i in start..count {
        CURRENT.store(i, Ordering::Release);
        let name = name_of(i);
        let mut d = Details::new();
        let status = if RUN.get().lens[i] > NAME_MAX {
            let _ = d.write_str("unknown check (name too long)");
            Status::Fail
        } else {
            match CHECKS.iter().find(|(n, _)| n.as_bytes() == name) {
                Some((_, f)) => f(&mut d),
                None => {
                    let names = CHECKS.iter().map(|c| c.0);
                    let _ = d.write_str("unknown check; known:");
                    for n in names {
                        let _ = write!(d, " {n}");
                    }
                    Status::Fail
                }
            }
        };
        report(name, status, &d);
    }
    finish()
}

fn finish() -> ! {
    CURRENT.store(usize::MAX, Ordering::Release);
    let dropped = RUN.get().dropped;
    if dropped > 0 {
        let mut d = Details::new();
        let _ = write!(
            d,
            "{dropped} names beyond the limit of {MAX_CHECKS} not run"
        );
        report(b"run", Status::Fail, &d);
    }
    println!(
        "PROBE DONE {}/{}",
        PASSED.load(Ordering::Relaxed),
        TOTAL.load(Ordering::Relaxed)
    );
    outb(0x64, 0xfe); // i8042 reset
    if time::khz() != 0 {
        time::delay_us(100_000);
    }
    cpu::reset(); // triple fault
    smp::park()
}

fn stop_timer() {
    if lapic::check_mode().is_ok() {
        lapic::write(lapic::LVT_TIMER, 1 << 16);
        lapic::write(lapic::TIMER_INIT, 0);
    }
}

/// Whether CPU `cpu` is in its failure path (set by entry.S for a fault,
/// by `on_panic` for a panic; cleared when the checks go on).
fn fault_mark(cpu: usize) -> bool {
    peek::<u8>(crate::sym_addr!(fault_active) + cpu as u64) != 0
}

fn set_fault_mark(cpu: usize, on: bool) {
    poke(crate::sym_addr!(fault_active) + cpu as u64, on as u8);
}

/// What the `selftest_nested_*` checks ask the failure path to do wrong.
static NESTED_SELFTEST: AtomicU32 = AtomicU32::new(NESTED_NONE);
const NESTED_NONE: u32 = 0;
const NESTED_FAULT: u32 = 1;
const NESTED_PANIC: u32 = 2;
/// Set once a fatal line is being printed: a fault or panic past that
/// point resets at once.
static FATAL: AtomicBool = AtomicBool::new(false);

/// An AP that failed records it for `smp` and parks.
fn park_failed_ap(cpu: usize, vector: u64, rip: u64) -> ! {
    if let Some(s) = smp::SLOTS.get(cpu) {
        s.fault_vector.store(vector, Ordering::Relaxed);
        s.fault_rip.store(rip, Ordering::Relaxed);
        s.state.store(smp::ST_FAULTED, Ordering::Release);
    }
    smp::park()
}

/// After an exception at CPL3 (see entry.S), on this CPU's fault stack with
/// its fault mark set: a FAIL line for the check that was running, then the
/// next check. APs record the fault and park.
pub fn on_fault(vector: u64, error: u64, rip: u64, cr2: u64, cpu: usize) -> ! {
    if cpu != 0 {
        park_failed_ap(cpu, vector, rip)
    }
    if NESTED_SELFTEST.load(Ordering::Relaxed) == NESTED_FAULT {
        // selftest_nested_fault: fault inside the fault path.
        let _: u64 = peek(paging::mapped_limit() + 0x1000);
    }
    let mut d = Details::new();
    let _ = write!(
        d,
        "exception vector={vector} error={error:#x} rip={rip:#x} cr2={cr2:#x}"
    );
    after_failure(&d)
}

pub fn on_panic(info: &core::panic::PanicInfo) -> ! {
    let cpu = cpu::cpu_index();
    if cpu >= smp::MAX_CPUS || fault_mark(cpu) {
        // A panic in the failure path: one last line, then the reset path
        // (never round again).
        if !FATAL.swap(true, Ordering::AcqRel) {
            println!("PROBE FATAL panic in the failure path: {}", info.message());
        }
        cpu::reset();
        smp::park()
    }
    set_fault_mark(cpu, true);
    if cpu != 0 {
        park_failed_ap(cpu, u64::MAX, 0)
    }
    let mut d = Details::new();
    let _ = write!(d, "panic: {}", info.message());
    if let Some(l) = info.location() {
        let _ = write!(d, " at {}:{}", l.file(), l.line());
    }
    after_failure(&d)
}

/// The boot CPU's failure path (fault mark set): report, then the checks go
/// on after the failed one; after too many failures, or one that happened
/// while finishing, the run ends.
fn after_failure(d: &Details) -> ! {
    cpu::cli();
    stop_timer();
    if NESTED_SELFTEST.load(Ordering::Relaxed) == NESTED_PANIC {
        panic!("selftest_nested_panic");
    }
    let n = FAULTS.fetch_add(1, Ordering::Relaxed);
    let cur = CURRENT.load(Ordering::Acquire);
    let next = if !RUNNING.load(Ordering::Acquire) {
        report(b"init", Status::Fail, d);
        if n > 4 || !INIT_DONE.load(Ordering::Acquire) && n > 0 {
            finish()
        }
        if !INIT_DONE.load(Ordering::Acquire) {
            // Continue with what was parsed so far; checks report the rest.
            INIT_DONE.store(true, Ordering::Release);
            parse_run_list(false);
        }
        0
    } else {
        if cur == usize::MAX || n > 16 {
            finish()
        }
        report(name_of(cur), Status::Fail, d);
        cur + 1
    };
    extern "C" {
        fn switch_stack(arg: u64, stack: u64, f: extern "C" fn(u64) -> !) -> !;
    }
    let top = crate::sym_addr!(bsp_ustack_top) - 8;
    // SAFETY: `switch_stack` (entry.S) loads RSP with `top`, the top of the
    // boot CPU's user stack minus 8 (the alignment at a function's entry),
    // and jumps to `resume_checks`, which never returns. Everything on that
    // stack belongs to the check that failed and is abandoned with it.
    unsafe { switch_stack(next as u64, top, resume_checks) }
}

/// The end of the failure path: on the top of the boot CPU's stack again,
/// the fault mark is cleared and the checks go on from `next`.
extern "C" fn resume_checks(next: u64) -> ! {
    set_fault_mark(0, false);
    run_from(next as usize)
}

// ------------------------------------------------------------------ checks

fn check_boot(d: &mut Details) -> Status {
    let bi = bootinfo::get();
    let if_on = bi.rflags & 0x200 != 0;
    let (entry, reg, expect_mode) = match bi.entry {
        Entry::Linux64 => ("linux64", "rsi", 64),
        Entry::Pvh => ("pvh", "ebx", 32),
        Entry::Unknown(_) => ("unknown", "reg", 0),
    };
    let pg = bi.cr0 & (1 << 31) != 0;
    let pe = bi.cr0 & 1 != 0;
    let lma = bi.efer & (1 << 10) != 0;
    let mut fail = true;
    if let Some(p) = bi.boot_problem {
        let _ = write!(d, "{} {:#x};", p.what, p.value);
    } else if let Some(p) = bi.cmdline_problem {
        let _ = write!(d, "{} {:#x};", p.what, p.value);
    } else if if_on {
        let _ = d.write_str("interrupts were enabled at entry;");
    } else if bi.entry == Entry::Linux64 && !(pg && pe && lma) {
        let _ = d.write_str("linux64 entry without long mode and paging;");
    } else if bi.entry == Entry::Pvh && (pg || !pe) {
        let _ = d.write_str("PVH entry must be protected mode with paging off;");
    } else {
        fail = false;
    }
    let _ = write!(
        d,
        " entry={} {}={:#x} cs={:#x} mode={} if={} cr0={:#x} cr4={:#x}",
        entry, reg, bi.reg, bi.cs, expect_mode, if_on as u8, bi.cr0, bi.cr4
    );
    match bi.entry {
        Entry::Linux64 => {
            let _ = write!(
                d,
                " efer={:#x} hdr={}",
                bi.efer,
                if bi.hdr_magic { "HdrS" } else { "none" }
            );
        }
        Entry::Pvh => {
            let _ = write!(d, " start_info_version={}", bi.pvh_version);
        }
        Entry::Unknown(_) => {}
    }
    let _ = write!(
        d,
        " modules={} rsdp={:#x} cmdline_ptr={:#x} cmdline=\"{}\"",
        bi.mod_count,
        bi.rsdp,
        bi.cmdline_ptr,
        Printable(bi.cmdline())
    );
    if fail {
        Status::Fail
    } else {
        Status::Ok
    }
}

fn check_mem(d: &mut Details) -> Status {
    let bi = bootinfo::get();
    if let Some(p) = bi.mem_problem {
        let _ = write!(d, "{} {:#x} entries={}", p.what, p.value, bi.mem_announced);
        return Status::Fail;
    }
    let usable: u64 = bi
        .mem()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.size)
        .sum();
    let usable_mib = usable >> 20;
    let mut fail = None;
    if let Some(v) = cmdline::get(bi.cmdline(), b"probe.mem_mib") {
        match cmdline::parse_u64(v) {
            // Documented holes (real-mode area, tables) are below 8 MiB.
            Some(want) if usable_mib > want || usable_mib + 8 < want => {
                fail = Some(want);
            }
            Some(_) => {}
            None => {
                let _ = d.write_str("probe.mem_mib is not a number;");
                return Status::Fail;
            }
        }
    }
    let r = if fail.is_none() {
        Some(mem::test())
    } else {
        None
    };
    if let Some(want) = fail {
        let _ = write!(
            d,
            "usable {usable_mib} MiB does not match probe.mem_mib={want};"
        );
    } else if let Some((a, want, got)) = r.as_ref().and_then(|r| r.bad_addr) {
        let _ = write!(
            d,
            "pattern mismatch at {a:#x}: wrote {want:#x} read {got:#x};"
        );
    }
    let _ = write!(
        d,
        " usable={usable} usable_mib={usable_mib} entries={}",
        bi.mem_count
    );
    if let Some(r) = &r {
        let _ = write!(d, " tested_mib={}", (r.pages * 4096) >> 20);
        if r.unmapped_bytes > 0 {
            let _ = write!(
                d,
                " untested_unmapped_mib={} map_top={:#x}",
                r.unmapped_bytes >> 20,
                paging::wanted_limit()
            );
        }
    }
    let _ = d.write_str(" map=");
    for (i, e) in bi.mem().iter().enumerate() {
        let _ = write!(
            d,
            "{}{:#x}-{:#x}:{}",
            if i == 0 { "" } else { "," },
            e.addr,
            e.end(),
            e.kind
        );
    }
    if fail.is_some() || r.is_some_and(|r| r.bad_addr.is_some()) {
        Status::Fail
    } else {
        Status::Ok
    }
}

fn check_smp(d: &mut Details) -> Status {
    let st = SMP.get();
    let table = match (st.table, st.table_error) {
        (Some(t), _) => t,
        (None, e) => {
            let _ = write!(d, "{}", e.unwrap_or("no CPU table"));
            return Status::Fail;
        }
    };
    smp::start_aps();
    let st = SMP.get();
    if let Some(e) = st.start_error {
        let _ = write!(d, "{e}");
        return Status::Fail;
    }
    let online = smp::online().count();
    let mut fail = false;
    if online != table.listed {
        let _ = write!(
            d,
            "{online} CPUs online but the {} lists {};",
            table.source, table.listed
        );
        fail = true;
    }
    if let Some(v) = cmdline::get(bootinfo::get().cmdline(), b"probe.cpus") {
        match cmdline::parse_u64(v) {
            Some(n) if n as usize == online => {}
            _ => {
                let _ = write!(d, "{online} CPUs online, probe.cpus={};", Printable(v));
                fail = true;
            }
        }
    }
    let _ = write!(
        d,
        " cpus={} expected={} source={} table={:#x} bsp={} ids=",
        online,
        table.listed,
        table.source,
        table.table_addr,
        smp::BSP_APIC.load(Ordering::Relaxed)
    );
    for (i, (_, s)) in smp::online().enumerate() {
        let _ = write!(
            d,
            "{}{}",
            if i == 0 { "" } else { "," },
            s.lapic_id.load(Ordering::Relaxed)
        );
    }
    if st.missing_count > 0 {
        let _ = d.write_str(" missing=");
        for (i, id) in st.missing[..st.missing_count].iter().enumerate() {
            let _ = write!(d, "{}{}", if i == 0 { "" } else { "," }, id);
        }
        fail = true;
    }
    for (i, s) in smp::SLOTS.iter().enumerate() {
        if s.state.load(Ordering::Acquire) == smp::ST_FAULTED {
            let _ = write!(
                d,
                " cpu{}_fault=vector{}@{:#x}",
                i,
                s.fault_vector.load(Ordering::Relaxed),
                s.fault_rip.load(Ordering::Relaxed)
            );
            fail = true;
        }
    }
    if st.tramp != 0 {
        let _ = write!(d, " trampoline={:#x}", st.tramp);
    }
    if fail {
        Status::Fail
    } else {
        Status::Ok
    }
}

fn regs_str(d: &mut Details, regs: &[u32]) {
    for r in regs {
        for b in r.to_le_bytes() {
            let c = if (0x20..0x7f).contains(&b) && b != b'"' {
                b as char
            } else {
                '.'
            };
            let _ = d.write_char(c);
        }
    }
}

fn check_cpuid(d: &mut Details) -> Status {
    let [max, b, c, dd] = cpuid(0, 0);
    let l1 = cpuid(1, 0);
    let hv = l1[2] >> 31;
    let mut body = Details::new();
    let _ = body.write_str(" vendor=\"");
    regs_str(&mut body, &[b, dd, c]);
    let _ = write!(body, "\" max_leaf={max:#x} hypervisor_bit={hv}");
    if hv != 0 {
        let [hmax, hb, hc, hd] = cpuid(0x4000_0000, 0);
        let _ = body.write_str(" hv_signature=\"");
        regs_str(&mut body, &[hb, hc, hd]);
        let _ = write!(body, "\" hv_max_leaf={hmax:#x}");
    }
    let mut bad = 0;
    let _ = body.write_str(" cpus=");
    for (n, (i, s)) in smp::online().enumerate() {
        let lapic = s.lapic_id.load(Ordering::Relaxed);
        let leaf1 = s.leaf1_apic.load(Ordering::Relaxed);
        let x2 = s.x2apic.load(Ordering::Relaxed);
        let _ = write!(
            body,
            "{}cpu{}:lapic={},leaf1={}",
            if n == 0 { "" } else { ";" },
            i,
            lapic,
            leaf1
        );
        if x2 != u32::MAX {
            let _ = write!(body, ",leafb={x2}");
        }
        let _ = write!(body, ",hv={}", s.hv.load(Ordering::Relaxed));
        if leaf1 != lapic & 0xff || (x2 != u32::MAX && x2 != lapic) {
            bad += 1;
        }
    }
    if !SMP.get().started {
        let _ = body.write_str(" aps=not-started");
    }
    if bad > 0 {
        let _ = write!(d, "{bad} CPUs with CPUID APIC ID != LAPIC ID register;");
    }
    let _ = d.write_str(core::str::from_utf8(body.as_bytes()).unwrap_or(""));
    if bad > 0 {
        Status::Fail
    } else {
        Status::Ok
    }
}

pub fn irq_count(vector: u32) -> u64 {
    peek(crate::sym_addr!(irq_counts) + 8 * vector as u64)
}

fn check_irq(d: &mut Details) -> Status {
    if let Err(e) = lapic::check_mode() {
        let _ = d.write_str(e);
        return Status::Fail;
    }
    lapic::enable();
    // Measure the timer's rate: one-shot, masked, 2 ms.
    lapic::write(lapic::TIMER_DIV, 0xb); // divide by 1
    lapic::write(lapic::LVT_TIMER, 1 << 16 | TIMER_VECTOR);
    lapic::write(lapic::TIMER_INIT, u32::MAX);
    let t0 = rdtsc();
    time::delay_us(2000);
    let cur = lapic::read(lapic::TIMER_CUR);
    let t1 = rdtsc();
    let elapsed_us = time::tsc_to_us(t1 - t0).max(1);
    let khz = (u32::MAX - cur) as u64 * 1000 / elapsed_us;
    // Periodic, 1 ms, wait for 5 interrupts (1 s at most).
    let period = (khz.clamp(1000, u32::MAX as u64)).min(u32::MAX as u64) as u32;
    let before = irq_count(TIMER_VECTOR);
    let spurious_before = irq_count(lapic::SPURIOUS_VECTOR);
    lapic::write(lapic::LVT_TIMER, 1 << 17 | TIMER_VECTOR);
    lapic::write(lapic::TIMER_INIT, period);
    let start = rdtsc();
    let dl = time::deadline(1_000_000);
    cpu::sti();
    while irq_count(TIMER_VECTOR) - before < 5 && !time::passed(dl) {
        core::hint::spin_loop();
    }
    cpu::cli();
    let took = time::tsc_to_us(rdtsc() - start);
    stop_timer();
    let got = irq_count(TIMER_VECTOR) - before;
    let spurious = irq_count(lapic::SPURIOUS_VECTOR) - spurious_before;
    let status = if got >= 5 {
        Status::Ok
    } else {
        let _ = write!(d, "only {got} of 5 timer interrupts within 1 s;");
        Status::Fail
    };
    let _ = write!(
        d,
        " vector={TIMER_VECTOR:#x} interrupts={got} spurious={spurious} lapic_timer_khz={khz} period_ticks={period} elapsed_us={took}"
    );
    status
}

fn check_tsc(d: &mut Details) -> Status {
    time::cross_check();
    let bi = bootinfo::get();
    let now = rdtsc();
    let status = if now <= bi.tsc {
        let _ = d.write_str("TSC did not advance since entry;");
        Status::Fail
    } else if time::khz() == 0 {
        let _ = d.write_str("TSC frequency unknown;");
        Status::Fail
    } else if time::disagreement() {
        let _ = d.write_str("TSC frequency sources disagree;");
        Status::Fail
    } else {
        Status::Ok
    };
    let _ = write!(
        d,
        " entry={} now={} khz={} {} since_entry_us={}",
        bi.tsc,
        now,
        time::khz(),
        time::calibration(),
        time::tsc_to_us(now.saturating_sub(bi.tsc))
    );
    status
}

pub fn key_num(key: &[u8], default: u64, min: u64, max: u64) -> Result<u64, &'static str> {
    match cmdline::get(bootinfo::get().cmdline(), key) {
        None => Ok(default),
        Some(v) => match cmdline::parse_u64(v) {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err("value out of range or not a number"),
        },
    }
}

fn check_tick(d: &mut Details) -> Status {
    let ms = match key_num(b"probe.tick_ms", 100, 1, 60_000) {
        Ok(v) => v,
        Err(e) => {
            let _ = write!(d, "probe.tick_ms: {e}");
            return Status::Fail;
        }
    };
    let n = match key_num(b"probe.ticks", 50, 0, 1_000_000) {
        Ok(v) => v,
        Err(e) => {
            let _ = write!(d, "probe.ticks: {e}");
            return Status::Fail;
        }
    };
    let step = time::us_to_tsc(ms * 1000);
    let start = rdtsc();
    for i in 1..=n {
        let when = start.saturating_add(step.saturating_mul(i));
        while rdtsc() < when {
            core::hint::spin_loop();
        }
        println!("PROBE tick {} {}", i, rdtsc());
    }
    let _ = write!(
        d,
        "ticks={n} tick_ms={ms} tsc_khz={} elapsed_us={}",
        time::khz(),
        time::tsc_to_us(rdtsc() - start)
    );
    Status::Ok
}

fn check_virtio(d: &mut Details) -> Status {
    let bi = bootinfo::get();
    let mut n = 0;
    let mut bad = 0;
    let mut body = Details::new();
    for dev in virtio::devices(bi.cmdline()) {
        n += 1;
        match dev {
            Err(raw) => {
                bad += 1;
                let _ = write!(body, " malformed=\"{}\"", Printable(raw));
            }
            Ok(t) if t.dev.addr.saturating_add(0x100) > paging::mapped_limit() => {
                bad += 1;
                let _ = write!(body, " {:#x}:unmapped", t.dev.addr);
            }
            Ok(t) => {
                let magic = t.magic();
                if magic != virtio::MAGIC {
                    bad += 1;
                }
                let id = t.device_id();
                let _ = write!(
                    body,
                    " {:#x}+{:#x}:irq{}:magic={}:version={}:id={}({}):vendor={:#x}",
                    t.dev.addr,
                    t.dev.size,
                    t.dev.irq,
                    if magic == virtio::MAGIC { "ok" } else { "BAD" },
                    t.version(),
                    id,
                    virtio::device_name(id),
                    t.vendor_id()
                );
                if magic == virtio::MAGIC && id == 4 && t.version() == 2 {
                    match crate::virtio_rng::read(&t, 16) {
                        Ok(n) => {
                            let _ = write!(body, ":rng_bytes={n}");
                        }
                        Err(e) => {
                            bad += 1;
                            let _ = write!(body, ":rng_error=\"{e}\"");
                        }
                    }
                }
            }
        }
    }
    if n == 0 {
        let _ = d.write_str("no virtio_mmio.device= on the command line");
        return Status::Skip;
    }
    if bad > 0 {
        let _ = write!(
            d,
            "{bad} of {n} devices malformed, without virtio magic or failing;"
        );
    }
    let _ = write!(d, " devices={n}");
    let _ = d.write_str(core::str::from_utf8(body.as_bytes()).unwrap_or(""));
    if bad > 0 {
        Status::Fail
    } else {
        Status::Ok
    }
}

/// Reads an unmapped address: the CPL0 exception path must turn the page
/// fault into this check's FAIL line and continue with the next check.
fn check_selftest_fault(_d: &mut Details) -> Status {
    let addr = paging::mapped_limit() + 0x1000;
    let v: u64 = peek(addr);
    // Not reached when the fault is handled.
    let _ = write!(_d, "read {v:#x} from unmapped {addr:#x} without a fault");
    Status::Fail
}

fn check_selftest_panic(_d: &mut Details) -> Status {
    panic!("selftest_panic")
}

/// Recursion with 4 KiB frames, deeper than the boot CPU's 256 KiB stack:
/// the guard page below the stack must stop it with a page fault.
fn check_selftest_stack(d: &mut Details) -> Status {
    #[inline(never)]
    fn dive(depth: u32) -> u64 {
        let mut frame = [0u8; 4096];
        frame[0] = depth as u8;
        let frame = core::hint::black_box(&mut frame);
        if depth == 0 {
            return frame[0] as u64;
        }
        dive(depth - 1) + frame[4095] as u64
    }
    let v = dive(core::hint::black_box(128));
    // Not reached when the guard page works.
    let _ = write!(d, "512 KiB of stack used without a fault ({v})");
    Status::Fail
}

fn check_selftest_nested_fault(_d: &mut Details) -> Status {
    NESTED_SELFTEST.store(NESTED_FAULT, Ordering::Relaxed);
    check_selftest_fault(_d)
}

fn check_selftest_nested_panic(_d: &mut Details) -> Status {
    NESTED_SELFTEST.store(NESTED_PANIC, Ordering::Relaxed);
    check_selftest_fault(_d)
}
