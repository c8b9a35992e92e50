//! cinder in Firecracker's place, driven as a manager drives `firecracker`: the binary is
//! started under the file name `firecracker` with a typical manager's flags, then configured
//! and run over the socket the way managers do it (trailing segments and slashes on routes,
//! `PUT /vsock/<id>` then waiting for the socket to appear, `InstanceStart`, pause and resume,
//! a new drive image, `FlushMetrics`), and the log file, the metrics file and what the guest
//! (the probe) reported are checked.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder_bin, require_kvm};
use cinder_tests::http::{request, wait_for_socket, Response};
use cinder_tests::probe::{self, Status};
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir;

fn ok(r: &Response, what: &str, s: &Session) {
    assert!(
        r.status == 204 || r.status == 200,
        "{what}: {r:?}\n{}",
        s.log()
    );
}

/// Waits (bounded) for a file to appear, as managers wait for the vsock socket.
fn wait_for_path(p: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn a_manager_drives_cinder_as_firecracker_under_cinder() {
    require_kvm();
    let d = TempDir::new("manager");
    // The manager spawns a binary named `firecracker`.
    let fc: PathBuf = d.join("firecracker");
    std::os::unix::fs::symlink(cinder_bin(), &fc).expect("symlink");
    let sock = d.join("fc.sock");
    let log = d.join("fc.log");
    let metrics = d.join("fc.metrics");
    let img = d.file("rootfs.img", &vec![0u8; 1 << 20]);
    let img2 = d.file("rootfs2.img", &vec![0u8; 1 << 20]);
    let uds = d.join("v.sock");
    std::fs::write(&log, b"").expect("log file");
    std::fs::write(&metrics, b"").expect("metrics file");

    let mut c = std::process::Command::new(&fc);
    c.arg("--api-sock")
        .arg(&sock)
        .args(["--id", "mgr-vm-1"])
        .arg("--log-path")
        .arg(&log)
        .args(["--level", "Info"])
        .arg("--metrics-path")
        .arg(&metrics)
        .arg("--enable-pci");
    let mut s = Session::start(c);
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}\n{}", s.log()));

    let info = request(&sock, "GET", "/", None);
    assert_eq!(info.json()["id"], "mgr-vm-1", "{info:?}");
    assert_eq!(info.json()["state"], "Not started");
    let v = request(&sock, "GET", "/version", None);
    assert_eq!(v.json()["firecracker_version"], "1.16.1", "{v:?}");

    let machine = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    ok(
        &request(&sock, "PUT", "/machine-config/", Some(machine)),
        "PUT /machine-config/",
        &s,
    );
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.run=blk,vsock probe.vsock_conns=1"}}"#,
        probe::elf_path().display()
    );
    ok(
        &request(&sock, "PUT", "/boot-source/", Some(&boot)),
        "PUT /boot-source/",
        &s,
    );
    let drive = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
        img.display()
    );
    ok(
        &request(&sock, "PUT", "/drives/rootfs", Some(&drive)),
        "PUT /drives/rootfs",
        &s,
    );
    let vsock = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display());
    ok(
        &request(&sock, "PUT", "/vsock/vsock0", Some(&vsock)),
        "PUT /vsock/vsock0",
        &s,
    );
    // Managers wait up to 5 s for the socket before InstanceStart.
    assert!(
        wait_for_path(&uds, Duration::from_secs(5)),
        "no vsock socket after PUT /vsock\n{}",
        s.log()
    );
    let m = request(&sock, "GET", "/machine-config", None);
    assert_eq!(m.json()["vcpu_count"], 1, "{m:?}");

    let start = r#"{"action_type": "InstanceStart"}"#;
    ok(
        &request(&sock, "PUT", "/actions", Some(start)),
        "InstanceStart",
        &s,
    );
    s.expect("PROBE vsock ready", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));

    for state in ["Paused", "Resumed"] {
        let body = format!(r#"{{"state": "{state}"}}"#);
        ok(&request(&sock, "PATCH", "/vm", Some(&body)), state, &s);
        let want = if state == "Paused" {
            "Paused"
        } else {
            "Running"
        };
        assert_eq!(request(&sock, "GET", "/", None).json()["state"], want);
    }
    // The probe is done with the disk (it serves vsock now): a new image.
    let patch = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}"}}"#,
        img2.display()
    );
    ok(
        &request(&sock, "PATCH", "/drives/rootfs", Some(&patch)),
        "PATCH /drives/rootfs",
        &s,
    );

    let flush = r#"{"action_type": "FlushMetrics"}"#;
    ok(
        &request(&sock, "PUT", "/actions", Some(flush)),
        "FlushMetrics",
        &s,
    );
    let flushed = std::fs::read_to_string(&metrics).unwrap_or_default();
    assert!(
        flushed.lines().any(|l| l.contains("\"block_rootfs\"")),
        "FlushMetrics wrote no line: {flushed:?}"
    );

    let mut conn = cinder_tests::vsock::connect(&uds, 5000, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    {
        use std::io::{Read, Write};
        conn.write_all(&[0xa5; 2000]).expect("send");
        conn.shutdown(std::net::Shutdown::Write)
            .expect("half close");
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
    }
    s.expect_line("PROBE DONE", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    let st = s
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.code(), Some(0), "the guest's reset ends it\n{}", s.log());

    let report = probe::parse(&s.console());
    for check in ["blk", "vsock"] {
        let c = report
            .check(check)
            .unwrap_or_else(|| panic!("no {check} result\n{}", s.log()));
        assert_eq!(c.status, Status::Ok, "{check}: {}\n{}", c.details, s.log());
    }
    assert_eq!(
        report.check("vsock").and_then(|c| c.num("rx_bytes")),
        Some(2000)
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log_text.lines().any(|l| l.contains("[mgr-vm-1]")),
        "log lines carry the id:\n{log_text}"
    );
    // At exit cinder writes a last metrics line.
    let metrics_text = std::fs::read_to_string(&metrics).unwrap_or_default();
    let last = metrics_text.lines().last().unwrap_or("{}");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
    assert!(
        v["api_server"]["requests"].as_u64().unwrap_or(0) >= 10,
        "metrics: {last}"
    );
    assert!(
        v["block_rootfs"]["writes"].as_u64().unwrap_or(0) > 0,
        "metrics: {last}"
    );
    let stderr = s
        .log()
        .split_once("--- stderr ---\n")
        .map(|(_, e)| e.to_string())
        .unwrap_or_default();
    assert_eq!(
        stderr.matches("--enable-pci").count(),
        1,
        "one --enable-pci warning: {stderr}"
    );
}
