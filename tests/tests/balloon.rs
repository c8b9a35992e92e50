//! virtio-balloon (issue 16 item 3), Firecracker-compatible.
//!
//! * The API answers as Firecracker 1.16.1 answers (checked against its binary): bodies and
//!   codes of every balloon error, before and after boot (`balloon_api_*`).
//! * The probe guest plays a hostile driver (`probe.run=balloon`): page frame numbers outside
//!   RAM, in the MMIO gap, duplicates, a huge count in one descriptor, a descriptor outside
//!   memory are ignored and counted (metrics `balloon`), the VM keeps running, and the page it
//!   did inflate reads back as zeros (the host discarded it).
//! * The Linux test profile, through its own virtio_balloon driver, in one boot: statistics,
//!   inflate (cinder's RSS drops by at least 0.9 X), deflate (the guest allocates again), free
//!   page reporting (an allocation and free of `TOUCH_MIB` returns near the earlier RSS).
//!
//! Tests with `under_cinder` in their name boot a guest and need /dev/kvm.

use std::path::Path;
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder, require_kvm, start_api};
use cinder_tests::http::{request, Response};
use cinder_tests::probe::{self, Status};
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir as Scratch;

fn fault(r: &Response) -> String {
    r.json()["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {r:?}"))
        .to_string()
}

/// `method route body` answers `status`, and (for errors) a fault message starting with
/// `message`.
fn answers(sock: &Path, method: &str, route: &str, body: Option<&str>, status: u16, message: &str) {
    let r = request(sock, method, route, body);
    assert_eq!(r.status, status, "{method} {route} {body:?}: {r:?}");
    if status >= 400 {
        let f = fault(&r);
        assert!(
            f.starts_with(message),
            "{method} {route} {body:?}: {f:?} does not start with {message:?}"
        );
    }
}

/// Every pre-boot balloon answer, as Firecracker 1.16.1 gives it (its binary, run by hand:
/// the same status and message; cinder adds which request after BEFORE_BOOT's message, and
/// the values after "too large").
#[test]
fn balloon_api_before_boot_answers_as_firecracker() {
    let d = Scratch::new("balloon-api-pre");
    let sock = d.join("api.sock");
    let _s = start_api(&sock, &[]);
    answers(
        &sock,
        "GET",
        "/balloon",
        None,
        400,
        "Balloon config error: No balloon device found.",
    );
    for (method, route, body) in [
        ("GET", "/balloon/statistics", None),
        ("PATCH", "/balloon", Some(r#"{"amount_mib": 10}"#)),
        (
            "PATCH",
            "/balloon/statistics",
            Some(r#"{"stats_polling_interval_s": 1}"#),
        ),
    ] {
        answers(
            &sock,
            method,
            route,
            body,
            400,
            "The requested operation is not supported before starting the microVM",
        );
    }
    answers(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#),
        204,
        "",
    );
    answers(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 129, "deflate_on_oom": false}"#),
        400,
        "Balloon config error: Amount of pages requested is too large.",
    );
    answers(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 10}"#),
        400,
        // cinder's wording for every bad body (Firecracker: "An error occurred when
        // deserializing the json body of a request: missing field ..."), same status.
        "invalid body of PUT /balloon: missing field `deflate_on_oom`",
    );
    answers(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 10, "deflate_on_oom": false, "bogus": 1}"#),
        400,
        "invalid body of PUT /balloon: bogus: unknown field `bogus`",
    );
    // Free page hinting is refused, naming it (Firecracker 1.14+ has it; cinder does not).
    answers(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 10, "deflate_on_oom": false, "free_page_hinting": true}"#),
        400,
        "balloon.free_page_hinting: free page hinting is not implemented by cinder yet",
    );
    answers(
        &sock,
        "PUT",
        "/balloon",
        Some(
            r#"{"amount_mib": 128, "deflate_on_oom": true, "stats_polling_interval_s": 1, "free_page_reporting": true}"#,
        ),
        204,
        "",
    );
    let r = request(&sock, "GET", "/balloon", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        serde_json::json!({"amount_mib": 128, "deflate_on_oom": true,
            "stats_polling_interval_s": 1, "free_page_hinting": false,
            "free_page_reporting": true})
    );
    answers(
        &sock,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        400,
        "Machine config error: The memory size (MiB) is smaller than the previously set balloon device target size.",
    );
    let cfg = request(&sock, "GET", "/vm/config", None).json();
    assert_eq!(cfg["balloon"]["amount_mib"], 128, "{cfg}");
    answers(
        &sock,
        "PATCH",
        "/balloon/hinting/start",
        Some("{}"),
        400,
        "",
    );
}

