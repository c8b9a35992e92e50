//! Firecracker v1.16.1's own command-line flags, as a manager that spawns `firecracker` passes
//! them: each either does what it does in Firecracker, or is refused with exit 1 and one line
//! naming what cinder lacks. The tests without `under_cinder` in their name need no KVM (they
//! look at the API socket before anything boots, or at cinder's exit before KVM is opened);
//! the `under_cinder` one boots the probe.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use cinder_tests::cinder::{cinder, require_kvm, start_api};
use cinder_tests::http::{raw, request, Response};
use cinder_tests::probe::{self, Status};
use cinder_tests::runner::run;
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir as Scratch;

/// Ends a session with SIGTERM and returns what it wrote on stderr.
fn stop(mut s: Session) -> String {
    s.signal(libc::SIGTERM);
    let st = s
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.code(), Some(143), "{}", s.log());
    let log = s.log();
    log.split_once("--- stderr ---\n")
        .map(|(_, e)| e.to_string())
        .unwrap_or_default()
}

fn output(args: &[&str]) -> Output {
    cinder().args(args).output().expect("run cinder")
}

/// Runs cinder with `args`; asserts exit `code` and one stderr line containing each of
/// `expect`.
fn refused(args: &[&str], code: i32, expect: &[&str]) {
    let out = output(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "cinder {args:?}: stderr: {stderr}"
    );
    if code == 1 {
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            lines.len(),
            1,
            "cinder {args:?}: one line expected: {stderr}"
        );
    }
    for e in expect {
        assert!(stderr.contains(e), "cinder {args:?}: no {e:?} in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "cinder {args:?}: {stderr}");
}

fn fault(r: &Response) -> String {
    r.json()["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {:?}", r.body))
        .to_string()
}

/// Every Firecracker flag, and what cinder's help says it does.
const FLAGS: [&str; 23] = [
    "--api-sock",
    "--boot-timer",
    "--config-file",
    "--describe-snapshot",
    "--enable-pci",
    "--http-api-max-payload-size",
    "--id",
    "--level",
    "--log-path",
    "--metadata",
    "--metrics-path",
    "--mmds-size-limit",
    "--module",
    "--no-api",
    "--no-seccomp",
    "--parent-cpu-time-us",
    "--seccomp-filter",
    "--show-level",
    "--show-log-origin",
    "--snapshot-version",
    "--start-time-cpu-us",
    "--start-time-us",
    "--version",
];

