//! I/O benchmark: virtio-blk and virtio-net rates measured by the probe guest (`blkbench`,
//! `netbench`), under cinder and QEMU microvm side by side in the same run.
//!
//! ```text
//! cargo run --release -p cinder-tests --bin bench_io -- [blk|net|all] [--runs N] [--ms MS] [--disk-mib N] [--only ROWS]
//! ```
//! - blk: a scratch image (written first, so it sits in the page cache) attached as the only
//!   drive (`--drive path=IMG` / `-drive ...,format=raw -device virtio-blk-device`); the probe
//!   reports 4 KiB random read/write IOPS at queue depth 1 and 32 and 1 MiB sequential MiB/s.
//! - net: a private network namespace with a TAP at 10.0.2.2/24 (`cinder_tests::netns`), the
//!   VMM inside it (`--net tap=NAME` / `-netdev tap,...,vhost=off -device virtio-net-device`);
//!   this program is the host side (UDP on 10.0.2.0/24 inside that namespace only): it asks the
//!   probe for guest->host blasts, counts what arrives, and blasts host->guest; 64-byte and
//!   1500-byte frames. The namespace and the image are removed at the end.
//!
//! The probe runs its `tsc` check first (its TSC frequency, from KVM's pvclock, cross-checked
//! against the PIT): a run where it fails has no figures, since every rate is TSC ticks over
//! that frequency.
//!
//! cinder runs twice per run, with its seccomp filters (the default) and with `--seccomp off`,
//! so the filters' cost shows side by side (reported, never asserted).
//!
//! blk also runs cinder on its io_uring engine (`--drive ...,io_engine=async`), both engines
//! with the I/O thread polling its ring for 32 us (`CINDER_BLK_IO_POLL_US=32`: rows "poll",
//! and `--only` keys sync-poll / uring-poll; the plain rows are `=0`, the default), and, when set,
//! `BASELINE_CINDER_BIN` (an older cinder build, e.g. to check a change for regressions in the
//! same rounds) and `FIRECRACKER_BIN` (Firecracker from a config file with the drive). Every VMM
//! runs once per round, so host noise hits them alike. Besides the probe's figures it reports
//! `host_cpu_us_per_io`: CPU time of the VMM's threads other than the vCPUs (sampled from
//! /proc while it runs) per request over the six phases (a sequential request is 1 MiB).
//! Prints median / min / max per figure over the runs and the cinder/QEMU ratio of medians.
//! QEMU uses KVM when /dev/kvm opens, else TCG (then its figures are not comparable). cinder
//! needs /dev/kvm; without it its rows say why they are missing.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cinder_tests::cinder::cinder_bin;
use cinder_tests::netns::NetNs;
use cinder_tests::probe::{self, Status};
use cinder_tests::qemu::{Accel, Microvm, DEFAULT_MACHINE};
use cinder_tests::session::Session;

const BLK_KEYS: [&str; 6] = [
    "qd1_randread_iops",
    "qd32_randread_iops",
    "qd1_randwrite_iops",
    "qd32_randwrite_iops",
    "seq_read_mibs",
    "seq_write_mibs",
];
const NET_KEYS: [&str; 8] = [
    "g2h_64_pps",
    "g2h_64_mbps",
    "g2h_1500_pps",
    "g2h_1500_mbps",
    "h2g_64_pps",
    "h2g_64_mbps",
    "h2g_1500_pps",
    "h2g_1500_mbps",
];
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const PORT: u16 = 7777;
const MAC: &str = "02:00:0a:00:02:0f";
/// Ethernet frame lengths (no FCS) for the "64" and "1500" figures.
const FRAMES: [u16; 2] = [60, 1514];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    /// cinder with its seccomp filters (the default).
    Cinder,
    /// cinder with `--seccomp off`.
    CinderNoSeccomp,
    Qemu,
}

/// cinder's two rows: seccomp on (the default) and off.
const CINDER_ON: &str = "cinder (seccomp on)";
const CINDER_OFF: &str = "cinder (seccomp off)";

struct Opts {
    runs: usize,
    ms: u64,
    disk_mib: u64,
    kvm: bool,
    /// `--only`: the blk rows to run (by [`BlkVmm::key`]), all when None.
    only: Option<Vec<String>>,
}