/// The config file's `balloon` key and `--balloon` take the same rules as `PUT /balloon`.
#[test]
fn balloon_config_file_and_flag_refuse_what_the_api_refuses() {
    let d = Scratch::new("balloon-cfg");
    let kernel = probe::elf_path();
    let f = d.join("vm.json");
    std::fs::write(
        &f,
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}},
                "balloon": {{"amount_mib": 65, "deflate_on_oom": false}}}}"#,
            kernel.display()
        ),
    )
    .unwrap();
    let out = cinder().arg("--config-file").arg(&f).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("Balloon config error: Amount of pages requested is too large."),
        "{err}"
    );
    let out = cinder()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "64", "--balloon", "amount_mib=65"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("--balloon: Balloon config error: Amount of pages requested is too large."),
        "{err}"
    );
    let out = cinder()
        .arg("--kernel")
        .arg(&kernel)
        .args(["--balloon", "amount_mib=1,free_page_hints"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("unknown or empty part \"free_page_hints\""),
        "{err}"
    );
}

/// After boot: PUT is refused, PATCH before the driver started the device says so, a target
/// above memory is refused, statistics cannot be queried when disabled nor turned on.
#[test]
fn balloon_api_after_boot_answers_as_firecracker_under_cinder() {
    require_kvm();
    let d = Scratch::new("balloon-api-post");
    let sock = d.join("api.sock");
    let mut s = start_api(&sock, &[]);
    let body = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.run=tick probe.ticks=1000000 probe.tick_ms=20"}}"#,
        probe::elf_path().display()
    );
    answers(&sock, "PUT", "/boot-source", Some(&body), 204, "");
    answers(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 0, "deflate_on_oom": false}"#),
        204,
        "",
    );
    let r = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}\n{}", s.log());
    s.expect("PROBE tick", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    answers(
        &sock,
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 10, "deflate_on_oom": false}"#),
        400,
        "The requested operation is not supported after starting the microVM",
    );
    answers(
        &sock,
        "GET",
        "/balloon/statistics",
        None,
        400,
        "Internal VMM error: Balloon: Received stats query when stats are disabled.",
    );
    // The probe's tick check never starts the balloon: Firecracker's answer.
    answers(
        &sock,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 10}"#),
        400,
        "Balloon update error: Balloon: Device not activated yet.",
    );
    answers(
        &sock,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 129}"#),
        400,
        "Balloon update error: Balloon: Amount of pages requested is too large.",
    );
    answers(
        &sock,
        "PATCH",
        "/balloon",
        Some("{}"),
        400,
        "invalid body of PATCH /balloon: missing field `amount_mib`",
    );
    answers(
        &sock,
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 1}"#),
        400,
        "Balloon update error: Balloon: Statistics cannot be enabled/disabled after activation.",
    );
    let r = request(&sock, "GET", "/balloon", None);
    assert_eq!(
        r.json()["amount_mib"],
        0,
        "a refused PATCH changed nothing: {r:?}"
    );
    // The VM still runs.
    assert_eq!(request(&sock, "GET", "/", None).json()["state"], "Running");
    s.signal(libc::SIGTERM);
    let _ = s.wait_exit(Duration::from_secs(10));
}

