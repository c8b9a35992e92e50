//! What cinder adds to a microVM's configuration that Firecracker's configuration does not
//! have: the boot protocol, the CPU template, the KVM device and the console. They come from
//! cinder's own flags, whichever way the rest of the configuration arrives.

use std::path::PathBuf;

use arch::loader::ProtocolChoice;

/// Knobs that only cinder has (not in Firecracker's configuration).
#[derive(Clone, Debug)]
pub struct VmmOptions {
    /// Boot protocol choice for ELF kernels.
    pub boot_protocol: ProtocolChoice,
    /// CPU template.
    pub cpu_template: CpuTemplate,
    /// KVM device path.
    pub kvm_path: String,
    /// The console (not part of Firecracker's configuration).
    pub console: ConsoleSpec,
}

/// CPU templates: what the guest is told about the CPU beyond the host's own features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuTemplate {
    /// KVM's supported CPUID with cinder's topology.
    #[default]
    Host,
    /// As `Host`, hiding the KVM paravirtual features that make the guest issue hypercalls
    /// (PV IPI, PV sched yield, PV unhalt).
    NoPvHypercalls,
}

/// The console: which device faces the user, and where a virtio-console's host side is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// COM1 (8250) on stdin/stdout; no virtio-console.
    #[default]
    Serial,
    /// A virtio-console (hvc0 in Linux). Its host side is stdin/stdout unless redirected; COM1
    /// then exists only when stdout is free for it (a redirected virtio-console).
    Virtio(VirtioConsoleHost),
    /// Neither: no console device at all.
    None,
}

/// The host side of a virtio-console.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum VirtioConsoleHost {
    /// stdin and stdout.
    #[default]
    Stdio,
    /// Guest output to this file (created or truncated); no input.
    File(PathBuf),
    /// Both ways over a Unix socket that is already listening (cinder connects before boot).
    Socket(PathBuf),
}

impl ConsoleSpec {
    /// Whether COM1 is emulated (on stdin/stdout).
    pub fn serial_enabled(&self) -> bool {
        match self {
            ConsoleSpec::Serial => true,
            ConsoleSpec::Virtio(VirtioConsoleHost::Stdio) | ConsoleSpec::None => false,
            ConsoleSpec::Virtio(_) => true,
        }
    }

    /// Whether the guest gets a virtio-console.
    pub fn is_virtio(&self) -> bool {
        matches!(self, ConsoleSpec::Virtio(_))
    }

    /// Whether the guest's console reads this process's stdin.
    pub fn reads_stdin(&self) -> bool {
        matches!(
            self,
            ConsoleSpec::Serial | ConsoleSpec::Virtio(VirtioConsoleHost::Stdio)
        )
    }
}
