//! vsock benchmark: throughput each way and connection setup latency through cinder's
//! virtio-vsock device and its Firecracker-style Unix socket, the probe guest at the other end.
//!
//! ```text
//! cargo run --release -p cinder-tests --bin bench_vsock -- [--runs N] [--mib N] [--conns N]
//! ```
//! - host->guest: a host client connects (`CONNECT 5000` / `OK <port>`), writes `--mib` MiB of a
//!   pattern and half-closes; the probe (`probe.vsock_mode=sum`) checksums every byte and
//!   closes. Timed from `OK` to the host seeing EOF (the guest has consumed all of it).
//! - guest->host: the probe connects to host port 6000 (`<uds>_6000`) and sends `--mib` MiB;
//!   timed from this program's accept to EOF. The bytes are checked against the pattern.
//! - setup: `--conns` connections one after another; each is timed from the client's
//!   `connect(2)` to reading `OK` (cinder's REQUEST to the guest and the guest's RESPONSE), and
//!   then as a whole (`CONNECT` to EOF after a 64-byte message, i.e. open, use and close).
//!
//! Every figure is also checked (the probe's checksums, byte counts, orderly closes): a run
//! whose data is wrong is reported as failed, not timed. Prints median / min / max over the
//! runs, for cinder with its seccomp filters and with `--seccomp off` side by side, and for
//! Firecracker when `FIRECRACKER_BIN` names its binary (same probe, same hybrid Unix socket
//! protocol; configured with `--no-api --config-file`; never downloaded). QEMU has no
//! counterpart here: its vsock needs vhost-vsock and an AF_VSOCK host side.
//! Needs /dev/kvm (on a host without it, `scripts/bench.sh vsock` runs this in the nested
//! KVM lane, whose figures only compare runs of that lane).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cinder_tests::cinder::cinder_bin;
use cinder_tests::linux::{fnv1a, pattern, TempDir};
use cinder_tests::probe::{self, Status};
use cinder_tests::session::Session;

const CID: u32 = 3;
const PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
const STEP: Duration = Duration::from_secs(300);

/// The VMM measured in a pass.
#[derive(Clone)]
enum Vmm {
    /// cinder with this `--seccomp` mode (each figure is measured with "on" and "off").
    Cinder(&'static str),
    /// Firecracker (`FIRECRACKER_BIN`), with its default seccomp filters.
    Firecracker(PathBuf),
}

impl Vmm {
    fn name(&self) -> String {
        match self {
            Vmm::Cinder(mode) => format!("seccomp {mode}"),
            Vmm::Firecracker(_) => "firecracker".to_string(),
        }
    }
}

struct Opts {
    runs: usize,
    mib: usize,
    conns: usize,
    vmm: Vmm,
}

fn start(o: &Opts, uds: &Path, keys: &str) -> Result<Session, String> {
    let cmdline = format!("probe.run=vsock {keys}");
    let c = match &o.vmm {
        Vmm::Cinder(mode) => {
            let mut c = Command::new(cinder_bin());
            c.args(["--seccomp", mode]);
            c.arg("--kernel")
                .arg(probe::elf_path())
                .args(["--memory", "128", "--vcpus", "1"])
                .args(["--vsock", &format!("cid={CID},uds={}", uds.display())])
                .args(["--cmdline", &cmdline]);
            c
        }
        Vmm::Firecracker(bin) => {
            let cfg = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": probe::elf_path(),
                    "boot_args": cmdline,
                },
                "drives": [],
                "machine-config": { "vcpu_count": 1, "mem_size_mib": 128 },
                "vsock": { "guest_cid": CID, "uds_path": uds },
            });
            let path = uds.with_extension("fc.json");
            std::fs::write(&path, cfg.to_string()).map_err(|e| format!("{e}"))?;
            // Its log lines go to stdout otherwise, into the middle of the probe's.
            let log = uds.with_extension("fc.log");
            std::fs::File::create(&log).map_err(|e| format!("{e}"))?;
            let mut c = Command::new(bin);
            c.args(["--no-api", "--config-file"])
                .arg(&path)
                .arg("--log-path")
                .arg(&log);
            c
        }
    };
    let mut s = Session::start(c);
    s.expect_line("PROBE vsock ready", STEP)?;
    Ok(s)
}

fn connect(uds: &Path) -> Result<UnixStream, String> {
    cinder_tests::vsock::connect(uds, PORT, STEP)
}

/// Waits for the probe's result and checks it.
fn finish(mut s: Session) -> Result<probe::Check, String> {
    s.expect("PROBE DONE", STEP)?;
    let _ = s.wait_exit(Duration::from_secs(30));
    let c = probe::parse(&s.console())
        .check("vsock")
        .cloned()
        .ok_or_else(|| format!("no vsock result\n{}", s.log()))?;
    if c.status != Status::Ok {
        return Err(format!("the probe reports a failure: {}", c.details));
    }
    Ok(c)
}

fn mibs(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

fn host_to_guest(o: &Opts) -> Result<f64, String> {
    let dir = TempDir::new("bench-vsock-h2g");
    let uds = dir.join("v.sock");
    let s = start(o, &uds, "probe.vsock_conns=1")?;
    let n = o.mib << 20;
    let data = pattern(0x5eed, n);
    let mut c = connect(&uds)?;
    let t0 = Instant::now();
    c.write_all(&data).map_err(|e| format!("send: {e}"))?;
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)
        .map_err(|e| format!("wait for the close: {e}"))?;
    let took = t0.elapsed();
    let r = finish(s)?;
    if r.num("rx_bytes") != Some(n as u64) || r.num("rx_sum") != Some(fnv1a(&data)) {
        return Err(format!("the guest received other bytes: {}", r.details));
    }
    Ok(mibs(n, took))
}