/// One run's figures (key -> value), in the order of the key list.
type Figures = Vec<(String, f64)>;

fn figures(details: &str, keys: &[&str]) -> Result<Figures, String> {
    keys.iter()
        .map(|k| {
            let v = probe::field(details, k).ok_or(format!("no {k}= in the PROBE line"))?;
            let v: f64 = v.parse().map_err(|_| format!("{k}={v} is not a number"))?;
            Ok((k.to_string(), v))
        })
        .collect()
}

fn qemu_vm(cmdline: &str, extra: &[String], accel: Accel) -> Microvm {
    let mut vm = Microvm::new(&probe::elf_path(), cmdline, 1, 128);
    vm.accel = accel;
    // acpi=off: microvm then names each virtio-mmio device on the command line.
    vm.machine = format!("{DEFAULT_MACHINE},acpi=off");
    vm.extra = vec!["-global".into(), "virtio-mmio.force-legacy=false".into()];
    vm.extra.extend(extra.iter().cloned());
    vm
}

fn cinder_cmd(vmm: Vmm, cmdline: &str, extra: &[String]) -> Command {
    let mut c = Command::new(cinder_bin());
    if vmm == Vmm::CinderNoSeccomp {
        c.args(["--seccomp", "off"]);
    }
    c.arg("--kernel")
        .arg(probe::elf_path())
        .args(["--memory", "128", "--vcpus", "1", "--cmdline", cmdline])
        .args(extra);
    c
}

// ---- blk ----

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A zero-filled image of `mib` MiB, written through the page cache (not sparse).
fn make_image(mib: u64) -> (Scratch, PathBuf) {
    let dir = std::env::temp_dir().join(format!("cinder-bench-io-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    let s = Scratch(dir.clone());
    let p = dir.join("disk.img");
    let mut f = std::fs::File::create(&p).expect("create image");
    let mib_buf = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&mib_buf).expect("write image");
    }
    f.flush().expect("flush image");
    (s, p)
}

/// What the blk benchmark runs, one row each.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BlkVmm {
    /// cinder, `io_engine` sync or async, seccomp on or off, the I/O thread polling its ring
    /// after serving requests (`CINDER_BLK_IO_POLL_US=32`) or not (`=0`, the default).
    Cinder {
        uring: bool,
        seccomp: bool,
        poll: bool,
    },
    /// The cinder binary named by `BASELINE_CINDER_BIN` (sync engine, seccomp on): an older
    /// build, run in the same rounds so that host noise hits both alike.
    Baseline,
    Qemu,
    /// Firecracker (`FIRECRACKER_BIN`), from a config file with the drive.
    Firecracker,
}

impl BlkVmm {
    /// The row's name for `--only`.
    fn key(self) -> &'static str {
        match self {
            BlkVmm::Cinder {
                uring: false,
                seccomp: true,
                poll: false,
            } => "sync",
            BlkVmm::Cinder {
                uring: false,
                seccomp: false,
                ..
            } => "sync-noseccomp",
            BlkVmm::Cinder {
                uring: true,
                poll: false,
                ..
            } => "uring",
            BlkVmm::Cinder {
                uring: false,
                poll: true,
                ..
            } => "sync-poll",
            BlkVmm::Cinder { uring: true, .. } => "uring-poll",
            BlkVmm::Baseline => "baseline",
            BlkVmm::Qemu => "qemu",
            BlkVmm::Firecracker => "firecracker",
        }
    }

    fn label(self, o: &Opts) -> String {
        match self {
            BlkVmm::Cinder {
                uring,
                seccomp,
                poll,
            } => format!(
                "cinder {} ({}{})",
                if uring { "io_uring" } else { "sync" },
                if seccomp { "seccomp on" } else { "seccomp off" },
                if poll { ", poll 32us" } else { "" }
            ),
            BlkVmm::Baseline => "cinder baseline (sync)".into(),
            BlkVmm::Qemu => qemu_label(o),
            BlkVmm::Firecracker => "firecracker".into(),
        }
    }
}

/// CPU seconds (user + system) of thread `tid` of `pid`, and its name.
fn thread_cpu(pid: u32, tid: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(") ")?;
    let name = head.split_once(" (")?.1.to_string();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 after the state.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((name, ticks / hz))
}

