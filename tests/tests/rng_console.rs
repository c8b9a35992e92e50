//! virtio-rng and virtio-console: the probe's `rng` and `console` checks under QEMU microvm
//! (the oracle) and under cinder.
//!
//! * `rng`: two 4 KiB reads per run; the probe FAILs on a constant or repeated read, and the
//!   harness checks that two runs print different hex prefixes.
//! * `console`: the probe writes `PROBE-HVC hello` to the virtio console and reads one line
//!   back; the harness reads the hello on the host side and answers with a line the probe must
//!   report (`PROBE console ok got="..."`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder, require_kvm};
use cinder_tests::probe::{self, ProbeLog, Status};
use cinder_tests::qemu::{Microvm, DEFAULT_MACHINE};
use cinder_tests::runner::{run, RunResult};
use cinder_tests::tmp::TempDir as Scratch;

/// QEMU under TCG takes both cores: one guest at a time.
static SERIAL: Mutex<()> = Mutex::new(());

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

fn finish(r: RunResult, what: String) -> Run {
    let log = probe::parse(&r.stdout);
    eprintln!("{what}: {:.2?}, done={:?}", r.elapsed, log.done);
    let run = Run { r, log, what };
    run.ensure(!run.r.timed_out, "timed out (VMM killed)");
    run.ensure(run.log.done.is_some(), "no PROBE DONE line");
    run
}

fn qemu_vm(cmdline: &str, extra: &[&str]) -> Microvm {
    let mut vm = Microvm::new(&probe::elf_path(), cmdline, 1, 128);
    // acpi=off: microvm then names each virtio-mmio device on the command line.
    vm.machine = format!("{DEFAULT_MACHINE},acpi=off");
    vm.extra = vec!["-global".into(), "virtio-mmio.force-legacy=false".into()];
    vm.extra.extend(extra.iter().map(|s| s.to_string()));
    vm
}

// ---------------------------------------------------------------------------------------------
// virtio-rng

/// The `rng` line's hex prefixes, after checking the line.
fn rng_result(run: &Run) -> (String, String) {
    let c = run.check("rng");
    run.ensure(c.status == Status::Ok, "rng FAILed");
    run.ensure(c.num("bytes") == Some(8192), "rng bytes=8192");
    let h1 = c.field("hex1").unwrap_or_default().to_string();
    let h2 = c.field("hex2").unwrap_or_default().to_string();
    run.ensure(h1.len() == 32 && h2.len() == 32, "hex1/hex2 of 16 bytes");
    run.ensure(h1 != h2, "the two reads of one run differ");
    run.ensure(run.log.done == Some((1, 1)), "PROBE DONE 1/1");
    (h1, h2)
}

fn rng_twice(vmm: impl Fn() -> Run) {
    let (a1, a2) = rng_result(&vmm());
    let (b1, b2) = rng_result(&vmm());
    assert!(
        a1 != b1 && a2 != b2,
        "two runs printed the same random bytes: {a1} {a2} / {b1} {b2}"
    );
}

fn rng_qemu() -> Run {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vm = qemu_vm(
        "probe.run=rng",
        &[
            "-object",
            "rng-random,id=r0,filename=/dev/urandom",
            "-device",
            "virtio-rng-device,rng=r0",
        ],
    );
    let r = vm.run(Duration::from_secs(120));
    finish(r, format!("rng under QEMU ({:?})", vm.accel))
}

fn rng_cinder() -> Run {
    require_kvm();
    let mut c = cinder();
    c.arg("--kernel")
        .arg(probe::elf_path())
        .args(["--cmdline", "probe.run=rng", "--rng"]);
    let r = run(c, Duration::from_secs(120), |_| false);
    finish(r, "rng under cinder".to_string())
}

#[test]
fn rng_qemu_bytes_differ_across_runs() {
    rng_twice(rng_qemu);
}

#[test]
fn rng_bytes_differ_across_runs_under_cinder() {
    rng_twice(rng_cinder);
}

/// Without a virtio-rng device the check is skipped, not failed.
#[test]
fn rng_qemu_without_device_skips() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vm = qemu_vm("probe.run=rng", &[]);
    let run = finish(vm.run(Duration::from_secs(120)), "rng, no device".into());
    run.ensure(run.check("rng").status == Status::Skip, "rng skip");
    run.ensure(run.log.done == Some((0, 0)), "PROBE DONE 0/0");
}

// ---------------------------------------------------------------------------------------------
// virtio-console

const HELLO: &str = "PROBE-HVC hello";

/// The host side of the console conversation: read the probe's hello line, answer `reply`.
/// Returns the line read.
fn converse(stream: UnixStream, reply: &str) -> Result<String, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading the hello line: {e}"))?;
    w.write_all(format!("{reply}\n").as_bytes())
        .map_err(|e| format!("writing the reply: {e}"))?;
    Ok(line.trim_end().to_string())
}

