//! Bad input to the `cinder` command line: each case gets a one-line error naming the
//! problem, a non-zero exit, no panic and no backtrace. These run before KVM is touched
//! (except the /dev/kvm cases themselves), so they hold on any host.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cinder_tests::cinder::cinder;
use cinder_tests::tmp::TempDir as Scratch;

/// A minimal x86_64 ELF (or for `machine`) with one 4 KiB PT_LOAD at `paddr` of `memsz`.
fn elf(machine: u16, paddr: u64, memsz: u64) -> Vec<u8> {
    let mut v = vec![0u8; 0x1000];
    v[0..4].copy_from_slice(b"\x7fELF");
    v[4] = 2;
    v[5] = 1;
    v[6] = 1;
    v[16..18].copy_from_slice(&2u16.to_le_bytes());
    v[18..20].copy_from_slice(&machine.to_le_bytes());
    v[24..32].copy_from_slice(&paddr.to_le_bytes());
    v[32..40].copy_from_slice(&64u64.to_le_bytes());
    v[52..54].copy_from_slice(&64u16.to_le_bytes());
    v[54..56].copy_from_slice(&56u16.to_le_bytes());
    v[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    v[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    v[ph + 8..ph + 16].copy_from_slice(&0x200u64.to_le_bytes());
    v[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    v[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    v[ph + 32..ph + 40].copy_from_slice(&0x100u64.to_le_bytes());
    v[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    v
}

/// Runs cinder with `args`; asserts a non-zero exit and a single-line error containing every
/// string in `expect`.
fn fails_with(args: &[&str], expect: &[&str]) -> String {
    let out = cinder().args(args).output().expect("run cinder");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "cinder {args:?} succeeded; stderr: {stderr}"
    );
    assert!(
        out.status.code().is_some(),
        "cinder {args:?} died by a signal"
    );
    assert!(
        !stderr.contains("panicked")
            && !stderr.contains("RUST_BACKTRACE")
            && !stderr.contains("stack backtrace"),
        "cinder {args:?} panicked: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line for {args:?}, got: {stderr}"
    );
    for e in expect {
        assert!(
            stderr.contains(e),
            "error for {args:?} lacks {e:?}: {stderr}"
        );
    }
    stderr
}

/// Runs cinder with `args`; asserts clap's usage error (exit 2, no panic) naming every string
/// in `expect`.
fn usage_error(args: &[&str], expect: &[&str]) {
    let out = cinder().args(args).output().expect("run cinder");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "cinder {args:?}: expected a usage error; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    for e in expect {
        assert!(
            stderr.contains(e),
            "error for {args:?} lacks {e:?}: {stderr}"
        );
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn missing_kernel() {
    fails_with(
        &["--kernel", "/nonexistent/vmlinux"],
        &["kernel image /nonexistent/vmlinux does not exist"],
    );
}

#[test]
fn kernel_is_a_directory() {
    let d = Scratch::new("dir");
    fails_with(&["--kernel", s(&d.0)], &["is a directory"]);
}

#[test]
fn unreadable_kernel() {
    // Root reads any mode-000 file, so run cinder as nobody (setpriv) when we are root.
    let d = Scratch::new("unreadable");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = if real_uid() == 0 {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(cinder_tests::cinder::cinder_bin())
            .args(["--kernel", s(&k)])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("setpriv")
    } else {
        cinder().args(["--kernel", s(&k)]).output().unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// The real uid, from /proc (no libc call needed).
fn real_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}

#[test]
fn neither_elf_nor_bzimage() {
    let d = Scratch::new("garbage");
    let k = d.file("kernel", &[0x42u8; 4096]);
    fails_with(
        &["--kernel", s(&k)],
        &["neither an ELF vmlinux nor a bzImage"],
    );
}

#[test]
fn elf_for_another_architecture() {
    let d = Scratch::new("arm");
    let k = d.file("vmlinux", &elf(183, 0x100000, 0x1000));
    fails_with(&["--kernel", s(&k)], &["aarch64", "not x86_64"]);
}

#[test]
fn zero_vcpus() {
    let d = Scratch::new("vcpu0");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    fails_with(&["--kernel", s(&k), "--vcpus", "0"], &["--vcpus 0"]);
}

#[test]
fn too_many_vcpus() {
    let d = Scratch::new("vcpu255");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    fails_with(
        &["--kernel", s(&k), "--vcpus", "255"],
        &[
            "--vcpus 255",
            "machine-config.vcpu_count: 255 is out of range; it must be 1..=254",
        ],
    );
    // Not a number for a u8 at all: clap's own one-line error.
    let out = cinder()
        .args(["--kernel", s(&k), "--vcpus", "1000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus"));
}

#[test]
fn zero_memory() {
    let d = Scratch::new("mem0");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    fails_with(&["--kernel", s(&k), "--memory", "0"], &["--memory 0"]);
}

#[test]
fn memory_below_kernel_needs() {
    let d = Scratch::new("memsmall");
    // Loads at 16 MiB and needs 32 MiB more.
    let k = d.file("vmlinux", &elf(62, 0x100_0000, 0x200_0000));
    fails_with(
        &["--kernel", s(&k), "--memory", "32"],
        &["needs guest memory up to 48 MiB", "raise --memory"],
    );
}

#[test]
fn memory_beyond_host() {
    let d = Scratch::new("memhuge");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    fails_with(
        &["--kernel", s(&k), "--memory", "1000000000000"],
        &["--memory 1000000000000"],
    );
}

#[test]
fn initrd_does_not_fit() {
    let d = Scratch::new("initrd");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    let rd = d.file("initrd", &vec![0u8; 20 << 20]);
    fails_with(
        &["--kernel", s(&k), "--memory", "16", "--initrd", s(&rd)],
        &["initrd of 20971520 bytes does not fit"],
    );
}

#[test]
fn missing_initrd() {
    let d = Scratch::new("noinitrd");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    fails_with(
        &["--kernel", s(&k), "--initrd", "/nonexistent/initrd"],
        &["/nonexistent/initrd"],
    );
}

#[test]
fn command_line_too_long() {
    let d = Scratch::new("cmdline");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    let long = "a".repeat(3000);
    fails_with(
        &["--kernel", s(&k), "--cmdline", &long],
        &["command line is 3001 bytes", "2048"],
    );
}

#[test]
fn forced_pvh_without_note() {
    let d = Scratch::new("pvh");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    fails_with(
        &["--kernel", s(&k), "--boot-protocol", "pvh"],
        &["no PVH entry note"],
    );
}

#[test]
fn no_kvm_device() {
    let d = Scratch::new("nokvm");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    fails_with(
        &["--kernel", s(&k), "--kvm-device", "/nonexistent/kvm"],
        &["/nonexistent/kvm", "does not exist", "no KVM"],
    );
}

#[test]
fn no_permission_on_kvm_device() {
    let d = Scratch::new("kvmperm");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    let fake = d.file("kvm", b"");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&d.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = if real_uid() == 0 {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(cinder_tests::cinder::cinder_bin())
            .args(["--kernel", s(&k), "--kvm-device", s(&fake)])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("setpriv")
    } else {
        cinder()
            .args(["--kernel", s(&k), "--kvm-device", s(&fake)])
            .output()
            .unwrap()
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn unknown_flag_and_help() {
    let out = cinder().args(["--frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let help = cinder().arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory",
        "--log-level",
        "--boot-protocol",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}: {text}");
    }
    assert!(text.contains("[default: 128]"), "defaults shown: {text}");
}

#[test]
fn vsock_bad_input() {
    let d = Scratch::new("vsock");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    let uds = d.0.join("v.sock");
    let uds_s = uds.to_str().unwrap().to_string();
    for cid in ["0", "1", "2"] {
        fails_with(
            &[
                "--kernel",
                s(&k),
                "--vsock",
                &format!("cid={cid},uds={uds_s}"),
            ],
            &[&format!("--vsock: vsock.guest_cid: {cid} is reserved")],
        );
    }
    // The API refuses the top CID too; so does the command line (one rule).
    fails_with(
        &[
            "--kernel",
            s(&k),
            "--vsock",
            &format!("cid=4294967295,uds={uds_s}"),
        ],
        &["vsock.guest_cid: 4294967295 is reserved"],
    );
    // A malformed spec is a usage error, like any other (exit 2).
    usage_error(
        &["--kernel", s(&k), "--vsock", "cid=x,uds=/tmp/v"],
        &["--vsock", "not a number"],
    );
    usage_error(
        &["--kernel", s(&k), "--vsock", "cid=3"],
        &["--vsock", "uds=PATH is required"],
    );
    fails_with(
        &[
            "--kernel",
            s(&k),
            "--vsock",
            "cid=3,uds=/nonexistent/dir/v.sock",
        ],
        &["/nonexistent/dir"],
    );
    // A socket path some live process is listening on.
    let _live = std::os::unix::net::UnixListener::bind(&uds).unwrap();
    fails_with(
        &["--kernel", s(&k), "--vsock", &format!("cid=3,uds={uds_s}")],
        &["in use"],
    );
}

#[test]
fn console_bad_input() {
    let d = Scratch::new("console");
    let k = d.file("vmlinux", &elf(62, 0x100000, 0x1000));
    fails_with(
        &["--kernel", s(&k), "--console-out", "/tmp/x"],
        &["need --console virtio"],
    );
    fails_with(
        &[
            "--kernel",
            s(&k),
            "--console",
            "virtio",
            "--console-sock",
            "/nonexistent/c.sock",
        ],
        &["--console-sock /nonexistent/c.sock", "cannot connect"],
    );
    fails_with(
        &[
            "--kernel",
            s(&k),
            "--console",
            "virtio",
            "--console-out",
            "/nonexistent/dir/out",
        ],
        &["--console-out /nonexistent/dir/out"],
    );
}
