//! API benchmark: exec to API socket ready, request round-trip latency (`GET /`), and, where
//! /dev/kvm opens, InstanceStart to the guest's first serial byte (probe guest). cinder is
//! measured with its seccomp filters (the default) and with `--seccomp off`, side by side
//! (reported, never asserted).
//!
//! ```text
//! cargo run --release -p cinder-tests --bin bench_api -- [--runs N] [--requests N]
//! ```
//! Set FIRECRACKER_BIN to a Firecracker binary to measure it side by side (never downloaded).

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cinder_tests::cinder::cinder_bin;
use cinder_tests::http::{read_response, request};

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn line(name: &str, what: &str, v: &mut [f64], unit: &str) {
    if v.is_empty() {
        println!("{name:<20} {what:<34} no samples");
        return;
    }
    let (med, min, max) = stats(v);
    println!("{name:<20} {what:<34} median {med:10.3} {unit:<3} min {min:10.3}  max {max:10.3}");
}

struct Vmm {
    child: Child,
    sock: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Starts `bin [extra] --api-sock sock` and returns the time until a connect succeeds.
fn start(bin: &Path, extra: &[&str], sock: &Path) -> Result<(Vmm, Duration), String> {
    let _ = std::fs::remove_file(sock);
    let t0 = Instant::now();
    let child = Command::new(bin)
        .args(extra)
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
    let vmm = Vmm {
        child,
        sock: sock.to_path_buf(),
    };
    while t0.elapsed() < Duration::from_secs(10) {
        if UnixStream::connect(sock).is_ok() {
            return Ok((vmm, t0.elapsed()));
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Err("socket never became ready".into())
}

fn main() {
    let mut runs = 20usize;
    let mut requests = 1000usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--runs", Some(v)) => runs = v.parse().expect("--runs N"),
            ("--requests", Some(v)) => requests = v.parse().expect("--requests N"),
            _ => {
                eprintln!("usage: bench_api [--runs N] [--requests N]");
                std::process::exit(2);
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("cinder-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let mut vmms: Vec<(String, PathBuf, &[&str])> = vec![
        ("cinder seccomp=on".to_string(), cinder_bin(), &[]),
        (
            "cinder seccomp=off".to_string(),
            cinder_bin(),
            &["--seccomp", "off"],
        ),
    ];
    if let Some(fc) = std::env::var_os("FIRECRACKER_BIN") {
        vmms.push(("firecracker".to_string(), PathBuf::from(fc), &[]));
    }
    println!("API benchmark: {runs} starts, {requests} requests per start-up sample");
    for (name, bin, extra) in &vmms {
        let sock = dir.join(format!("{}.sock", name.replace([' ', '='], "-")));
        let mut ready = Vec::new();
        let mut rtt = Vec::new();
        let mut start_to_serial = Vec::new();
        for i in 0..runs {
            let (mut vmm, t) = match start(bin, extra, &sock) {
                Ok(x) => x,
                Err(e) => {
                    println!("{name}: {e}");
                    break;
                }
            };
            ready.push(t.as_secs_f64() * 1e3);
            if i == 0 {
                // Round trips on one keep-alive connection.
                let mut s = UnixStream::connect(&sock).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                for _ in 0..requests {
                    let t0 = Instant::now();
                    use std::io::Write;
                    if s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                        break;
                    }
                    if read_response(&mut s).map(|r| r.status).unwrap_or(0) != 200 {
                        break;
                    }
                    rtt.push(t0.elapsed().as_secs_f64() * 1e6);
                }
            }
            if kvm {
                let probe = cinder_tests::probe::elf_path();
                let body = format!(
                    r#"{{"kernel_image_path": "{}", "boot_args": "probe.run=boot"}}"#,
                    probe.display()
                );
                request(&sock, "PUT", "/boot-source", Some(&body));
                let mut out = vmm.child.stdout.take().expect("stdout");
                let t0 = Instant::now();
                let r = request(
                    &sock,
                    "PUT",
                    "/actions",
                    Some(r#"{"action_type": "InstanceStart"}"#),
                );
                if r.status == 204 {
                    let mut b = [0u8; 1];
                    if out.read(&mut b).unwrap_or(0) == 1 {
                        start_to_serial.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
        }
        line(name, "exec -> API socket ready", &mut ready, "ms");
        line(name, "GET / round trip (keep-alive)", &mut rtt, "us");
        if kvm {
            line(
                name,
                "InstanceStart -> first serial byte",
                &mut start_to_serial,
                "ms",
            );
        } else {
            println!("{name:<20} InstanceStart -> first serial byte    not measured: /dev/kvm cannot be opened");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