#[test]
fn help_lists_the_firecracker_flags_in_their_own_group() {
    let out = output(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let (own, group) = help
        .split_once("Firecracker v1.16.1 flags:")
        .unwrap_or_else(|| panic!("no Firecracker group in --help:\n{help}"));
    for flag in FLAGS {
        let at = group
            .find(&format!("{flag} "))
            .or_else(|| group.find(&format!("{flag}\n")))
            .unwrap_or_else(|| panic!("{flag} is not in the Firecracker group:\n{group}"));
        let entry = &group[at..];
        let entry = entry.split("\n\n").next().unwrap_or(entry);
        assert!(
            ["[implemented]", "[refused", "[accepted"]
                .iter()
                .any(|w| entry.contains(w)),
            "{flag}'s help does not say whether cinder implements it: {entry}"
        );
        assert!(
            !own.lines().any(|l| {
                let l = l.trim_start();
                l.starts_with(&format!("{flag} ")) || l == flag
            }),
            "{flag} is listed outside the group too"
        );
    }
    // cinder's own --log-level says that --level wins.
    assert!(own.contains("--log-level"), "{own}");
    assert!(help.contains("--level (Firecracker's flag) wins"), "{help}");
}

#[test]
fn describe_snapshot_refuses_a_file_that_is_not_a_snapshot_in_one_line() {
    let d = Scratch::new("fcflags-describe");
    let f = d.file("some.json", b"{}");
    let out = cinder()
        .arg("--describe-snapshot")
        .arg(&f)
        .output()
        .expect("run cinder");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--describe-snapshot") && err.trim().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn flags_cinder_does_not_implement_are_refused_naming_the_feature() {
    let d = Scratch::new("fcflags-refused");
    let f = d.file("some.json", b"{}");
    let f = f.to_str().expect("utf-8 path");
    let sock = d.join("api.sock");
    let sock = sock.to_str().expect("utf-8 path");
    let cases: [(&[&str], &str); 4] = [
        (&["--metadata", f], "--metadata: cinder has no MMDS"),
        (
            &["--mmds-size-limit", "1000"],
            "--mmds-size-limit: cinder has no MMDS",
        ),
        // Not seccompiler-bin's output: refused before anything starts (seccomp.rs has the
        // file that works).
        (
            &["--seccomp-filter", f],
            "not a seccompiler-bin filter file",
        ),
        (
            &["--boot-timer"],
            "--boot-timer: cinder has no boot-timer device",
        ),
    ];
    for (args, msg) in cases {
        // Alone, and in a command line that would otherwise run.
        refused(args, 1, &[msg]);
        let mut full = vec!["--api-sock", sock, "--kvm-device", "/nonexistent/kvm"];
        full.extend_from_slice(args);
        refused(&full, 1, &[msg]);
        assert!(
            !Path::new(sock).exists(),
            "{args:?}: the API socket was bound"
        );
    }
}

#[test]
fn id_names_the_instance_in_get_and_in_log_lines() {
    let d = Scratch::new("fcflags-id");
    let sock = d.join("api.sock");
    let log = d.join("log");
    let s = start_api(
        &sock,
        &[
            "--id",
            "my-vm",
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Info",
        ],
    );
    let info = request(&sock, "GET", "/", None);
    assert_eq!(info.status, 200, "{info:?}");
    assert_eq!(info.json()["id"], "my-vm");
    stop(s);
    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(
        !text.is_empty() && text.lines().all(|l| l.starts_with("cinder: [my-vm] ")),
        "{text}"
    );

    // The longest id Firecracker takes (64), and non-ASCII alphanumerics, as Firecracker.
    let long = "a".repeat(64);
    let sock2 = d.join("api2.sock");
    for id in [long.as_str(), "é-1"] {
        let s = start_api(&sock2, &["--id", id]);
        assert_eq!(request(&sock2, "GET", "/", None).json()["id"], id);
        stop(s);
    }
}

#[test]
fn ids_firecracker_refuses_are_refused() {
    let long = "a".repeat(65);
    for (id, why) in [
        ("my_vm", "Invalid char (_) at position 2"),
        ("a:b", "Invalid char (:) at position 1"),
        ("", "Invalid len (0);  the length must be between 1 and 64"),
        (
            long.as_str(),
            "Invalid len (65);  the length must be between 1 and 64",
        ),
    ] {
        refused(
            &[
                "--id",
                id,
                "--kvm-device",
                "/nonexistent/kvm",
                "--api-sock",
                "/nonexistent/s",
            ],
            1,
            &["--id", "invalid instance id", why],
        );
    }
}

#[test]
fn log_path_and_level_write_debug_lines_to_the_file() {
    let d = Scratch::new("fcflags-log");
    let sock = d.join("api.sock");
    let log = d.join("log");
    // --level wins over cinder's own --log-level, whichever comes first.
    let s = start_api(
        &sock,
        &[
            "--log-level",
            "off",
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "Debug",
            "--show-level",
            "--show-log-origin",
        ],
    );
    // A request the API refuses is logged at debug level.
    let r = raw(&sock, b"BREW / HTTP/1.1\r\n\r\n").expect("answer");
    assert_eq!(r.status, 400);
    let stderr = stop(s);
    let text = std::fs::read_to_string(&log).expect("log file");
    assert!(text.contains("[debug]"), "no debug line in the log: {text}");
    assert!(
        text.contains(".rs:"),
        "--show-log-origin: no origin: {text}"
    );
    assert!(
        !stderr.contains("[debug]"),
        "log lines went to stderr too: {stderr}"
    );

    // --level Warning keeps the info and debug lines out, though --log-level says debug.
    let log2 = d.join("log2");
    let s = start_api(
        &sock,
        &[
            "--level",
            "warning",
            "--log-level",
            "debug",
            "--log-path",
            log2.to_str().unwrap(),
        ],
    );
    let _ = raw(&sock, b"BREW / HTTP/1.1\r\n\r\n");
    stop(s);
    let text = std::fs::read_to_string(&log2).expect("log file");
    assert!(!text.contains("debug") && !text.contains("info"), "{text}");

    // A level Firecracker does not know: exit 1, the API's message.
    refused(
        &["--level", "loud", "--api-sock", "/nonexistent/s"],
        1,
        &["--level loud: unknown log level"],
    );
    // A log path that cannot be opened: exit 1, one line.
    refused(
        &[
            "--log-path",
            "/nonexistent/dir/log",
            "--api-sock",
            "/nonexistent/s",
        ],
        1,
        &["--log-path", "/nonexistent/dir/log"],
    );
}

#[test]
fn module_keeps_only_that_modules_lines() {
    let d = Scratch::new("fcflags-module");
    let sock = d.join("api.sock");
    let log = d.join("log");
    let s = start_api(
        &sock,
        &[
            "--log-path",
            log.to_str().unwrap(),
            "--level",
            "debug",
            "--module",
            "api",
        ],
    );
    let _ = raw(&sock, b"BREW / HTTP/1.1\r\n\r\n");
    stop(s);
    let text = std::fs::read_to_string(&log).expect("log file");
    // The API server's debug line is kept; the runtime's shutdown line (module vmm) is not.
    assert!(text.contains("API request refused"), "{text}");
    assert!(!text.contains("shutting down"), "{text}");
}

#[test]
fn metrics_path_receives_flushed_metrics_with_the_startup_times() {
    let d = Scratch::new("fcflags-metrics");
    let sock = d.join("api.sock");
    let metrics = d.join("metrics.json");
    let s = start_api(
        &sock,
        &[
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--start-time-us",
            "0",
            "--start-time-cpu-us",
            "0",
            "--parent-cpu-time-us",
            "1000000",
        ],
    );
    let r = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    // The destination is set once, as in Firecracker.
    let r = request(
        &sock,
        "PUT",
        "/metrics",
        Some(r#"{"metrics_path": "/tmp/other.json"}"#),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(fault(&r).contains("already configured"), "{r:?}");
    stop(s);
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    let line: serde_json::Value =
        serde_json::from_str(text.lines().next().expect("a line")).expect("JSON");
    let api = &line["api_server"];
    // From a monotonic start of 0: the host's uptime, in microseconds.
    assert!(
        api["process_startup_time_us"].as_u64().unwrap() > 0,
        "{line}"
    );
    // The parent's second is added to cinder's own CPU time.
    assert!(
        api["process_startup_time_cpu_us"].as_u64().unwrap() >= 1_000_000,
        "{line}"
    );

    // Without the start times the values are 0 (as in Firecracker).
    let m2 = d.join("m2.json");
    let s = start_api(&sock, &["--metrics-path", m2.to_str().unwrap()]);
    let r = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    stop(s);
    let text = std::fs::read_to_string(&m2).expect("metrics file");
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["api_server"]["process_startup_time_us"], 0, "{line}");

    // A config file that sets metrics too: the destination is set once.
    let cfg = d.file(
        "vm.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
                "metrics": {{"metrics_path": "{}"}}}}"#,
            probe::elf_path().display(),
            d.join("m3.json").display()
        )
        .as_bytes(),
    );
    refused(
        &[
            "--config-file",
            cfg.to_str().unwrap(),
            "--no-api",
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--kvm-device",
            "/nonexistent/kvm",
        ],
        1,
        &["--metrics-path", "only once"],
    );
    // A path that cannot be opened.
    refused(
        &[
            "--metrics-path",
            "/nonexistent/dir/m",
            "--api-sock",
            "/nonexistent/s",
        ],
        1,
        &["--metrics-path", "/nonexistent/dir/m"],
    );
    // Malformed start times are a bad command line.
    refused(&["--start-time-us", "soon"], 2, &["--start-time-us"]);
}

