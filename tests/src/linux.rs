//! Shared pieces of the Linux device tests (`linux_blk`, `linux_net`, `linux_console_rng`,
//! `linux_vsock`): the ext4 root filesystem artifact, temporary directories, the QEMU microvm
//! oracle's base configuration, cinder's base command line for the test profile, and the
//! checksum the guest agent uses.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::guest::GuestDir;
use crate::qemu::{Accel, Microvm};

/// Per-step deadline: the guest kernel runs in an emulator on the KVM test hosts.
pub const STEP: Duration = Duration::from_secs(300);

/// QEMU microvm as the Linux guests' oracle: MP table and `virtio_mmio.device=` on the
/// command line (`acpi=off`), like cinder.
pub const QEMU_MACHINE: &str = "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off";

/// Unwraps a session step, panicking with its message (which carries the whole log).
pub fn ok<T>(r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

pub use crate::tmp::TempDir;

/// The root filesystem artifact of `resources/guest/build-rootfs.sh` (`rootfs.ext4`,
/// `cinder-agent`): `$CINDER_ROOTFS_DIR`, else built (or found in the cache) now.
pub struct RootFs(pub PathBuf);

impl RootFs {
    /// The artifact directory: `$CINDER_ROOTFS_DIR` if set, else the directory that
    /// `build-rootfs.sh` prints last (panics if the script cannot run or fails).
    pub fn get() -> RootFs {
        if let Some(d) = std::env::var_os("CINDER_ROOTFS_DIR") {
            return RootFs(PathBuf::from(d));
        }
        let script = crate::cinder::repo_root().join("resources/guest/build-rootfs.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        RootFs(PathBuf::from(dir))
    }

    /// A writable copy of `rootfs.ext4` in `dir` (the cached image is never written).
    pub fn copy_to(&self, dir: &TempDir, name: &str) -> PathBuf {
        let src = self.0.join("rootfs.ext4");
        let dst = dir.join(name);
        std::fs::copy(&src, &dst)
            .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), dst.display()));
        dst
    }
}

/// The test profile's kernel command line (its `cmdline` file).
pub fn profile_cmdline(g: &GuestDir) -> String {
    std::fs::read_to_string(g.file("cmdline"))
        .expect("profile cmdline")
        .trim()
        .to_string()
}

/// QEMU microvm booting the profile's `vmlinux` with an i8042 (so `reboot -f` ends QEMU), on
/// [`Accel::for_linux`].
pub fn qemu_vm(g: &GuestDir, cmdline: &str, cpus: u32, mib: u64) -> Microvm {
    let mut vm = Microvm::new(&g.file("vmlinux"), cmdline, cpus, mib);
    vm.accel = Accel::for_linux();
    vm.machine = QEMU_MACHINE.to_string();
    vm.extra = vec!["-device".into(), "i8042".into()];
    vm
}

/// cinder booting the profile's `vmlinux` with the CPU template the profile needs.
pub fn cinder_vm(g: &GuestDir, cmdline: &str, vcpus: u32, mib: u64) -> Command {
    let mut c = crate::cinder::cinder();
    c.arg("--kernel")
        .arg(g.file("vmlinux"))
        .args(["--cmdline", cmdline])
        .args(["--vcpus", &vcpus.to_string(), "--memory", &mib.to_string()])
        .args(["--cpu-template", "no-pv-hypercalls"]);
    c
}

/// 64-bit FNV-1a, the guest agent's checksum (`resources/guest-agent`).
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// `n` bytes of a seeded xorshift sequence (test data).
pub fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// The same bytes `cinder-agent connect CID PORT N` sends.
pub fn agent_pattern(n: usize) -> Vec<u8> {
    pattern(0x9e37_79b9_7f4a_7c15, n)
}
