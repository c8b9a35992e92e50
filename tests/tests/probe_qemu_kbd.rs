//! QEMU oracle for the probe's `kbd` check: the probe waits for Ctrl+Alt+Del on the i8042
//! keyboard, QEMU's monitor types it (`sendkey ctrl-alt-delete`), the probe reports the
//! make codes it read and the IRQ1 interrupts it counted.
//!
//! QEMU's `microvm` machine has no i8042 of its own: `-device i8042` adds one (ISA, ports
//! 0x60/0x64, IRQ1 and IRQ12), which also makes the probe's final `out 0x64, 0xfe` reset
//! QEMU (with `-no-reboot`: exit) instead of falling back to a triple fault.

use cinder_tests::probe::{self, ProbeLog, Status};
use cinder_tests::qemu::Microvm;
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One QEMU at a time (TCG on a 2-core host).
static SERIAL: Mutex<()> = Mutex::new(());

fn vm(cmdline: &str, with_i8042: bool, monitor: Option<&Path>) -> Microvm {
    let mut vm = Microvm::new(&probe::elf_path(), cmdline, 1, 128);
    if with_i8042 {
        vm.extra
            .extend(["-device".to_string(), "i8042".to_string()]);
    }
    if let Some(sock) = monitor {
        vm.extra.extend([
            "-monitor".to_string(),
            format!("unix:{},server=on,wait=off", sock.display()),
        ]);
    }
    vm
}

/// Connects to QEMU's human monitor and types `cmd`; the stream stays open so QEMU finishes
/// the command before it sees the connection close.
fn monitor_command(sock: &Path, cmd: &str) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot connect to {}: {e}", sock.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{cmd}\n").as_bytes())
        .map_err(|e| format!("cannot write to the monitor: {e}"))?;
    // Wait (bounded) for the prompt that follows the command's execution.
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        let text = String::from_utf8_lossy(&seen);
        if text.matches("(qemu)").count() >= 2 {
            break;
        }
    }
    Ok(s)
}

/// Boots the probe with `kbd,tsc`, types Ctrl+Alt+Del when it is ready, returns its report.
fn ctrl_alt_del(xlate: u8) -> (ProbeLog, String) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("kbd");
    let sock = dir.path().join("monitor.sock");
    let cmdline = format!("probe.run=kbd,tsc probe.kbd_timeout_ms=60000 probe.kbd_xlate={xlate}");
    let vm = vm(&cmdline, true, Some(&sock));
    let mut s = Session::start(vm.command());
    let (_, ready) = s
        .expect("PROBE kbd ready", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let _mon = monitor_command(&sock, "sendkey ctrl-alt-delete")
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    let (_, done) = s
        .expect_line("PROBE DONE", Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("{e}"));
    s.wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "kbd under QEMU ({:?}, xlate={xlate}): ready at {ready:.2?}, PROBE DONE at {done:.2?}",
        vm.accel
    );
    (probe::parse(&s.console()), s.log())
}

fn assert_ok(log: &ProbeLog, all: &str, seq: &str, set: &str) {
    assert_eq!(log.done, Some((2, 2)), "kbd and tsc pass\n{all}");
    let kbd = log.check("kbd").expect("kbd result line");
    assert_eq!(kbd.status, Status::Ok, "{all}");
    assert_eq!(kbd.field("seq"), Some(seq), "{all}");
    assert_eq!(kbd.field("set"), Some(set), "{all}");
    assert_eq!(kbd.field("ioapic"), Some("pin1"), "{all}");
    assert!(kbd.num("irqs").unwrap_or(0) >= 1, "IRQ1 counted\n{all}");
    assert!(kbd.num("tsc").is_some(), "{all}");
    assert_eq!(log.check("tsc").map(|c| c.status), Some(Status::Ok));
    // The only line the parser does not know is the ready marker.
    assert!(
        log.unparsed
            .iter()
            .all(|l| l.starts_with("PROBE kbd ready")),
        "{all}"
    );
}

#[test]
fn qemu_kbd_ctrl_alt_del() {
    // Translation off: the keyboard's own scan code set 2.
    let (log, all) = ctrl_alt_del(0);
    assert_ok(&log, &all, "14,11,e0,71", "2");
}

#[test]
fn qemu_kbd_ctrl_alt_del_translated() {
    // Translation on (what Linux keeps and cinder's i8042 starts with): set 1.
    let (log, all) = ctrl_alt_del(1);
    assert_ok(&log, &all, "1d,38,e0,53", "1");
}

#[test]
fn qemu_kbd_timeout_fails_and_the_run_goes_on() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r =
        vm("probe.run=kbd,tsc probe.kbd_timeout_ms=300", true, None).run(Duration::from_secs(90));
    let log = probe::parse(&r.stdout);
    assert_eq!(log.done, Some((1, 2)), "{}", r.log());
    let kbd = log.check("kbd").expect("kbd result line");
    assert_eq!(kbd.status, Status::Fail, "{}", r.log());
    assert!(kbd.details.starts_with("timeout"), "{}", r.log());
    assert_eq!(log.check("tsc").map(|c| c.status), Some(Status::Ok));
    assert!(!r.timed_out, "the i8042 reset ends QEMU\n{}", r.log());
}

#[test]
fn qemu_kbd_skips_without_i8042() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let r =
        vm("probe.run=kbd,tsc probe.kbd_timeout_ms=300", false, None).run(Duration::from_secs(90));
    let log = probe::parse(&r.stdout);
    let kbd = log.check("kbd").expect("kbd result line");
    assert_eq!(kbd.status, Status::Skip, "{}", r.log());
    assert_eq!(log.done, Some((1, 1)), "{}", r.log());
}
