//! Issue 16 item 1: rate limiters that limit, and no setting accepted and ignored. The block,
//! network (RX and TX) and entropy devices enforce their `rate_limiter`s: the `*_under_cinder`
//! tests below measure what the probe guest gets through. Until cinder implements
//! `cache_type: "Unsafe"` or `huge_pages: "2M"`, each is refused with 400
//! naming its field by the API, and with the same one-line message (exit 1) by the config file
//! (the command line has no flag for them). One test per field. A limiter that limits nothing
//! (`{}`, a bucket of size 0 or refill time 0) and the values cinder implements are taken.
//!
//! No KVM needed: an accepted configuration is shown by cinder getting as far as opening a KVM
//! device that does not exist (as in `config_parity.rs`).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder, require_kvm, start_api};
use cinder_tests::http::request;
use cinder_tests::netns::NetNs;
use cinder_tests::probe::{self, Status};
use cinder_tests::runner::run;
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir as Scratch;

const NO_KVM: &str = "/nonexistent/kvm";
const BUCKET: &str = r#"{"size": 1000, "refill_time": 100}"#;

/// One setting given through the config file and the API.
struct Case {
    /// Config-file members besides `boot-source`.
    file: String,
    /// API requests (method, path, body) in order; the last one is judged.
    api: Vec<(&'static str, String, String)>,
}

/// One measuring guest at a time: the tests assert rates (at most 1.2x a limit, an unlimited
/// run faster than 2x one), and several flooding probes at once on a 2-core host starve each
/// other (a host request once went unanswered for 20 s in CI with all of them in parallel).
static MEASURING: Mutex<()> = Mutex::new(());

fn measuring() -> MutexGuard<'static, ()> {
    MEASURING.lock().unwrap_or_else(|e| e.into_inner())
}

fn kernel() -> String {
    probe::elf_path().display().to_string()
}

fn run_file(d: &Scratch, c: &Case) -> std::process::Output {
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}"}}, {}}}"#,
        kernel(),
        c.file
    );
    let f = d.join("vm.json");
    std::fs::write(&f, json).expect("write config file");
    cinder()
        .arg("--config-file")
        .arg(&f)
        .args(["--kvm-device", NO_KVM])
        .output()
        .expect("run cinder")
}

