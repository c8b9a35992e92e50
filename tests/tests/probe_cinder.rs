//! The probe guest under cinder: both entry paths (PVH and the Linux 64-bit protocol), 1, 2
//! and 4 vCPUs, 128, 3584 and 5120 MiB (RAM above 4 GiB past the MMIO gap). Every check must
//! pass, and what the probe saw must match what cinder was asked for. Also: the probe's
//! i8042 reset ends cinder with exit code 0.

use std::time::Duration;

use cinder_tests::cinder::{cinder, require_kvm};
use cinder_tests::probe::{self, ProbeLog, Status};
use cinder_tests::runner::{run, RunResult};

const CHECKS: &str = "boot,mem,smp,cpuid,irq,tsc";
/// The hole cinder's memory map documents: [EBDA, 1 MiB) is not RAM for the guest.
const HOLE: u64 = 0x10_0000 - 0x9_fc00;

struct Run {
    r: RunResult,
    log: ProbeLog,
    what: String,
}

impl Run {
    fn ensure(&self, cond: bool, msg: &str) {
        if !cond {
            panic!("{}: {msg}\n{}", self.what, self.r.log());
        }
    }
    fn check(&self, name: &str) -> &probe::Check {
        self.log
            .check(name)
            .unwrap_or_else(|| panic!("{}: no line for {name}\n{}", self.what, self.r.log()))
    }
}

/// Runs the probe to its end, whatever that is (see `boot` for a normal run).
fn start(protocol: &str, vcpus: u8, mib: u64, cmdline: &str) -> Run {
    require_kvm();
    let mut c = cinder();
    c.arg("--kernel")
        .arg(probe::elf_path())
        .args(["--boot-protocol", protocol])
        .args(["--vcpus", &vcpus.to_string(), "--memory", &mib.to_string()])
        .args(["--cmdline", cmdline]);
    let r = run(
        c,
        Duration::from_secs(if mib > 1024 { 300 } else { 120 }),
        |_| false,
    );
    let log = probe::parse(&r.stdout);
    let what = format!("probe under cinder ({protocol}, {vcpus} vCPU, {mib} MiB, `{cmdline}`)");
    eprintln!("{what}: {:.2?}, done={:?}", r.elapsed, log.done);
    let run = Run { r, log, what };
    run.ensure(!run.r.timed_out, "timed out (cinder killed)");
    run
}

/// A normal run: to `PROBE DONE` and the probe's i8042 reset.
fn boot(protocol: &str, vcpus: u8, mib: u64, cmdline: &str) -> Run {
    let run = start(protocol, vcpus, mib, cmdline);
    run.ensure(run.log.done.is_some(), "no PROBE DONE line");
    run.ensure(
        run.r.code() == Some(0),
        "the probe's i8042 reset must end cinder with exit code 0",
    );
    run
}

fn full(protocol: &str, vcpus: u8, mib: u64) {
    let cmdline = format!("probe.run={CHECKS} probe.cpus={vcpus} probe.mem_mib={mib}");
    let run = boot(protocol, vcpus, mib, &cmdline);
    let n = u32::try_from(CHECKS.split(',').count()).expect("the check count fits u32");
    run.ensure(
        run.log.done == Some((n, n)),
        &format!("expected PROBE DONE {n}/{n}"),
    );
    for name in CHECKS.split(',') {
        run.ensure(
            run.check(name).status == Status::Ok,
            &format!("check {name} not ok"),
        );
    }
    let boot = run.check("boot");
    run.ensure(boot.field("entry") == Some(protocol), "entry path");
    run.ensure(
        boot.details.contains(&cmdline),
        "the guest sees our command line",
    );
    run.ensure(boot.field("if") == Some("0"), "interrupts off at entry");
    let mode = if protocol == "pvh" { "32" } else { "64" };
    run.ensure(boot.field("mode") == Some(mode), "CS mode at entry");

    let mem = run.check("mem");
    run.ensure(
        mem.num("usable") == Some((mib << 20) - HOLE),
        "usable RAM must be --memory minus the documented hole",
    );
    run.ensure(
        mem.num("tested_mib").unwrap_or(0) + 16 >= mib,
        "pattern test covered RAM",
    );

    let smp = run.check("smp");
    run.ensure(smp.num("cpus") == Some(u64::from(vcpus)), "CPUs online");
    run.ensure(
        smp.num("expected") == Some(u64::from(vcpus)),
        "CPUs in cinder's MP table",
    );

    let cpuid = run.check("cpuid");
    run.ensure(cpuid.field("hypervisor_bit") == Some("1"), "hypervisor bit");
    run.ensure(
        cpuid.details.contains("hv_signature=\"KVMKVMKVM"),
        "KVM signature leaf",
    );
    run.ensure(
        cpuid.details.matches("lapic=").count() == vcpus as usize,
        "CPUID seen on every CPU",
    );
    for i in 0..vcpus {
        run.ensure(
            cpuid.details.contains(&format!("cpu{i}:lapic={i},")),
            &format!("CPU {i} has APIC ID {i}"),
        );
    }
    run.ensure(
        run.check("irq").num("interrupts").unwrap_or(0) >= 5,
        "timer interrupts",
    );
    let tsc = run.check("tsc");
    run.ensure(tsc.num("now") > tsc.num("entry"), "TSC advances");
}

