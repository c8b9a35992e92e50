//! `cinder run IMAGE -- CMD` (vmm/src/run, the guest agent's init role in
//! resources/guest-agent): each test boots the Linux guest `scripts/run.sh` would boot here
//! (the test profile on a kvm-pvm host: ~60 s of CPU per boot) with the agent's initramfs and
//! the busybox root filesystem of `resources/guest/build-rootfs.sh` as the image, and checks
//! what the command saw and what `cinder run` returned. Boots are few: one command per VM, so
//! each test combines the checks one boot allows (issue 20, items 1 and 3).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder, require_kvm};
use cinder_tests::linux::{pattern, RootFs, TempDir};

/// A whole `cinder run`, boot included, on a busy emulated host.
const DEADLINE: Duration = Duration::from_secs(1200);

struct Out {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Out {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn expect(&self, code: i32) {
        assert_eq!(
            self.code,
            Some(code),
            "exit code; stdout {:?}, stderr {:?}",
            self.stdout(),
            self.stderr()
        );
    }
}

/// The image: the cached busybox rootfs (used read-only: cinder run never writes it).
fn image() -> PathBuf {
    RootFs::get().0.join("rootfs.ext4")
}

fn spawn(args: &[&str], stdin: bool) -> Child {
    spawn_env(args, stdin, &[])
}

fn spawn_env(args: &[&str], stdin: bool, env: &[(&str, &Path)]) -> Child {
    let mut c: Command = cinder();
    for (k, v) in env {
        c.env(k, v);
    }
    c.arg("run")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if stdin {
        c.stdin(Stdio::piped());
    }
    c.spawn().expect("spawn cinder run")
}

/// Waits for `child` (bounded), feeding `input` to its stdin, collecting its output.
fn finish(mut child: Child, input: Option<Vec<u8>>) -> Out {
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    if let (Some(data), Some(mut w)) = (input, child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let until = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cinder run did not end within {} s", DEADLINE.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Out {
        code: status.code(),
        stdout: t_out.join().expect("stdout reader"),
        stderr: t_err.join().expect("stderr reader"),
    }
}

fn run(args: &[&str]) -> Out {
    require_kvm();
    finish(spawn(args, false), None)
}

fn sha256(data: &[u8]) -> String {
    let mut c = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut w = c.stdin.take().expect("stdin");
    let d = data.to_vec();
    let t = std::thread::spawn(move || w.write_all(&d));
    let out = c.wait_with_output().expect("sha256sum");
    t.join().expect("writer").expect("write to sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn file_sha256(p: &Path) -> String {
    sha256(&std::fs::read(p).expect("read image"))
}

#[test]
fn run_true_exits_0_under_cinder() {
    let img = image();
    run(&[img.to_str().unwrap(), "--", "true"]).expect(0);
}

#[test]
fn run_false_exits_1_and_env_workdir_user_are_honoured_under_cinder() {
    let img = image();
    let o = run(&[
        "-e",
        "CINDER_RUN_FOO=bar baz",
        "-w",
        "/work/dir",
        "-u",
        "1000:1001",
        img.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "env | grep ^CINDER_RUN_FOO=; pwd; id -u; id -g; false",
    ]);
    o.expect(1);
    assert_eq!(
        o.stdout(),
        "CINDER_RUN_FOO=bar baz\n/work/dir\n1000\n1001\n",
        "{}",
        o.stderr()
    );
}

#[test]
fn run_exit_42_with_1mib_of_random_stdout_byte_exact_and_stderr_apart_and_copy_out_under_cinder() {
    // The random bytes come from the host through a copied-in volume: /dev/urandom in the
    // guest would cost minutes of emulated kernel time on a kvm-pvm host.
    let dir = TempDir::new("run-out");
    std::fs::create_dir(dir.join("in")).unwrap();
    let out = pattern(42, 1 << 20);
    let err = pattern(43, 256 << 10);
    std::fs::write(dir.join("in/r.bin"), &out).unwrap();
    std::fs::write(dir.join("in/e.bin"), &err).unwrap();
    let img = image();
    let copied = dir.join("copied.bin");
    let vol = format!("{}:/in", dir.join("in").display());
    let spec = format!("/in/r.bin:{}", copied.display());
    let o = run(&[
        "-v",
        &vol,
        "--copy-out",
        &spec,
        img.to_str().unwrap(),
        "sh",
        "-c",
        "cat /in/r.bin; cat /in/e.bin >&2; sha256sum /in/r.bin >&2; exit 42",
    ]);
    o.expect(42);
    assert_eq!(
        o.stdout.len(),
        out.len(),
        "stderr tail: {}",
        String::from_utf8_lossy(&o.stderr[o.stderr.len().saturating_sub(300)..])
    );
    assert!(
        o.stdout == out,
        "stdout differs from the bytes the command wrote"
    );
    assert!(
        o.stderr.starts_with(&err),
        "stderr does not start with the command's 256 KiB"
    );
    let tail = String::from_utf8_lossy(&o.stderr[err.len()..]).into_owned();
    assert_eq!(
        tail,
        format!("{}  /in/r.bin\n", sha256(&out)),
        "the guest's sha256"
    );
    assert!(
        std::fs::read(&copied).expect("--copy-out file") == out,
        "--copy-out brought back other bytes"
    );
}

#[test]
fn run_kill_9_self_exits_137_and_a_read_only_volume_is_readable_not_writable_under_cinder() {
    let img = image();
    let dir = TempDir::new("run-vol");
    std::fs::create_dir(dir.join("v")).unwrap();
    std::fs::write(dir.join("v/hello.txt"), b"from the host\n").unwrap();
    let spec = format!("{}:/data:ro", dir.join("v").display());
    let o = run(&[
        "-v",
        &spec,
        img.to_str().unwrap(),
        "sh",
        "-c",
        "cat /data/hello.txt; touch /data/x 2>/dev/null || echo write-refused; kill -9 $$",
    ]);
    o.expect(137);
    assert_eq!(
        o.stdout(),
        "from the host\nwrite-refused\n",
        "{}",
        o.stderr()
    );
}

#[test]
fn run_missing_binary_exits_127_under_cinder() {
    let img = image();
    let o = run(&[img.to_str().unwrap(), "no-such-binary-cinder"]);
    o.expect(127);
    assert!(
        o.stderr().contains("no-such-binary-cinder"),
        "{}",
        o.stderr()
    );
}

#[test]
fn run_non_executable_file_exits_126_under_cinder() {
    let img = image();
    // /etc/fstab is a regular file without execute permission in the image.
    let o = run(&[img.to_str().unwrap(), "/etc/fstab"]);
    o.expect(126);
    assert!(o.stderr().contains("ermission denied"), "{}", o.stderr());
}

#[test]
fn run_broken_image_exits_125_with_one_line() {
    let dir = TempDir::new("run-broken");
    let bad = dir.file("broken.img", &vec![0x5a; 1 << 20]);
    // No guest boots: the image is refused first.
    let o = finish(spawn(&[bad.to_str().unwrap(), "true"], false), None);
    o.expect(125);
    let err = o.stderr();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not an OCI layout, a docker-archive tar or an ext4 image"),
        "{err}"
    );
    let o = finish(
        spawn(&["/nonexistent/cinder-image.ext4", "true"], false),
        None,
    );
    o.expect(125);
    assert_eq!(o.stderr().lines().count(), 1, "{}", o.stderr());
}

#[test]
fn run_1mib_stdin_through_cat_comes_back_byte_exact_under_cinder() {
    require_kvm();
    let img = image();
    let data = pattern(20, 1 << 20);
    let o = finish(
        spawn(&["-i", img.to_str().unwrap(), "cat"], true),
        Some(data.clone()),
    );
    o.expect(0);
    assert_eq!(o.stdout.len(), data.len(), "{}", o.stderr());
    assert!(o.stdout == data, "stdin came back changed");
}

#[test]
fn run_timeout_kills_the_process_group_and_ends_the_vm_under_cinder() {
    let img = image();
    let o = run(&[
        "--timeout",
        "2",
        img.to_str().unwrap(),
        "sh",
        "-c",
        "sleep 100 & sleep 100",
    ]);
    o.expect(124);
    // The agent reaps every process it killed (it is PID 1: none can escape it); one that
    // survived would be reported on stderr.
    assert!(!o.stderr().contains("still running"), "{}", o.stderr());
}

#[test]
fn run_two_at_once_do_not_see_each_others_writes_and_the_image_is_unchanged_under_cinder() {
    require_kvm();
    let img = image();
    let before = file_sha256(&img);
    let script = |me: &str| {
        format!(
            "echo {me} > /shared; mkdir -p /etc/x; echo {me} > /etc/x/{me}; sleep 20; \
             cat /shared; ls /etc/x"
        )
    };
    let (sa, sb) = (script("a"), script("b"));
    // Both restore from one template (its memory mapped MAP_PRIVATE by each).
    let a = spawn(
        &["--verbose", img.to_str().unwrap(), "sh", "-c", &sa],
        false,
    );
    let b = spawn(
        &["--verbose", img.to_str().unwrap(), "sh", "-c", &sb],
        false,
    );
    let (oa, ob) = (finish(a, None), finish(b, None));
    oa.expect(0);
    ob.expect(0);
    let (ta, tb) = (
        template_dir(&oa.stderr(), RESTORED),
        template_dir(&ob.stderr(), RESTORED),
    );
    assert_eq!(ta, tb, "the two runs restored from different templates");
    assert_eq!(oa.stdout(), "a\na\n");
    assert_eq!(ob.stdout(), "b\nb\n");
    assert_eq!(
        file_sha256(&img),
        before,
        "cinder run wrote to the cached image"
    );
}

#[test]
fn run_tty_gives_the_command_a_terminal_and_sigterm_is_forwarded_to_it_under_cinder() {
    require_kvm();
    let img = image();
    // No terminal on the test's side: the guest's pty gets 24x80. Once the command says
    // "ready", SIGTERM to cinder run must reach it (its trap exits 3).
    let mut child = spawn(
        &[
            "-t",
            img.to_str().unwrap(),
            "sh",
            "-c",
            "tty; stty size; trap 'echo got-term; exit 3' TERM; echo ready; \
             while :; do sleep 1; done",
        ],
        false,
    );
    let mut so = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = so.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let until = Instant::now() + DEADLINE;
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => seen.extend_from_slice(&chunk),
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "no \"ready\" from the command ({e}); output so far {:?}",
                    String::from_utf8_lossy(&seen)
                );
            }
        }
    }
    // The front-end runs under its seccomp filter (mode 2), every one of its threads.
    let tasks = format!("/proc/{}/task", child.id());
    let mut threads = 0;
    for t in std::fs::read_dir(&tasks).expect("read the front-end's threads") {
        let status = std::fs::read_to_string(t.expect("a thread").path().join("status"))
            .expect("read a thread's status");
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "a thread of cinder run has no seccomp filter:\n{status}"
        );
        threads += 1;
    }
    assert!(
        threads >= 3,
        "main, signals, terminal size: {threads} threads"
    );
    // SAFETY: signals our own child process.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("cinder run did not end after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    reader.join().expect("reader");
    while let Ok(chunk) = rx.try_recv() {
        seen.extend_from_slice(&chunk);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let out = String::from_utf8_lossy(&seen).replace('\r', "");
    assert_eq!(status.code(), Some(3), "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "/dev/pts/0\n24 80\nready\ngot-term\n", "{err}");
}

/// `sha256sum` of a file, as lowercase hex.
fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_string()
}

