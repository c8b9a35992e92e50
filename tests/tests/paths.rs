//! The host paths a client may make cinder touch (issue 15 items 3 and 4, issue 18 items 2
//! and 12): kernel, initrd and drive images are regular files (a block device as a drive only
//! with `--allow-block-devices`), opened without blocking, and checked when they are given;
//! log and metrics destinations are not symbolic links and are created 0600; a refused
//! configuration changes nothing and can be corrected; guest memory stays out of core dumps.
//! The tests without `under_cinder` boot no guest.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder, require_kvm, start_api};
use cinder_tests::http::{request, Response};
use cinder_tests::probe;
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir as Scratch;

const NO_KVM: &str = "/nonexistent/kvm";

fn fault(r: &Response) -> String {
    r.json()["fault_message"]
        .as_str()
        .unwrap_or_else(|| panic!("no fault_message in {:?}", r.body))
        .to_string()
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().expect("run mkfifo");
    assert!(st.success(), "mkfifo {}", p.display());
}

/// Runs cinder with `args` (bounded: 20 s, then it is killed and the test fails), and returns
/// its exit code and what it wrote to stderr.
fn run_bounded(args: &[&str]) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = cinder()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cinder");
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for cinder") {
            break st;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cinder {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.code(), err)
}

/// cinder `args` fails with exit 1 and one line containing every string of `expect`.
fn refused(args: &[&str], expect: &[&str]) {
    let (code, log) = run_bounded(args);
    assert_eq!(code, Some(1), "cinder {args:?}: {log}");
    assert_eq!(
        log.trim().lines().count(),
        1,
        "one line for {args:?}: {log}"
    );
    for e in expect {
        assert!(log.contains(e), "cinder {args:?}: {log} lacks {e:?}");
    }
}

/// cinder `args` gets past its configuration: it stops at the missing KVM device.
fn configured(args: &[&str]) {
    let mut all = args.to_vec();
    all.extend(["--kvm-device", NO_KVM]);
    let (code, log) = run_bounded(&all);
    assert_eq!(code, Some(1), "cinder {all:?}: {log}");
    assert!(
        log.contains(NO_KVM),
        "cinder {all:?} refused its configuration: {log}"
    );
}

fn stop(mut s: Session) {
    s.signal(libc::SIGTERM);
    let st = s
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    assert_eq!(st.code(), Some(143), "{}", s.log());
}

fn kernel() -> String {
    probe::elf_path().display().to_string()
}

fn boot_body(kernel: &Path) -> String {
    format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display())
}

/// `GET /` answers, within `limit` (the API thread itself waits long for the control loop, so a
/// blocked loop shows as a slow answer).
fn answers_quickly(sock: &Path, limit: Duration) {
    let t = Instant::now();
    let r = request(sock, "GET", "/", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        t.elapsed() < limit,
        "GET / took {:?}: the control loop was blocked",
        t.elapsed()
    );
}

