//! QEMU oracle tests for the probe guest: boot it under QEMU's microvm
//! machine (KVM when /dev/kvm opens, TCG otherwise), read its serial
//! report, and check it against the configuration. A missing QEMU fails.
//!
//! Runs are serialized: a TCG guest of 3584 MiB touches every page.

use cinder_tests::probe::{self, ProbeLog, Status};
use cinder_tests::qemu::{Microvm, DEFAULT_MACHINE};
use cinder_tests::runner::RunResult;
use std::sync::Mutex;
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());

const ALL: &str = "boot,mem,smp,cpuid,irq,tsc,tick";
const TICKS: u64 = 3;

struct Run {
    result: RunResult,
    log: ProbeLog,
    what: String,
}

impl Run {
    /// Panics with the whole serial log.
    fn fail(&self, msg: &str) -> ! {
        panic!("{}: {msg}\n{}", self.what, self.result.log());
    }

    fn ensure(&self, cond: bool, msg: &str) {
        if !cond {
            self.fail(msg);
        }
    }

    fn check(&self, name: &str) -> &probe::Check {
        match self.log.check(name) {
            Some(c) => c,
            None => self.fail(&format!("no result line for check {name}")),
        }
    }
}

fn boot(cpus: u32, mem_mib: u64, cmdline: &str, extra: &[&str]) -> Run {
    boot_on(DEFAULT_MACHINE, cpus, mem_mib, cmdline, extra)
}

/// Runs the probe to its end, whatever that is (see `boot_on` for a normal run).
fn start_on(machine: &str, cpus: u32, mem_mib: u64, cmdline: &str, extra: &[&str]) -> Run {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut vm = Microvm::new(&probe::elf_path(), cmdline, cpus, mem_mib);
    vm.machine = machine.to_string();
    vm.extra = extra.iter().map(|s| s.to_string()).collect();
    // Generous: under TCG on a loaded 2-core host the 3.5 GiB memory test
    // takes ~15 s; a hang is what this bounds.
    let timeout = Duration::from_secs(if mem_mib > 1024 { 240 } else { 90 });
    let result = vm.run(timeout);
    let log = probe::parse(&result.stdout);
    let what = format!(
        "probe under QEMU ({:?}, {cpus} vCPU, {mem_mib} MiB, `{cmdline}`)",
        vm.accel
    );
    eprintln!(
        "{what}: {:.2?}, {}",
        result.elapsed,
        match log.done {
            Some((p, t)) => format!("PROBE DONE {p}/{t}"),
            None => "no PROBE DONE".to_string(),
        }
    );
    let run = Run { result, log, what };
    run.ensure(!run.result.timed_out, "timed out (QEMU killed)");
    run
}

fn boot_on(machine: &str, cpus: u32, mem_mib: u64, cmdline: &str, extra: &[&str]) -> Run {
    let run = start_on(machine, cpus, mem_mib, cmdline, extra);
    run.ensure(run.log.done.is_some(), "no PROBE DONE line");
    run
}

fn full_run(cpus: u32, mem_mib: u64) {
    let cmdline = format!("probe.run={ALL} probe.ticks={TICKS} probe.tick_ms=20");
    let run = boot(cpus, mem_mib, &cmdline, &[]);
    let n = u32::try_from(ALL.split(',').count()).expect("the check count fits u32");
    run.ensure(
        run.log.done == Some((n, n)),
        &format!("expected PROBE DONE {n}/{n}"),
    );
    run.ensure(run.log.unparsed.is_empty(), "unparsed PROBE lines");
    for name in ALL.split(',') {
        let c = run.check(name);
        run.ensure(c.status == Status::Ok, &format!("check {name} is not ok"));
        run.ensure(
            c.num("tsc").is_some(),
            &format!("check {name} has no tsc= field"),
        );
    }

    let boot = run.check("boot");
    run.ensure(
        boot.field("entry") == Some("pvh"),
        "QEMU boots an ELF through PVH",
    );
    run.ensure(
        boot.details.contains(&cmdline),
        "the guest sees the command line",
    );
    run.ensure(boot.field("if") == Some("0"), "interrupts off at entry");

    let mem = run.check("mem");
    let usable = mem.num("usable_mib").unwrap_or(0);
    run.ensure(
        usable <= mem_mib && usable + 8 >= mem_mib,
        &format!("usable {usable} MiB not within 8 MiB below -m {mem_mib}"),
    );
    let tested = mem.num("tested_mib").unwrap_or(0);
    run.ensure(
        tested + 16 >= mem_mib,
        &format!("only {tested} MiB pattern-tested"),
    );

    let smp = run.check("smp");
    run.ensure(
        smp.num("cpus") == Some(cpus as u64),
        &format!("smp cpus != {cpus}"),
    );
    run.ensure(smp.num("expected") == Some(cpus as u64), "table CPU count");

    let cpuid = run.check("cpuid");
    run.ensure(cpuid.field("hypervisor_bit") == Some("1"), "hypervisor bit");
    run.ensure(
        cpuid.details.matches("lapic=").count() == cpus as usize,
        "cpuid reported for every CPU",
    );

    let irq = run.check("irq");
    run.ensure(
        irq.num("interrupts").unwrap_or(0) >= 5,
        "timer interrupts counted",
    );

    let tsc = run.check("tsc");
    run.ensure(tsc.num("khz").unwrap_or(0) > 0, "TSC frequency");
    run.ensure(tsc.num("now") > tsc.num("entry"), "TSC advances");

    let ticks: Vec<u64> = run.log.ticks.iter().map(|t| t.0).collect();
    run.ensure(ticks == (1..=TICKS).collect::<Vec<_>>(), "tick lines 1..=n");
    run.ensure(
        run.log.ticks.windows(2).all(|w| w[1].1 > w[0].1),
        "tick TSCs increase",
    );
}

