//! The Linux slow lane: the test profile of the default guest reaches its init under cinder,
//! reports CPUs and memory that match what cinder was asked for, runs a command typed into
//! the serial console, and `reboot -f` ends cinder with exit code 0. Each run also prints
//! cinder's start-up cost next to the guest's (exec -> first console output -> init).
//!
//! The profile's kvm.c patch (no PV IPI / sched-yield) is not needed here: cinder's
//! `--cpu-template no-pv-hypercalls` hides those features, so these tests use a test
//! profile built with `CINDER_TEST_KVM_PV_PATCH=0` when it is present, and the template always.

use std::time::Duration;

use cinder_tests::cinder::{cinder, require_kvm};
use cinder_tests::guest::GuestDir;
use cinder_tests::session::Session;

/// Generous per-step deadline: the guest kernel runs in an emulator on the test machines.
const STEP: Duration = Duration::from_secs(240);

fn parse_field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

fn lane(vcpus: u8, mib: u64) {
    require_kvm();
    let g = GuestDir::test_profile();
    let cmdline = std::fs::read_to_string(g.file("cmdline")).expect("profile cmdline");
    let mut c = cinder();
    c.arg("--kernel")
        .arg(g.file("vmlinux"))
        .arg("--initrd")
        .arg(g.file("initramfs.cpio"))
        .args(["--cmdline", cmdline.trim()])
        .args(["--vcpus", &vcpus.to_string(), "--memory", &mib.to_string()])
        .args(["--cpu-template", "no-pv-hypercalls"]);
    let mut s = Session::start(c);
    // With `quiet` the kernel may print nothing before init: the first byte of console output
    // (the kernel's or init's) marks the guest running.
    let first = s.expect_output(STEP).unwrap_or_else(|e| panic!("{e}"));
    let (marker_text, init_at) = s
        .expect("CINDER-INIT ok", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    let (rest, _) = s.expect("\n", STEP).unwrap_or_else(|e| panic!("{e}"));
    let line = format!("CINDER-INIT ok{rest}");
    let _ = marker_text;
    eprintln!(
        "linux lane {vcpus} vCPU {mib} MiB: exec -> first console output {:.2?}, exec -> init {:.2?}",
        first, init_at
    );
    let cpus =
        parse_field(&line, "cpus=").unwrap_or_else(|| panic!("no cpus= in {line:?}\n{}", s.log()));
    let mem_kb = parse_field(&line, "memtotal_kb=")
        .unwrap_or_else(|| panic!("no memtotal_kb= in {line:?}\n{}", s.log()));
    assert_eq!(cpus, u64::from(vcpus), "guest CPU count\n{}", s.log());
    let asked_kb = mib * 1024;
    assert!(
        mem_kb <= asked_kb && mem_kb >= asked_kb * 3 / 4,
        "MemTotal {mem_kb} kB does not fit --memory {mib} MiB\n{}",
        s.log()
    );
    // The console works both ways: a command typed in runs and its output comes back.
    s.send("echo typed-$((6*7))-back\n")
        .unwrap_or_else(|e| panic!("{e}"));
    s.expect("typed-42-back", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    s.send("reboot -f\n").unwrap_or_else(|e| panic!("{e}"));
    let status = s.wait_exit(STEP).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "reboot -f must end cinder with 0\n{}",
        s.log()
    );
}

#[test]
fn linux_lane_1_vcpu_under_cinder() {
    lane(1, 128);
}

#[test]
fn linux_lane_2_vcpus_under_cinder() {
    lane(2, 256);
}
