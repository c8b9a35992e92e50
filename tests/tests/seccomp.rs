//! seccomp, per thread, on by default (issue 15 item 1). A running cinder has a filter on every
//! thread (`/proc/<pid>/task/*/status`), each thread kind its own; a forbidden system call ends
//! the process with exit code 148 and one line naming the thread and the call, an allowed one
//! does not. The forbidden calls are made by `seccomp_hook` (tests/src/bin/seccomp_hook.rs):
//! cinder's own filters, handler and exit code, installed on a thread named as cinder names
//! it, so that the shipped binary has no such hook. `--seccomp off`, `--no-seccomp` and
//! `--seccomp-filter` (Firecracker's compiled filters) are here too.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder, require_kvm, start_api};
use cinder_tests::http::request;
use cinder_tests::probe;
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir as Scratch;

const HOOK: &str = env!("CARGO_BIN_EXE_seccomp_hook");

fn hook(args: &[&str]) -> Output {
    Command::new(HOOK)
        .args(args)
        .output()
        .expect("run seccomp_hook")
}

/// Each thread of `pid`: (name, Seccomp mode, number of filters).
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).expect("cinder's /proc/pid/task");
    for t in dir.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // a thread that ended meanwhile
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {k} in {status}"))
        };
        out.push((
            field("Name:"),
            field("Seccomp:").parse().expect("a number"),
            field("Seccomp_filters:").parse().expect("a number"),
        ));
    }
    out.sort();
    out
}

/// Every task of a process is filtered (`Seccomp: 2` and at least one filter: KVM's own
/// workers too, which the kernel starts from a vCPU thread and which inherit its filters), and
/// each thread named in `expect` has exactly that many filters. Threads not named (a kind
/// another change adds) must still be filtered; name them here when they come.
fn assert_filters(all: &[(String, u32, u32)], expect: &[(&str, u32)], log: &str) {
    assert!(
        all.iter().all(|(_, mode, n)| *mode == 2 && *n >= 1),
        "a thread without a filter: {all:?}\n{log}"
    );
    for (name, n) in expect {
        let found: Vec<_> = all.iter().filter(|(t, _, _)| t == name).collect();
        assert_eq!(found.len(), 1, "thread {name} in {all:?}\n{log}");
        assert_eq!(found[0].2, *n, "filters of {name} in {all:?}\n{log}");
    }
}

/// The process-wide `Seccomp:` line of `pid`.
fn process_seccomp(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find(|l| l.starts_with("Seccomp:"))
        .unwrap_or_default()
        .to_string()
}

/// Ends a session with SIGTERM (exit 143) and returns its stderr.
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

#[test]
fn a_forbidden_syscall_ends_the_process_with_148_and_one_line() {
    // (thread kind, call, the thread's name in the line, the syscall "number (name)").
    let cases = [
        ("vcpu", "execve", "vcpu0", "59 (execve)"),
        ("vcpu", "socket-unix", "vcpu0", "41 (socket)"),
        ("vcpu", "ioctl-kvm-create-vm", "vcpu0", "16 (ioctl)"),
        ("devices", "socket-inet", "devices", "41 (socket)"),
        ("devices", "execve", "devices", "59 (execve)"),
        ("api", "ptrace", "api", "101 (ptrace)"),
        ("api", "socket-inet", "api", "41 (socket)"),
        ("console-out", "mmap-exec", "console-out", "9 (mmap)"),
        ("vmm", "socket-inet", "main", "41 (socket)"),
        ("vmm", "execve", "main", "59 (execve)"),
        ("vmm", "mmap-exec", "main", "9 (mmap)"),
        // main may spawn threads (next test), never fork.
        ("vmm", "fork", "main", "56 (clone)"),
    ];
    for (kind, call, thread, syscall) in cases {
        let out = hook(&["on", kind, call]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(148),
            "{kind} {call}: stdout {stdout} stderr {stderr}"
        );
        assert_eq!(
            stderr,
            format!(
                "cinder: seccomp: thread {thread} made forbidden syscall {syscall}; exiting with code 148\n"
            ),
            "{kind} {call}"
        );
        assert!(!stdout.contains("survived"), "{kind} {call}: {stdout}");
    }
}