/// The probe as a hostile balloon driver: every bad page frame number and descriptor is
/// ignored and counted, the one good page is discarded (reads back as zeros) and comes back
/// on deflate, and the run goes on to its next check.
#[test]
fn balloon_hostile_pfns_are_ignored_and_counted_under_cinder() {
    require_kvm();
    let d = Scratch::new("balloon-hostile");
    let metrics = d.join("metrics.json");
    std::fs::write(&metrics, "").unwrap();
    let out = cinder()
        .arg("--kernel")
        .arg(probe::elf_path())
        .args(["--cmdline", "probe.run=balloon,boot"])
        .args(["--memory", "128", "--balloon", "amount_mib=4"])
        .arg("--metrics-path")
        .arg(&metrics)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = probe::parse(&stdout);
    let c = log
        .check("balloon")
        .unwrap_or_else(|| panic!("no balloon line\n{stdout}\n{stderr}"));
    assert_eq!(c.status, Status::Ok, "{}\n{stderr}", c.details);
    assert_eq!(c.num("target"), Some(1024), "{}", c.details);
    assert_eq!(c.field("zeroed"), Some("1"), "{}", c.details);
    // The VM kept running: the next check ran and the probe finished.
    assert_eq!(
        log.check("boot").map(|c| c.status),
        Some(Status::Ok),
        "{stdout}"
    );
    assert!(stdout.contains("PROBE DONE 2/2"), "{stdout}\n{stderr}");
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("metrics line {last:?}: {e}"));
    let b = &v["balloon"];
    let n = |k: &str| {
        b[k].as_u64()
            .unwrap_or_else(|| panic!("no balloon.{k} in {v}"))
    };
    assert_eq!(n("inflated_pages"), 1, "{b}");
    assert_eq!(n("deflated_pages"), 1, "{b}");
    assert_eq!(
        n("invalid_pfns"),
        3,
        "beyond RAM, MMIO gap, 0xffffffff: {b}"
    );
    assert_eq!(
        n("duplicate_pfns"),
        2,
        "one on inflate, one on deflate: {b}"
    );
    assert_eq!(n("oversized_descriptors"), 1, "{b}");
    assert_eq!(n("bad_descriptors"), 1, "outside memory: {b}");
    assert_eq!(n("madvise_failures"), 0, "{b}");
}

/// Whether `[start, end)` of `f` holds no data (SEEK_DATA finds none before `end`).
fn is_hole(f: &std::fs::File, start: u64, end: u64) -> bool {
    use std::os::fd::AsRawFd;
    let o = libc::off_t::try_from(start).expect("offset fits off_t");
    // SAFETY: lseek on an open fd; no memory is passed.
    let data = unsafe { libc::lseek(f.as_raw_fd(), o, libc::SEEK_DATA) };
    data < 0 || data.cast_unsigned() >= end
}