/// Issue 18 item 2: a FIFO as kernel or initrd froze the control loop (no answer to `GET /`,
/// SIGTERM ignored) until the FIFO got a writer. It is refused at once, with a clear reason,
/// at the PUT, at InstanceStart (a file swapped for a FIFO after the PUT) and on the command
/// line, and cinder keeps answering.
#[test]
fn fifo_as_kernel_or_initrd_is_refused_and_the_api_keeps_answering() {
    let d = Scratch::new("paths-fifo");
    let sock = d.join("api.sock");
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let s = start_api(&sock, &["--kvm-device", NO_KVM]);
    let r = request(&sock, "PUT", "/boot-source", Some(&boot_body(&fifo)));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        fault(&r),
        format!(
            "boot-source.kernel_image_path: kernel image {} is a FIFO, not a regular file",
            fifo.display()
        )
    );
    answers_quickly(&sock, Duration::from_secs(2));
    let body = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "{}"}}"#,
        kernel(),
        fifo.display()
    );
    let r = request(&sock, "PUT", "/boot-source", Some(&body));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(fault(&r).contains("initrd_path: initrd"), "{}", fault(&r));
    assert!(fault(&r).contains("is a FIFO"), "{}", fault(&r));
    // Nothing of the refused requests was recorded.
    let v = request(&sock, "GET", "/vm/config", None).json();
    assert!(v["boot-source"].is_null(), "{v}");

    // A good kernel, replaced by a FIFO before InstanceStart.
    let k = d.join("vmlinux");
    std::fs::copy(probe::elf_path(), &k).expect("copy the probe");
    let r = request(&sock, "PUT", "/boot-source", Some(&boot_body(&k)));
    assert_eq!(r.status, 204, "{r:?}");
    std::fs::remove_file(&k).unwrap();
    mkfifo(&k);
    let t = Instant::now();
    let r = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(fault(&r).contains("is a FIFO"), "{}", fault(&r));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    answers_quickly(&sock, Duration::from_secs(2));
    assert_eq!(
        request(&sock, "GET", "/", None).json()["state"],
        "Not started"
    );
    stop(s);

    // The command line and the config file: one line, at once.
    let f = fifo.to_str().unwrap();
    refused(&["--kernel", f], &["kernel image", f, "is a FIFO"]);
    refused(
        &["--kernel", &kernel(), "--initrd", f],
        &["initrd", f, "is a FIFO"],
    );
    let cfg = d.file(
        "vm.json",
        format!(r#"{{"boot-source": {}}}"#, boot_body(&fifo)).as_bytes(),
    );
    refused(
        &["--config-file", cfg.to_str().unwrap(), "--no-api"],
        &["is a FIFO"],
    );
}

/// Issue 15 item 3: a symbolic link as kernel or initrd is refused, not followed.
#[test]
fn symlinked_kernel_is_refused() {
    let d = Scratch::new("paths-klink");
    let link = d.join("vmlinux");
    std::os::unix::fs::symlink(probe::elf_path(), &link).unwrap();
    let l = link.to_str().unwrap();
    refused(&["--kernel", l], &["kernel image", l, "symbolic link"]);
    let sock = d.join("api.sock");
    let s = start_api(&sock, &[]);
    let r = request(&sock, "PUT", "/boot-source", Some(&boot_body(&link)));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(fault(&r).contains("symbolic link"), "{}", fault(&r));
    stop(s);
}

/// Issue 18 item 12b: a missing kernel, initrd or drive image is a 400 at the PUT (it used to
/// be a 204, failing only at InstanceStart), and the refusal changes nothing.
#[test]
fn missing_files_are_refused_at_the_put() {
    let d = Scratch::new("paths-missing");
    let sock = d.join("api.sock");
    let s = start_api(&sock, &[]);
    let missing = d.join("missing");
    let m = missing.display().to_string();
    let r = request(&sock, "PUT", "/boot-source", Some(&boot_body(&missing)));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        fault(&r),
        format!("boot-source.kernel_image_path: kernel image {m} does not exist: check the path")
    );
    let body = format!(
        r#"{{"kernel_image_path": "{}", "initrd_path": "{m}"}}"#,
        kernel()
    );
    let r = request(&sock, "PUT", "/boot-source", Some(&body));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        fault(&r),
        format!("boot-source.initrd_path: initrd {m} does not exist: check the path")
    );
    let drive = format!(r#"{{"drive_id": "d1", "path_on_host": "{m}", "is_root_device": false}}"#);
    let r = request(&sock, "PUT", "/drives/d1", Some(&drive));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        fault(&r),
        format!("drives[d1].path_on_host: block image {m} does not exist: check the path")
    );
    let v = request(&sock, "GET", "/vm/config", None).json();
    assert!(v["boot-source"].is_null(), "{v}");
    assert_eq!(v["drives"], serde_json::json!([]), "{v}");
    stop(s);
}

/// A loop device over a scratch file, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn new(backing: &Path) -> LoopDevice {
        let out: Output = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup --find --show {}: {}",
            backing.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Issue 15 item 3: a host block device backs a drive only with `--allow-block-devices`, on
