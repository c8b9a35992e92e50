//! QEMU as an oracle: the `microvm` machine booting a guest kernel (the
//! probe, through its PVH note) with the serial console on stdout. Uses
//! KVM when `/dev/kvm` opens, TCG otherwise (and TCG for Linux guests on
//! a kvm-pvm host: see [`Accel::for_linux`]). Running and timeouts are
//! `runner::run`'s job.

use crate::host::{self, HostKind};
use crate::runner::{self, RunResult};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The accelerator a run used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm` (`-accel kvm`).
    Kvm,
    /// QEMU's software emulator (`-accel tcg`).
    Tcg,
}

impl Accel {
    /// KVM if `/dev/kvm` can be opened read-write (on any host kind), else TCG: for the
    /// probe, which runs on every kind of KVM, and for benchmarks that compare QEMU and
    /// cinder on the same KVM. Tests of Linux guests use [`Accel::for_linux`].
    pub fn detect() -> Accel {
        match host::kind() {
            HostKind::Hardware | HostKind::KvmPvm => Accel::Kvm,
            HostKind::None => Accel::Tcg,
        }
    }

    /// For a Linux guest (the clean default guest and the test profile): KVM only on a
    /// hardware KVM host, TCG elsewhere. kvm-pvm cannot run a stock kernel's kernel mode at
    /// all, and its kernel-mode emulator is not a faithful CPU for the test profile either:
    /// under QEMU on a kvm-pvm host the test profile corrupted data copied to user space
    /// (the vsock loopback agent received 200000 bytes with a wrong checksum in 1 run of 3,
    /// the same wrong checksum each time) and busybox `reboot -f` segfaulted. The oracle's
    /// job is to show what a correct CPU does with the guest artifacts, so on those hosts it
    /// uses QEMU's own CPU.
    pub fn for_linux() -> Accel {
        if host::kind().runs_stock_kernels() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// `-accel` and `-cpu` arguments.
    pub fn args(self) -> [&'static str; 4] {
        match self {
            // `-cpu host` alone fails on MSR 0x10a on kvm-pvm hosts. There a hypercall hangs
            // the vCPU, so QEMU also hides the KVM PV features that make Linux issue them:
            // the same three that cinder's `--cpu-template no-pv-hypercalls` hides
            // (arch/src/cpuid.rs), so QEMU and cinder show the test profile one CPU where a
            // benchmark runs it on KVM here (`bench_io`; the tests use TCG, see `for_linux`).
            Accel::Kvm if host::kind() == HostKind::KvmPvm => [
                "-accel",
                "kvm",
                "-cpu",
                "host,-arch-capabilities,kvm-pv-unhalt=off,kvm-pv-ipi=off,kvm-pv-sched-yield=off",
            ],
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host,-arch-capabilities"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// `$CINDER_QEMU`, else `qemu-system-x86_64` from PATH. Panics (does not
/// skip) when QEMU is missing.
pub fn qemu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CINDER_QEMU") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("qemu-system-x86_64"))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => p,
        None => panic!(
            "qemu-system-x86_64 not found in PATH: the QEMU oracle tests need it \
             (apt-get install qemu-system-x86) or set CINDER_QEMU"
        ),
    }
}

/// QEMU's qboot firmware (Debian: qemu-system-data).
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// QEMU's microvm without option ROMs and RTC, with the ISA serial port.
pub const DEFAULT_MACHINE: &str = "microvm,x-option-roms=off,rtc=off,isa-serial=on";

/// A microvm configuration.
#[derive(Clone, Debug)]
pub struct Microvm {
    /// The guest kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The kernel command line (`-append`).
    pub cmdline: String,
    /// vCPUs (`-smp`).
    pub cpus: u32,
    /// Guest memory in MiB (`-m`).
    pub mem_mib: u64,
    /// The accelerator (`-accel` and `-cpu`).
    pub accel: Accel,
    /// `-M` value; ACPI is on by default (MADT), `acpi=off` gives an MP
    /// table and `virtio_mmio.device=` keys on the command line instead.
    pub machine: String,
    /// Extra arguments (e.g. `-device virtio-rng-device`).
    pub extra: Vec<String>,
}

impl Microvm {
    /// `kernel` with `cmdline` on `cpus` vCPUs and `mem_mib` MiB: [`Accel::detect`]'s
    /// accelerator, [`DEFAULT_MACHINE`], no extra arguments.
    pub fn new(kernel: &Path, cmdline: &str, cpus: u32, mem_mib: u64) -> Microvm {
        Microvm {
            kernel: kernel.to_path_buf(),
            cmdline: cmdline.to_string(),
            cpus,
            mem_mib,
            accel: Accel::detect(),
            machine: DEFAULT_MACHINE.to_string(),
            extra: Vec::new(),
        }
    }

    /// The QEMU command line. `-no-reboot` turns the guest's reset (i8042
    /// or triple fault) into QEMU exiting.
    pub fn command(&self) -> Command {
        let mut c = Command::new(qemu_bin());
        c.stdin(Stdio::null()).args(["-M", &self.machine]);
        // microvm boots the kernel through qboot. Debian's QEMU 10 defaults microvm to
        // SeaBIOS's bios-microvm.bin, which does not start a -kernel with option ROMs off.
        if self.machine.starts_with("microvm") && std::path::Path::new(QBOOT).exists() {
            c.args(["-bios", QBOOT]);
        }
        c.args(self.accel.args())
            .args(["-m", &self.mem_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args([
                "-nodefaults",
                "-nographic",
                "-no-reboot",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .args(["-append", &self.cmdline])
            .args(&self.extra);
        c
    }

    /// Boots and waits for QEMU to exit (the probe resets the VM after
    /// `PROBE DONE`), or kills it at the timeout.
    pub fn run(&self, timeout: Duration) -> RunResult {
        runner::run(self.command(), timeout, |_| false)
    }
}