/// A field `key=value` of a probe output line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Issue 17 item 2 for the balloon: the probe's `balloonsnap` driver inflates 1024 pages and
/// keeps a statistics buffer posted; the VM is snapshotted and restored in a new process.
/// After the restore `GET /balloon` and `/balloon/statistics` answer as before, the inflated
/// pages are holes in the memory file, the statistics keep coming (the held buffer came
/// along), a PATCH of the target reaches the guest, and a deflate of the pages inflated before
/// the snapshot is counted as a deflate, not as duplicates (the inflated set came along).
#[test]
fn balloon_state_survives_a_snapshot_and_restore_under_cinder() {
    require_kvm();
    const T: Duration = Duration::from_secs(60);
    const PAGES: u64 = 1024;
    let d = Scratch::new("balloon-snap");
    let sock = d.join("boot.sock");
    // One metrics file for both processes: the restored one takes its configuration (metrics
    // included) from the snapshot.
    let metrics = d.join("metrics.json");
    let mut s = start_api(
        &sock,
        &[
            "--metrics-path",
            metrics.to_str().expect("utf-8 path"),
            "--kernel",
            probe::elf_path().to_str().expect("utf-8 path"),
            "--memory",
            "128",
            "--balloon",
            "amount_mib=4,stats_polling_interval_s=1",
            "--cmdline",
            &format!("probe.run=balloonsnap probe.balloon_pages={PAGES}"),
        ],
    );
    let (text, _) = s
        .expect_line("balloonsnap: ready", T)
        .unwrap_or_else(|e| panic!("{e}"));
    let ready = text
        .lines()
        .find(|l| l.contains("balloonsnap: ready"))
        .unwrap_or_default()
        .to_string();
    let hex = |k: &str| {
        field(&ready, k)
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| panic!("{k} in {ready:?}"))
    };
    let (first, last) = (hex("first"), hex("last"));
    assert_eq!(field(&ready, "contiguous"), Some("1"), "{ready}");
    assert_eq!(field(&ready, "target"), Some("1024"), "{ready}");
    s.expect_line("balloonsnap: stats 2", T)
        .unwrap_or_else(|e| panic!("statistics do not flow before the snapshot: {e}"));
    let before_cfg = request(&sock, "GET", "/balloon", None);
    assert_eq!(before_cfg.status, 200, "{before_cfg:?}");

    // Pause, snapshot, kill.
    answers(
        &sock,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        204,
        "",
    );
    let before_stats = request(&sock, "GET", "/balloon/statistics", None);
    assert_eq!(before_stats.status, 200, "{before_stats:?}");
    let bs = before_stats.json();
    assert_eq!(bs["target_pages"].as_u64(), Some(PAGES), "{bs}");
    assert_eq!(bs["actual_pages"].as_u64(), Some(PAGES), "{bs}");
    let free_before = bs["free_memory"].as_u64().unwrap_or_else(|| panic!("{bs}"));
    let (state, mem) = (d.join("state"), d.join("mem"));
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "Full"}}"#,
        state.display(),
        mem.display()
    );
    answers(&sock, "PUT", "/snapshot/create", Some(&body), 204, "");
    s.signal(libc::SIGKILL);
    let _ = s.wait_exit(Duration::from_secs(10));
    let last_stats = s
        .console()
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("balloonsnap: stats ")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap_or(0);

    // The inflated pages are not in the memory file (nor, so, resident once restored).
    let f = std::fs::File::open(&mem).unwrap();
    assert!(
        is_hole(&f, first, last + 4096),
        "inflated pages {first:#x}..={last:#x} hold data in the memory file"
    );
    // The state file holds the balloon's own state.
    let bytes = std::fs::read(&state).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&bytes[24..bytes.len() - 8]).expect("state payload is JSON");
    let b = &v["devices"]["balloon"];
    assert_eq!(
        b["inflated"],
        serde_json::json!([[first >> 12, PAGES]]),
        "{b}"
    );

    // Restore in a new process, with metrics.
    let sock2 = d.join("restored.sock");
    std::fs::write(&metrics, "").unwrap();
    let mut r = start_api(&sock2, &[]);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": false}}"#,
        state.display(),
        mem.display()
    );
    let l = request(&sock2, "PUT", "/snapshot/load", Some(&body));
    assert_eq!(l.status, 204, "{l:?}\n{}", r.log());
    // Before it runs: the same answers as before the snapshot.
    let after_cfg = request(&sock2, "GET", "/balloon", None);
    assert_eq!(after_cfg.json(), before_cfg.json(), "GET /balloon");
    let after_stats = request(&sock2, "GET", "/balloon/statistics", None);
    assert_eq!(after_stats.json(), bs, "GET /balloon/statistics");
    answers(
        &sock2,
        "PATCH",
        "/vm",
        Some(r#"{"state": "Resumed"}"#),
        204,
        "",
    );

    // The statistics keep coming: the guest gets its buffer back and posts the next.
    r.expect_line(&format!("balloonsnap: stats {}", last_stats + 2), T)
        .unwrap_or_else(|e| {
            panic!("statistics stopped after the restore (last {last_stats}): {e}")
        });
    let fresh = poll(Duration::from_secs(30), || {
        let v = request(&sock2, "GET", "/balloon/statistics", None).json();
        (v["free_memory"].as_u64().is_some_and(|f| f > free_before)).then_some(v)
    });
    assert!(
        fresh.is_some(),
        "GET /balloon/statistics never changed after the restore"
    );

    // A new target reaches the guest.
    answers(
        &sock2,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 8}"#),
        204,
        "",
    );
    r.expect_line("balloonsnap: target=2048", T)
        .unwrap_or_else(|e| panic!("the new target did not reach the guest: {e}"));

    // Deflate what was inflated before the snapshot.
    r.send("d").unwrap_or_else(|e| panic!("{e}"));
    let (text, _) = r
        .expect_line("balloonsnap: deflated", T)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(text.contains("reused=1"), "{text}");
    let m = flushed_metrics(&sock2, &metrics);
    let b = &m["balloon"];
    assert_eq!(
        b["inflated_pages"].as_u64(),
        Some(PAGES),
        "counters came along: {b}"
    );
    assert_eq!(b["deflated_pages"].as_u64(), Some(PAGES), "{b}");
    assert_eq!(
        b["duplicate_pfns"].as_u64(),
        Some(0),
        "the inflated set came along: {b}"
    );
    r.send("g").unwrap_or_else(|e| panic!("{e}"));
    r.expect_line("PROBE DONE", T)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = r.console();
    let log = probe::parse(&out);
    let c = log
        .check("balloonsnap")
        .unwrap_or_else(|| panic!("no balloonsnap line\n{}", r.log()));
    assert_eq!(c.status, Status::Ok, "{}\n{}", c.details, r.log());
    let _ = r.wait_exit(Duration::from_secs(20));
}