#[test]
fn http_api_max_payload_size_limits_the_body() {
    let d = Scratch::new("fcflags-payload");
    let sock = d.join("api.sock");
    let s = start_api(&sock, &["--http-api-max-payload-size", "100"]);
    let small = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    assert_eq!(
        request(&sock, "PUT", "/machine-config", Some(small)).status,
        204
    );
    // The same body, padded with JSON whitespace past the limit.
    let big = format!("{small}{}", " ".repeat(100));
    let r = request(&sock, "PUT", "/machine-config", Some(&big));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        fault(&r).contains("request body too large") && fault(&r).contains("100 bytes"),
        "{r:?}"
    );
    stop(s);

    // Above cinder's default of 65536, when asked.
    let s = start_api(&sock, &["--http-api-max-payload-size", "200000"]);
    let big = format!("{small}{}", " ".repeat(70_000));
    let r = request(&sock, "PUT", "/machine-config", Some(&big));
    assert_eq!(r.status, 204, "the raised limit did not apply: {r:?}");
    stop(s);

    for bad in ["0", "-1", "lots"] {
        let arg = format!("--http-api-max-payload-size={bad}");
        refused(&[&arg], 2, &["--http-api-max-payload-size"]);
    }
}

#[test]
fn enable_pci_warns_once_and_the_run_goes_on() {
    let d = Scratch::new("fcflags-pci");
    let sock = d.join("api.sock");
    let s = start_api(&sock, &["--enable-pci"]);
    assert_eq!(request(&sock, "GET", "/", None).status, 200);
    let stderr = stop(s);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("PCI")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains("--enable-pci") && warnings[0].contains("virtio-mmio"),
        "{stderr}"
    );
}

