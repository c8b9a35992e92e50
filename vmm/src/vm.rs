//! Building a microVM from a [`VmSpec`] and running it to its end.
//!
//! Everything that can be checked without KVM (files, kernel format, sizes, command line) is
//! checked first, so bad input gets its own precise error on any host.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arch::boot::{place_initrd, write_boot_info, write_cmdline, BootError, InitrdPlacement};
use arch::cpuid::CpuidOptions;
use arch::layout::{self, ram_regions, ram_top, MIB};
use arch::loader::{load_kernel, LoadedKernel, LoaderError, ProtocolChoice};
use arch::mptable::{setup_mptable, MptableError, MAX_CPUS};
use arch::GuestMemoryMmap;
use devices::i8042::I8042;
use devices::legacy::{self, SerialDevice};
use event_manager::MutEventSubscriber;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::console::{Console as VirtioConsole, ConsoleInput as VirtioConsoleInput};
use devices::virtio::net::{generate_mac, Net, NetConfig, DEFAULT_MTU};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::{mmio, MmioTransport, VirtioDevice};
use kvm_ioctls::IoEventAddress;

use crate::bus::{Bus, BusError};
use crate::console::ConsoleInput;
use crate::exit::ExitSignal;
use crate::kvm::KvmError;
use crate::metrics::Metrics;
use crate::vcpu::{kick_handler, Vcpu, VcpuControl, VcpuError, CPUID_ENTRIES};

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

/// What to boot.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Boot protocol choice.
    pub boot_protocol: ProtocolChoice,
    /// CPU template.
    pub cpu_template: CpuTemplate,
    /// Path of the KVM device.
    pub kvm_path: String,
    /// Block devices, in the order the guest sees them (the root drive first).
    pub drives: Vec<DriveSpec>,
    /// virtio-net devices on existing TAP interfaces.
    pub nets: Vec<NetSpec>,
    /// A virtio-rng (entropy) device.
    pub rng: bool,
    /// Where the console is.
    pub console: ConsoleSpec,
    /// A virtio-vsock device.
    pub vsock: Option<VsockSpec>,
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

/// One virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// Interface id.
    pub id: String,
    /// An existing TAP interface on the host.
    pub tap: String,
    /// The guest's MAC; generated from the id and tap name (stable) when absent.
    pub mac: Option<[u8; 6]>,
    /// MTU told to the guest.
    pub mtu: Option<u16>,
}

/// A virtio-vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockSpec {
    /// Guest CID (3 or more).
    pub cid: u64,
    /// Host-side Unix socket.
    pub uds: PathBuf,
}

/// Where the `--` that starts init's arguments is in a kernel command line: the first word
/// that is exactly `--` outside double quotes, as Linux's `parse_args` finds it (a `--`
/// inside a quoted value, such as `run="set -- a"`, belongs to that value).
fn init_args_start(cmdline: &str) -> Option<usize> {
    let mut in_quote = false;
    let mut word_start = None;
    for (i, ch) in cmdline
        .char_indices()
        .chain(std::iter::once((cmdline.len(), ' ')))
    {
        if ch == '"' {
            in_quote = !in_quote;
        }
        if ch.is_ascii_whitespace() && !in_quote {
            if let Some(start) = word_start.take() {
                if &cmdline[start..i] == "--" {
                    return Some(start);
                }
            }
        } else if word_start.is_none() {
            word_start = Some(i);
        }
    }
    None
}

/// One virtio-blk drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveSpec {
    /// Name (also the serial the guest reads, when it fits in 20 bytes).
    pub id: String,
    /// Backing raw image.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Boot from it: `root=/dev/vdX` (and `ro`) is appended to the command line.
    pub root: bool,
}

