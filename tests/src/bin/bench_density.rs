//! Density benchmark: how many idle probe microVMs one host holds, and what each costs it
//! (issue 17 item 6). Reported, never asserted.
//!
//! ```text
//! scripts/bench.sh density [--counts 100,300,1000] [--mem-mib 128] [--parallel 4]
//!                          [--timeout-s 1200] [--idle-s 5]
//! ```
//! For each VMM (cinder; Firecracker too when `FIRECRACKER_BIN` names its binary) and each
//! count N it starts N microVMs (1 vCPU, `--mem-mib`) running the probe's `idle` check, which
//! halts with no timer and wakes only on serial input. At most `--parallel` VMs boot at once
//! (a VM boots until it prints `PROBE idle ready`). Then:
//! - **VMs per second** and **time to all ready**: from the first start to the last ready line;
//!   each VM's own start -> ready time (median / max);
//! - **ping**: a `p` on every VM's serial input, answered `PROBE pong 1`: time until all
//!   answered (and how many did);
//! - **memory per VM**: PSS from `/proc/PID/smaps_rollup`, RSS, RSS minus the guest-RAM
//!   mappings (the VMM's overhead, shared pages counted whole) and the private anonymous
//!   memory outside guest RAM (`cinder_tests::smaps`); and the host's `MemAvailable` drop
//!   divided by N;
//! - **idle CPU**: the VMs' user+system time over `--idle-s` seconds, in % of one core;
//! - **teardown**: a `q` to every VM ends its check and the probe resets: VMs that exited 0
//!   within 60 s, the time it took, VMs that had to be killed.
//!
//! `--sources cold,restored` (the default: both): restored clones are cinder processes started
//! with `--restore state=..,mem=..,resume` from one snapshot of an idle probe taken after
//! `PROBE idle ready` ([`Source::Restored`]). A restored probe is already inside its idle loop,
//! so it prints no ready line: readiness is its first answer to a ping (the ping phase then
//! measures a second one). Firecracker's clones are Firecracker processes with an API socket
//! each, loading (`PUT /snapshot/load`, `resume_vm`) one snapshot Firecracker took of the same
//! idle probe: the API thread is part of what they cost.
//!
//! Mind the limits: each VM is a process with about 6 threads and 30 file descriptors; this
//! program raises its own RLIMIT_NOFILE to the hard limit and holds 2 descriptors per VM.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use cinder_tests::cinder::cinder_bin;
use cinder_tests::probe;
use cinder_tests::smaps;
use cinder_tests::tmp::TempDir;

/// How long one VM may take from its start to ready.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The VMM under test.
#[derive(Clone)]
enum Vmm {
    Cinder,
    Firecracker(PathBuf),
}

impl Vmm {
    fn name(&self) -> &'static str {
        match self {
            Vmm::Cinder => "cinder",
            Vmm::Firecracker(_) => "firecracker",
        }
    }
}