#[test]
fn no_seccomp_runs_without_filters_with_one_warning() {
    let d = Scratch::new("fcflags-seccomp");
    let sock = d.join("api.sock");
    let s = start_api(&sock, &["--no-seccomp"]);
    assert_eq!(request(&sock, "GET", "/", None).status, 200);
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    assert!(status.contains("\nSeccomp:\t0\n"), "{status}");
    let stderr = stop(s);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("seccomp")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("seccomp is off"), "{stderr}");
}

#[test]
fn version_config_file_and_no_api_keep_their_meaning() {
    let out = output(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Firecracker API 1.16.1"));
    // --no-api with a config file: it boots at once (here: stops at the missing KVM device).
    let d = Scratch::new("fcflags-noapi");
    let cfg = d.file(
        "vm.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}}}}"#,
            probe::elf_path().display()
        )
        .as_bytes(),
    );
    refused(
        &[
            "--no-api",
            "--config-file",
            cfg.to_str().unwrap(),
            "--kvm-device",
            "/nonexistent/kvm",
        ],
        1,
        &["/nonexistent/kvm"],
    );
}

#[test]
fn enable_pci_and_no_seccomp_boot_the_probe_on_virtio_mmio_under_cinder() {
    require_kvm();
    let mut c = cinder();
    c.arg("--kernel")
        .arg(probe::elf_path())
        .args(["--cmdline", "probe.run=boot,rng", "--rng"])
        .args(["--enable-pci", "--no-seccomp", "--id", "pci-vm"]);
    let r = run(c, Duration::from_secs(120), |_| false);
    let log = probe::parse(&r.stdout);
    let what = format!("{}\n--- stderr ---\n{}", r.stdout, r.stderr);
    assert!(!r.timed_out, "timed out: {what}");
    assert_eq!(r.status.and_then(|s| s.code()), Some(0), "{what}");
    assert!(log.all_passed(), "{what}");
    assert_eq!(
        log.check("rng").map(|c| c.status),
        Some(Status::Ok),
        "the virtio-mmio rng device: {what}"
    );
    let warnings = r.stderr.lines().filter(|l| l.contains("PCI")).count();
    assert_eq!(warnings, 1, "{what}");
}
