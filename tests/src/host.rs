//! What kind of KVM host this is, decided in one place (the shell twin is
//! `scripts/kvm-lane.sh`, which answers the same way):
//!
//! - `hardware`: `/dev/kvm` opens and guest kernel mode runs on the CPU (what users have;
//!   the nested KVM lane's L1 is this kind too);
//! - `kvm-pvm`: `/dev/kvm` opens but belongs to kvm-pvm (`/sys/module/kvm_pvm` exists): guest
//!   user mode runs natively, guest kernel mode in a slow emulator that cannot run a stock
//!   Linux kernel (no XRSTOR, INT3, POPCNT, CLAC, FWAIT; a hypercall hangs the vCPU);
//! - `none`: `/dev/kvm` cannot be opened (no KVM device, or no permission).

use std::path::Path;
use std::sync::OnceLock;

/// The kind of KVM host (see the module docs for how each is recognised).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// `/dev/kvm` opens and guest kernel mode runs on the CPU.
    Hardware,
    /// `/dev/kvm` opens but belongs to kvm-pvm (guest kernel mode is emulated).
    KvmPvm,
    /// `/dev/kvm` cannot be opened.
    None,
}

impl HostKind {
    /// The kind's name as `scripts/kvm-lane.sh` prints it: `hardware`, `kvm-pvm` or `none`.
    pub fn name(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware",
            HostKind::KvmPvm => "kvm-pvm",
            HostKind::None => "none",
        }
    }

    /// Whether this host can run a stock (clean default) Linux guest under KVM.
    pub fn runs_stock_kernels(self) -> bool {
        self == HostKind::Hardware
    }
}

/// Decides from `/dev/kvm` and the loaded modules (no caching; see [`kind`]).
pub fn detect() -> HostKind {
    let opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !opens {
        HostKind::None
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        HostKind::KvmPvm
    } else {
        HostKind::Hardware
    }
}

/// This host's kind, detected once per process and printed (on stderr) the first time.
pub fn kind() -> HostKind {
    static KIND: OnceLock<HostKind> = OnceLock::new();
    *KIND.get_or_init(|| {
        let k = detect();
        eprintln!("[cinder-tests] host kind: {}", k.name());
        k
    })
}