fn guest_to_host(o: &Opts) -> Result<f64, String> {
    let dir = TempDir::new("bench-vsock-g2h");
    let uds = dir.join("v.sock");
    let n = o.mib << 20;
    let l = UnixListener::bind(dir.join(&format!("v.sock_{HOST_PORT}")))
        .map_err(|e| format!("listen: {e}"))?;
    let s = start(
        o,
        &uds,
        &format!("probe.vsock_host_port={HOST_PORT} probe.vsock_bytes={n}"),
    )?;
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let until = Instant::now() + STEP;
    let mut c = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(format!("the probe did not connect: {e}")),
        }
    };
    let t0 = Instant::now();
    c.set_nonblocking(false).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(STEP)).map_err(|e| e.to_string())?;
    let mut got = Vec::with_capacity(n);
    c.read_to_end(&mut got)
        .map_err(|e| format!("receive: {e}"))?;
    let took = t0.elapsed();
    let r = finish(s)?;
    if got.len() != n || r.num("tx_sum") != Some(fnv1a(&got)) {
        return Err(format!(
            "the host received {} bytes that do not match what the guest sent: {}",
            got.len(),
            r.details
        ));
    }
    Ok(mibs(n, took))
}

/// Median connect->OK and open-use-close times in microseconds.
fn setup(o: &Opts) -> Result<(f64, f64), String> {
    let dir = TempDir::new("bench-vsock-setup");
    let uds = dir.join("v.sock");
    let s = start(o, &uds, &format!("probe.vsock_conns={}", o.conns))?;
    let msg = [0x42u8; 64];
    let mut ok_us = Vec::new();
    let mut cycle_us = Vec::new();
    for i in 0..o.conns {
        let t0 = Instant::now();
        let mut c = connect(&uds).map_err(|e| format!("connection {i}: {e}"))?;
        ok_us.push(t0.elapsed().as_secs_f64() * 1e6);
        c.write_all(&msg).map_err(|e| e.to_string())?;
        c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        c.read_to_end(&mut rest)
            .map_err(|e| format!("connection {i}: wait for the close: {e}"))?;
        cycle_us.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    let r = finish(s)?;
    if r.num("in") != Some(o.conns as u64) || r.num("unorderly") != Some(0) {
        return Err(format!(
            "the guest did not see {} orderly connections: {}",
            o.conns, r.details
        ));
    }
    Ok((median(&mut ok_us), median(&mut cycle_us)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn row(name: &str, unit: &str, v: &[f64]) {
    if v.is_empty() {
        println!("{name:<34} {:>12}", "no result");
        return;
    }
    let mut s = v.to_vec();
    let med = median(&mut s);
    println!(
        "{name:<34} {med:>12.1} {:>12.1} {:>12.1}  {unit}",
        s[0],
        s[s.len() - 1]
    );
}

fn main() {
    let mut o = Opts {
        runs: 5,
        mib: 64,
        conns: 100,
        vmm: Vmm::Cinder("on"),
    };
    let usage = "usage: bench_vsock [--runs N] [--mib N] [--conns N]";
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> usize {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{name} needs a number; {usage}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--runs" => o.runs = num("--runs").clamp(1, 1000),
            "--mib" => o.mib = num("--mib").clamp(1, 4096),
            "--conns" => o.conns = num("--conns").clamp(1, 10_000),
            other => {
                eprintln!("unknown argument {other}; {usage}");
                std::process::exit(2);
            }
        }
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!(
            "bench_vsock: cannot open /dev/kvm ({e}); on a host without KVM run \
             `scripts/bench.sh vsock` (it uses the nested KVM lane)"
        );
        std::process::exit(1);
    }
    println!(
        "vsock benchmark: cinder virtio-vsock <-> probe guest (1 vCPU, 128 MiB), {} MiB each way, \
         {} sequential connections, {} runs",
        o.mib, o.conns, o.runs
    );
    // Figures per seccomp mode: cinder with its filters (the default) and with --seccomp off,
    // alternately, side by side (reported, never asserted).
    let mut results = Vec::new();
    let mut failures = 0;
    let mut vmms = vec![Vmm::Cinder("on"), Vmm::Cinder("off")];
    if let Some(fc) = std::env::var_os("FIRECRACKER_BIN") {
        vmms.push(Vmm::Firecracker(PathBuf::from(fc)));
    }
    for vmm in vmms {
        let mode = vmm.name();
        o.vmm = vmm;
        let (mut h2g, mut g2h, mut ok, mut cycle) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..o.runs {
            match host_to_guest(&o) {
                Ok(v) => h2g.push(v),
                Err(e) => {
                    failures += 1;
                    println!("{mode} run {run}: host->guest failed: {e}");
                }
            }
            match guest_to_host(&o) {
                Ok(v) => g2h.push(v),
                Err(e) => {
                    failures += 1;
                    println!("{mode} run {run}: guest->host failed: {e}");
                }
            }
            match setup(&o) {
                Ok((a, b)) => {
                    ok.push(a);
                    cycle.push(b);
                }
                Err(e) => {
                    failures += 1;
                    println!("{mode} run {run}: connection setup failed: {e}");
                }
            }
        }
        results.push((mode, h2g, g2h, ok, cycle));
    }
    println!();
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "figure", "median", "min", "max"
    );
    for (mode, h2g, g2h, ok, cycle) in &results {
        row(&format!("host->guest ({mode})"), "MiB/s", h2g);
        row(&format!("guest->host ({mode})"), "MiB/s", g2h);
        row(&format!("connect -> OK ({mode})"), "us", ok);
        row(&format!("open,64B,close ({mode})"), "us", cycle);
    }
    if failures > 0 {
        println!("{failures} measurement(s) failed (see above)");
        std::process::exit(1);
    }
}
