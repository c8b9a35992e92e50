//! Building a microVM from a [`VmSpec`] and running it to its end.
//!
//! Everything that can be checked without KVM (files, kernel format, sizes, command line) is
//! checked first, so bad input gets its own precise error on any host.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arch::boot::{place_initrd, write_boot_info, write_cmdline, BootError, InitrdPlacement};
use arch::cpuid::CpuidOptions;
use arch::layout::{self, ram_regions, ram_top, MIB};
use arch::loader::{load_kernel, LoadedKernel, LoaderError, ProtocolChoice};
use arch::mptable::{setup_mptable, MptableError, MAX_CPUS};
use arch::GuestMemoryMmap;
use devices::legacy::{self, SerialDevice, I8042};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::{Bus, BusError};
use crate::console::{ConsoleInput, RawTerminal};
use crate::exit::{ExitReason, ExitSignal};
use crate::kvm::KvmError;
use crate::vcpu::{Vcpu, VcpuError, CPUID_ENTRIES};

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
pub fn prepare_guest(spec: &VmSpec) -> Result<PreparedGuest, VmError> {
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
    let cmdline_len = write_cmdline(&mem, &kernel, &spec.cmdline)?;
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

/// A running or ready microVM.
pub struct Vmm {
    // Field order matters for drop: threads are joined in `run`, then the VM, then memory.
    vcpus: Vec<Vcpu>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_in_empty: Arc<EventFd>,
    reset_evt: Arc<EventFd>,
    exit: Arc<ExitSignal>,
    _vm: VmFd,
    _kvm: Kvm,
    _mem: GuestMemoryMmap,
}

impl Vmm {
    /// Builds the VM for `spec`, with the serial console writing to `console_out`.
    pub fn build(spec: &VmSpec, console_out: Box<dyn Write + Send>) -> Result<Vmm, VmError> {
        let guest = prepare_guest(spec)?;
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

        let efd = || {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map(Arc::new)
                .map_err(os("eventfd"))
        };
        let serial_irq = efd()?;
        vm.register_irqfd(&serial_irq, legacy::COM1_IRQ)
            .map_err(vm_ioctl("KVM_IRQFD (serial)"))?;
        let serial_in_empty = efd()?;
        let reset_evt = efd()?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            serial_irq,
            serial_in_empty.clone(),
            console_out,
        )));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), legacy::COM1_PORT, legacy::COM1_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(reset_evt.clone()))),
            legacy::I8042_PORT,
            legacy::I8042_LEN,
        )?;
        let mmio = Bus::new();

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
        Ok(Vmm {
            vcpus,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            serial_in_empty,
            reset_evt,
            exit: Arc::new(ExitSignal::new().map_err(os("eventfd"))?),
            _vm: vm,
            _kvm: kvm,
            _mem: guest.mem,
        })
    }

    /// Runs the VM until it resets, fails, or a signal or the console escape ends it. Joins
    /// every vCPU thread before returning.
    pub fn run(mut self) -> ExitReason {
        let signals = match SignalFd::new(&[libc::SIGINT, libc::SIGTERM]) {
            Ok(s) => s,
            Err(e) => return ExitReason::VmmError(format!("cannot watch signals: {e}")),
        };
        // vCPU threads are kicked out of KVM_RUN with this signal; its handler does nothing.
        extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        let kick = SIGRTMIN();
        if let Err(e) = register_signal_handler(kick, kick_handler) {
            return ExitReason::VmmError(format!("cannot install the vCPU kick handler: {e}"));
        }

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            let (pio, mmio, stop, exit) = (
                self.pio.clone(),
                self.mmio.clone(),
                stop.clone(),
                self.exit.clone(),
            );
            let name = format!("vcpu{}", vcpu.index);
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run(pio, mmio, stop, exit))
            {
                Ok(h) => threads.push(h),
                Err(e) => {
                    self.exit.request(ExitReason::VmmError(format!(
                        "cannot start a vCPU thread: {e}"
                    )));
                    break;
                }
            }
        }

        let terminal = RawTerminal::enter();
        let reason = self.event_loop(signals, terminal.is_active());
        drop(terminal);

        stop.store(true, Ordering::Release);
        for t in threads {
            // Kick until the thread leaves KVM_RUN (bounded: 5 s), then join.
            for _ in 0..500 {
                if t.is_finished() {
                    break;
                }
                let _ = t.kill(kick);
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        reason
    }

    fn event_loop(&mut self, signals: SignalFd, interactive: bool) -> ExitReason {
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            match EventManager::new() {
                Ok(em) => em,
                Err(e) => {
                    return ExitReason::VmmError(format!("cannot create the event loop: {e:?}"))
                }
            };
        let control = Arc::new(Mutex::new(Control {
            signals,
            reset: self.reset_evt.clone(),
            exit: self.exit.clone(),
        }));
        em.add_subscriber(control);
        let console = Arc::new(Mutex::new(ConsoleInput::new(
            self.serial.clone(),
            self.serial_in_empty.clone(),
            self.exit.clone(),
            interactive,
        )));
        em.add_subscriber(console);
        loop {
            if let Some(r) = self.exit.reason() {
                return r;
            }
            if let Err(e) = em.run_with_timeout(1000) {
                return ExitReason::VmmError(format!("event loop failed: {e:?}"));
            }
        }
    }
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
        Ok(SignalFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
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

/// Signals, the i8042 reset, and exit requests from vCPUs.
struct Control {
    signals: SignalFd,
    reset: Arc<EventFd>,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.signals.fd.as_raw_fd(),
            self.reset.as_raw_fd(),
            self.exit.evt.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                self.exit.request(ExitReason::VmmError(format!(
                    "cannot watch control events: {e:?}"
                )));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.signals.fd.as_raw_fd() {
            if let Some(sig) = self.signals.read() {
                log::info!("signal {sig}: shutting down");
                self.exit.request(ExitReason::Signal(sig));
            }
        } else if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            log::info!("guest reset through the i8042");
            self.exit.request(ExitReason::Reset);
        } else if fd == self.exit.evt.as_raw_fd() {
            let _ = self.exit.evt.read();
        }
    }
}
