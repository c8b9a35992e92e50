//! virtio-console and virtio-rng through Linux's own drivers: the test profile runs with
//! `console=hvc0` (the virtio console is the only console: cinder `--console virtio`, QEMU a
//! virtconsole on stdio with no serial backend), a typed command round-trips through it, the
//! kernel picked the virtio RNG as `/dev/hwrng`, and 64 bytes read from it are not all equal
//! and differ between two boots.
//!
//! QEMU microvm is the oracle; the `_under_cinder` variant needs /dev/kvm.

use std::process::Command;
use std::sync::Mutex;

use cinder_tests::cinder::require_kvm;
use cinder_tests::guest::GuestDir;
use cinder_tests::linux::{cinder_vm, ok, profile_cmdline, QEMU_MACHINE, STEP};
use cinder_tests::qemu::{qemu_bin, Accel};
use cinder_tests::session::Session;

/// One guest at a time (QEMU TCG takes both cores).
static SERIAL: Mutex<()> = Mutex::new(());

/// The profile's command line with hvc0 as the console.
fn cmdline(g: &GuestDir) -> String {
    let c = profile_cmdline(g);
    assert!(c.contains("console=ttyS0"), "profile cmdline {c:?}");
    c.replace("console=ttyS0", "console=hvc0")
}

/// One boot: the typed round trip, the RNG in use, 64 bytes of /dev/hwrng.
fn boot(what: &str, vmm: Command) -> Vec<u8> {
    let mut s = Session::start(vmm);
    let (_, t_init) = ok(s.expect_line("CINDER-INIT ok", STEP));
    ok(s.expect("CINDER-INIT shell", STEP));
    // Typed text comes back echoed; the markers are split with `""` so only output matches.
    ok(s.send("echo typed-$((6*7))-back\n"));
    ok(s.expect("typed-42-back", STEP));
    ok(s.send(
        "read a < /sys/class/tty/console/active; read r < /sys/class/misc/hw_random/rng_current; \
         echo CON\"\"SOLE=$a RNG\"\"CUR=$r\n",
    ));
    let (line, _) = ok(s.expect_line("CONSOLE=", STEP));
    let line = line.lines().last().unwrap_or_default().to_string();
    assert!(
        line.contains("CONSOLE=hvc0 "),
        "{what}: console {line:?}\n{}",
        s.log()
    );
    assert!(
        line.contains("RNGCUR=virtio_rng"),
        "{what}: current hwrng {line:?}\n{}",
        s.log()
    );
    let t = std::time::Instant::now();
    ok(s.send("echo HW\"\"RNG-BEGIN; head -c 64 /dev/hwrng | od -An -tx1; echo HW\"\"RNG-END\n"));
    ok(s.expect_line("HWRNG-BEGIN", STEP));
    let (hex, _) = ok(s.expect("HWRNG-END", STEP));
    let t_rng = t.elapsed();
    let bytes: Vec<u8> = hex
        .split_whitespace()
        .filter(|w| w.len() == 2)
        .filter_map(|w| u8::from_str_radix(w, 16).ok())
        .collect();
    assert_eq!(bytes.len(), 64, "{what}: hwrng bytes {hex:?}\n{}", s.log());
    assert!(
        bytes.iter().any(|&b| b != bytes[0]),
        "{what}: 64 equal bytes from /dev/hwrng\n{}",
        s.log()
    );
    ok(s.send("reboot -f\n"));
    let st = ok(s.wait_exit(STEP));
    assert_eq!(st.code(), Some(0), "{what}: reboot -f\n{}", s.log());
    eprintln!("{what}: init at {t_init:.2?}; hwrng read {t_rng:.2?}");
    bytes
}

fn two_boots(what: &str, vmm: impl Fn() -> Command) {
    let a = boot(what, vmm());
    let b = boot(what, vmm());
    assert_ne!(
        a, b,
        "{what}: /dev/hwrng gave the same 64 bytes in two boots"
    );
}

/// QEMU microvm with the virtio console on stdio and no serial backend (both cannot take
/// stdio), virtio-rng from the host's /dev/urandom.
fn qemu(g: &GuestDir) -> Command {
    let mut c = Command::new(qemu_bin());
    c.args(["-M", QEMU_MACHINE])
        .args(Accel::for_linux().args())
        .args(["-m", "128", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "none", "-monitor", "none", "-device", "i8042"])
        .args(["-chardev", "stdio,id=con0,signal=off"])
        .args(["-device", "virtio-serial-device"])
        .args(["-device", "virtconsole,chardev=con0"])
        .args(["-object", "rng-random,id=r0,filename=/dev/urandom"])
        .args(["-device", "virtio-rng-device,rng=r0"])
        .arg("-kernel")
        .arg(g.file("vmlinux"))
        .arg("-initrd")
        .arg(g.file("initramfs.cpio"))
        .args(["-append", &cmdline(g)]);
    c
}

#[test]
fn linux_hvc0_console_and_hwrng_qemu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = GuestDir::test_profile();
    two_boots(&format!("QEMU ({:?})", Accel::for_linux()), || qemu(&g));
}

#[test]
fn linux_hvc0_console_and_hwrng_under_cinder() {
    require_kvm();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = GuestDir::test_profile();
    two_boots("cinder", || {
        let mut c = cinder_vm(&g, &cmdline(&g), 1, 128);
        c.arg("--initrd")
            .arg(g.file("initramfs.cpio"))
            .args(["--console", "virtio", "--rng"]);
        c
    });
}