/// A `docker save`-style archive (docker-archive) made here, with no Docker: one layer holding
/// the host's static busybox and a few of its applet links, and a config whose Entrypoint, Cmd,
/// Env, WorkingDir and User the run must use.
fn docker_archive(dir: &TempDir) -> PathBuf {
    let root = dir.join("layer-root");
    std::fs::create_dir_all(root.join("bin")).expect("mkdir bin");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy /bin/busybox");
    for applet in ["sh", "echo", "pwd", "id", "env"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    let ar = dir.join("archive");
    std::fs::create_dir_all(ar.join("layer1")).expect("mkdir layer1");
    let layer = ar.join("layer1/layer.tar");
    let st = Command::new("tar")
        .args([
            "--sort=name",
            "--mtime=@0",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
        ])
        .arg(&root)
        .arg("-cf")
        .arg(&layer)
        .arg("bin")
        .status()
        .expect("run tar");
    assert!(st.success(), "tar the layer");
    let diff_id = sha256_hex(&layer);
    let config = format!(
        concat!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"#,
            r#""Entrypoint":["/bin/sh","-c"],"#,
            r#""Cmd":["echo greeting=$GREETING; pwd; id -u"],"#,
            r#""Env":["PATH=/bin","GREETING=from-the-image"],"#,
            r#""WorkingDir":"/srv/app","User":"4321"}},"#,
            r#""rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}}}}"#
        ),
        diff_id
    );
    let cfg_tmp = ar.join("config.tmp");
    std::fs::write(&cfg_tmp, &config).expect("write config");
    let cfg_name = format!("{}.json", sha256_hex(&cfg_tmp));
    std::fs::rename(&cfg_tmp, ar.join(&cfg_name)).expect("name the config by its digest");
    let manifest = format!(
        r#"[{{"Config":"{cfg_name}","RepoTags":["cinder-run-test:latest"],"Layers":["layer1/layer.tar"]}}]"#
    );
    std::fs::write(ar.join("manifest.json"), manifest).expect("write manifest.json");
    let out = dir.join("image.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&ar)
        .arg("-cf")
        .arg(&out)
        .args(["manifest.json", &cfg_name, "layer1"])
        .status()
        .expect("run tar");
    assert!(st.success(), "tar the archive");
    out
}

#[test]
fn run_a_docker_archive_uses_its_entrypoint_cmd_env_workdir_and_user_under_cinder() {
    let dir = TempDir::new("run-docker-archive");
    let img = docker_archive(&dir);
    let spec = format!("{}:latest", img.display());
    // No command: the image's Entrypoint + Cmd, in its WorkingDir, as its User, with its Env.
    let o = run(&[&spec]);
    o.expect(0);
    assert_eq!(
        o.stdout(),
        "greeting=from-the-image\n/srv/app\n4321\n",
        "stderr {:?}",
        o.stderr()
    );
}

/// What `--verbose` says when a run restored its VM from the run template.
const RESTORED: &str = "cinder run: restored from the run template ";
/// ... when it built the template first.
const BUILT: &str = "cinder run: built the run template ";

/// The template directory a `--verbose` line names.
fn template_dir(stderr: &str, prefix: &str) -> PathBuf {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {stderr:?}"));
    PathBuf::from(line.split(" in ").next().unwrap_or_default())
}

/// Seconds since the epoch on the host.
fn host_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Issue 20 item 4: the first run (in a cache of its own) builds the run template (its
/// directory appears, with the state and memory files) and restores from it; a second run
/// restores from the same template without building. Each restored guest has the host's wall
/// clock (the template's is minutes old), a hostname of its own and its own random stream
/// (both restored from one RNG state: START's entropy reseeds it). A template whose state file
/// is cut short is rebuilt once and the run still succeeds.
#[test]
fn run_builds_the_template_once_restores_from_it_and_rebuilds_a_corrupt_one_under_cinder() {
    require_kvm();
    let cache = TempDir::new("run-tpl");
    let img = image();
    let script = "date +%s; hostname; od -An -tx1 -N16 /dev/urandom";
    let go = || {
        let c = spawn_env(
            &["--verbose", img.to_str().unwrap(), "sh", "-c", script],
            false,
            &[("CINDER_CACHE", cache.path())],
        );
        let o = finish(c, None);
        o.expect(0);
        let mut lines: Vec<String> = o.stdout().lines().map(str::to_string).collect();
        assert_eq!(
            lines.len(),
            3,
            "stdout {:?} stderr {:?}",
            o.stdout(),
            o.stderr()
        );
        let t: i64 = lines[0].trim().parse().expect("date +%s");
        assert!(
            (t - host_now()).abs() < 120,
            "the guest's clock says {t}, the host's {}",
            host_now()
        );
        assert!(lines[1].starts_with("cinder-"), "hostname {:?}", lines[1]);
        lines[2].retain(|c| !c.is_whitespace());
        assert_eq!(
            lines[2].len(),
            32,
            "random bytes {:?}; stderr {:?}",
            lines[2],
            o.stderr()
        );
        (o, lines)
    };
    let (first, l1) = go();
    let dir = template_dir(&first.stderr(), BUILT);
    assert!(dir.starts_with(cache.path()), "{}", dir.display());
    for f in ["state", "mem", "ready"] {
        assert!(dir.join(f).is_file(), "{} has no {f}", dir.display());
    }
    assert_eq!(template_dir(&first.stderr(), RESTORED), dir);

    let (second, l2) = go();
    assert!(!second.stderr().contains(BUILT), "{}", second.stderr());
    assert_eq!(template_dir(&second.stderr(), RESTORED), dir);
    assert_ne!(
        l1[2], l2[2],
        "two runs from one template read the same random bytes"
    );
    assert_ne!(
        l1[1], l2[1],
        "two runs from one template have the same hostname"
    );

    // A corrupt template: its state file cut in half.
    let state = dir.join("state");
    let len = std::fs::metadata(&state).expect("state").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate the state file");
    let (third, _) = go();
    let err = third.stderr();
    assert!(err.contains("did not restore"), "{err}");
    assert_eq!(template_dir(&err, BUILT), dir, "{err}");
    assert_eq!(template_dir(&err, RESTORED), dir, "{err}");
    assert!(
        std::fs::metadata(&state).expect("state").len() > len / 2,
        "the state file is still cut: {err}"
    );
}

/// A restored run (no volume, no network: the default) passes the exit-code, stdin and stdout
/// checks: `true` exits 0, `false` 1, and 1 MiB of random bytes through stdin comes back
/// byte-exact on stdout from a command that exits 42.
#[test]
fn run_restored_exit_codes_and_1mib_through_stdin_and_stdout_are_exact_under_cinder() {
    require_kvm();
    let img = image();
    let o = run(&["--verbose", img.to_str().unwrap(), "true"]);
    o.expect(0);
    assert!(o.stderr().contains(RESTORED), "{}", o.stderr());
    let o = run(&["--verbose", img.to_str().unwrap(), "false"]);
    o.expect(1);
    assert!(o.stderr().contains(RESTORED), "{}", o.stderr());
    let data = pattern(77, 1 << 20);
    let c = spawn(
        &[
            "--verbose",
            "-i",
            img.to_str().unwrap(),
            "sh",
            "-c",
            "cat; exit 42",
        ],
        true,
    );
    let o = finish(c, Some(data.clone()));
    o.expect(42);
    assert!(o.stderr().contains(RESTORED), "{}", o.stderr());
    assert_eq!(o.stdout.len(), data.len(), "{}", o.stderr());
    assert!(o.stdout == data, "stdout differs from stdin");
}

/// `--no-snapshot` (and CINDER_RUN_SNAPSHOT=0) boots the guest instead of restoring.
#[test]
fn run_no_snapshot_boots_cold_under_cinder() {
    require_kvm();
    let img = image();
    let o = run(&[
        "--verbose",
        "--no-snapshot",
        img.to_str().unwrap(),
        "sh",
        "-c",
        "echo cold",
    ]);
    o.expect(0);
    assert_eq!(o.stdout(), "cold\n");
    let err = o.stderr();
    assert!(
        err.contains("cinder run: booting cold (--no-snapshot)"),
        "{err}"
    );
    assert!(!err.contains(RESTORED), "{err}");
}