/// A vCPU thread (cinder "vcpuN", QEMU "CPU N/KVM", Firecracker "fc_vcpu N"): its time is
/// mostly the guest's own (the probe polls).
fn is_vcpu(name: &str) -> bool {
    name.starts_with("vcpu") || name.starts_with("CPU ") || name.starts_with("fc_vcpu")
}

/// Runs `cmd` to its end (at most `timeout`), sampling its threads' CPU time: returns the
/// console output and the CPU seconds of its threads other than the vCPUs (the VMM's own work:
/// device emulation, I/O, exits handled in user space are on the vCPU threads and not counted).
fn run_sampled(cmd: Command, timeout: Duration) -> Result<(String, f64), String> {
    let mut sess = Session::start(cmd);
    let pid = sess.pid();
    let deadline = Instant::now() + timeout;
    let mut last: std::collections::HashMap<String, (String, f64)> =
        std::collections::HashMap::new();
    loop {
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in dir.flatten() {
                let tid = t.file_name().to_string_lossy().into_owned();
                if let Some(v) = thread_cpu(pid, &tid) {
                    last.insert(tid, v);
                }
            }
        }
        if sess.wait_exit(Duration::from_millis(100)).is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out\n{}", sess.log()));
        }
    }
    let cpu = last
        .values()
        .filter(|(n, _)| !is_vcpu(n))
        .map(|(_, c)| c)
        .sum();
    Ok((sess.console(), cpu))
}

/// Firecracker's configuration file for the probe with one drive.
fn firecracker_config(dir: &Path, cmdline: &str, img: &Path) -> Result<PathBuf, String> {
    let cfg = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe::elf_path(),
            "boot_args": cmdline,
        },
        "drives": [{
            "drive_id": "d0",
            "path_on_host": img,
            "is_root_device": false,
            "is_read_only": false,
        }],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
    });
    let p = dir.join("firecracker.json");
    std::fs::write(&p, cfg.to_string()).map_err(|e| format!("write {}: {e}", p.display()))?;
    Ok(p)
}

/// One blkbench run: the probe's figures, then `host_cpu_us_per_io` (CPU time of the VMM's
/// non-vCPU threads per request over the six phases).
fn blk_once(vmm: BlkVmm, img: &Path, o: &Opts) -> Result<Figures, String> {
    let cmdline = format!("probe.run=tsc,blkbench probe.bench_ms={}", o.ms);
    // Six phases of `ms`, plus boot; generous for TCG.
    let timeout = Duration::from_millis(6 * o.ms * 3 + 60_000);
    let drive = |extra: &str| vec!["--drive".into(), format!("path={}{extra}", img.display())];
    let cmd = match vmm {
        BlkVmm::Cinder {
            uring,
            seccomp,
            poll,
        } => {
            let v = if seccomp {
                Vmm::Cinder
            } else {
                Vmm::CinderNoSeccomp
            };
            let mut c = cinder_cmd(
                v,
                &cmdline,
                &drive(if uring { ",io_engine=async" } else { "" }),
            );
            // devices::virtio::block::IO_POLL_ENV (polling is off by default).
            c.env("CINDER_BLK_IO_POLL_US", if poll { "32" } else { "0" });
            c
        }
        BlkVmm::Baseline => {
            let bin = std::env::var_os("BASELINE_CINDER_BIN").ok_or("no BASELINE_CINDER_BIN")?;
            let mut c = Command::new(bin);
            c.arg("--kernel")
                .arg(probe::elf_path())
                .args(["--memory", "128", "--vcpus", "1", "--cmdline", &cmdline])
                .args(drive(""));
            c
        }
        BlkVmm::Qemu => {
            let extra = [
                "-drive".to_string(),
                format!("id=d0,file={},format=raw,if=none", img.display()),
                "-device".into(),
                "virtio-blk-device,drive=d0".into(),
            ];
            let accel = if o.kvm { Accel::Kvm } else { Accel::Tcg };
            qemu_vm(&cmdline, &extra, accel).command()
        }
        BlkVmm::Firecracker => {
            let bin = std::env::var_os("FIRECRACKER_BIN").ok_or("no FIRECRACKER_BIN")?;
            let dir = img.parent().unwrap_or(Path::new("/tmp"));
            let cfg = firecracker_config(dir, &cmdline, img)?;
            let mut c = Command::new(bin);
            c.arg("--no-api").arg("--config-file").arg(cfg);
            c.args(["--level", "Error"]);
            c
        }
    };
    let (console, cpu) = run_sampled(cmd, timeout)?;
    let log = probe::parse(&console);
    tsc_ok(&log)?;
    match log.check("blkbench") {
        Some(c) if c.status == Status::Ok => {
            let mut f = figures(&c.details, &BLK_KEYS)?;
            let ops: f64 = [
                "qd1_randread",
                "qd32_randread",
                "qd1_randwrite",
                "qd32_randwrite",
                "seq_read",
                "seq_write",
            ]
            .iter()
            .filter_map(|p| probe::field(&c.details, &format!("{p}_ops")))
            .filter_map(|v| v.parse::<f64>().ok())
            .sum();
            if ops > 0.0 {
                f.push((CPU_KEY.to_string(), cpu * 1e6 / ops));
            }
            Ok(f)
        }
        Some(c) => Err(format!("blkbench {:?}: {}", c.status, c.details)),
        None => Err(format!("no PROBE blkbench line\n{console}")),
    }
}

