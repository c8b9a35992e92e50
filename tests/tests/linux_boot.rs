//! The Linux boot protocol, proven by Linux itself: the clean default guest kernel boots under
//! cinder as an ELF vmlinux (PVH and 64-bit entry) and as a bzImage, and what its early
//! console prints (banner, command line, e820 map, CPUs found in our MP table) must match
//! what cinder was asked for. On the development machines Linux then meets the emulator's
//! limits, so each run ends itself once it has seen what it needs.

use std::time::Duration;

use arch::layout::{e820_map, E820_RAM};
use cinder_tests::cinder::{cinder, require_kvm};
use cinder_tests::guest::GuestDir;
use cinder_tests::runner::{run, RunResult};

const CMDLINE: &str =
    "earlyprintk=serial,ttyS0 console=ttyS0 reboot=k panic=-1 noxsave nokaslr cinder.test=boot";

/// Linux's "BIOS-e820" lines for the usable RAM of `mib` MiB, as cinder describes it.
/// (Reserved lines are not compared: Linux's PVH entry adds [0xa0000, 1 MiB) as reserved and
/// merges it with the EBDA, so their shape depends on the entry path.)
fn expected_e820(mib: u64) -> Vec<String> {
    e820_map(mib << 20)
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| {
            format!(
                "BIOS-e820: [mem {:#018x}-{:#018x}] usable",
                e.addr,
                e.addr + e.size - 1
            )
        })
        .collect()
}

fn boot(kernel: &str, protocol: &str, vcpus: u8, mib: u64, until: &'static str) -> RunResult {
    require_kvm();
    let g = GuestDir::default_guest();
    let mut c = cinder();
    c.args(["--kernel"])
        .arg(g.file(kernel))
        .args(["--boot-protocol", protocol])
        .args(["--vcpus", &vcpus.to_string(), "--memory", &mib.to_string()])
        .args(["--cmdline", CMDLINE]);
    // Stop once the line holding `until` is complete (output arrives in pieces).
    run(c, Duration::from_secs(300), move |out| {
        out.find(until).is_some_and(|at| out[at..].contains('\n'))
    })
}

fn check_common(r: &RunResult, mib: u64) {
    let log = r.log();
    assert!(!r.timed_out, "Linux did not get far enough:\n{log}");
    assert!(r.stdout.contains("Linux version 6.1"), "no banner:\n{log}");
    assert!(
        r.stdout.contains(&format!("Command line: {CMDLINE}")),
        "the kernel did not see our command line:\n{log}"
    );
    for line in expected_e820(mib) {
        assert!(
            r.stdout.contains(&line),
            "missing e820 line {line:?}:\n{log}"
        );
    }
    // Independently of arch's table: usable RAM is all of --memory but the EBDA-to-1MiB hole.
    let usable: u64 = r
        .stdout
        .lines()
        .filter(|l| l.contains("BIOS-e820:") && l.trim_end().ends_with("usable"))
        .filter_map(|l| {
            let inner = l.split('[').nth(1)?.split(']').next()?;
            let range = inner.strip_prefix("mem ")?;
            let (a, b) = range.split_once('-')?;
            let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?;
            let b = u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?;
            Some(b - a + 1)
        })
        .sum();
    assert_eq!(
        usable,
        (mib << 20) - (0x100000 - 0x9fc00),
        "usable RAM:\n{log}"
    );
}

#[test]
fn linux_vmlinux_pvh_boots_under_cinder() {
    let r = boot("vmlinux", "pvh", 1, 256, "smpboot: Allowing");
    check_common(&r, 256);
    assert!(r.stdout.contains("Allowing 1 CPUs"), "{}", r.log());
}

#[test]
fn linux_vmlinux_linux64_boots_under_cinder_with_2_cpus() {
    let r = boot("vmlinux", "linux64", 2, 512, "smpboot: Allowing");
    check_common(&r, 512);
    let log = r.log();
    assert!(
        r.stdout.contains("MPTABLE: OEM ID: CINDER"),
        "MP table not used:\n{log}"
    );
    assert!(r.stdout.contains("Allowing 2 CPUs"), "{log}");
}

#[test]
fn linux_bzimage_boots_under_cinder_above_4g() {
    let r = boot("bzImage-uncompressed", "auto", 2, 5120, "smpboot: Allowing");
    check_common(&r, 5120);
    assert!(r.stdout.contains("Allowing 2 CPUs"), "{}", r.log());
}
