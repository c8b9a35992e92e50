//! [`VmError`]: why a microVM could not be built, started or paused. Each message is one line
//! that names what was wrong.

use std::path::PathBuf;

use arch::boot::BootError;
use arch::loader::LoaderError;
use arch::mptable::MptableError;
use devices::virtio::block::BlockError;
use devices::virtio::console::ConsoleError;
use devices::virtio::net::NetError;
use devices::virtio::rng::RngError;
use devices::virtio::vsock::VsockError;

use crate::bus::BusError;
use crate::kvm::KvmError;
use crate::vcpu::VcpuError;

/// Errors building or running the VM. Each message is one line that names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration has no kernel.
    #[error("no boot source: configure boot-source (kernel_image_path)")]
    NoBootSource,
    /// The configuration breaks one of its own rules (it is normally checked before it gets
    /// here; a configuration assembled by hand may not be).
    #[error("{0}")]
    Config(#[from] api::config::ConfigError),
    /// A second start of the same microVM.
    #[error("the microVM is already running")]
    AlreadyRunning,
    /// More virtio devices than there are IOAPIC pins for them.
    #[error("{count} virtio devices: at most {max} fit the IOAPIC's pins")]
    TooManyDevices {
        /// Devices asked for.
        count: usize,
        /// Pins there are.
        max: usize,
    },
    /// Bad vCPU count.
    #[error("--vcpus {0}: must be at least 1")]
    NoVcpus(u8),
    /// More vCPUs than the MP table or KVM allow.
    #[error("--vcpus {got}: more than {limit} allows (at most {max})")]
    TooManyVcpus {
        /// Asked for.
        got: u8,
        /// What limits it.
        limit: &'static str,
        /// The limit.
        max: usize,
    },
    /// Memory size zero.
    #[error("--memory 0: the guest needs memory")]
    NoMemory,
    /// More memory than the host's physical address width allows.
    #[error("--memory {mib}: guest RAM would end at {top:#x}, beyond this host's {bits}-bit physical address space")]
    MemoryTooLarge {
        /// Asked for.
        mib: u64,
        /// Top guest address.
        top: u64,
        /// Host physical address bits.
        bits: u32,
    },
    /// mmap failed.
    #[error("--memory {mib}: cannot map {mib} MiB of guest memory: {why}")]
    MemoryMap {
        /// Asked for.
        mib: u64,
        /// The error.
        why: String,
    },
    /// Kernel loading.
    #[error("{0}")]
    Loader(#[from] LoaderError),
    /// Boot data.
    #[error("{0}")]
    Boot(#[from] BootError),
    /// The initrd file.
    #[error("cannot read initrd {path}: {why}")]
    Initrd {
        /// The path.
        path: String,
        /// The error.
        why: String,
    },
    /// MP table.
    #[error("{0}")]
    Mptable(#[from] MptableError),
    /// KVM is not usable.
    #[error("{0}")]
    Kvm(#[from] KvmError),
    /// A VM-level KVM ioctl failed.
    #[error("{what} failed: {source}")]
    VmIoctl {
        /// The operation.
        what: String,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// vCPU setup.
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    /// A snapshot cannot be written or taken back.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Device setup.
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    /// A drive cannot be opened.
    #[error("drive {id}: {source}")]
    Drive {
        /// The drive id.
        id: String,
        /// Why.
        source: BlockError,
    },
    /// A network interface cannot be opened.
    #[error("network interface {id}: {source}")]
    Net {
        /// The interface id.
        id: String,
        /// Why.
        source: NetError,
    },
    /// The entropy device cannot be created.
    #[error("rng: {0}")]
    Rng(RngError),
    /// The balloon device cannot be created.
    #[error("balloon: {0}")]
    Balloon(devices::virtio::balloon::BalloonError),
    /// The virtio-console's output file cannot be created.
    #[error("--console-out {}: {source}", path.display())]
    ConsoleOut {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The virtio-console's socket cannot be reached.
    #[error("--console-sock {}: cannot connect: {source} (it must be listening before cinder starts)", path.display())]
    ConsoleSock {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The virtio-console cannot be created.
    #[error("virtio-console: {0}")]
    VirtioConsole(ConsoleError),
    /// The vsock device cannot be created.
    #[error("--vsock: {0}")]
    Vsock(VsockError),
    /// The kernel command line cannot be built.
    #[error(transparent)]
    Cmdline(#[from] crate::cmdline::CmdlineError),
    /// The virtio transport refused a device.
    #[error("{id}: {why}")]
    Transport {
        /// The device's name.
        id: String,
        /// Why.
        why: String,
    },
    /// An OS resource could not be created.
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

/// Maps a failed VM ioctl to [`VmError::VmIoctl`], naming the operation.
pub(crate) fn vm_ioctl(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::VmIoctl { what, source }
}

/// Maps a failed OS call to [`VmError::Os`], naming what it was for.
pub(crate) fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}