impl VmSpec {
    /// The command line the guest gets: the user's, then one `virtio_mmio.device=` per
    /// virtio device and the root device.
    pub fn full_cmdline(&self) -> String {
        // Kernel parameters go before a `--`: what follows it is init's.
        let user = self.cmdline.trim();
        let (kernel_part, init_part) = match init_args_start(user) {
            Some(i) => (&user[..i], Some(&user[i..])),
            None => (user, None),
        };
        let mut c = kernel_part.trim().to_string();
        for i in 0..self.virtio_count() {
            let (base, irq) = virtio_slot(i);
            c.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        }
        if let Some((i, d)) = self.drives.iter().enumerate().find(|(_, d)| d.root) {
            let letter = (b'a' + i as u8) as char;
            c.push_str(&format!(
                " root=/dev/vd{letter} {}",
                if d.read_only { "ro" } else { "rw" }
            ));
        }
        if let Some(init) = init_part {
            c.push(' ');
            c.push_str(init);
        }
        c.trim().to_string()
    }

    /// How many virtio devices the guest gets: drives first (so the root drive is vda), then
    /// rng, console and vsock, each in its own slot.
    pub fn virtio_count(&self) -> usize {
        self.drives.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(matches!(self.console, ConsoleSpec::Virtio(_)))
            + usize::from(self.vsock.is_some())
    }

    /// Whether COM1 is emulated (on stdin/stdout).
    pub fn serial_enabled(&self) -> bool {
        match &self.console {
            ConsoleSpec::Serial => true,
            ConsoleSpec::Virtio(VirtioConsoleHost::Stdio) | ConsoleSpec::None => false,
            ConsoleSpec::Virtio(_) => true,
        }
    }

