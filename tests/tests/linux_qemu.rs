//! The guest artifacts against QEMU microvm, the independent oracle: the clean default guest
//! and the test profile boot to their init (vmlinux through PVH, and the uncompressed bzImage),
//! report the CPUs and memory QEMU gave them, run a command typed into the serial console, and
//! `reboot -f` ends the VMM with exit code 0. This proves the recipes in resources/guest on
//! any host (TCG without KVM), so a failure under cinder points at cinder.
//!
//! QEMU runs both guests on KVM only on a hardware KVM host, and on TCG elsewhere: kvm-pvm
//! cannot run a stock kernel's kernel mode, and its emulated kernel mode is not a faithful
//! CPU for the test profile either (see `Accel::for_linux`).

use std::time::Duration;

use cinder_tests::guest::GuestDir;
use cinder_tests::qemu::{Accel, Microvm};
use cinder_tests::session::Session;

const MACHINE: &str = "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off";
const STEP: Duration = Duration::from_secs(300);

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

fn boot(g: &GuestDir, kernel: &str, cmdline: &str, cpus: u32, mib: u64, accel: Accel) {
    let mut vm = Microvm::new(&g.file(kernel), cmdline, cpus, mib);
    vm.accel = accel;
    vm.machine = MACHINE.to_string();
    vm.extra = vec![
        "-device".into(),
        "i8042".into(),
        "-initrd".into(),
        g.file("initramfs.cpio").display().to_string(),
    ];
    let mut cmd = vm.command();
    cmd.stdin(std::process::Stdio::piped());
    let mut s = Session::start(cmd);
    let (line, at) = s
        .expect_line("CINDER-INIT ok", STEP)
        .unwrap_or_else(|e| panic!("{kernel}: {e}"));
    eprintln!(
        "{} {kernel} under QEMU ({:?}, {cpus} vCPU, {mib} MiB): init at {at:.2?}",
        g.0.display(),
        vm.accel
    );
    assert_eq!(field(&line, "cpus="), Some(u64::from(cpus)), "{}", s.log());
    let kb = field(&line, "memtotal_kb=").unwrap_or(0);
    assert!(
        kb <= mib * 1024 && kb >= mib * 1024 * 3 / 4,
        "MemTotal {kb} kB\n{}",
        s.log()
    );
    s.expect("CINDER-INIT shell", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    s.send("echo typed-$((6*7))-back\n")
        .unwrap_or_else(|e| panic!("{e}"));
    s.expect("typed-42-back", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    s.send("reboot -f\n").unwrap_or_else(|e| panic!("{e}"));
    let st = s.wait_exit(STEP).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        st.code(),
        Some(0),
        "reboot -f ends QEMU with 0\n{}",
        s.log()
    );
}

#[test]
fn default_guest_vmlinux_boots_under_qemu() {
    let g = GuestDir::default_guest();
    boot(
        &g,
        "vmlinux",
        "console=ttyS0 reboot=k panic=-1",
        2,
        256,
        Accel::for_linux(),
    );
}

#[test]
fn default_guest_bzimage_boots_under_qemu() {
    let g = GuestDir::default_guest();
    boot(
        &g,
        "bzImage-uncompressed",
        "console=ttyS0 reboot=k panic=-1",
        1,
        128,
        Accel::for_linux(),
    );
}

#[test]
fn test_profile_boots_under_qemu() {
    let g = GuestDir::test_profile();
    let cmdline = std::fs::read_to_string(g.file("cmdline")).expect("profile cmdline");
    boot(&g, "vmlinux", cmdline.trim(), 2, 256, Accel::for_linux());
}