#[test]
fn qemu_1cpu_128m() {
    full_run(1, 128);
}

#[test]
fn qemu_2cpu_128m() {
    full_run(2, 128);
}

#[test]
fn qemu_1cpu_3584m() {
    full_run(1, 3584);
}

#[test]
fn qemu_2cpu_3584m() {
    full_run(2, 3584);
}

#[test]
fn unknown_check_name_fails_and_counts() {
    let run = boot(1, 128, "probe.run=boot,no_such_check,tsc", &[]);
    run.ensure(run.log.done == Some((2, 3)), "expected PROBE DONE 2/3");
    let c = run.check("no_such_check");
    run.ensure(c.status == Status::Fail, "unknown name must FAIL");
    run.ensure(c.details.starts_with("unknown check"), "reason");
    run.ensure(
        run.check("tsc").status == Status::Ok,
        "checks after it still run",
    );
}

#[test]
fn expectations_given_to_the_probe_are_enforced() {
    // Deliberately wrong: 2 vCPUs but probe.cpus=3; 128 MiB but mem_mib=512.
    let run = boot(
        2,
        128,
        "probe.run=smp,mem probe.cpus=3 probe.mem_mib=512",
        &[],
    );
    run.ensure(run.log.done == Some((0, 2)), "expected PROBE DONE 0/2");
    let smp = run.check("smp");
    run.ensure(
        smp.status == Status::Fail,
        "smp must FAIL on a wrong probe.cpus",
    );
    run.ensure(
        smp.details.contains("probe.cpus=3"),
        "smp reason names the key",
    );
    let mem = run.check("mem");
    run.ensure(
        mem.status == Status::Fail,
        "mem must FAIL on a wrong probe.mem_mib",
    );
}

#[test]
fn empty_run_list_is_done_at_once() {
    let run = boot(1, 128, "probe.run=", &[]);
    run.ensure(run.log.done == Some((0, 0)), "expected PROBE DONE 0/0");
}

#[test]
fn mp_table_and_virtio_devices_without_acpi() {
    // acpi=off: CPUs come from the MP table and microvm adds one
    // `virtio_mmio.device=` per device to the command line. The rng device
    // exercises the probe's virtqueue core (request + used-ring polling).
    let run = boot_on(
        &format!("{DEFAULT_MACHINE},acpi=off"),
        2,
        128,
        "probe.run=smp,virtio",
        &[
            "-global",
            "virtio-mmio.force-legacy=false",
            "-device",
            "virtio-rng-device",
        ],
    );
    run.ensure(run.log.done == Some((2, 2)), "expected PROBE DONE 2/2");
    let smp = run.check("smp");
    run.ensure(
        smp.field("source") == Some("mptable"),
        "CPUs from the MP table",
    );
    run.ensure(smp.num("cpus") == Some(2), "2 CPUs online");
    let v = run.check("virtio");
    run.ensure(
        v.details.contains("magic=ok:version=2:id=4(rng)"),
        "rng device listed",
    );
    run.ensure(v.details.contains("rng_bytes=16"), "rng request completed");
}

#[test]
fn faults_and_panics_become_fail_lines() {
    // The self-tests fault (unmapped read at CPL3) and panic on purpose;
    // the CPL0 exception path and the panic handler must report and go on.
    // selftest_stack recurses into the guard page below the stack.
    let run = boot(
        1,
        128,
        "probe.run=selftest_fault,tsc,selftest_panic,selftest_stack,boot",
        &[],
    );
    run.ensure(run.log.done == Some((2, 5)), "expected PROBE DONE 2/5");
    let f = run.check("selftest_fault");
    run.ensure(f.status == Status::Fail, "selftest_fault FAILs");
    run.ensure(f.num("vector") == Some(14), "reported as a page fault");
    let p = run.check("selftest_panic");
    run.ensure(
        p.details.starts_with("panic: selftest_panic"),
        "panic message",
    );
    let st = run.check("selftest_stack");
    run.ensure(
        st.status == Status::Fail && st.num("vector") == Some(14),
        "the stack overflow is a page fault",
    );
    run.ensure(
        run.check("boot").status == Status::Ok,
        "boot after the panic and the overflow",
    );
}

#[test]
fn a_failure_in_the_failure_path_ends_the_run() {
    // No recursion: one FATAL line, then the reset (QEMU exits, -no-reboot), nothing after.
    for (check, line) in [
        (
            "selftest_nested_fault",
            "PROBE FATAL fault in the failure path vector=0xe rip=0x",
        ),
        (
            "selftest_nested_panic",
            "PROBE FATAL panic in the failure path: selftest_nested_panic",
        ),
    ] {
        let run = start_on(
            DEFAULT_MACHINE,
            1,
            128,
            &format!("probe.run=boot,{check},tsc"),
            &["-device", "i8042"],
        );
        run.ensure(run.check("boot").status == Status::Ok, "boot ran first");
        run.ensure(
            run.result.stdout.contains(line),
            &format!("a line `{line}`"),
        );
        run.ensure(run.log.done.is_none(), "no PROBE DONE after it");
        run.ensure(run.log.check("tsc").is_none(), "no check after it");
    }
}
