//! Opening `/dev/kvm` and checking that the host's KVM has everything cinder relies on.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{FromRawFd, IntoRawFd};

use kvm_ioctls::{Cap, Kvm};

/// Capabilities cinder cannot run without, with what each is for.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "in-kernel IOAPIC/PIC/LAPIC"),
    (Cap::Hlt, "HLT handled in the kernel"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "TSS address"),
    (Cap::SetIdentityMapAddr, "identity map address"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::PitState2, "PIT state"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    (Cap::Ioeventfd, "ioeventfd (queue kicks without exits)"),
    (Cap::Irqfd, "irqfd (interrupts from the event loop)"),
    (Cap::ImmediateExit, "immediate exit (stopping vCPUs)"),
];

/// The KVM API version cinder speaks.
pub const KVM_API_VERSION: i32 = 12;

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm is missing.
    #[error("cannot open {path}: it does not exist; this host has no KVM (is the kvm module loaded and virtualization enabled?)")]
    Missing {
        /// The device path.
        path: String,
    },
    /// No permission.
    #[error("cannot open {path}: permission denied; run as root or add the user to the group that owns {path}")]
    Permission {
        /// The device path.
        path: String,
    },
    /// Other open errors.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The device path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Wrong API version.
    #[error("KVM API version {0} is not supported (cinder needs {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A capability is missing.
    #[error("KVM lacks capability {cap:?} ({what}), which cinder needs")]
    MissingCap {
        /// The capability.
        cap: Cap,
        /// What it is for.
        what: &'static str,
    },
}

static KVM_PVM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether the host's KVM is kvm-pvm (`/sys/module/kvm_pvm` exists): guest user mode runs
/// natively there, guest kernel mode in a slow instruction emulator that cannot run a stock
/// Linux kernel. Decided once, when `/dev/kvm` is opened (before any thread is confined), and
/// only used to explain an emulation failure.
pub fn host_is_kvm_pvm() -> bool {
    *KVM_PVM.get_or_init(|| std::path::Path::new("/sys/module/kvm_pvm").exists())
}

/// Opens the KVM device at `path` (normally `/dev/kvm`) and checks the API version and every
/// capability in [`REQUIRED_CAPS`].
pub fn open(path: &str) -> Result<Kvm, KvmError> {
    host_is_kvm_pvm();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => KvmError::Missing {
                path: path.to_string(),
            },
            std::io::ErrorKind::PermissionDenied => KvmError::Permission {
                path: path.to_string(),
            },
            _ => KvmError::Open {
                path: path.to_string(),
                source: e,
            },
        })?;
    // SAFETY: the fd was just opened on the KVM device and its ownership moves to `Kvm`.
    let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
    let v = kvm.get_api_version();
    if v != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(v));
    }
    for (cap, what) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCap { cap: *cap, what });
        }
    }
    Ok(kvm)
}