/// Connects to `path` once it exists (QEMU creates it at start-up), then converses.
fn connect_and_converse(path: &Path, reply: &str) -> Result<String, String> {
    let until = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() > until => return Err(format!("connect: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    converse(stream, reply)
}

fn check_console(run: &Run, host_got: Result<String, String>, reply: &str) {
    let host_got =
        host_got.unwrap_or_else(|e| panic!("{}: host side: {e}\n{}", run.what, run.r.log()));
    run.ensure(host_got == HELLO, &format!("host read {host_got:?}"));
    let c = run.check("console");
    run.ensure(c.status == Status::Ok, "console FAILed");
    run.ensure(
        c.details.contains(&format!("got=\"{reply}\"")),
        "the probe reports the reply",
    );
    run.ensure(run.log.done == Some((1, 1)), "PROBE DONE 1/1");
}

/// QEMU's virtio-serial offers MULTIPORT; the probe does not negotiate it, so port 0 (the
/// virtconsole) runs on receiveq0/transmitq0 like a single-port console. `wait=on` makes QEMU
/// wait for the harness to connect before the guest starts, so the hello is never dropped.
#[test]
fn console_qemu_hello_and_reply() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("con");
    let sock = s.join("c.sock");
    let reply = format!("PROBE-HOST reply {}", std::process::id());
    let chardev = format!("socket,id=c0,path={},server=on,wait=on", sock.display());
    let vm = qemu_vm(
        "probe.run=console probe.console_ms=30000",
        &[
            "-chardev",
            &chardev,
            "-device",
            "virtio-serial-device",
            "-device",
            "virtconsole,chardev=c0",
        ],
    );
    let host = {
        let (sock, reply) = (sock.clone(), reply.clone());
        std::thread::spawn(move || connect_and_converse(&sock, &reply))
    };
    let r = vm.run(Duration::from_secs(120));
    let host_got = host
        .join()
        .unwrap_or_else(|_| Err("host thread panicked".into()));
    let run = finish(r, format!("console under QEMU ({:?})", vm.accel));
    check_console(&run, host_got, &reply);
}

/// cinder with `--console virtio --console-sock PATH`: cinder connects to the harness's
/// listening socket before the guest starts; guest output goes to it, its input to the guest.
#[test]
fn console_hello_and_reply_under_cinder() {
    require_kvm();
    let s = Scratch::new("con");
    let sock = s.join("c.sock");
    let listener = UnixListener::bind(&sock).expect("bind the console socket");
    let reply = format!("PROBE-HOST reply {}", std::process::id());
    let host = {
        let reply = reply.clone();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            converse(stream, &reply)
        })
    };
    let mut c = cinder();
    c.arg("--kernel")
        .arg(probe::elf_path())
        .args(["--cmdline", "probe.run=console probe.console_ms=30000"])
        .args(["--console", "virtio", "--console-sock"])
        .arg(&sock);
    let r = run(c, Duration::from_secs(120), |_| false);
    let run = finish(r, "console under cinder".to_string());
    // If cinder never connected, unblock the accept so the thread ends.
    let _ = UnixStream::connect(&sock);
    let host_got = host
        .join()
        .unwrap_or_else(|_| Err("host thread panicked".into()));
    check_console(&run, host_got, &reply);
}

/// `--console virtio --console-out PATH`: the hello line lands in the file; with no input the
/// probe's read times out (FAIL), which is the expected outcome of an output-only console.
#[test]
fn console_output_to_file_under_cinder() {
    require_kvm();
    let s = Scratch::new("conout");
    let out = s.join("console.out");
    let mut c = cinder();
    c.arg("--kernel")
        .arg(probe::elf_path())
        .args(["--cmdline", "probe.run=console probe.console_ms=500"])
        .args(["--console", "virtio", "--console-out"])
        .arg(&out);
    let r = run(c, Duration::from_secs(120), |_| false);
    let run = finish(r, "console to a file under cinder".to_string());
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    run.ensure(
        text == format!("{HELLO}\n"),
        &format!("file holds {text:?}"),
    );
    run.ensure(
        run.check("console").status == Status::Fail,
        "no input: read times out",
    );
}

/// Issue 18 item 10: `--console-out` stops growing at `--console-out-max-size`: the guest's
/// first bytes are kept, then one line says the rest was dropped.
#[test]
fn console_output_file_is_capped_under_cinder() {
    require_kvm();
    let s = Scratch::new("conoutcap");
    let out = s.join("console.out");
    let mut c = cinder();
    c.arg("--kernel")
        .arg(probe::elf_path())
        .args(["--cmdline", "probe.run=console probe.console_ms=500"])
        .args(["--console", "virtio", "--console-out-max-size", "8"])
        .arg("--console-out")
        .arg(&out);
    let r = run(c, Duration::from_secs(120), |_| false);
    let run = finish(r, "capped console file under cinder".to_string());
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let kept = &HELLO[..8];
    run.ensure(
        text.starts_with(&format!(
            "{kept}\n[cinder: console output reached its limit of 8 bytes"
        )),
        &format!("file holds {text:?}"),
    );
    run.ensure(text.lines().count() == 2, &format!("file holds {text:?}"));
}

/// Without a console device the check is skipped.
#[test]
fn console_qemu_without_device_skips() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let vm = qemu_vm("probe.run=console", &[]);
    let run = finish(
        vm.run(Duration::from_secs(120)),
        "console, no device".into(),
    );
    run.ensure(run.check("console").status == Status::Skip, "console skip");
}