fn run_api(d: &Scratch, c: &Case) -> (u16, String) {
    let sock = d.join("api.sock");
    let _s = start_api(&sock, &["--kvm-device", NO_KVM]);
    let mut last = None;
    for (method, path, body) in &c.api {
        last = Some(request(&sock, method, path, Some(body)));
    }
    let r = last.expect("at least one request");
    let fault = if r.status == 204 {
        String::new()
    } else {
        r.json()["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (r.status, fault)
}

/// The API answers 400 with `msg` in its fault message, the config file exits 1 with `msg` on
/// one line, before cinder goes on to open KVM.
fn refused(c: &Case, msg: &str) {
    let d = Scratch::new("rl-refused");
    let (status, fault) = run_api(&d, c);
    assert_eq!(status, 400, "API took {:?}", c.api);
    assert!(fault.contains(msg), "API fault {fault:?} lacks {msg:?}");
    let out = run_file(&d, c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "config file: {err}");
    assert_eq!(
        err.trim().lines().count(),
        1,
        "config file, one line: {err}"
    );
    assert!(err.contains(msg), "config file: {err:?} lacks {msg:?}");
    assert!(
        !err.contains(NO_KVM),
        "config file got past the check: {err}"
    );
}

/// The API answers 204 and the config file gets as far as the (missing) KVM device.
fn accepted(c: &Case) {
    accepted_until(c, NO_KVM)
}

/// As [`accepted`], where the config file stops at `later`, a host error that comes after the
/// configuration (a missing TAP).
fn accepted_until(c: &Case, later: &str) {
    let d = Scratch::new("rl-accepted");
    let (status, fault) = run_api(&d, c);
    assert_eq!(status, 204, "API refused {:?}: {fault}", c.api);
    let out = run_file(&d, c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(later), "config file refused it: {err}");
}

fn drive(d: &Scratch, extra: &str) -> Case {
    let img = d.join("disk.img");
    std::fs::write(&img, vec![0u8; 4096]).expect("image");
    let body = format!(
        r#"{{"drive_id": "d1", "path_on_host": "{}", "is_root_device": false, {extra}}}"#,
        img.display()
    );
    Case {
        file: format!(r#""drives": [{body}]"#),
        api: vec![("PUT", "/drives/d1".into(), body)],
    }
}

fn iface(extra: &str) -> Case {
    // The TAP is never opened: the API stores it before boot, the file stops at KVM first.
    let body = format!(r#"{{"iface_id": "n1", "host_dev_name": "rltap0", {extra}}}"#);
    Case {
        file: format!(r#""network-interfaces": [{body}]"#),
        api: vec![("PUT", "/network-interfaces/n1".into(), body)],
    }
}

fn entropy(body: &str) -> Case {
    Case {
        file: format!(r#""entropy": {body}"#),
        api: vec![("PUT", "/entropy".into(), body.into())],
    }
}

/// The block device enforces its limiter (the `blk_*_under_cinder` tests below); a refill
/// time beyond the limiter's arithmetic is refused naming the field.
#[test]
fn drive_rate_limiter_out_of_range_is_refused_naming_it() {
    let d = Scratch::new("rl-drive");
    refused(
        &drive(
            &d,
            r#""rate_limiter": {"bandwidth": {"size": 1, "refill_time": 18446744073710}}"#,
        ),
        "drives[d1].rate_limiter: refill_time must be at most 18446744073709 ms",
    );
    accepted(&drive(
        &d,
        &format!(r#""rate_limiter": {{"bandwidth": {BUCKET}, "ops": {BUCKET}}}"#),
    ));
}

/// Issue 16 item 2: cinder implements `io_engine: "Async"` (io_uring, tests/tests/blk.rs),
/// and its own `"Auto"`; both are taken, by the API and the config file alike.
#[test]
fn drive_io_engine_async_is_accepted() {
    let d = Scratch::new("rl-engine");
    accepted(&drive(&d, r#""io_engine": "Async""#));
    accepted(&drive(&d, r#""io_engine": "Auto""#));
    accepted(&drive(&d, r#""io_engine": "Sync""#));
}

#[test]
fn drive_cache_type_unsafe_is_refused_naming_it() {
    let d = Scratch::new("rl-cache");
    refused(
        &drive(&d, r#""cache_type": "Unsafe""#),
        r#"drives[d1].cache_type: "Unsafe" (FLUSH as a no-op) is not implemented by cinder yet"#,
    );
}

/// The network device enforces both limiters (the `net_*_under_cinder` tests below); a refill
/// time beyond the limiter's arithmetic is refused naming the field, each direction apart.
#[test]
fn net_rate_limiters_out_of_range_are_refused_naming_them() {
    const HUGE: &str = r#"{"ops": {"size": 1, "refill_time": 18446744073710}}"#;
    refused(
        &iface(&format!(r#""rx_rate_limiter": {HUGE}"#)),
        "network-interfaces[n1].rx_rate_limiter: refill_time must be at most 18446744073709 ms",
    );
    refused(
        &iface(&format!(r#""tx_rate_limiter": {HUGE}"#)),
        "network-interfaces[n1].tx_rate_limiter: refill_time must be at most 18446744073709 ms",
    );
    accepted_until(
        &iface(&format!(
            r#""rx_rate_limiter": {{"ops": {BUCKET}}}, "tx_rate_limiter": {{"bandwidth": {BUCKET}}}"#
        )),
        "tap rltap0 does not exist",
    );
}

/// The entropy device enforces its limiter (the `rng_*_under_cinder` tests below); a refill
/// time beyond the limiter's arithmetic is refused naming the field.
#[test]
fn entropy_rate_limiter_out_of_range_is_refused_naming_it() {
    refused(
        &entropy(r#"{"rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073710}}}"#),
        "entropy.rate_limiter: refill_time must be at most 18446744073709 ms",
    );
    accepted(&entropy(&format!(
        r#"{{"rate_limiter": {{"bandwidth": {BUCKET}}}}}"#
    )));
}

#[test]
fn huge_pages_2m_is_refused_naming_it() {
    let msg = r#"machine-config.huge_pages: "2M" (hugetlbfs-backed guest memory) is not implemented by cinder yet"#;
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}"#;
    refused(
        &Case {
            file: format!(r#""machine-config": {body}"#),
            api: vec![("PUT", "/machine-config".into(), body.into())],
        },
        msg,
    );
    // PATCH /machine-config takes the same rule.
    let d = Scratch::new("rl-huge-patch");
    let (status, fault) = run_api(
        &d,
        &Case {
            file: String::new(),
            api: vec![(
                "PATCH",
                "/machine-config".into(),
                r#"{"huge_pages": "2M"}"#.into(),
            )],
        },
    );
    assert_eq!(status, 400, "PATCH took huge_pages 2M");
    assert!(fault.contains(msg), "PATCH fault {fault:?} lacks {msg:?}");
}

/// What cinder implements, and limiters that limit nothing, are still taken: the refusals
/// above are of the setting, not of the keys.
#[test]
fn implemented_and_neutral_settings_are_accepted() {
    let d = Scratch::new("rl-ok");
    accepted(&drive(
        &d,
        r#""cache_type": "Writeback", "io_engine": "Sync", "rate_limiter": {}"#,
    ));
    accepted(&drive(
        &d,
        r#""rate_limiter": {"bandwidth": {"size": 0, "refill_time": 100}, "ops": {"size": 5, "refill_time": 0}}"#,
    ));
    accepted_until(
        &iface(r#""rx_rate_limiter": {}, "tx_rate_limiter": {}"#),
        "tap rltap0 does not exist",
    );
    accepted(&entropy(r#"{"rate_limiter": {}}"#));
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "None"}"#;
    accepted(&Case {
        file: format!(r#""machine-config": {body}"#),
        api: vec![("PUT", "/machine-config".into(), body.into())],
    });
}

// ---------------------------------------------------------------------------------------------
// Enforcement, measured by the probe guest (`probe.run=rngbench`, timed with its TSC).

/// Boots the probe with a virtio-rng whose `rate_limiter` is `limiter` (JSON) and runs
/// `rngbench` with `args`; returns its `PROBE rngbench` line, which must be `ok` (no request
/// lost, foreign or completed twice).
fn rngbench_under_cinder(limiter: &str, args: &str) -> probe::Check {
    require_kvm();
    let _one = measuring();
    let d = Scratch::new("rl-rngbench");
    let metrics = d.join("metrics.json");
    std::fs::write(&metrics, "").expect("create metrics file");
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "probe.run=rngbench {args}"}},
            "entropy": {{"rate_limiter": {limiter}}},
            "metrics": {{"metrics_path": "{}"}}}}"#,
        kernel(),
        metrics.display()
    );
    let f = d.join("vm.json");
    std::fs::write(&f, json).expect("write config file");
    let mut c = cinder();
    c.arg("--config-file").arg(&f);
    let r = run(c, Duration::from_secs(120), |_| false);
    let log = probe::parse(&r.stdout);
    assert!(!r.timed_out, "timed out\n{}", r.log());
    let check = log
        .check("rngbench")
        .unwrap_or_else(|| panic!("no rngbench line\n{}", r.log()))
        .clone();
    assert_eq!(check.status, Status::Ok, "{}\n{}", check.details, r.log());
    eprintln!("rngbench {limiter}: {}", check.details);
    // The metrics count the limiter's stops: some under a limit, none without one.
    let text = std::fs::read_to_string(&metrics).expect("read metrics");
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("metrics line {last:?}: {e}"));
    let throttled = v["entropy"]["rate_limiter_throttled"]
        .as_u64()
        .unwrap_or_else(|| panic!("no entropy.rate_limiter_throttled in {v}"));
    if limiter == "{}" {
        assert_eq!(throttled, 0, "{v}");
    } else {
        assert!(throttled > 0, "{v}");
    }
    check
}

fn num(c: &probe::Check, key: &str) -> u64 {
    c.num(key)
        .unwrap_or_else(|| panic!("no {key} in {}", c.details))
}

/// Per second, over the probe's TSC-timed run.
fn per_second(c: &probe::Check, key: &str) -> f64 {
    num(c, key) as f64 * 1e6 / num(c, "us").max(1) as f64
}

/// A bandwidth limit of B bytes/s holds the guest to at most 1.2 B over 3 s (and it is not
/// stalled: at least B/2). The bucket is a tenth of a second's worth, so its initial fill adds
/// 3 %.
#[test]
fn rng_bandwidth_limit_holds_under_cinder() {
    const B: u64 = 256 * 1024;
    let c = rngbench_under_cinder(
        &format!(
            r#"{{"bandwidth": {{"size": {}, "refill_time": 100}}}}"#,
            B / 10
        ),
        "probe.bench_ms=3000 probe.rng_req=4096",
    );
    let rate = per_second(&c, "bytes");
    assert!(
        rate <= 1.2 * B as f64,
        "{rate:.0} B/s over a limit of {B} B/s: {}",
        c.details
    );
    assert!(
        rate >= 0.5 * B as f64,
        "{rate:.0} B/s: stalled? {}",
        c.details
    );
}

/// An ops limit of K requests/s holds the guest to at most 1.2 K over 3 s.
#[test]
fn rng_ops_limit_holds_under_cinder() {
    const K: u64 = 100;
    let c = rngbench_under_cinder(
        &format!(r#"{{"ops": {{"size": {}, "refill_time": 100}}}}"#, K / 10),
        "probe.bench_ms=3000 probe.rng_req=16",
    );
    let rate = per_second(&c, "ops");
    assert!(
        rate <= 1.2 * K as f64,
        "{rate:.1} ops/s over a limit of {K}: {}",
        c.details
    );
    assert!(
        rate >= 0.5 * K as f64,
        "{rate:.1} ops/s: stalled? {}",
        c.details
    );
}

/// A one-time burst passes first at full speed (within the first 200 ms, where the rate alone
/// would give 51 KiB), and then the rate holds: at most burst + 1.2 B over 3 s.
#[test]
fn rng_one_time_burst_passes_first_under_cinder() {
    const B: u64 = 256 * 1024;
    const BURST: u64 = 1024 * 1024;
    let c = rngbench_under_cinder(
        &format!(
            r#"{{"bandwidth": {{"size": {}, "one_time_burst": {BURST}, "refill_time": 100}}}}"#,
            B / 10
        ),
        "probe.bench_ms=3000 probe.rng_req=4096 probe.rng_early_ms=200",
    );
    let early = num(&c, "early_bytes");
    assert!(
        early >= BURST,
        "only {early} bytes in the first 200 ms, burst {BURST}: {}",
        c.details
    );
    let secs = num(&c, "us") as f64 / 1e6;
    let bytes = num(&c, "bytes") as f64;
    assert!(
        bytes <= BURST as f64 + 1.2 * B as f64 * secs,
        "{bytes} bytes in {secs:.2} s: {}",
        c.details
    );
}

/// For comparison, and to show the limits above are below what the device does unlimited:
/// without a limiter the same run goes well past 1.2 B (else the tests above prove nothing).
#[test]
fn rng_unlimited_is_faster_than_the_limits_under_cinder() {
    let c = rngbench_under_cinder("{}", "probe.bench_ms=1000 probe.rng_req=4096");
    let rate = per_second(&c, "bytes");
    assert!(
        rate > 2.0 * 256.0 * 1024.0,
        "unlimited only {rate:.0} B/s: {}",
        c.details
    );
    let c = rngbench_under_cinder("{}", "probe.bench_ms=1000 probe.rng_req=16");
    let rate = per_second(&c, "ops");
    assert!(
        rate > 2.0 * 100.0,
        "unlimited only {rate:.1} ops/s: {}",
        c.details
    );
}

/// A scratch image for `blkbench` (it writes arbitrary data).
fn scratch_image(d: &Scratch) -> String {
    let img = d.join("bench.img");
    let f = std::fs::File::create(&img).expect("create image");
    f.set_len(64 << 20).expect("size image");
    img.display().to_string()
}

/// A decimal `key=12.34` of a probe line.
fn dec(c: &probe::Check, key: &str) -> f64 {
    c.field(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {}", c.details))
}

/// The rate of each `blkbench` phase, in requests per second (1 MiB requests in the
/// sequential ones).
fn phase_iops(c: &probe::Check) -> [(&'static str, f64); 6] {
    [
        ("qd1_randread", dec(c, "qd1_randread_iops")),
        ("qd32_randread", dec(c, "qd32_randread_iops")),
        ("qd1_randwrite", dec(c, "qd1_randwrite_iops")),
        ("qd32_randwrite", dec(c, "qd32_randwrite_iops")),
        ("seq_read", dec(c, "seq_read_mibs")),
        ("seq_write", dec(c, "seq_write_mibs")),
    ]
}

/// Boots the probe with one scratch drive limited by `limiter` (JSON) and runs `blkbench` with
/// phases of `ms`; returns its line, which must be `ok` (every request completed once, within
/// the probe's 5 s per request).
fn blkbench_under_cinder(limiter: &str, ms: u64) -> probe::Check {
    blkbench_with_metrics(limiter, ms).0
}

/// As [`blkbench_under_cinder`], and the drive's metrics as cinder wrote them at exit.
fn blkbench_with_metrics(limiter: &str, ms: u64) -> (probe::Check, serde_json::Value) {
    require_kvm();
    let _one = measuring();
    let d = Scratch::new("rl-blkbench");
    let img = scratch_image(&d);
    let metrics = d.join("metrics.json");
    std::fs::write(&metrics, "").expect("create metrics file");
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "probe.run=blkbench probe.bench_ms={ms}"}},
            "drives": [{{"drive_id": "b0", "path_on_host": "{img}", "is_root_device": false,
                         "rate_limiter": {limiter}}}],
            "metrics": {{"metrics_path": "{}"}}}}"#,
        kernel(),
        metrics.display()
    );
    let f = d.join("vm.json");
    std::fs::write(&f, json).expect("write config file");
    let mut c = cinder();
    c.arg("--config-file").arg(&f);
    let r = run(c, Duration::from_secs(180), |_| false);
    let log = probe::parse(&r.stdout);
    assert!(!r.timed_out, "timed out\n{}", r.log());
    let check = log
        .check("blkbench")
        .unwrap_or_else(|| panic!("no blkbench line\n{}", r.log()))
        .clone();
    assert_eq!(check.status, Status::Ok, "{}\n{}", check.details, r.log());
    eprintln!("blkbench {limiter}: {}", check.details);
    let text = std::fs::read_to_string(&metrics).expect("read metrics");
    let last = text.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("metrics line {last:?}: {e}"));
    (check, v["block_b0"].clone())
}

/// An ops limit of K requests/s holds every blkbench phase (4 KiB random reads and writes at
/// queue depth 1 and 32, 1 MiB sequential) to at most 1.2 K, and the deep random read is not
/// stalled (at least K/2). The bucket is a tenth of a second's worth.
#[test]
fn blk_ops_limit_holds_under_cinder() {
    const K: f64 = 200.0;
    let (c, m) = blkbench_with_metrics(r#"{"ops": {"size": 20, "refill_time": 100}}"#, 1000);
    // The metrics count the stops.
    let throttled = m["rate_limiter_throttled"].as_u64().unwrap_or(0);
    assert!(throttled > 0, "no throttled events in {m}");
    for (phase, iops) in phase_iops(&c) {
        assert!(
            iops <= 1.2 * K,
            "{phase}: {iops} requests/s over a limit of {K}: {}",
            c.details
        );
    }
    let qd32 = dec(&c, "qd32_randread_iops");
    assert!(
        qd32 >= 0.5 * K,
        "qd32 randread {qd32}/s: stalled? {}",
        c.details
    );
}

/// A bandwidth limit of B bytes/s holds every blkbench phase to at most 1.2 B: 4 KiB random
/// requests (iops x 4 KiB) and 1 MiB sequential ones (larger than the 0.4 MiB bucket: each
/// passes on a full bucket and leaves debt).
#[test]
fn blk_bandwidth_limit_holds_under_cinder() {
    const B: f64 = 4.0 * 1024.0 * 1024.0;
    let c = blkbench_under_cinder(
        r#"{"bandwidth": {"size": 419430, "refill_time": 100}}"#,
        1000,
    );
    for (phase, rate) in phase_iops(&c) {
        let bytes = if phase.starts_with("seq") {
            rate * 1024.0 * 1024.0
        } else {
            rate * 4096.0
        };
        assert!(
            bytes <= 1.2 * B,
            "{phase}: {bytes:.0} B/s over a limit of {B} B/s: {}",
            c.details
        );
    }
    let seq = dec(&c, "seq_read_mibs");
    assert!(seq >= 2.0, "seq read {seq} MiB/s: stalled? {}", c.details);
}

/// `PATCH /drives/{id}` changes the limit of a running VM: the drive is configured at K1
/// ops/s, the VM started, and the PATCH to K2 = 8 K1 lands before the probe (about a second
/// to boot) starts measuring; every phase then runs well above 1.2 K1 and at most 1.2 K2.
#[test]
fn blk_patch_changes_the_rate_of_a_running_vm_under_cinder() {
    require_kvm();
    let _one = measuring();
    const K1: f64 = 50.0;
    const K2: f64 = 400.0;
    let d = Scratch::new("rl-blkpatch");
    let img = scratch_image(&d);
    let sock = d.join("api.sock");
    let mut s = start_api(&sock, &[]);
    let put = |path: &str, body: String| {
        let r = request(&sock, "PUT", path, Some(&body));
        assert_eq!(r.status, 204, "PUT {path}: {r:?}");
    };
    put(
        "/boot-source",
        format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "probe.run=blkbench probe.bench_ms=1000"}}"#,
            kernel()
        ),
    );
    put(
        "/drives/b0",
        format!(
            r#"{{"drive_id": "b0", "path_on_host": "{img}", "is_root_device": false,
                "rate_limiter": {{"ops": {{"size": 5, "refill_time": 100}}}}}}"#
        ),
    );
    put("/actions", r#"{"action_type": "InstanceStart"}"#.into());
    let r = request(
        &sock,
        "PATCH",
        "/drives/b0",
        Some(r#"{"drive_id": "b0", "rate_limiter": {"ops": {"size": 40, "refill_time": 100}}}"#),
    );
    assert_eq!(r.status, 204, "PATCH: {r:?}");
    // The new limit is what GET /vm/config reports (asked now: the VM ends with the probe).
    let v = request(&sock, "GET", "/vm/config", None).json();
    assert_eq!(v["drives"][0]["rate_limiter"]["ops"]["size"], 40, "{v}");
    let (text, _) = s
        .expect("PROBE DONE", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    let log = probe::parse(&text);
    let c = log
        .check("blkbench")
        .unwrap_or_else(|| panic!("no blkbench line\n{}", s.log()))
        .clone();
    assert_eq!(c.status, Status::Ok, "{}\n{}", c.details, s.log());
    eprintln!("blkbench patched {K1} -> {K2} ops/s: {}", c.details);
    for (phase, iops) in phase_iops(&c) {
        assert!(
            iops > 2.0 * K1 && iops <= 1.2 * K2,
            "{phase}: {iops} requests/s; limit patched from {K1} to {K2}: {}",
            c.details
        );
    }
}

// ---------------------------------------------------------------------------------------------
// virtio-net: `netbench` in a private network namespace, the host side as in
// `tests/src/bin/bench_io.rs` (its protocol: `resources/probe/src/net_bench.rs`).

const PROBE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const PORT: u16 = 7777;
const MAC: &str = "02:00:0a:00:02:0f";
/// 60-byte and 1514-byte frames.
const FRAMES: [u16; 2] = [60, 1514];

fn udp_recv(sock: &UdpSocket, buf: &mut [u8], t: Duration) -> Option<usize> {
    sock.set_read_timeout(Some(t.max(Duration::from_millis(1))))
        .ok()?;
    sock.recv(buf).ok()
}

/// Sends `msg` until a datagram starting with `want` comes back (20 s at most: a throttled
/// RX queue drains what the TAP holds first).
fn udp_request(sock: &UdpSocket, msg: &[u8], want: u8, buf: &mut [u8]) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let _ = sock.send(msg);
        let t = Instant::now() + Duration::from_millis(300);
        while Instant::now() < t {
            if let Some(n) = udp_recv(sock, buf, t.saturating_duration_since(Instant::now())) {
                if n > 0 && buf[0] == want {
                    return Ok(());
                }
            }
        }
    }
    Err(format!(
        "no '{}' answer to '{}'",
        want as char, msg[0] as char
    ))
}

/// The host side of `netbench` for phases of `ms`: per frame size a guest->host blast, then a
/// host->guest one; ends with STOP.
fn net_host(ms: u64) -> Result<(), String> {
    let ms32 = u32::try_from(ms).map_err(|_| "phase too long".to_string())?;
    let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).map_err(|e| format!("bind: {e}"))?;
    sock.connect(SocketAddrV4::new(PROBE_IP, PORT))
        .map_err(|e| format!("connect: {e}"))?;
    let mut buf = vec![0u8; 2048];
    udp_request(&sock, b"Ehello", b'e', &mut buf)?;
    for len in FRAMES {
        let mut b = vec![b'B'];
        b.extend(len.to_le_bytes());
        b.extend(ms32.to_le_bytes());
        sock.send(&b).map_err(|e| format!("send B: {e}"))?;
        let mut count = 0u64;
        let limit = Instant::now() + Duration::from_millis(ms * 20 + 30_000);
        let mut done = false;
        while !done && Instant::now() < limit {
            match udp_recv(&sock, &mut buf, Duration::from_secs(2)) {
                Some(n) if n > 0 && buf[0] == b'p' => count += 1,
                Some(n) if n > 0 && buf[0] == b'b' => done = true,
                _ => {}
            }
        }
        if !done {
            return Err("guest->host blast did not end".into());
        }
        let mut r = vec![b'R'];
        r.extend(count.to_le_bytes());
        udp_request(&sock, &r, b'r', &mut buf)?;
        let mut s = vec![b'S'];
        s.extend(len.to_le_bytes());
        udp_request(&sock, &s, b's', &mut buf)?;
        let mut pkt = vec![0u8; usize::from(len) - 42];
        pkt[0] = b'P';
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            for _ in 0..64 {
                let _ = sock.send(&pkt);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        udp_request(&sock, b"F", b'f', &mut buf)?;
    }
    for _ in 0..3 {
        let _ = sock.send(b"X");
    }
    Ok(())
}

/// Boots the probe in a namespace with one interface whose limiters are `rx`/`tx` (JSON members
/// of the interface), runs `netbench` with phases of `ms` and returns its line (`ok`).
fn netbench_under_cinder(limiters: &str, ms: u64) -> probe::Check {
    netbench_patched(limiters, ms, None)
}

/// As [`netbench_under_cinder`]; with `patch`, cinder also serves its API and, once the probe
/// is ready (the VM running), `PATCH /network-interfaces/n0` with that body is sent before the
/// host starts the phases.
fn netbench_patched(limiters: &str, ms: u64, patch: Option<&str>) -> probe::Check {
    require_kvm();
    let _one = measuring();
    let ns = NetNs::new();
    let d = Scratch::new("rl-netbench");
    let sock = d.join("api.sock");
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "probe.run=netbench probe.net_ip=10.0.2.15 probe.net_peer=10.0.2.2 probe.udp_port=7777 probe.net_ms=600000"}},
            "network-interfaces": [{{"iface_id": "n0", "host_dev_name": "{}", "guest_mac": "{MAC}"{limiters}}}]}}"#,
        kernel(),
        ns.tap
    );
    let f = d.join("vm.json");
    std::fs::write(&f, json).expect("write config file");
    let mut c = cinder();
    c.arg("--config-file").arg(&f);
    if patch.is_some() {
        c.arg("--api-sock").arg(&sock);
    }
    let mut s = Session::start(ns.wrap(&c));
    s.expect("PROBE netbench ready", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    if let Some(body) = patch {
        let r = request(&sock, "PATCH", "/network-interfaces/n0", Some(body));
        assert_eq!(r.status, 204, "PATCH: {r:?}\n{}", s.log());
    }
    let host = ns.spawn(move || net_host(ms)).join();
    match host {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("host side: {e}\n{}", s.log()),
        Err(_) => panic!("host side panicked\n{}", s.log()),
    }
    s.expect_line("PROBE DONE", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let log = probe::parse(&s.console());
    let c = log
        .check("netbench")
        .unwrap_or_else(|| panic!("no netbench line\n{}", s.log()))
        .clone();
    assert_eq!(c.status, Status::Ok, "{}\n{}", c.details, s.log());
    eprintln!("netbench {limiters}: {}", c.details);
    c
}

/// A TX ops limit of K frames/s holds what the device takes from the guest (the probe's
/// `g2h_*_sent_pps`, TSC-timed) to at most 1.2 K for 60- and 1514-byte frames, and a TX
/// bandwidth limit of B bytes/s holds 1514-byte frames to 1.2 B.
#[test]
fn net_tx_limit_holds_under_cinder() {
    const K: f64 = 500.0;
    let c = netbench_under_cinder(
        r#", "tx_rate_limiter": {"ops": {"size": 50, "refill_time": 100}}"#,
        1000,
    );
    for key in ["g2h_64_sent_pps", "g2h_1500_sent_pps"] {
        let pps = dec(&c, key);
        assert!(
            pps <= 1.2 * K,
            "{key} {pps} over a limit of {K}: {}",
            c.details
        );
        assert!(pps >= 0.5 * K, "{key} {pps}: stalled? {}", c.details);
    }
    const B: f64 = 1_000_000.0;
    let c = netbench_under_cinder(
        r#", "tx_rate_limiter": {"bandwidth": {"size": 100000, "refill_time": 100}}"#,
        1000,
    );
    let bytes = dec(&c, "g2h_1500_sent_pps") * 1514.0;
    assert!(
        bytes <= 1.2 * B,
        "{bytes} B/s over a limit of {B}: {}",
        c.details
    );
}

/// An RX ops limit of K frames/s holds what the guest receives (`h2g_*_pps`, TSC-timed) to at
/// most 1.2 K while the host sends as fast as it can; the rest waits in (or is dropped by) the
/// host's TAP, as for any slow receiver.
#[test]
fn net_rx_limit_holds_under_cinder() {
    const K: f64 = 500.0;
    let c = netbench_under_cinder(
        r#", "rx_rate_limiter": {"ops": {"size": 50, "refill_time": 100}}"#,
        1000,
    );
    for key in ["h2g_64_pps", "h2g_1500_pps"] {
        let pps = dec(&c, key);
        assert!(
            pps <= 1.2 * K,
            "{key} {pps} over a limit of {K}: {}",
            c.details
        );
        assert!(pps >= 0.5 * K, "{key} {pps}: stalled? {}", c.details);
    }
}

/// Without limiters the same runs go well past those limits (else the tests above prove
/// nothing).
#[test]
fn net_unlimited_is_faster_than_the_limits_under_cinder() {
    let c = netbench_under_cinder("", 1000);
    for key in [
        "g2h_64_sent_pps",
        "g2h_1500_sent_pps",
        "h2g_64_pps",
        "h2g_1500_pps",
    ] {
        let pps = dec(&c, key);
        assert!(pps > 2.0 * 500.0, "{key} only {pps}: {}", c.details);
    }
}

/// `PATCH /network-interfaces/{id}` changes the TX limit of a running VM: configured at K1
/// frames/s, patched to K2 = 10 K1 once the probe is up, before the phases; both phases then
/// run well above 1.2 K1 and at most 1.2 K2.
#[test]
fn net_patch_changes_the_rate_of_a_running_vm_under_cinder() {
    const K1: f64 = 50.0;
    const K2: f64 = 500.0;
    let c = netbench_patched(
        r#", "tx_rate_limiter": {"ops": {"size": 5, "refill_time": 100}}"#,
        1000,
        Some(r#"{"iface_id": "n0", "tx_rate_limiter": {"ops": {"size": 50, "refill_time": 100}}}"#),
    );
    for key in ["g2h_64_sent_pps", "g2h_1500_sent_pps"] {
        let pps = dec(&c, key);
        assert!(
            pps > 2.0 * K1 && pps <= 1.2 * K2,
            "{key} {pps}; TX limit patched from {K1} to {K2}: {}",
            c.details
        );
    }
}
