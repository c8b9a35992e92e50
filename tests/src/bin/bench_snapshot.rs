//! Snapshot benchmark (issue 17): what a snapshot of an idle probe costs and how fast it comes
//! back. Reported, never asserted; the host is shared, so the figures are noisy.
//!
//! ```text
//! scripts/bench.sh snapshot [--mem-mib 128] [--clones 8,100] [--rounds 5]
//! ```
//! For cinder (and Firecracker when `FIRECRACKER_BIN` names its binary; both driven through
//! the same Firecracker API over a Unix socket), with the probe's `idle` check (halted, woken
//! only by serial input: `p` is answered `PROBE pong N`):
//! - **create**: `PUT /snapshot/create` of the paused VM, Full then Diff (dirty page tracking
//!   on; one ping between the two), request to response; the files' sizes (apparent and
//!   allocated: the memory file is sparse);
//! - **restore**: a new process, `PUT /snapshot/load` with `resume_vm` to its response, then
//!   a ping to its pong; for cinder also exec of `cinder --restore ...,resume` to the first
//!   guest output (a `p` is typed at once, the first output is the pong);
//! - **fan-out**: N clones started at once from the one snapshot, wall time until every one
//!   answered a ping.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cinder_tests::cinder::cinder_bin;
use cinder_tests::http::{request, wait_for_socket, Response};
use cinder_tests::probe;
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir;

const T: Duration = Duration::from_secs(120);

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

    /// The VMM serving its API on `sock`, nothing configured.
    fn start(&self, sock: &Path) -> Result<Session, String> {
        let mut c = match self {
            Vmm::Cinder => Command::new(cinder_bin()),
            Vmm::Firecracker(bin) => {
                let mut c = Command::new(bin);
                c.args(["--level", "Error"]);
                c
            }
        };
        c.arg("--api-sock").arg(sock);
        let s = Session::start(c);
        wait_for_socket(sock, Duration::from_secs(10)).map_err(|e| format!("{e}\n{}", s.log()))?;
        Ok(s)
    }
}

fn ok(r: Response, what: &str) -> Result<(), String> {
    if r.status == 204 || r.status == 200 {
        Ok(())
    } else {
        Err(format!("{what}: {} {}", r.status, r.body))
    }
}

/// Timed request (ms).
fn timed(sock: &Path, method: &str, route: &str, body: &str) -> Result<f64, String> {
    let t = Instant::now();
    let r = request(sock, method, route, Some(body));
    let ms = t.elapsed().as_secs_f64() * 1e3;
    ok(r, &format!("{method} {route}"))?;
    Ok(ms)
}

fn sizes(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p)
        .map(|m| (m.len(), m.blocks() * 512))
        .unwrap_or((0, 0))
}

fn kib(b: u64) -> String {
    format!("{:.0} KiB", b as f64 / 1024.0)
}