/// How a VM gets to its idle state.
#[derive(Clone, Copy)]
enum Source {
    /// A cold boot of the probe ELF with `probe.run=idle`.
    ColdBoot,
    /// `cinder --restore state=..,mem=..,resume` of one snapshot ([`Opts::snapshot`]) taken
    /// after `PROBE idle ready`: every clone maps the same memory file `MAP_PRIVATE`.
    Restored,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::ColdBoot => "cold boot",
            Source::Restored => "restored clones",
        }
    }

    /// Whether the VM is ready when it answers a ping (a restored guest prints no ready line).
    fn ready_on_pong(self) -> bool {
        match self {
            Source::ColdBoot => false,
            Source::Restored => true,
        }
    }

    /// The command that starts VM `i` in `dir`.
    fn command(self, vmm: &Vmm, o: &Opts, dir: &Path, i: usize) -> std::io::Result<Command> {
        let cmdline = "probe.run=idle";
        match (self, vmm) {
            (Source::ColdBoot, Vmm::Cinder) => {
                let mut c = Command::new(cinder_bin());
                c.arg("--kernel")
                    .arg(probe::elf_path())
                    .args(["--memory", &o.mem_mib.to_string(), "--vcpus", "1"])
                    .args(["--cmdline", cmdline]);
                Ok(c)
            }
            (Source::Restored, Vmm::Cinder) => {
                let (state, mem) = o
                    .snapshot
                    .as_ref()
                    .ok_or_else(|| std::io::Error::other("no snapshot to restore clones from"))?;
                let mut c = Command::new(cinder_bin());
                c.arg("--restore").arg(format!(
                    "state={},mem={},resume",
                    state.display(),
                    mem.display()
                ));
                Ok(c)
            }
            (Source::Restored, Vmm::Firecracker(bin)) => {
                // An API socket each: Firecracker loads a snapshot only through its API
                // ([`Source::after_spawn`]).
                let mut c = Command::new(bin);
                c.args(["--level", "Error", "--api-sock"])
                    .arg(dir.join(format!("vm{i}.sock")));
                Ok(c)
            }
            (Source::ColdBoot, Vmm::Firecracker(bin)) => {
                let cfg = serde_json::json!({
                    "boot-source": {
                        "kernel_image_path": probe::elf_path(),
                        "boot_args": cmdline,
                    },
                    "drives": [],
                    "machine-config": { "vcpu_count": 1, "mem_size_mib": o.mem_mib },
                });
                let path = dir.join(format!("vm{i}.json"));
                std::fs::write(&path, cfg.to_string())?;
                // Its log lines go to stdout otherwise, into the middle of the probe's.
                let log = dir.join(format!("vm{i}.log"));
                File::create(&log)?;
                let mut c = Command::new(bin);
                c.args(["--no-api", "--config-file"])
                    .arg(&path)
                    .arg("--log-path")
                    .arg(&log);
                Ok(c)
            }
        }
    }
}

impl Source {
    /// What VM `i` needs once its process runs: a restored Firecracker clone its
    /// `PUT /snapshot/load` (resumed), from the snapshot [`snapshot_idle_probe_fc`] wrote.
    fn after_spawn(self, vmm: &Vmm, o: &Opts, dir: &Path, i: usize) -> std::io::Result<()> {
        use cinder_tests::http::{request, wait_for_socket};
        let (Source::Restored, Vmm::Firecracker(_)) = (self, vmm) else {
            return Ok(());
        };
        let (state, mem) = o
            .fc_snapshot
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no Firecracker snapshot to restore from"))?;
        let sock = dir.join(format!("vm{i}.sock"));
        wait_for_socket(&sock, Duration::from_secs(10)).map_err(std::io::Error::other)?;
        let body = serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
        });
        let r = request(&sock, "PUT", "/snapshot/load", Some(&body.to_string()));
        if r.status != 204 {
            return Err(std::io::Error::other(format!(
                "snapshot/load: {} {}",
                r.status, r.body
            )));
        }
        Ok(())
    }
}

struct Opts {
    counts: Vec<usize>,
    mem_mib: u64,
    parallel: usize,
    timeout: Duration,
    idle: Duration,
    sources: Vec<Source>,
    /// The idle probe's snapshot (state, memory) the restored clones start from.
    snapshot: Option<(PathBuf, PathBuf)>,
    /// The same, taken by Firecracker (its clones load it through their API).
    fc_snapshot: Option<(PathBuf, PathBuf)>,
}