    /// Checks what can be checked without opening anything.
    pub fn validate(&self) -> Result<(), VmError> {
        let mut seen = std::collections::HashSet::new();
        for d in &self.drives {
            if !seen.insert(d.id.as_str()) {
                return Err(VmError::DriveSpec(format!(
                    "drive id {:?} is used twice",
                    d.id
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for n in &self.nets {
            if !seen.insert(n.id.as_str()) {
                return Err(VmError::DriveSpec(format!(
                    "network interface id {:?} is used twice",
                    n.id
                )));
            }
        }
        if self.drives.iter().filter(|d| d.root).count() > 1 {
            return Err(VmError::DriveSpec(
                "more than one drive is marked root".into(),
            ));
        }
        let max = (layout::IRQ_MAX - layout::IRQ_BASE + 1) as usize;
        if self.virtio_count() > max {
            return Err(VmError::DriveSpec(format!(
                "{} virtio devices: at most {max} fit the IOAPIC's pins",
                self.virtio_count()
            )));
        }
        Ok(())
    }
}

/// The MMIO base and IRQ of virtio slot `i`.
pub fn virtio_slot(i: usize) -> (u64, u32) {
    (
        layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE,
        layout::IRQ_BASE + i as u32,
    )
}

/// Errors building or running the VM. Each message is one line that names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
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
    /// Device setup.
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    /// A drive specification is inconsistent.
    #[error("{0}")]
    DriveSpec(String),
    /// A drive cannot be opened.
    #[error("drive {id}: {source}")]
    Drive {
        /// The drive id.
        id: String,
        /// Why.
        source: devices::virtio::block::BlockError,
    },
    /// A device other than a drive cannot be set up.
    #[error("{0}")]
    Device(String),
    /// The virtio transport refused a device.
    #[error("{id}: {why}")]
    Transport {
        /// The drive id.
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

fn vm_ioctl(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::VmIoctl { what, source }
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

/// The host's physical address width, from CPUID leaf 0x80000008.
fn host_phys_bits() -> u32 {
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext >= 0x8000_0008 {
        std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    }
}

/// Guest memory with the kernel, initrd and boot data in place.
pub struct PreparedGuest {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The loaded kernel.
    pub kernel: LoadedKernel,
    /// Where the initrd went.
    pub initrd: Option<InitrdPlacement>,
}

/// Maps guest memory and loads everything the guest needs at entry. Needs no KVM.
pub fn prepare_guest(spec: &VmSpec, cmdline: &str) -> Result<PreparedGuest, VmError> {
    if spec.vcpus == 0 {
        return Err(VmError::NoVcpus(0));
    }
    if spec.vcpus > MAX_CPUS {
        return Err(VmError::TooManyVcpus {
            got: spec.vcpus,
            limit: "the MP table",
            max: MAX_CPUS as usize,
        });
    }
    if spec.memory_mib == 0 {
        return Err(VmError::NoMemory);
    }
    let mem_size = spec
        .memory_mib
        .checked_mul(MIB)
        .ok_or(VmError::MemoryTooLarge {
            mib: spec.memory_mib,
            top: u64::MAX,
            bits: host_phys_bits(),
        })?;
    let bits = host_phys_bits();
    let top = ram_top(mem_size);
    if bits < 64 && top > (1u64 << bits) {
        return Err(VmError::MemoryTooLarge {
            mib: spec.memory_mib,
            top,
            bits,
        });
    }
    let mem =
        GuestMemoryMmap::from_ranges(&ram_regions(mem_size)).map_err(|e| VmError::MemoryMap {
            mib: spec.memory_mib,
            why: e.to_string(),
        })?;
    let kernel = load_kernel(
        &mem,
        &spec.kernel,
        layout::low_ram_end(mem_size),
        spec.boot_protocol,
    )?;
    let cmdline_len = write_cmdline(&mem, &kernel, cmdline)?;
    let initrd = match &spec.initrd {
        None => None,
        Some(path) => {
            let p = path.display().to_string();
            let ierr = |why: String| VmError::Initrd {
                path: p.clone(),
                why,
            };
            let mut f = File::open(path).map_err(|e| ierr(e.to_string()))?;
            let meta = f.metadata().map_err(|e| ierr(e.to_string()))?;
            if !meta.is_file() {
                return Err(ierr("not a regular file".into()));
            }
            let size = meta.len();
            let placement = place_initrd(mem_size, &kernel, size)?;
            mem.read_exact_volatile_from(GuestAddress(placement.addr), &mut f, size as usize)
                .map_err(|e| ierr(e.to_string()))?;
            Some(placement)
        }
    };
    write_boot_info(&mem, mem_size, &kernel, cmdline_len, initrd)?;
    setup_mptable(&mem, spec.vcpus)?;
    Ok(PreparedGuest {
        mem,
        kernel,
        initrd,
    })
}

/// Creates the VM: in-kernel irqchip and PIT, TSS and identity map, memory slots.
fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(vm_ioctl("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(vm_ioctl("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(vm_ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(vm_ioctl("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(vm_ioctl("KVM_CREATE_PIT2"))?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::MemoryMap {
                mib: region.len() >> 20,
                why: e.to_string(),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the
        // vCPU threads are joined before `mem` is dropped), and slots do not overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(vm_ioctl(format!(
            "KVM_SET_USER_MEMORY_REGION (slot {slot}, {} MiB at {:#x})",
            region.len() >> 20,
            region.start_addr().0
        )))?;
    }
    Ok(vm)
}

/// The keyboard's IRQ (ISA IRQ 1).
pub const KBD_IRQ: u32 = 1;

/// Shared plumbing a VM reports through, owned by the runtime.
#[derive(Clone)]
pub struct VmContext {
    /// Written when the guest resets through the i8042.
    pub reset_evt: Arc<EventFd>,
    /// Where vCPUs report why the VM ended.
    pub exit: Arc<ExitSignal>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Whether stdin is an interactive terminal (enables the console escape).
    pub interactive: bool,
}

/// An event-loop subscriber.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A built microVM: memory, KVM VM, devices and vCPUs.
pub struct Vmm {
    // Field order matters for drop: threads are joined in `shutdown`, then the VM goes, then
    // guest memory.
    vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    vcpu_count: usize,
    control: Arc<VcpuControl>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    subscribers: Vec<Subscriber>,
    blocks: Vec<(String, Arc<Mutex<Block>>)>,
    nets: Vec<(String, Arc<Mutex<Net>>)>,
    i8042: Arc<Mutex<I8042>>,
    ctx: VmContext,
    _vm: VmFd,
    _kvm: Kvm,
    _mem: GuestMemoryMmap,
}

/// A virtio device opened before boot: its name (for errors), the device for its transport,
/// and the same device as an event-loop subscriber.
type NewVirtio = (String, Arc<Mutex<dyn VirtioDevice>>, Subscriber);

/// Puts a virtio device in MMIO slot `slot`: its transport on the bus, an irqfd for its IRQ,
/// and an ioeventfd per queue at the notify register (a kick never exits to userspace).
fn attach_virtio(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio_bus: &mut Bus,
    slot: usize,
    name: &str,
    dev: Arc<Mutex<dyn VirtioDevice>>,
) -> Result<(), VmError> {
    let (base, irq) = virtio_slot(slot);
    let irqfd = efd()?;
    vm.register_irqfd(&irqfd, irq)
        .map_err(vm_ioctl(format!("KVM_IRQFD ({name})")))?;
    let transport =
        MmioTransport::new(mem.clone(), dev, irqfd).map_err(|e| VmError::Transport {
            id: name.to_string(),
            why: e.to_string(),
        })?;
    for (q, evt) in transport.queue_evts().iter().enumerate() {
        vm.register_ioevent(
            evt,
            &IoEventAddress::Mmio(base + mmio::NOTIFY_REG_OFFSET),
            q as u32,
        )
        .map_err(vm_ioctl(format!("KVM_IOEVENTFD ({name} queue {q})")))?;
    }
    mmio_bus.insert(Arc::new(Mutex::new(transport)), base, mmio::MMIO_SIZE)?;
    Ok(())
}

fn efd() -> Result<Arc<EventFd>, VmError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map(Arc::new)
        .map_err(os("eventfd"))
}

impl Vmm {
    /// Builds the VM for `spec` (vCPUs created, not running), with the serial console
    /// writing to `console_out`. Everything checkable without KVM is checked first.
    pub fn build(
        spec: &VmSpec,
        console_out: Box<dyn Write + Send>,
        ctx: VmContext,
    ) -> Result<Vmm, VmError> {
        spec.validate()?;
        // Open every device's host side before anything else: a missing image or a socket in
        // use is the user's error, and must be reported as such on any host.
        let mut blocks = Vec::with_capacity(spec.drives.len());
        let mut nets = Vec::with_capacity(spec.nets.len());
        let mut virtio: Vec<NewVirtio> = Vec::new();
        for d in &spec.drives {
            let serial = (d.id.len() <= 20).then(|| d.id.clone());
            let blk = Block::new(&BlockConfig {
                path: d.path.clone(),
                read_only: d.read_only,
                id: serial,
            })
            .map_err(|source| VmError::Drive {
                id: d.id.clone(),
                source,
            })?;
            let dev = Arc::new(Mutex::new(blk));
            blocks.push((d.id.clone(), dev.clone()));
            virtio.push((format!("drive {}", d.id), dev.clone(), dev));
        }
        for n in &spec.nets {
            let mac = n
                .mac
                .unwrap_or_else(|| generate_mac(format!("{}/{}", n.id, n.tap).as_bytes()));
            let net = Net::new(&NetConfig {
                tap: n.tap.clone(),
                mac,
                mtu: n.mtu.unwrap_or(DEFAULT_MTU),
            })
            .map_err(|e| VmError::Device(format!("network interface {}: {e}", n.id)))?;
            let dev = Arc::new(Mutex::new(net));
            nets.push((n.id.clone(), dev.clone()));
            virtio.push((format!("network interface {}", n.id), dev.clone(), dev));
        }
        if spec.rng {
            let rng = Rng::new().map_err(|e| VmError::Device(format!("rng: {e}")))?;
            let dev = Arc::new(Mutex::new(rng));
            virtio.push(("rng".into(), dev.clone(), dev));
        }
        let mut console_out = Some(console_out);
        if let ConsoleSpec::Virtio(host) = &spec.console {
            let (input, output): (Option<Box<dyn VirtioConsoleInput>>, Box<dyn Write + Send>) =
                match host {
                    VirtioConsoleHost::Stdio => (
                        Some(if ctx.interactive {
                            Box::new(crate::console::EscapingStdin::new(ctx.exit.clone()))
                        } else {
                            Box::new(crate::console::StdinFd)
                        }),
                        console_out
                            .take()
                            .unwrap_or_else(|| Box::new(std::io::stdout())),
                    ),
                    VirtioConsoleHost::File(p) => (
                        None,
                        Box::new(File::create(p).map_err(|e| {
                            VmError::Device(format!("--console-out {}: {e}", p.display()))
                        })?),
                    ),
                    VirtioConsoleHost::Socket(p) => {
                        let sock = std::os::unix::net::UnixStream::connect(p).map_err(|e| {
                            VmError::Device(format!(
                                "--console-sock {}: cannot connect: {e} (it must be listening before cinder starts)",
                                p.display()
                            ))
                        })?;
                        let input = sock.try_clone().map_err(os("console socket"))?;
                        sock.set_nonblocking(true).map_err(os("console socket"))?;
                        (Some(Box::new(input)), Box::new(sock))
                    }
                };
            let con = VirtioConsole::new(input, output)
                .map_err(|e| VmError::Device(format!("virtio-console: {e}")))?;
            let dev = Arc::new(Mutex::new(con));
            virtio.push(("console".into(), dev.clone(), dev));
        }
        if let Some(v) = &spec.vsock {
            let cfg = VsockConfig {
                guest_cid: v.cid,
                uds_path: v.uds.clone(),
            };
            cfg.validate()
                .map_err(|e| VmError::Device(format!("--vsock: {e}")))?;
            let vs = Vsock::new(&cfg).map_err(|e| VmError::Device(format!("--vsock: {e}")))?;
            let dev = Arc::new(Mutex::new(vs));
            virtio.push(("vsock".into(), dev.clone(), dev));
        }
        let console_out: Box<dyn Write + Send> =
            console_out.unwrap_or_else(|| Box::new(std::io::sink()));
        let cmdline = spec.full_cmdline();
        let guest = prepare_guest(spec, &cmdline)?;
        let kvm = crate::kvm::open(&spec.kvm_path)?;
        let max = kvm.get_max_vcpus();
        if usize::from(spec.vcpus) > max {
            return Err(VmError::TooManyVcpus {
                got: spec.vcpus,
                limit: "KVM on this host",
                max,
            });
        }
        let vm = create_vm(&kvm, &guest.mem)?;

        let mut pio = Bus::new();
        let mut subscribers: Vec<Subscriber> = Vec::new();
        if spec.serial_enabled() {
            let serial_irq = efd()?;
            vm.register_irqfd(&serial_irq, legacy::COM1_IRQ)
                .map_err(vm_ioctl("KVM_IRQFD (serial)"))?;
            let serial_in_empty = efd()?;
            let serial = Arc::new(Mutex::new(SerialDevice::new(
                serial_irq,
                serial_in_empty.clone(),
                console_out,
            )));
            pio.insert(serial.clone(), legacy::COM1_PORT, legacy::COM1_LEN)?;
            subscribers.push(Arc::new(Mutex::new(ConsoleInput::new(
                serial,
                serial_in_empty,
                ctx.exit.clone(),
                ctx.interactive,
            ))));
        }
        let kbd_irq = efd()?;
        vm.register_irqfd(&kbd_irq, KBD_IRQ)
            .map_err(vm_ioctl("KVM_IRQFD (i8042)"))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(kbd_irq, ctx.reset_evt.clone())));
        pio.insert(i8042.clone(), legacy::I8042_PORT, legacy::I8042_LEN)?;

        let mut mmio = Bus::new();
        for (slot, (name, dev, sub)) in virtio.into_iter().enumerate() {
            attach_virtio(&vm, &guest.mem, &mut mmio, slot, &name, dev)?;
            subscribers.push(sub);
        }

        let supported = kvm
            .get_supported_cpuid(CPUID_ENTRIES)
            .map_err(vm_ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let opts = CpuidOptions {
            hide_kvm_hypercalls: spec.cpu_template == CpuTemplate::NoPvHypercalls,
            tsc_khz: None,
        };
        let mut vcpus = Vec::with_capacity(spec.vcpus as usize);
        for i in 0..spec.vcpus {
            vcpus.push(Vcpu::new(
                &kvm,
                &vm,
                &guest.mem,
                i,
                spec.vcpus,
                &guest.kernel,
                &supported,
                opts,
            )?);
        }
        log::info!(
            "VM ready: {} vCPU, {} MiB, {:?} entry at {:#x}, cmdline {cmdline:?}",
            spec.vcpus,
            spec.memory_mib,
            guest.kernel.protocol,
            guest.kernel.entry.0
        );
        Ok(Vmm {
            vcpu_count: vcpus.len(),
            vcpus,
            threads: Vec::new(),
            control: Arc::new(VcpuControl::default()),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            subscribers,
            blocks,
            nets,
            i8042,
            ctx,
            _vm: vm,
            _kvm: kvm,
            _mem: guest.mem,
        })
    }

    /// The event-loop subscribers of this VM's devices (console input, virtio queues).
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.subscribers.clone()
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<(), VmError> {
        register_signal_handler(kick_signal(), kick_handler).map_err(|e| VmError::Os {
            what: "installing the vCPU kick handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        for vcpu in self.vcpus.drain(..) {
            let (pio, mmio, control, exit, metrics) = (
                self.pio.clone(),
                self.mmio.clone(),
                self.control.clone(),
                self.ctx.exit.clone(),
                self.ctx.metrics.clone(),
            );
            let h = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .spawn(move || vcpu.run(pio, mmio, control, exit, metrics))
                .map_err(os("starting a vCPU thread"))?;
            self.threads.push(h);
        }
        Ok(())
    }

    fn kick_all(&self) {
        for t in &self.threads {
            if !t.is_finished() {
                let _ = t.kill(kick_signal());
            }
        }
    }

    /// Stops every vCPU between instructions; returns once all are parked (at most 5 s).
    pub fn pause(&self) -> Result<(), VmError> {
        self.control.request_pause();
        for _ in 0..500 {
            if self.control.all_parked(self.vcpu_count) {
                return Ok(());
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(VmError::Os {
            what: "pausing the vCPUs",
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "vCPUs did not park within 5 s",
            ),
        })
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard (i8042, IRQ 1).
    pub fn send_ctrl_alt_del(&self) -> Result<(), String> {
        let mut k = match self.i8042.lock() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        k.trigger_ctrl_alt_del()
            .map_err(|e| format!("SendCtrlAltDel: the guest is not taking keyboard input ({e})"))
    }

    /// Switches drive `id` to a new backing image (same read-only mode); the guest is told of
    /// the new size.
    pub fn patch_drive(&self, id: &str, path: &std::path::Path) -> Result<(), String> {
        let (_, dev) = self
            .blocks
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| format!("drive {id} does not exist"))?;
        let mut dev = match dev.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        dev.set_backing(path)
            .map_err(|e| format!("drive {id}: {e}"))
    }

    /// Per-device metrics sections (cumulative counters), as JSON objects.
    pub fn device_metrics(&self) -> Vec<(String, String)> {
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            match m.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            }
        }
        let mut out = Vec::new();
        for (id, dev) in &self.blocks {
            let s = lock(dev).stats();
            out.push((
                format!("block_{id}"),
                format!(
                    "{{\"reads\":{},\"writes\":{},\"flushes\":{},\"discards\":{},\"write_zeroes\":{},\"read_bytes\":{},\"write_bytes\":{},\"errors\":{}}}",
                    s.reads, s.writes, s.flushes, s.discards, s.write_zeroes, s.read_bytes, s.write_bytes, s.errors
                ),
            ));
        }
        for (id, dev) in &self.nets {
            let s = lock(dev).stats();
            out.push((
                format!("net_{id}"),
                format!(
                    "{{\"rx_frames\":{},\"rx_bytes\":{},\"rx_dropped\":{},\"rx_bad_chains\":{},\"tx_frames\":{},\"tx_bytes\":{},\"tx_dropped\":{}}}",
                    s.rx_frames, s.rx_bytes, s.rx_dropped, s.rx_bad_chains, s.tx_frames, s.tx_bytes, s.tx_dropped
                ),
            ));
        }
        out
    }

    /// Stops and joins every vCPU thread (kicking them out of KVM_RUN). A thread that does
    /// not stop within 5 s (blocked on the host, e.g. a stalled console) is left behind: the
    /// process is about to exit anyway.
    pub fn shutdown(mut self) {
        self.control.stop();
        for _ in 0..500 {
            if self.threads.iter().all(|t| t.is_finished()) {
                break;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(10));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                if t.join().is_err() {
                    log::error!("a vCPU thread panicked");
                }
            } else {
                log::error!("a vCPU thread did not stop within 5 s; leaving it");
                std::mem::forget(t);
            }
        }
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// SIGINT/SIGTERM as a readable fd (the signals are blocked for every thread).
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `sigs` in this thread (and the threads it starts later) and opens a signalfd.
    pub fn new(sigs: &[libc::c_int]) -> std::io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for s in sigs {
            // SAFETY: `set` is valid and `s` a signal number.
            unsafe { libc::sigaddset(&mut set, *s) };
        }
        // SAFETY: `set` is valid; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// The fd to poll.
    pub fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one pending signal number.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`, which is `size` bytes long.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                size,
            )
        };
        (n as usize == size).then_some(info.ssi_signo as i32)
    }
}

#[cfg(test)]
mod spec_tests {
    use super::*;

    fn spec(cmdline: &str, drives: Vec<DriveSpec>) -> VmSpec {
        VmSpec {
            kernel: PathBuf::from("k"),
            initrd: None,
            cmdline: cmdline.into(),
            vcpus: 1,
            memory_mib: 128,
            boot_protocol: ProtocolChoice::Auto,
            cpu_template: CpuTemplate::Host,
            kvm_path: "/dev/kvm".into(),
            drives,
            nets: Vec::new(),
            rng: true,
            console: ConsoleSpec::Serial,
            vsock: None,
        }
    }

    fn drive(id: &str, root: bool, ro: bool) -> DriveSpec {
        DriveSpec {
            id: id.into(),
            path: PathBuf::from(id),
            read_only: ro,
            root,
        }
    }

    #[test]
    fn cmdline_gets_devices_and_root_before_init_args() {
        let s = spec(
            "console=ttyS0 -- init-arg",
            vec![drive("r", true, true), drive("d", false, false)],
        );
        assert_eq!(
            s.full_cmdline(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7 root=/dev/vda ro -- init-arg"
        );
        let s = spec("quiet", vec![]);
        assert_eq!(s.full_cmdline(), "quiet virtio_mmio.device=4K@0xd0000000:5");
        let s = spec("-- a b", vec![]);
        assert_eq!(
            s.full_cmdline(),
            "virtio_mmio.device=4K@0xd0000000:5 -- a b"
        );
    }

    #[test]
    fn a_quoted_double_dash_is_not_the_init_separator() {
        let s = spec(
            "quiet run=\"set -- $x; echo --\" x=\"a\"-- -- init \"--\"",
            vec![drive("r", true, false)],
        );
        assert_eq!(
            s.full_cmdline(),
            "quiet run=\"set -- $x; echo --\" x=\"a\"-- virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 root=/dev/vda rw -- init \"--\""
        );
        assert_eq!(init_args_start("a=\"--\" b"), None);
        assert_eq!(init_args_start("--"), Some(0));
        assert_eq!(init_args_start("a\t--\tb"), Some(2));
        assert_eq!(init_args_start("a --b -- c"), Some(6));
    }

    #[test]
    fn duplicate_ids_and_roots_are_refused() {
        let s = spec("", vec![drive("a", false, false), drive("a", false, false)]);
        assert!(s.validate().unwrap_err().to_string().contains("used twice"));
        let s = spec("", vec![drive("a", true, false), drive("b", true, false)]);
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("more than one"));
    }
}