#[test]
fn probe_pvh_1cpu_128m_under_cinder() {
    full("pvh", 1, 128);
}

#[test]
fn probe_pvh_2cpu_3584m_under_cinder() {
    full("pvh", 2, 3584);
}

#[test]
fn probe_pvh_4cpu_5120m_under_cinder() {
    full("pvh", 4, 5120);
}

#[test]
fn probe_linux64_1cpu_5120m_under_cinder() {
    full("linux64", 1, 5120);
}

#[test]
fn probe_linux64_2cpu_128m_under_cinder() {
    full("linux64", 2, 128);
}

#[test]
fn probe_linux64_4cpu_3584m_under_cinder() {
    full("linux64", 4, 3584);
}

#[test]
fn probe_unknown_check_fails_cleanly_under_cinder() {
    let run = boot("auto", 1, 128, "probe.run=boot,no_such_check");
    run.ensure(run.log.done == Some((1, 2)), "expected PROBE DONE 1/2");
    run.ensure(
        run.check("no_such_check").status == Status::Fail,
        "unknown name FAILs",
    );
}

#[test]
fn probe_faults_panics_and_stack_overflow_become_fail_lines_under_cinder() {
    // Each self-test fails on purpose at CPL3: a read of unmapped memory, a panic, and a
    // recursion past the end of the 256 KiB stack into its guard page. The fault path (on its
    // own stack) reports each and the run goes on, on every CPU count.
    let run = boot(
        "auto",
        2,
        128,
        "probe.run=selftest_fault,tsc,selftest_panic,selftest_stack,boot",
    );
    run.ensure(run.log.done == Some((2, 5)), "expected PROBE DONE 2/5");
    let f = run.check("selftest_fault");
    run.ensure(
        f.status == Status::Fail && f.num("vector") == Some(14),
        "selftest_fault is a page fault",
    );
    run.ensure(
        run.check("selftest_panic")
            .details
            .starts_with("panic: selftest_panic"),
        "panic message",
    );
    let st = run.check("selftest_stack");
    run.ensure(
        st.status == Status::Fail && st.num("vector") == Some(14),
        "the stack overflow is a page fault in the guard page",
    );
    run.ensure(run.check("tsc").status == Status::Ok, "tsc after the fault");
    run.ensure(
        run.check("boot").status == Status::Ok,
        "boot after the stack overflow",
    );
}

#[test]
fn probe_failure_in_the_failure_path_ends_the_run_under_cinder() {
    // A fault or a panic while the fault path runs must not recurse: one FATAL line, then the
    // reset path (cinder ends with 0), and nothing after it.
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
        let run = start("auto", 1, 128, &format!("probe.run=boot,{check},tsc"));
        run.ensure(run.check("boot").status == Status::Ok, "boot ran first");
        run.ensure(run.r.stdout.contains(line), &format!("a line `{line}`"));
        run.ensure(
            run.log.done.is_none(),
            "no PROBE DONE after a fatal failure",
        );
        run.ensure(run.log.check("tsc").is_none(), "no check after it");
        run.ensure(run.r.code() == Some(0), "the reset ends cinder with 0");
    }
}

#[test]
fn probe_sigterm_ends_cinder_cleanly_under_cinder() {
    require_kvm();
    let mut c = cinder();
    c.arg("--kernel").arg(probe::elf_path()).args([
        "--cmdline",
        "probe.run=tick probe.ticks=100000 probe.tick_ms=10",
    ]);
    let mut s = cinder_tests::session::Session::start(c);
    s.expect("PROBE tick 3 ", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    s.signal(libc::SIGTERM);
    let st = s
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.code(), Some(143), "SIGTERM exit code\n{}", s.log());
}