#[test]
fn only_main_may_spawn_threads() {
    // glibc blocks every signal around clone3 in pthread_create, so the kernel cannot run
    // the SIGSYS handler there: the forbidden clone3 kills the process by SIGSYS itself.
    use std::os::unix::process::ExitStatusExt;
    for kind in ["vcpu", "devices", "api", "console-out"] {
        let out = hook(&["on", kind, "spawn-thread"]);
        assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{kind}: {out:?}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("survived"));
    }
    let out = hook(&["on", "vmm", "spawn-thread"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn an_allowed_syscall_does_not_end_the_process() {
    let cases = [
        ("vcpu", "ioctl-kvm-run"),
        ("vcpu", "getpid"),
        ("vcpu", "mmap-rw"),
        ("devices", "socket-unix"),
        ("api", "getpid"),
        ("console-out", "mmap-rw"),
        ("vmm", "ioctl-kvm-create-vm"),
        ("vmm", "socket-unix"),
        ("vmm", "spawn-thread"),
    ];
    for (kind, call) in cases {
        let out = hook(&["on", kind, call]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{kind} {call}: {stderr}");
        assert!(
            stdout.starts_with(&format!("survived {call} ")),
            "{kind} {call}: {stdout}"
        );
        assert!(stderr.is_empty(), "{kind} {call}: {stderr}");
    }
}

#[test]
fn log_mode_lets_a_forbidden_syscall_through() {
    for (kind, call) in [("vcpu", "socket-inet"), ("api", "socket-inet")] {
        let out = hook(&["log", kind, call]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{kind} {call}: {out:?}");
        assert!(stdout.starts_with("survived socket-inet"), "{stdout}");
    }
}

/// Waits (at most `limit`) until `pid` has threads named by each of `names`.
fn wait_threads(pid: u32, names: &[&str], limit: Duration) -> Vec<(String, u32, u32)> {
    let until = Instant::now() + limit;
    loop {
        let t = threads(pid);
        if names.iter().all(|n| t.iter().any(|(name, _, _)| name == n)) || Instant::now() > until {
            return t;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_thread_of_a_running_cinder_has_its_filter_under_cinder() {
    require_kvm();
    let d = Scratch::new("seccomp-threads");
    let sock = d.join("api.sock");
    let s = start_api(&sock, &[]);
    let pid = s.pid();
    // The socket takes connections as soon as it is bound, before main installs its filter;
    // a request answered means main is serving (its filter is on) and so is the API thread.
    assert_eq!(request(&sock, "GET", "/", None).status, 200, "{}", s.log());
    // Before InstanceStart: main and api.
    assert_eq!(process_seccomp(pid), "Seccomp:\t2", "{}", s.log());
    // main: its table and the one that answers clone3 with ENOSYS; api: its table.
    assert_filters(
        &threads(pid),
        &[("api", 1), ("cinder", 2), ("log-writer", 1)],
        &s.log(),
    );
    let body = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "probe.run=tick probe.ticks=1000000 probe.tick_ms=20"}}"#,
        probe::elf_path().display()
    );
    assert_eq!(
        request(&sock, "PUT", "/boot-source", Some(&body)).status,
        204
    );
    assert_eq!(
        request(
            &sock,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 128}"#)
        )
        .status,
        204
    );
    let r = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}\n{}", s.log());
    let names = [
        "api",
        "cinder",
        "console-out",
        "devices",
        "log-writer",
        "vcpu0",
        "vcpu1",
    ];
    let all = wait_threads(pid, &names, Duration::from_secs(30));
    // main and api as before; the threads main spawned: main's two (inherited) and their own.
    assert_filters(
        &all,
        &[
            ("api", 1),
            ("cinder", 2),
            ("console-out", 3),
            ("devices", 3),
            ("log-writer", 1),
            ("vcpu0", 3),
            ("vcpu1", 3),
        ],
        &s.log(),
    );
    assert_eq!(
        request(&sock, "GET", "/", None).json()["state"],
        "Running",
        "{}",
        s.log()
    );
    let stderr = stop(s);
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

#[test]
fn seccomp_off_installs_no_filter_and_warns() {
    for flags in [&["--seccomp", "off"][..], &["--no-seccomp"][..]] {
        let d = Scratch::new("seccomp-off");
        let sock = d.join("api.sock");
        let s = start_api(&sock, flags);
        assert_eq!(request(&sock, "GET", "/", None).status, 200);
        let t = threads(s.pid());
        assert!(
            t.len() >= 2 && t.iter().all(|(_, mode, n)| *mode == 0 && *n == 0),
            "{flags:?}: {t:?}"
        );
        let stderr = stop(s);
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("seccomp")).collect();
        assert_eq!(lines.len(), 1, "{flags:?}: {stderr}");
        assert!(
            lines[0].starts_with("cinder: warning: seccomp is off"),
            "{stderr}"
        );
    }
}

#[test]
fn seccomp_log_installs_filters_quietly() {
    let d = Scratch::new("seccomp-log");
    let sock = d.join("api.sock");
    let s = start_api(&sock, &["--seccomp", "log"]);
    assert_eq!(request(&sock, "GET", "/", None).status, 200);
    let t = threads(s.pid());
    assert_filters(&t, &[("api", 1), ("cinder", 2)], "");
    let stderr = stop(s);
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

#[test]
fn a_firecracker_seccomp_filter_file_is_installed() {
    let d = Scratch::new("seccomp-file");
    let file = d.join("filters.bpf");
    let out = hook(&["dump", file.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{out:?}");
    let sock = d.join("api.sock");
    let s = start_api(&sock, &["--seccomp-filter", file.to_str().expect("utf-8")]);
    assert_eq!(request(&sock, "GET", "/", None).status, 200);
    let t = threads(s.pid());
    // Firecracker's programs alone (no ENOSYS filter): one each.
    assert_filters(&t, &[("api", 1), ("cinder", 1)], "");
    let stderr = stop(s);
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

#[test]
fn a_firecracker_seccomp_filter_file_runs_the_probe_with_its_devices_under_cinder() {
    require_kvm();
    let d = Scratch::new("seccomp-file-boot");
    let file = d.join("filters.bpf");
    let out = hook(&["dump", file.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{out:?}");
    let mut c = cinder();
    c.arg("--seccomp-filter")
        .arg(&file)
        .arg("--kernel")
        .arg(probe::elf_path())
        .args(["--cmdline", "probe.run=boot,rng", "--rng"]);
    let r = cinder_tests::runner::run(c, Duration::from_secs(120), |_| false);
    let what = format!("{}\n--- stderr ---\n{}", r.stdout, r.stderr);
    assert!(!r.timed_out, "timed out: {what}");
    assert_eq!(r.status.and_then(|s| s.code()), Some(0), "{what}");
    let log = probe::parse(&r.stdout);
    assert!(log.all_passed(), "{what}");
    assert_eq!(
        log.check("rng").map(|c| c.status),
        Some(probe::Status::Ok),
        "{what}"
    );
}

#[test]
fn bad_seccomp_filter_files_are_refused_with_one_line() {
    let d = Scratch::new("seccomp-badfile");
    let cases: [(&Path, &str); 3] = [
        (
            &d.file("json", b"{\"vmm\": {}}"),
            "not a seccompiler-bin filter file",
        ),
        (&d.file("huge", &[0u8; 100_001]), "at most 100000"),
        (Path::new("/nonexistent/filters.bpf"), "cannot read it"),
    ];
    for (path, msg) in cases {
        let out = cinder()
            .arg("--seccomp-filter")
            .arg(path)
            .args(["--api-sock", d.join("api.sock").to_str().expect("utf-8")])
            .output()
            .expect("run cinder");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{path:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{path:?}: {stderr}");
        assert!(
            stderr.contains("--seccomp-filter") && stderr.contains(msg),
            "{stderr}"
        );
        assert!(!d.join("api.sock").exists());
    }
    // A file without the "vcpu" filter.
    let mut f = Vec::new();
    f.extend(0u64.to_le_bytes());
    let empty = d.file("empty", &f);
    let out = cinder()
        .arg("--seccomp-filter")
        .arg(&empty)
        .arg("--api-sock")
        .arg(d.join("api.sock"))
        .output()
        .expect("run cinder");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no \"vmm\" filter"), "{stderr}");
}

#[test]
fn help_documents_the_modes_and_the_exit_code() {
    let out = cinder().arg("--help").output().expect("run cinder");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--seccomp <MODE>"), "{help}");
    assert!(help.contains("148"), "{help}");
    // The modes are checked by clap: a bad one is a usage error.
    let out = cinder()
        .args(["--seccomp", "strict"])
        .output()
        .expect("run cinder");
    assert_eq!(out.status.code(), Some(2));
}