// ---------------------------------------------------------------------------------------------
// The Linux test profile's own virtio_balloon driver, one boot.

/// cinder's resident set, bytes (VmRSS).
fn rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

const MIB: u64 = 1 << 20;
/// The Linux guest's memory: small, so that what the guest touches is most of its free memory
/// (the balloon takes free pages; only those the guest touched are resident on the host).
/// With 256 MiB and 96 MiB touched, inflating 48 MiB lowered RSS by 43.8 MiB: 0.91 X.
const MEM_MIB: u64 = 160;
/// MiB the guest writes (into its root file system) and frees, before the inflate and for
/// free page reporting. On kvm-pvm every page the guest touches costs emulated kernel work:
/// about 1 s of host CPU per MiB (measured: 18 MiB in 17 s of cinder's CPU), so this is well
/// below the 256 MiB of the issue's wording.
const TOUCH_MIB: u64 = 112;
/// MiB the balloon inflates by.
const INFLATE_MIB: u64 = 48;

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// Polls `f` every 250 ms until it returns Some, at most `limit`.
fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs `cmd` in the guest's shell and returns what it printed between two markers.
fn sh(s: &mut Session, tag: &str, cmd: &str) -> String {
    s.send(&format!("echo {tag}\"\"-B; {cmd}; echo {tag}\"\"-E\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    s.expect_line(&format!("{tag}-B"), STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    let (out, _) = s
        .expect(&format!("{tag}-E"), 2 * STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    out.trim_end_matches(&format!("{tag}-E")).to_string()
}

/// A /proc/meminfo field of the guest, kB.
fn meminfo(s: &mut Session, tag: &str, field: &str) -> u64 {
    let out = sh(s, tag, &format!("grep '^{field}:' /proc/meminfo"));
    out.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} from {out:?}\n{}", s.log()))
}

use cinder_tests::linux::STEP;

/// Flushes the metrics (`FlushMetrics`) and returns the last line.
fn flushed_metrics(sock: &Path, path: &Path) -> serde_json::Value {
    let r = request(
        sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("metrics line {last:?}: {e}"))
}

/// Inflate, deflate, statistics and free page reporting through Linux's virtio_balloon.
#[test]
fn linux_balloon_inflate_deflate_stats_and_reporting_under_cinder() {
    require_kvm();
    let g = cinder_tests::guest::GuestDir::test_profile();
    let d = Scratch::new("balloon-linux");
    let sock = d.join("api.sock");
    let metrics = d.join("metrics.json");
    std::fs::write(&metrics, "").unwrap();
    let mut c =
        cinder_tests::linux::cinder_vm(&g, &cinder_tests::linux::profile_cmdline(&g), 1, MEM_MIB);
    c.arg("--initrd")
        .arg(g.file("initramfs.cpio"))
        .args([
            "--balloon",
            "amount_mib=0,deflate_on_oom,stats_polling_interval_s=1,free_page_reporting",
        ])
        .arg("--api-sock")
        .arg(&sock)
        .arg("--metrics-path")
        .arg(&metrics);
    let mut s = Session::start(c);
    let t0 = Instant::now();
    // A loaded 2-core kvm-pvm host took 150 s to a 256 MiB guest's shell.
    s.expect("CINDER-INIT shell", 2 * STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("shell at {:.1?}", t0.elapsed());
    let pid = s.pid();
    // Free page reporting off while inflate is measured (it would discard the free pages the
    // balloon is to take): no free block is of order 11 or more.
    let order = "/sys/module/page_reporting/parameters/page_reporting_order";
    let out = sh(&mut s, "ORD", &format!("echo 11 > {order}; cat {order}"));
    assert!(
        out.contains("11"),
        "page_reporting_order: {out:?}\n{}",
        s.log()
    );

    // Statistics: the guest's own MemTotal shows in GET /balloon/statistics.
    let memtotal = meminfo(&mut s, "MT", "MemTotal") * 1024;
    let stats = poll(Duration::from_secs(60), || {
        let r = request(&sock, "GET", "/balloon/statistics", None);
        (r.status == 200 && r.json()["total_memory"].as_u64() == Some(memtotal)).then(|| r.json())
    })
    .unwrap_or_else(|| {
        panic!(
            "statistics never showed total_memory {memtotal}: {:?}",
            request(&sock, "GET", "/balloon/statistics", None)
        )
    });
    eprintln!("statistics: {stats}");
    assert!(
        stats["free_memory"].as_u64().is_some_and(|f| f > 0),
        "{stats}"
    );
    assert!(stats["available_memory"].as_u64().is_some(), "{stats}");

    // The guest touches memory and frees it: the free pages are resident on the host.
    let touch = TOUCH_MIB;
    let t = Instant::now();
    sh(
        &mut s,
        "TOUCH",
        &format!("dd if=/dev/zero of=/fill bs=1M count={touch} 2>/dev/null; rm /fill"),
    );
    eprintln!("touched {touch} MiB in {:.1?}", t.elapsed());
    let before = rss(pid);

    // Inflate by X: RSS drops by at least 0.9 X.
    let x = INFLATE_MIB;
    let t = Instant::now();
    answers(
        &sock,
        "PATCH",
        "/balloon",
        Some(&format!(r#"{{"amount_mib": {x}}}"#)),
        204,
        "",
    );
    let reached = poll(Duration::from_secs(240), || {
        let v = request(&sock, "GET", "/balloon/statistics", None).json();
        (v["actual_mib"].as_u64() == Some(x)).then_some(())
    });
    assert!(
        reached.is_some(),
        "balloon never reached {x} MiB: {:?}\n{}",
        request(&sock, "GET", "/balloon/statistics", None),
        s.log()
    );
    let inflated = rss(pid);
    eprintln!(
        "inflate {x} MiB in {:.1?}: RSS {:.1} -> {:.1} MiB",
        t.elapsed(),
        mib(before),
        mib(inflated)
    );
    assert!(
        before.saturating_sub(inflated) >= x * MIB * 9 / 10,
        "inflating {x} MiB lowered RSS by only {:.1} MiB ({:.1} -> {:.1})",
        mib(before.saturating_sub(inflated)),
        mib(before),
        mib(inflated)
    );
    let free_inflated = meminfo(&mut s, "MF1", "MemFree");

    // Deflate: the guest gets the memory back and can use it again.
    answers(
        &sock,
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 0}"#),
        204,
        "",
    );
    let reached = poll(Duration::from_secs(240), || {
        let v = request(&sock, "GET", "/balloon/statistics", None).json();
        (v["actual_mib"].as_u64() == Some(0)).then_some(())
    });
    assert!(reached.is_some(), "balloon never deflated\n{}", s.log());
    let free_deflated = meminfo(&mut s, "MF2", "MemFree");
    assert!(
        free_deflated >= free_inflated + x * 1024 * 9 / 10,
        "MemFree {free_inflated} kB inflated, {free_deflated} kB deflated"
    );
    eprintln!("MemFree {free_inflated} kB inflated, {free_deflated} kB deflated");
    let out = sh(
        &mut s,
        "REUSE",
        &format!(
            "dd if=/dev/zero of=/fill bs=1M count={x} 2>/dev/null && echo RE\"\"USED-OK; rm /fill"
        ),
    );
    assert!(out.contains("REUSED-OK"), "{out:?}\n{}", s.log());

    // Free page reporting: back on; a small free starts a report of what is free now (the
    // pages touched above: Linux reports about a sixteenth of each free list per pass, a pass
    // every 2 s), then an allocation and free of TOUCH_MIB returns within 10% of that RSS.
    let before_fpr = rss(pid);
    sh(
        &mut s,
        "ORD9",
        &format!("echo 9 > {order}; dd if=/dev/zero of=/fill bs=1M count=8 2>/dev/null; rm /fill"),
    );
    let settled = |limit: Duration| {
        // Settled: no change of more than 1 MiB over 15 s.
        let mut last = rss(pid);
        poll(limit, || {
            std::thread::sleep(Duration::from_secs(15));
            let now = rss(pid);
            let done = now.abs_diff(last) < MIB;
            last = now;
            done.then_some(now)
        })
    };
    let base = settled(Duration::from_secs(300)).unwrap_or_else(|| rss(pid));
    let m = flushed_metrics(&sock, &metrics);
    eprintln!(
        "free page reporting on: RSS {:.1} -> {:.1} MiB; balloon metrics {}",
        mib(before_fpr),
        mib(base),
        m["balloon"]
    );
    let reported_before = m["balloon"]["reported_bytes"].as_u64().unwrap_or(0);
    let free_before = meminfo(&mut s, "FREE0", "MemFree");
    let t = Instant::now();
    sh(
        &mut s,
        "FPR",
        &format!("dd if=/dev/zero of=/fill bs=1M count={TOUCH_MIB} 2>/dev/null"),
    );
    let peak = rss(pid);
    // What the guest allocated, in its own view (the root file system is capped at half of
    // RAM, so dd may stop short of TOUCH_MIB; and a guest page that is free but still resident
    // from earlier work, never reported because it did not coalesce to order 9, is reused
    // without growing RSS: the host's RSS peak is printed, not asserted).
    let allocated = free_before.saturating_sub(meminfo(&mut s, "FREE1", "MemFree")) * 1024;
    sh(&mut s, "FPRRM", "rm /fill");
    let t_freed = t.elapsed();
    let back = poll(Duration::from_secs(300), || {
        let now = rss(pid);
        (now <= base + base / 10).then_some(now)
    });
    // Reports arrive in passes every 2 s: give the last ones a bounded time.
    let reported_since = |m: &serde_json::Value| {
        m["balloon"]["reported_bytes"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(reported_before)
    };
    let mut m = flushed_metrics(&sock, &metrics);
    for _ in 0..30 {
        if reported_since(&m) >= allocated / 2 {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
        m = flushed_metrics(&sock, &metrics);
    }
    let reported = reported_since(&m);
    eprintln!(
        "free page reporting: RSS {:.1} MiB, the guest allocated {:.1} MiB (RSS {:.1} MiB; freed \
         at {:.1?}), back to {:?} MiB {:.1?} later, {:.1} MiB reported since; balloon metrics {}",
        mib(base),
        mib(allocated),
        mib(peak),
        t_freed,
        back.map(mib),
        t.elapsed() - t_freed,
        mib(reported),
        m["balloon"]
    );
    assert!(
        allocated >= TOUCH_MIB * MIB / 4,
        "the guest allocated only {:.1} MiB of {TOUCH_MIB}",
        mib(allocated)
    );
    // What the guest freed came back through free page reporting (not only through RSS
    // arithmetic that a reused resident page could satisfy).
    assert!(
        reported >= allocated / 2,
        "{:.1} MiB allocated and freed, {:.1} MiB reported since",
        mib(allocated),
        mib(reported)
    );
    assert!(
        back.is_some(),
        "RSS stayed at {:.1} MiB, above {:.1} MiB + 10%",
        mib(rss(pid)),
        mib(base)
    );
    assert!(
        m["balloon"]["reported_bytes"].as_u64().unwrap_or(0) > 0,
        "{}",
        m["balloon"]
    );
    let v = request(&sock, "GET", "/balloon/statistics", None);
    eprintln!("final statistics: {}", v.body);
    s.send("reboot -f\n").unwrap_or_else(|e| panic!("{e}"));
    let _ = s.wait_exit(Duration::from_secs(60));
}