/// the command line, in the config file and through the API alike, with one message; a
/// character device never does.
#[test]
fn block_device_as_drive_needs_the_flag() {
    let d = Scratch::new("paths-blockdev");
    let img = d.file("backing.img", &vec![0u8; 1 << 20]);
    let lo = LoopDevice::new(&img);
    let dev = lo.0.as_str();
    let msg = format!(
        "block image {dev} is a block device: cinder attaches host block devices only when started with --allow-block-devices"
    );
    let spec = format!("path={dev},id=d1");
    let k = kernel();
    refused(&["--kernel", &k, "--drive", &spec], &[&msg]);
    configured(&["--kernel", &k, "--drive", &spec, "--allow-block-devices"]);
    let cfg = d.file(
        "vm.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{k}"}},
                "drives": [{{"drive_id": "d1", "path_on_host": "{dev}", "is_root_device": false}}]}}"#
        )
        .as_bytes(),
    );
    let c = cfg.to_str().unwrap();
    refused(&["--config-file", c], &[&msg]);
    configured(&["--config-file", c, "--allow-block-devices"]);

    let body = format!(r#"{{"drive_id": "d1", "path_on_host": "{dev}", "is_root_device": false}}"#);
    let sock = d.join("api.sock");
    let s = start_api(&sock, &[]);
    let r = request(&sock, "PUT", "/drives/d1", Some(&body));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(fault(&r), format!("drives[d1].path_on_host: {msg}"));
    stop(s);
    let s = start_api(&sock, &["--allow-block-devices"]);
    let r = request(&sock, "PUT", "/drives/d1", Some(&body));
    assert_eq!(r.status, 204, "{r:?}");
    // Other non-regular files stay refused, flag or not.
    let null = r#"{"drive_id": "d2", "path_on_host": "/dev/null", "is_root_device": false}"#;
    let r = request(&sock, "PUT", "/drives/d2", Some(null));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        fault(&r),
        "drives[d2].path_on_host: block image /dev/null is a character device, not a regular file"
    );
    stop(s);
    refused(
        &[
            "--kernel",
            &k,
            "--drive",
            "path=/dev/null",
            "--allow-block-devices",
        ],
        &["/dev/null is a character device"],
    );
}

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Issue 15 item 3 and issue 18 item 12a: a symbolic link as log or metrics path is refused
/// (not followed), the refused `PUT /logger` changes nothing in `GET /vm/config`, and the
/// files cinder creates are 0600.
#[test]
fn symlinked_log_and_metrics_paths_are_refused() {
    let d = Scratch::new("paths-loglink");
    let target = d.file("target", b"");
    let link = d.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let l = link.to_str().unwrap();
    let sock = d.join("api.sock");
    let s = start_api(&sock, &[]);
    let r = request(
        &sock,
        "PUT",
        "/logger",
        Some(&format!(r#"{{"log_path": "{l}", "level": "Debug"}}"#)),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(fault(&r).contains(l), "{}", fault(&r));
    assert!(fault(&r).contains("symbolic link"), "{}", fault(&r));
    let r = request(
        &sock,
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{l}"}}"#)),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(fault(&r).contains("symbolic link"), "{}", fault(&r));
    let v = request(&sock, "GET", "/vm/config", None).json();
    assert!(v["logger"].is_null(), "a refused logger was recorded: {v}");
    assert!(
        v["metrics"].is_null(),
        "a refused metrics path was recorded: {v}"
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        b"",
        "written through the link"
    );
    // The same, corrected: taken, and created 0600.
    let log = d.join("cinder.log");
    let r = request(
        &sock,
        "PUT",
        "/logger",
        Some(&format!(r#"{{"log_path": "{}"}}"#, log.display())),
    );
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(mode_of(&log), 0o600, "log file mode");
    stop(s);
    refused(
        &["--api-sock", sock.to_str().unwrap(), "--log-path", l],
        &["symbolic link"],
    );
    refused(
        &["--api-sock", sock.to_str().unwrap(), "--metrics-path", l],
        &["symbolic link"],
    );
}

/// Issue 18 item 12b, metrics: a metrics path that cannot be opened is a 400 at the PUT (it
/// used to be a 204, then a corrected PUT was refused as "already configured" and the VM ran
/// without metrics); the corrected PUT is taken and the file exists at once, 0600.
#[test]
fn metrics_path_is_opened_at_the_put_and_can_be_corrected() {
    let d = Scratch::new("paths-metrics");
    let sock = d.join("api.sock");
    let s = start_api(&sock, &[]);
    let bad = d.join("no/such/dir/metrics.json");
    let r = request(
        &sock,
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, bad.display())),
    );
    assert_eq!(r.status, 400, "{r:?}");
    assert!(
        fault(&r).starts_with(&format!(
            "metrics.metrics_path: cannot open {}: No such file",
            bad.display()
        )),
        "{}",
        fault(&r)
    );
    let good = d.join("metrics.json");
    let r = request(
        &sock,
        "PUT",
        "/metrics",
        Some(&format!(r#"{{"metrics_path": "{}"}}"#, good.display())),
    );
    assert_eq!(r.status, 204, "the corrected PUT /metrics: {r:?}");
    assert!(good.exists(), "created at the PUT");
    assert_eq!(mode_of(&good), 0o600, "metrics file mode");
    let v = request(&sock, "GET", "/vm/config", None).json();
    assert_eq!(v["metrics"]["metrics_path"], good.display().to_string());
    let r = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    stop(s);
    let text = std::fs::read_to_string(&good).unwrap();
    assert!(text.lines().count() >= 1, "{text}");
    // A config file's metrics path is checked before anything runs, too.
    let cfg = d.file(
        "vm.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}"}}, "metrics": {{"metrics_path": "{}"}}}}"#,
            kernel(),
            bad.display()
        )
        .as_bytes(),
    );
    refused(
        &[
            "--config-file",
            cfg.to_str().unwrap(),
            "--kvm-device",
            NO_KVM,
        ],
        &["metrics.metrics_path: cannot open", "no/such/dir"],
    );
}

/// The mappings of `pid` at least `min_kib` large: (header line, VmFlags).
fn big_mappings(pid: u32, min_kib: u64) -> Vec<(String, String)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("read smaps");
    let mut out = Vec::new();
    let mut header = String::new();
    let mut size = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            header = line.to_string();
            size = 0;
        } else if let Some(v) = line.strip_prefix("Size:") {
            size = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        } else if let Some(flags) = line.strip_prefix("VmFlags:") {
            if size >= min_kib {
                out.push((header.clone(), flags.trim().to_string()));
            }
        }
    }
    out
}