/// Boots one idle probe under cinder's API, waits for `PROBE idle ready`, pauses it and
/// writes a Full snapshot into `dir`.
fn snapshot_idle_probe(dir: &Path, mem_mib: u64) -> Result<(PathBuf, PathBuf), String> {
    use cinder_tests::http::{request, wait_for_socket};
    let t = Duration::from_secs(120);
    let sock = dir.join("snap.sock");
    let mut c = Command::new(cinder_bin());
    c.arg("--api-sock")
        .arg(&sock)
        .arg("--kernel")
        .arg(probe::elf_path())
        .args(["--memory", &mem_mib.to_string(), "--vcpus", "1"])
        .args(["--cmdline", "probe.run=idle"]);
    let mut s = cinder_tests::session::Session::start(c);
    wait_for_socket(&sock, t)?;
    s.expect_line("PROBE idle ready", t)?;
    let (state, mem) = (dir.join("idle.state"), dir.join("idle.mem"));
    let r = request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    if r.status != 204 {
        return Err(format!("pause: {} {}", r.status, r.body));
    }
    let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string();
    let r = request(&sock, "PUT", "/snapshot/create", Some(&body));
    if r.status != 204 {
        return Err(format!("snapshot/create: {} {}", r.status, r.body));
    }
    Ok((state, mem))
}

/// As [`snapshot_idle_probe`], under Firecracker `bin` (configured through its API).
fn snapshot_idle_probe_fc(
    dir: &Path,
    mem_mib: u64,
    bin: &Path,
) -> Result<(PathBuf, PathBuf), String> {
    use cinder_tests::http::{request, wait_for_socket};
    let t = Duration::from_secs(120);
    let sock = dir.join("fc-snap.sock");
    let mut c = Command::new(bin);
    c.args(["--level", "Error", "--api-sock"]).arg(&sock);
    let mut s = cinder_tests::session::Session::start(c);
    wait_for_socket(&sock, t)?;
    let put = |route: &str, body: serde_json::Value| -> Result<(), String> {
        let r = request(&sock, "PUT", route, Some(&body.to_string()));
        if r.status == 204 {
            Ok(())
        } else {
            Err(format!("{route}: {} {}", r.status, r.body))
        }
    };
    put(
        "/boot-source",
        serde_json::json!({"kernel_image_path": probe::elf_path(), "boot_args": "probe.run=idle"}),
    )?;
    put(
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": mem_mib}),
    )?;
    put(
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    )?;
    s.expect_line("PROBE idle ready", t)?;
    let r = request(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    if r.status != 204 {
        return Err(format!("pause: {} {}", r.status, r.body));
    }
    let (state, mem) = (dir.join("fc-idle.state"), dir.join("fc-idle.mem"));
    put(
        "/snapshot/create",
        serde_json::json!({"snapshot_path": state, "mem_file_path": mem, "snapshot_type": "Full"}),
    )?;
    Ok((state, mem))
}

/// One running VM: its process, serial input, and what it printed so far.
struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    out: File,
    text: Vec<u8>,
    started: Instant,
    ready: Option<Duration>,
    /// The readiness ping went out (restored clones only).
    pinged: bool,
    pong: bool,
    exited: Option<Option<i32>>,
}