/// The probe's rates are TSC ticks over its TSC frequency: a run whose `tsc` check did not
/// pass (its frequency sources disagree, see resources/probe/README.md) has no figures.
fn tsc_ok(log: &probe::ProbeLog) -> Result<(), String> {
    match log.check("tsc") {
        Some(c) if c.status == Status::Ok => Ok(()),
        Some(c) => Err(format!("tsc {:?}: {}", c.status, c.details)),
        None => Err("no PROBE tsc line".into()),
    }
}

/// The host-CPU figure of a blk run.
const CPU_KEY: &str = "host_cpu_us_per_io";

// ---- net ----

fn recv(sock: &UdpSocket, buf: &mut [u8], t: Duration) -> Option<usize> {
    sock.set_read_timeout(Some(t.max(Duration::from_millis(1))))
        .ok()?;
    sock.recv(buf).ok()
}

/// Sends `msg` until a datagram starting with `want` comes back (10 s at most).
fn request(sock: &UdpSocket, msg: &[u8], want: u8, buf: &mut [u8]) -> Result<usize, String> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let _ = sock.send(msg);
        let t = Instant::now() + Duration::from_millis(300);
        while Instant::now() < t {
            if let Some(n) = recv(sock, buf, t.saturating_duration_since(Instant::now())) {
                if n > 0 && buf[0] == want {
                    return Ok(n);
                }
            }
        }
    }
    Err(format!(
        "no '{}' answer to '{}'",
        want as char, msg[0] as char
    ))
}

fn set_rcvbuf(sock: &UdpSocket, bytes: i32) {
    // SAFETY: setsockopt reads an int through the pointer; the fd is open.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const i32).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<i32>())
                .expect("an int's size fits socklen_t"),
        )
    };
}

/// What the host counted, per frame size: guest->host datagrams received, host->guest sent.
#[derive(Debug, Default)]
struct HostCounts {
    g2h_rx: [u64; 2],
    h2g_sent: [u64; 2],
}