/// Issue 15 item 4: guest memory is `MADV_DONTDUMP`: the running cinder's guest RAM mapping
/// carries the `dd` flag in /proc/<pid>/smaps, so a core dump holds none of the guest's memory.
#[test]
fn guest_memory_is_not_dumped_under_cinder() {
    require_kvm();
    let mut c = cinder();
    c.args([
        "--kernel",
        &kernel(),
        "--memory",
        "256",
        "--cmdline",
        "probe.run=tick probe.ticks=1000000 probe.tick_ms=50",
    ]);
    let mut s = Session::start(c);
    s.expect("PROBE tick", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    // Guest RAM is the only mapping of 256 MiB; nothing else in cinder is near that size.
    let maps = big_mappings(s.pid(), 200 << 10);
    assert!(!maps.is_empty(), "no guest memory mapping found in smaps");
    for (header, flags) in &maps {
        assert!(
            flags.split_whitespace().any(|f| f == "dd"),
            "guest memory mapping {header} lacks dd: VmFlags {flags}"
        );
    }
    stop(s);
}

/// Optional confinement (`--confine-paths DIR`, Landlock): a client path written outside DIR
/// is refused at the PUT with a precise message, and one inside DIR that leads out through a
/// symbolic link is refused by the kernel itself.
#[test]
fn confine_paths_refuses_what_is_outside_the_directory() {
    let d = Scratch::new("paths-confine");
    let root = d.join("root");
    std::fs::create_dir(&root).unwrap();
    let k = root.join("vmlinux");
    std::fs::copy(probe::elf_path(), &k).expect("copy the probe");
    let outside = d.file("outside.img", &[0u8; 4096]);
    let outside_k = d.join("vmlinux");
    std::fs::copy(probe::elf_path(), &outside_k).expect("copy the probe");
    let sock = root.join("api.sock");
    let r = root.display().to_string();
    let s = start_api(&sock, &["--confine-paths", &r, "--kvm-device", NO_KVM]);
    let resp = request(&sock, "PUT", "/boot-source", Some(&boot_body(&outside_k)));
    assert_eq!(resp.status, 400, "{resp:?}");
    assert_eq!(
        fault(&resp),
        format!(
            "boot-source.kernel_image_path: kernel image {} is not beneath {r}: cinder was started with --confine-paths {r}, give a path beneath it",
            outside_k.display()
        )
    );
    let resp = request(&sock, "PUT", "/boot-source", Some(&boot_body(&k)));
    assert_eq!(resp.status, 204, "{resp:?}");
    // Written beneath the directory, leading out of it: the kernel refuses the open.
    let link = root.join("link.img");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let body = format!(
        r#"{{"drive_id": "d1", "path_on_host": "{}", "is_root_device": false}}"#,
        link.display()
    );
    let resp = request(&sock, "PUT", "/drives/d1", Some(&body));
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(
        fault(&resp).contains("Permission denied"),
        "{}",
        fault(&resp)
    );
    for (route, body) in [
        (
            "/logger",
            format!(r#"{{"log_path": "{}/log"}}"#, d.0.display()),
        ),
        (
            "/metrics",
            format!(r#"{{"metrics_path": "{}/m"}}"#, d.0.display()),
        ),
        (
            "/vsock",
            format!(
                r#"{{"guest_cid": 3, "uds_path": "{}/v.sock"}}"#,
                d.0.display()
            ),
        ),
    ] {
        let resp = request(&sock, "PUT", route, Some(&body));
        assert_eq!(resp.status, 400, "{route}: {resp:?}");
        assert!(
            fault(&resp).contains("is not beneath"),
            "{route}: {}",
            fault(&resp)
        );
    }
    assert!(!d.join("log").exists() && !d.join("m").exists() && !d.join("v.sock").exists());
    stop(s);
    // The command line: the same rule, before anything runs.
    refused(
        &[
            "--confine-paths",
            &r,
            "--kernel",
            outside_k.to_str().unwrap(),
        ],
        &["is not beneath", "--confine-paths"],
    );
    refused(
        &[
            "--confine-paths",
            outside.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        &["--confine-paths", "not a directory"],
    );
}

/// Confined, cinder still reaches the KVM device and everything beneath DIR: the probe boots
/// from there with a drive and a metrics file there, and is done.
#[test]
fn confine_paths_boots_a_guest_from_the_directory_under_cinder() {
    require_kvm();
    let d = Scratch::new("paths-confine-boot");
    let root = d.join("root");
    std::fs::create_dir(&root).unwrap();
    let k = root.join("vmlinux");
    std::fs::copy(probe::elf_path(), &k).expect("copy the probe");
    let img = root.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = root.join("api.sock");
    let r = root.display().to_string();
    let mut s = start_api(&sock, &["--confine-paths", &r]);
    let body = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.run=boot"}}"#,
        k.display()
    );
    assert_eq!(
        request(&sock, "PUT", "/boot-source", Some(&body)).status,
        204
    );
    let drive = format!(
        r#"{{"drive_id": "d1", "path_on_host": "{}", "is_root_device": false}}"#,
        img.display()
    );
    assert_eq!(
        request(&sock, "PUT", "/drives/d1", Some(&drive)).status,
        204
    );
    let m = root.join("metrics.json");
    let body = format!(r#"{{"metrics_path": "{}"}}"#, m.display());
    assert_eq!(request(&sock, "PUT", "/metrics", Some(&body)).status, 204);
    let resp = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(resp.status, 204, "{resp:?}\n{}", s.log());
    s.expect_line("PROBE DONE", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    let st = s
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.code(), Some(0), "{}", s.log());
    let log = probe::parse(&s.console());
    assert!(log.all_passed(), "{}", s.log());
    assert!(m.exists(), "metrics file beneath the directory");
}