/// Waits for `PROBE pong {n}` after typing `p`; returns the round trip in ms.
fn ping(s: &mut Session, n: u32) -> Result<f64, String> {
    let t = Instant::now();
    s.send("p")?;
    s.expect_line(&format!("PROBE pong {n}"), T)?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

struct Snap {
    state: PathBuf,
    mem: PathBuf,
}

/// Boots the idle probe through the API, snapshots it (Full, then Diff) and reports.
fn create(vmm: &Vmm, dir: &Path, o: &Opts) -> Result<Snap, String> {
    let sock = dir.join("create.sock");
    let mut s = vmm.start(&sock)?;
    let boot = serde_json::json!({
        "kernel_image_path": probe::elf_path(),
        "boot_args": "probe.run=idle",
    });
    ok(
        request(&sock, "PUT", "/boot-source", Some(&boot.to_string())),
        "boot-source",
    )?;
    let mc =
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": o.mem_mib, "track_dirty_pages": true});
    ok(
        request(&sock, "PUT", "/machine-config", Some(&mc.to_string())),
        "machine-config",
    )?;
    ok(
        request(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        ),
        "InstanceStart",
    )?;
    s.expect_line("PROBE idle ready", T)?;
    let pause = r#"{"state": "Paused"}"#;
    let resume = r#"{"state": "Resumed"}"#;
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    timed(&sock, "PATCH", "/vm", pause)?;
    let body = |st: &Path, m: &Path, ty: &str| {
        serde_json::json!({"snapshot_path": st, "mem_file_path": m, "snapshot_type": ty})
            .to_string()
    };
    let full_ms = timed(
        &sock,
        "PUT",
        "/snapshot/create",
        &body(&state, &mem, "Full"),
    )?;
    timed(&sock, "PATCH", "/vm", resume)?;
    ping(&mut s, 1)?;
    timed(&sock, "PATCH", "/vm", pause)?;
    let (dstate, dmem) = (dir.join("dstate"), dir.join("dmem"));
    let diff_ms = timed(
        &sock,
        "PUT",
        "/snapshot/create",
        &body(&dstate, &dmem, "Diff"),
    )?;
    drop(s);
    let (sa, _) = sizes(&state);
    let (ma, mb) = sizes(&mem);
    let (da, db) = sizes(&dmem);
    println!(
        "  create Full: {full_ms:.1} ms; state {}, memory {} apparent / {} allocated",
        kib(sa),
        kib(ma),
        kib(mb)
    );
    println!(
        "  create Diff (after one ping): {diff_ms:.1} ms; memory {} apparent / {} allocated",
        kib(da),
        kib(db)
    );
    // The snapshot the restores use was taken before the ping: its next pong is 1.
    Ok(Snap { state, mem })
}

fn load_body(s: &Snap) -> String {
    serde_json::json!({
        "snapshot_path": s.state,
        "mem_backend": {"backend_type": "File", "backend_path": s.mem},
        "resume_vm": true,
    })
    .to_string()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn restore(vmm: &Vmm, dir: &Path, snap: &Snap, o: &Opts) -> Result<(), String> {
    let (mut load, mut pong) = (vec![], vec![]);
    for r in 0..o.rounds {
        let sock = dir.join(format!("load{r}.sock"));
        let mut s = vmm.start(&sock)?;
        load.push(timed(&sock, "PUT", "/snapshot/load", &load_body(snap))?);
        pong.push(ping(&mut s, 1)?);
    }
    println!(
        "  restore (PUT /snapshot/load, resume_vm) request -> response: median {:.1} ms of {}; then ping -> pong {:.1} ms",
        median(&mut load),
        o.rounds,
        median(&mut pong)
    );
    if let Vmm::Cinder = vmm {
        let mut first = vec![];
        for _ in 0..o.rounds {
            let spec = format!(
                "state={},mem={},resume",
                snap.state.display(),
                snap.mem.display()
            );
            let mut c = Command::new(cinder_bin());
            c.args(["--restore", &spec]);
            let mut s = Session::start(c);
            s.send("p")?;
            first.push(s.expect_output(T)?.as_secs_f64() * 1e3);
            s.expect_line("PROBE pong 1", T)?;
        }
        println!(
            "  exec `cinder --restore ...,resume` -> first guest output (a ping typed at once): median {:.1} ms of {}",
            median(&mut first),
            o.rounds
        );
    }
    Ok(())
}

/// N clones at once; every one must answer a ping.
fn fan_out(vmm: &Vmm, dir: &Path, snap: &Snap, n: usize) -> Result<(), String> {
    let t = Instant::now();
    let mut vms = Vec::with_capacity(n);
    for i in 0..n {
        let s = match vmm {
            Vmm::Cinder => {
                let spec = format!(
                    "state={},mem={},resume",
                    snap.state.display(),
                    snap.mem.display()
                );
                let mut c = Command::new(cinder_bin());
                c.args(["--restore", &spec]);
                Session::start(c)
            }
            Vmm::Firecracker(_) => vmm.start(&dir.join(format!("clone{n}-{i}.sock")))?,
        };
        vms.push(s);
    }
    if let Vmm::Firecracker(_) = vmm {
        // Its loads go through the API: all at once, one thread each.
        let body = load_body(snap);
        let errors: Vec<String> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..n)
                .map(|i| {
                    let (body, sock) = (&body, dir.join(format!("clone{n}-{i}.sock")));
                    sc.spawn(move || {
                        ok(
                            request(&sock, "PUT", "/snapshot/load", Some(body)),
                            "snapshot/load",
                        )
                    })
                })
                .collect();
            hs.into_iter()
                .filter_map(|h| h.join().ok().and_then(|r| r.err()))
                .collect()
        });
        if let Some(e) = errors.first() {
            return Err(e.clone());
        }
    }
    let started = t.elapsed();
    for s in vms.iter_mut() {
        s.send("p")?;
    }
    for s in vms.iter_mut() {
        s.expect_line("PROBE pong 1", T)?;
    }
    let all = t.elapsed();
    println!(
        "  fan-out {n} clones: all spawned in {:.0} ms, all answered a ping after {:.0} ms ({:.1} clones/s)",
        started.as_secs_f64() * 1e3,
        all.as_secs_f64() * 1e3,
        n as f64 / all.as_secs_f64()
    );
    Ok(())
}

struct Opts {
    mem_mib: u64,
    clones: Vec<usize>,
    rounds: usize,
}

fn bench(vmm: &Vmm, o: &Opts) -> Result<(), String> {
    println!("\n{}: idle probe, 1 vCPU, {} MiB", vmm.name(), o.mem_mib);
    let dir = TempDir::new(&format!("bench-snap-{}", vmm.name()));
    let snap = create(vmm, dir.path(), o)?;
    restore(vmm, dir.path(), &snap, o)?;
    for &n in &o.clones {
        fan_out(vmm, dir.path(), &snap, n)?;
    }
    Ok(())
}

fn main() {
    let mut o = Opts {
        mem_mib: 128,
        clones: vec![8, 100],
        rounds: 5,
    };
    let usage = "usage: bench_snapshot [--mem-mib N] [--clones N,N,..] [--rounds N]";
    let bad = |what: &str| -> ! {
        eprintln!("{what}; {usage}");
        std::process::exit(2)
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args
            .next()
            .unwrap_or_else(|| bad(&format!("{a} needs a value")));
        let num = |v: &str| -> u64 {
            v.parse()
                .unwrap_or_else(|_| bad(&format!("{a}: {v:?} is not a number")))
        };
        match a.as_str() {
            "--mem-mib" => o.mem_mib = num(&v).clamp(16, 65536),
            "--clones" => {
                o.clones = v
                    .split(',')
                    .map(|c| usize::try_from(num(c).clamp(1, 10_000)).unwrap_or(1))
                    .collect()
            }
            "--rounds" => o.rounds = usize::try_from(num(&v).clamp(1, 1000)).unwrap_or(1),
            other => bad(&format!("unknown argument {other}")),
        }
    }
    println!("snapshot benchmark (reported, not asserted; a shared host gives noisy figures)");
    let mut vmms = vec![Vmm::Cinder];
    if let Some(fc) = std::env::var_os("FIRECRACKER_BIN") {
        vmms.push(Vmm::Firecracker(PathBuf::from(fc)));
    }
    let mut failed = 0;
    for vmm in &vmms {
        if let Err(e) = bench(vmm, &o) {
            println!("  {}: did not complete: {e}", vmm.name());
            failed += 1;
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