/// The host side of `netbench`, inside the namespace; ends with STOP.
fn net_host(ms: u64) -> Result<HostCounts, String> {
    // The B request carries the duration as a u32.
    let ms32 = u32::try_from(ms).map_err(|_| format!("{ms} ms does not fit the probe's u32"))?;
    let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).map_err(|e| format!("bind: {e}"))?;
    sock.connect(SocketAddrV4::new(PROBE_IP, PORT))
        .map_err(|e| format!("connect: {e}"))?;
    set_rcvbuf(&sock, 32 << 20);
    let mut buf = vec![0u8; 2048];
    let mut out = HostCounts::default();
    // Echo first: resolves the probe's MAC and shows it serves.
    request(&sock, b"Ehello", b'e', &mut buf)?;
    for (i, &len) in FRAMES.iter().enumerate() {
        // Guest -> host blast.
        let mut b = vec![b'B'];
        b.extend(len.to_le_bytes());
        b.extend(ms32.to_le_bytes());
        sock.send(&b).map_err(|e| format!("send B: {e}"))?;
        let mut count = 0u64;
        let start = Instant::now();
        let limit = start + Duration::from_millis(ms * 20 + 30_000);
        let mut done = false;
        while !done && Instant::now() < limit {
            match recv(&sock, &mut buf, Duration::from_secs(2)) {
                Some(n) if n > 0 && buf[0] == b'p' && n == usize::from(len) - 42 => count += 1,
                Some(n) if n > 0 && buf[0] == b'b' => done = true,
                Some(_) => {}
                None if count == 0 && start.elapsed() > Duration::from_secs(3) => {
                    return Err("no guest->host datagrams after B".into());
                }
                None => {}
            }
        }
        if !done {
            return Err("guest->host blast did not end".into());
        }
        out.g2h_rx[i] = count;
        let mut r = vec![b'R'];
        r.extend(count.to_le_bytes());
        request(&sock, &r, b'r', &mut buf)?;

        // Host -> guest blast.
        let mut s = vec![b'S'];
        s.extend(len.to_le_bytes());
        request(&sock, &s, b's', &mut buf)?;
        let mut pkt = vec![0u8; usize::from(len) - 42];
        pkt[0] = b'P';
        let until = Instant::now() + Duration::from_millis(ms);
        let mut sent = 0u64;
        while Instant::now() < until {
            for _ in 0..64 {
                if sock.send(&pkt).is_ok() {
                    sent += 1;
                }
            }
        }
        out.h2g_sent[i] = sent;
        std::thread::sleep(Duration::from_millis(200));
        request(&sock, b"F", b'f', &mut buf)?;
    }
    for _ in 0..3 {
        let _ = sock.send(b"X");
    }
    Ok(out)
}

fn net_once(vmm: Vmm, o: &Opts) -> Result<(Figures, HostCounts), String> {
    let ns = NetNs::new();
    let cmdline = "probe.run=tsc,netbench probe.net_ip=10.0.2.15 probe.net_peer=10.0.2.2 \
                   probe.udp_port=7777 probe.net_ms=1800000";
    let cmd = match vmm {
        Vmm::Cinder | Vmm::CinderNoSeccomp => cinder_cmd(
            vmm,
            cmdline,
            &["--net".into(), format!("tap={},mac={MAC}", ns.tap)],
        ),
        Vmm::Qemu => {
            let extra = [
                "-netdev".to_string(),
                format!(
                    "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                    ns.tap
                ),
                "-device".into(),
                format!("virtio-net-device,netdev=n0,mac={MAC}"),
            ];
            let accel = if o.kvm { Accel::Kvm } else { Accel::Tcg };
            qemu_vm(cmdline, &extra, accel).command()
        }
    };
    let mut s = Session::start(ns.wrap(&cmd));
    s.expect("PROBE netbench ready", Duration::from_secs(120))?;
    let ms = o.ms;
    let host = ns
        .spawn(move || net_host(ms))
        .join()
        .map_err(|_| "host side panicked".to_string())?;
    let host = match host {
        Ok(h) => h,
        Err(e) => return Err(format!("host side: {e}\n{}", s.log())),
    };
    s.expect_line("PROBE DONE", Duration::from_secs(60))?;
    let log = probe::parse(&s.console());
    tsc_ok(&log)?;
    let res = match log.check("netbench") {
        Some(c) if c.status == Status::Ok => figures(&c.details, &NET_KEYS),
        Some(c) => Err(format!("netbench {:?}: {}", c.status, c.details)),
        None => Err(format!("no PROBE netbench line\n{}", s.log())),
    };
    drop(s);
    drop(ns);
    res.map(|f| (f, host))
}

// ---- report ----

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (med, v[0], v[v.len() - 1])
}

fn median_of(runs: &[Figures], key: &str) -> Option<f64> {
    let mut v: Vec<f64> = runs
        .iter()
        .filter_map(|f| f.iter().find(|(k, _)| k == key).map(|(_, v)| *v))
        .collect();
    (!v.is_empty()).then(|| stats(&mut v).0)
}