impl Vm {
    /// Reads what the VM printed since the last call (bounded: the file is the VM's stdout).
    fn poll(&mut self) {
        let mut buf = [0u8; 4096];
        let _ = self.out.seek(SeekFrom::Start(self.text.len() as u64));
        for _ in 0..64 {
            match self.out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.text.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn has(&self, needle: &str) -> bool {
        self.text
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    fn send(&mut self, b: &[u8]) -> bool {
        self.stdin
            .as_mut()
            .is_some_and(|s| s.write_all(b).and_then(|_| s.flush()).is_ok())
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // After the command name's closing parenthesis: fields 3.. ; utime and stime are 14, 15.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// `Pss:` and `Rss:` of `/proc/PID/smaps_rollup`, in KiB.
fn rollup(pid: u32) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
        return (0, 0);
    };
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("Pss:"), get("Rss:"))
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed; no other memory.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
    r.rlim_cur
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn row(what: &str, v: &mut [f64], unit: &str) {
    let (med, min, max) = stats(v);
    println!("  {what:<40} {med:>10.1} {min:>10.1} {max:>10.1}  {unit}");
}

/// Stops whatever is left: SIGKILL and reap (bounded by the kernel).
fn kill_all(vms: &mut [Vm]) -> usize {
    let mut killed = 0;
    for vm in vms.iter_mut() {
        if vm.exited.is_none() {
            let _ = vm.child.kill();
            let _ = vm.child.wait();
            vm.exited = Some(None);
            killed += 1;
        }
    }
    killed
}

fn run(vmm: &Vmm, source: Source, n: usize, o: &Opts) -> Result<(), String> {
    println!(
        "\n{} / {}: {n} VMs (1 vCPU, {} MiB), {} booting at a time",
        vmm.name(),
        source.name(),
        o.mem_mib,
        o.parallel
    );
    let dir = TempDir::new(&format!("density-{}-{n}", vmm.name()));
    let avail_before = mem_available_kib();
    let t0 = Instant::now();
    let deadline = t0 + o.timeout;
    let mut vms: Vec<Vm> = Vec::with_capacity(n);
    let mut failed_start = None;
    // Start, keeping at most `parallel` booting; bounded by `deadline`.
    loop {
        let booting = vms.iter().filter(|v| v.ready.is_none()).count();
        if vms.len() < n && booting < o.parallel && failed_start.is_none() {
            let i = vms.len();
            let out_path = dir.join(&format!("vm{i}.out"));
            let spawn = source
                .command(vmm, o, dir.path(), i)
                .and_then(|mut c| {
                    let out = File::create(&out_path)?;
                    let err = out.try_clone()?;
                    c.stdin(Stdio::piped()).stdout(out).stderr(err).spawn()
                })
                .and_then(|mut child| {
                    if let Err(e) = source.after_spawn(vmm, o, dir.path(), i) {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(e);
                    }
                    let stdin = child.stdin.take();
                    Ok(Vm {
                        child,
                        stdin,
                        out: File::open(&out_path)?,
                        text: Vec::new(),
                        started: Instant::now(),
                        ready: None,
                        pinged: false,
                        pong: false,
                        exited: None,
                    })
                });
            match spawn {
                Ok(vm) => vms.push(vm),
                Err(e) => failed_start = Some(format!("VM {i} did not start: {e}")),
            }
            continue;
        }
        for vm in vms.iter_mut().filter(|v| v.ready.is_none()) {
            vm.poll();
            let ready = if source.ready_on_pong() {
                if !vm.pinged {
                    vm.pinged = vm.send(b"p");
                }
                vm.has("PROBE pong")
            } else {
                vm.has("PROBE idle ready")
            };
            if ready {
                vm.ready = Some(vm.started.elapsed());
            } else if vm.started.elapsed() > BOOT_TIMEOUT {
                failed_start = Some(format!(
                    "VM {} was not ready {BOOT_TIMEOUT:?} after its start",
                    vm.pid()
                ));
                vm.ready = Some(Duration::MAX);
            } else if let Ok(Some(st)) = vm.child.try_wait() {
                vm.exited = Some(st.code());
                let tail = String::from_utf8_lossy(&vm.text);
                let tail: String = tail
                    .chars()
                    .rev()
                    .take(400)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                failed_start = Some(format!(
                    "VM {} exited ({st}) before it was ready: ...{tail}",
                    vm.pid()
                ));
                vm.ready = Some(Duration::MAX);
            }
        }
        let all_ready = vms.len() == n && vms.iter().all(|v| v.ready.is_some());
        if all_ready || (failed_start.is_some() && vms.iter().all(|v| v.ready.is_some())) {
            break;
        }
        if Instant::now() > deadline {
            failed_start.get_or_insert_with(|| "timed out before all VMs were ready".into());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let all_ready_at = t0.elapsed();
    if let Some(e) = failed_start {
        let ready = vms
            .iter()
            .filter(|v| v.ready.is_some_and(|d| d != Duration::MAX))
            .count();
        println!(
            "  {e} ({ready} of {n} ready after {:.1} s)",
            all_ready_at.as_secs_f64()
        );
        let killed = kill_all(&mut vms);
        println!("  stopped: {killed} killed");
        return Err(e);
    }
    let mut boot: Vec<f64> = vms
        .iter()
        .filter_map(|v| v.ready.map(|d| d.as_secs_f64() * 1e3))
        .collect();
    println!(
        "  {:<40} {:>10} {:>10} {:>10}",
        "figure", "median", "min", "max"
    );
    println!(
        "  all {n} ready after {:.2} s: {:.1} VMs/s",
        all_ready_at.as_secs_f64(),
        n as f64 / all_ready_at.as_secs_f64()
    );
    row("start -> ready, per VM", &mut boot, "ms");

    // Memory, once all are idle.
    let avail_after = mem_available_kib();
    let (mut pss, mut rss, mut over, mut private) = (vec![], vec![], vec![], vec![]);
    for vm in &vms {
        let (p, r) = rollup(vm.pid());
        pss.push(p as f64);
        rss.push(r as f64);
        if let Ok(m) = smaps::measure(vm.pid(), o.mem_mib) {
            over.push(m.overhead_kib() as f64);
            private.push(m.private_anon_kib as f64);
        }
    }
    row("PSS (smaps_rollup)", &mut pss, "KiB");
    row("RSS (smaps_rollup)", &mut rss, "KiB");
    row("RSS minus guest RAM (VMM overhead)", &mut over, "KiB");
    row("private anonymous, not guest RAM", &mut private, "KiB");
    println!(
        "  host MemAvailable drop per VM: {:.0} KiB ({} MiB for {n})",
        avail_before.saturating_sub(avail_after) as f64 / n as f64,
        avail_before.saturating_sub(avail_after) / 1024
    );

    // Idle CPU.
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let before: u64 = vms.iter().map(|v| cpu_ticks(v.pid())).sum();
    let t = Instant::now();
    std::thread::sleep(o.idle);
    let after: u64 = vms.iter().map(|v| cpu_ticks(v.pid())).sum();
    let secs = t.elapsed().as_secs_f64();
    let pct = (after.saturating_sub(before)) as f64 / hz / secs * 100.0;
    println!(
        "  idle CPU of all {n} VMs over {secs:.1} s: {pct:.1}% of one core ({:.3}% per VM)",
        pct / n as f64
    );

    // Ping every VM.
    let tp = Instant::now();
    let mut sent = 0;
    for vm in vms.iter_mut() {
        if vm.send(b"p") {
            sent += 1;
        }
    }
    let ping_deadline = Instant::now() + Duration::from_secs(60).max(o.timeout / 10);
    let want = if source.ready_on_pong() {
        "PROBE pong 2"
    } else {
        "PROBE pong 1"
    };
    loop {
        for vm in vms.iter_mut().filter(|v| !v.pong) {
            vm.poll();
            vm.pong = vm.has(want);
        }
        if vms.iter().all(|v| v.pong) || Instant::now() > ping_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let answered = vms.iter().filter(|v| v.pong).count();
    println!(
        "  ping: {answered} of {n} answered ({sent} sent) in {:.1} ms",
        tp.elapsed().as_secs_f64() * 1e3
    );

    // Teardown: `q` ends the idle check, the probe resets, the VMM exits.
    let tq = Instant::now();
    for vm in vms.iter_mut() {
        vm.send(b"q");
    }
    let quit_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for vm in vms.iter_mut().filter(|v| v.exited.is_none()) {
            if let Ok(Some(st)) = vm.child.try_wait() {
                vm.exited = Some(st.code());
            }
        }
        if vms.iter().all(|v| v.exited.is_some()) || Instant::now() > quit_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = tq.elapsed();
    let clean = vms.iter().filter(|v| v.exited == Some(Some(0))).count();
    let other: Vec<String> = vms
        .iter()
        .filter_map(|v| match v.exited {
            Some(Some(0)) | None => None,
            Some(c) => Some(format!("{c:?}")),
        })
        .take(5)
        .collect();
    let killed = kill_all(&mut vms);
    println!(
        "  teardown: {clean} of {n} exited 0 in {:.2} s; {killed} killed; other exits: {other:?}",
        took.as_secs_f64()
    );
    Ok(())
}

fn main() {
    let mut o = Opts {
        counts: vec![100],
        mem_mib: 128,
        parallel: 4,
        timeout: Duration::from_secs(1200),
        idle: Duration::from_secs(5),
        sources: vec![Source::ColdBoot, Source::Restored],
        snapshot: None,
        fc_snapshot: None,
    };
    let usage = "usage: bench_density [--counts N,N,..] [--mem-mib N] [--parallel N] \
                 [--timeout-s N] [--idle-s N] [--sources cold,restored]";
    let mut args = std::env::args().skip(1);
    let bad = |what: &str| -> ! {
        eprintln!("{what}; {usage}");
        std::process::exit(2)
    };
    while let Some(a) = args.next() {
        let v = args
            .next()
            .unwrap_or_else(|| bad(&format!("{a} needs a value")));
        let num = |v: &str| -> u64 {
            v.parse()
                .unwrap_or_else(|_| bad(&format!("{a}: {v:?} is not a number")))
        };
        match a.as_str() {
            "--counts" => {
                o.counts = v
                    .split(',')
                    .map(|c| usize::try_from(num(c).clamp(1, 100_000)).unwrap_or(1))
                    .collect()
            }
            "--mem-mib" => o.mem_mib = num(&v).clamp(16, 65536),
            "--parallel" => o.parallel = usize::try_from(num(&v).clamp(1, 10_000)).unwrap_or(1),
            "--timeout-s" => o.timeout = Duration::from_secs(num(&v).clamp(1, 86_400)),
            "--idle-s" => o.idle = Duration::from_secs(num(&v).clamp(1, 3600)),
            "--sources" => {
                o.sources = v
                    .split(',')
                    .map(|w| match w {
                        "cold" => Source::ColdBoot,
                        "restored" => Source::Restored,
                        other => bad(&format!("--sources: {other:?} is not cold or restored")),
                    })
                    .collect()
            }
            other => bad(&format!("unknown argument {other}")),
        }
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        eprintln!("bench_density: cannot open /dev/kvm ({e})");
        std::process::exit(1);
    }
    let nofile = raise_nofile();
    println!(
        "density benchmark: idle probe microVMs (probe.run=idle: halted, woken by serial input); \
         RLIMIT_NOFILE {nofile}; host MemAvailable {} MiB",
        mem_available_kib() / 1024
    );
    let mut vmms = vec![Vmm::Cinder];
    if let Some(fc) = std::env::var_os("FIRECRACKER_BIN") {
        vmms.push(Vmm::Firecracker(PathBuf::from(fc)));
    }
    let mut failures = 0;
    let snap_dir = TempDir::new("density-snapshot");
    if o.sources.iter().any(|s| matches!(s, Source::Restored)) {
        match snapshot_idle_probe(snap_dir.path(), o.mem_mib) {
            Ok(s) => o.snapshot = Some(s),
            Err(e) => {
                println!("no snapshot of the idle probe, no restored clones: {e}");
                failures += 1;
            }
        }
    }
    for &n in &o.counts {
        for &source in &o.sources {
            for vmm in &vmms {
                if matches!(source, Source::Restored) {
                    if o.snapshot.is_none() {
                        continue;
                    }
                    if let Vmm::Firecracker(bin) = vmm {
                        if o.fc_snapshot.is_none() {
                            match snapshot_idle_probe_fc(snap_dir.path(), o.mem_mib, bin) {
                                Ok(s) => o.fc_snapshot = Some(s),
                                Err(e) => {
                                    println!(
                                        "\nfirecracker / restored clones: no snapshot of the \
                                         idle probe: {e}"
                                    );
                                    failures += 1;
                                    continue;
                                }
                            }
                        }
                    }
                }
                if run(vmm, source, n, &o).is_err() {
                    failures += 1;
                }
            }
        }
    }
    if failures > 0 {
        println!("\n{failures} run(s) did not complete (see above)");
        std::process::exit(1);
    }
}