/// cinder's runs with seccomp on and off.
struct CinderRuns<'a> {
    on: &'a [Figures],
    off: &'a [Figures],
}

fn report(keys: &[&str], cinder: Option<CinderRuns>, qemu: &[Figures], qlabel: &str) {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".to_string(),
    };
    for key in keys {
        if let Some(c) = &cinder {
            row(CINDER_ON, key, c.on);
            row(CINDER_OFF, key, c.off);
        } else {
            println!(
                "{:<22} {key:<20} not measured: /dev/kvm cannot be opened",
                "cinder"
            );
        }
        row(qlabel, key, qemu);
        let on = cinder.as_ref().and_then(|c| median_of(c.on, key));
        let off = cinder.as_ref().and_then(|c| median_of(c.off, key));
        println!(
            "{:<22} {key:<20} cinder/QEMU (medians) {}  seccomp on/off {}",
            "ratio",
            ratio(on, median_of(qemu, key)),
            ratio(on, off)
        );
    }
}

fn row(name: &str, key: &str, runs: &[Figures]) {
    let mut v: Vec<f64> = runs
        .iter()
        .filter_map(|f| f.iter().find(|(k, _)| k == key).map(|(_, v)| *v))
        .collect();
    if v.is_empty() {
        println!("{name:<28} {key:<20} no successful run");
        return;
    }
    let n = v.len();
    let (med, min, max) = stats(&mut v);
    println!("{name:<28} {key:<20} median {med:12.2}  min {min:12.2}  max {max:12.2}  ({n} runs)");
}

fn bench_blk(o: &Opts) {
    let (_scratch, img) = make_image(o.disk_mib);
    println!(
        "blk benchmark: {} MiB image {} (page cache), {} ms per phase, {} runs",
        o.disk_mib,
        img.display(),
        o.ms,
        o.runs
    );
    let mut vmms = Vec::new();
    if o.kvm {
        for (uring, seccomp, poll) in [
            (false, true, false),
            (false, false, false),
            (true, true, false),
            (false, true, true),
            (true, true, true),
        ] {
            vmms.push(BlkVmm::Cinder {
                uring,
                seccomp,
                poll,
            });
        }
        if std::env::var_os("BASELINE_CINDER_BIN").is_some() {
            vmms.push(BlkVmm::Baseline);
        }
        if std::env::var_os("FIRECRACKER_BIN").is_some() {
            vmms.push(BlkVmm::Firecracker);
        }
    }
    vmms.push(BlkVmm::Qemu);
    if let Some(only) = &o.only {
        vmms.retain(|v| only.iter().any(|k| k == v.key()));
    }
    let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); vmms.len()];
    for run in 0..o.runs {
        // Every VMM once per round, so that what the host does meanwhile hits all alike.
        for (i, vmm) in vmms.iter().enumerate() {
            match blk_once(*vmm, &img, o) {
                Ok(f) => runs[i].push(f),
                Err(e) => println!("{} blk run {run} failed: {e}", vmm.label(o)),
            }
        }
    }
    println!();
    if !o.kvm {
        println!("cinder: not measured: /dev/kvm cannot be opened");
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".to_string(),
    };
    let med = |v: BlkVmm, key: &str| {
        vmms.iter()
            .position(|x| *x == v)
            .and_then(|i| median_of(&runs[i], key))
    };
    let sync_on = BlkVmm::Cinder {
        uring: false,
        seccomp: true,
        poll: false,
    };
    let sync_off = BlkVmm::Cinder {
        uring: false,
        seccomp: false,
        poll: false,
    };
    let uring = BlkVmm::Cinder {
        uring: true,
        seccomp: true,
        poll: false,
    };
    let sync_poll = BlkVmm::Cinder {
        uring: false,
        seccomp: true,
        poll: true,
    };
    let uring_poll = BlkVmm::Cinder {
        uring: true,
        seccomp: true,
        poll: true,
    };
    for key in BLK_KEYS.iter().copied().chain([CPU_KEY]) {
        for (i, vmm) in vmms.iter().enumerate() {
            row(&vmm.label(o), key, &runs[i]);
        }
        let mut line = format!(
            "{:<28} {key:<20} sync/QEMU {}  io_uring/sync {}  seccomp on/off {}",
            "ratio (medians)",
            ratio(med(sync_on, key), med(BlkVmm::Qemu, key)),
            ratio(med(uring, key), med(sync_on, key)),
            ratio(med(sync_on, key), med(sync_off, key)),
        );
        line += &format!(
            "  sync poll/no poll {}  io_uring poll/no poll {}",
            ratio(med(sync_poll, key), med(sync_on, key)),
            ratio(med(uring_poll, key), med(uring, key)),
        );
        if vmms.contains(&BlkVmm::Baseline) {
            line += &format!(
                "  sync/baseline {}",
                ratio(med(sync_on, key), med(BlkVmm::Baseline, key))
            );
        }
        if vmms.contains(&BlkVmm::Firecracker) {
            line += &format!(
                "  sync/firecracker {}",
                ratio(med(sync_on, key), med(BlkVmm::Firecracker, key))
            );
        }
        println!("{line}");
    }
}

fn bench_net(o: &Opts) {
    println!(
        "net benchmark: TAP in a private namespace, 10.0.2.2 <-> 10.0.2.15, {} ms per phase, \
         frames of 64 (60 + FCS) and 1514 bytes, {} runs",
        o.ms, o.runs
    );
    let mut cinder = Vec::new();
    let mut cinder_off = Vec::new();
    let mut qemu = Vec::new();
    for run in 0..o.runs {
        for vmm in [Vmm::Cinder, Vmm::CinderNoSeccomp, Vmm::Qemu] {
            if vmm != Vmm::Qemu && !o.kvm {
                continue;
            }
            let name = match vmm {
                Vmm::Cinder => CINDER_ON,
                Vmm::CinderNoSeccomp => CINDER_OFF,
                Vmm::Qemu => "qemu",
            };
            match net_once(vmm, o) {
                Ok((f, h)) => {
                    println!("{name} net run {run}: host counted {h:?}");
                    match vmm {
                        Vmm::Cinder => cinder.push(f),
                        Vmm::CinderNoSeccomp => cinder_off.push(f),
                        Vmm::Qemu => qemu.push(f),
                    }
                }
                Err(e) => println!("{name} net run {run} failed: {e}"),
            }
        }
    }
    println!();
    report(
        &NET_KEYS,
        o.kvm.then_some(CinderRuns {
            on: &cinder,
            off: &cinder_off,
        }),
        &qemu,
        &qemu_label(o),
    );
}

fn qemu_label(o: &Opts) -> String {
    format!("qemu microvm ({})", if o.kvm { "kvm" } else { "tcg" })
}

fn main() {
    let mut what = "all".to_string();
    let mut o = Opts {
        runs: 5,
        ms: 2000,
        disk_mib: 256,
        kvm: false,
        only: None,
    };
    let usage = "usage: bench_io [blk|net|all] [--runs N] [--ms MS] [--disk-mib N] \
                 [--only sync,sync-noseccomp,uring,sync-poll,uring-poll,baseline,firecracker,qemu]";
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{name} needs a number; {usage}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "blk" | "net" | "all" => what = a,
            "--runs" => {
                o.runs = usize::try_from(num("--runs").max(1)).unwrap_or_else(|_| {
                    eprintln!("--runs is too large; {usage}");
                    std::process::exit(2)
                })
            }
            "--ms" => o.ms = num("--ms").clamp(1, 600_000),
            "--disk-mib" => o.disk_mib = num("--disk-mib").max(2),
            "--only" => {
                let Some(list) = args.next() else {
                    eprintln!("--only needs a list; {usage}");
                    std::process::exit(2)
                };
                o.only = Some(list.split(',').map(str::to_string).collect());
            }
            other => {
                eprintln!("unknown argument {other}; {usage}");
                std::process::exit(2);
            }
        }
    }
    o.kvm = Accel::detect() == Accel::Kvm;
    if what == "blk" || what == "all" {
        bench_blk(&o);
    }
    if what == "all" {
        println!();
    }
    if what == "net" || what == "all" {
        bench_net(&o);
    }
    if !o.kvm {
        println!(
            "note: QEMU ran under TCG (software emulation); its figures are not comparable to a \
             KVM VMM's"
        );
    }
}
