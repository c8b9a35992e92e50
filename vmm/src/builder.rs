//! Building a [`Vmm`] from a validated [`VmConfig`] and cinder's own [`VmmOptions`], in named
//! steps: check, open the devices' host sides, prepare the guest, create the VM, attach the
//! legacy devices, attach the virtio devices, create the vCPUs.
//!
//! Everything that can be checked without KVM (files, sockets, kernel format, sizes, command
//! line) is checked first, so bad input gets its own precise error on any host.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use api::config::VmConfig;
use arch::boot::{place_initrd, write_boot_info, write_cmdline, InitrdPlacement};
use arch::cpuid::CpuidOptions;
use arch::layout::{self, ram_regions, ram_top, MIB};
use arch::loader::{load_kernel, LoadedKernel, ProtocolChoice};
use arch::mptable::{setup_mptable, MAX_CPUS};
use arch::GuestMemoryMmap;
use devices::i8042::I8042;
use devices::legacy::{self, SerialDevice};
use devices::rate_limiter::{bucket, RateLimiter, RateLimiterError};
use devices::virtio::balloon::{Balloon, BalloonConfig as BalloonDeviceConfig};
use devices::virtio::block::{Block, BlockConfig, IoEngine, IoGate, StartHook};
use devices::virtio::console::{Console as VirtioConsole, ConsoleInput as VirtioConsoleInput};
use devices::virtio::net::{generate_mac, Net, NetConfig, DEFAULT_MTU};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{Vsock, VsockConfig, VsockListener};
use devices::virtio::{mmio, MmioTransport, VirtioDevice, VirtioEventDevice};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::cmdline::{user_cmdline, virtio_count, virtio_slot, GuestCmdline, MAX_VIRTIO_DEVICES};
use crate::console::ConsoleInput;
use crate::error::{os, vm_ioctl, VmError};
use crate::options::{ConsoleSpec, CpuTemplate, VirtioConsoleHost, VmmOptions};
use crate::snapshot::{DeviceStates, MicrovmState, SnapshotError};
use crate::vcpu::{Vcpu, VcpuControl, CPUID_ENTRIES};
use crate::vm::{Subscriber, VmContext, Vmm};

/// The keyboard's IRQ (ISA IRQ 1).
pub const KBD_IRQ: u32 = 1;

/// Builds one microVM. [`VmBuilder::new`] checks what needs nothing opened;
/// [`VmBuilder::build`] opens, loads and creates everything.
pub struct VmBuilder<'a> {
    cfg: &'a VmConfig,
    opts: &'a VmmOptions,
    /// The vsock socket, when it was bound before the build (`PUT /vsock`).
    vsock: Option<VsockListener>,
}

/// What a block device's I/O thread ("blk-<id>") runs first: the place for its seccomp
/// filter (it reads and writes the image with preadv/pwritev/read/write/lseek, fdatasync,
/// fallocate, and talks to the device loop through a channel and an eventfd write).
fn blk_thread_start_hook() -> StartHook {
    Arc::new(|| {
        // A thread that cannot be confined ends cinder rather than run unfiltered.
        if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::BlockIo) {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "cinder: [error] {e}");
            std::process::exit(1);
        }
    })
}

/// A virtio device opened before boot: its name (for errors) and the device, which is both
/// its transport's device and an event-loop subscriber.
type NewVirtio = (String, Arc<Mutex<dyn VirtioEventDevice>>);

/// The devices' host sides, opened before anything else.
struct OpenDevices {
    /// Drives by id, for the API's PATCH and metrics.
    blocks: Vec<(String, Arc<Mutex<Block>>)>,
    /// Held shut by a pause, so that no block I/O thread touches guest memory then.
    io_gate: Arc<IoGate>,
    /// Network interfaces by id, for metrics.
    nets: Vec<(String, Arc<Mutex<Net>>)>,
    /// The entropy device, for metrics.
    rng: Option<Arc<Mutex<Rng>>>,
    /// The balloon, for PATCH /balloon, its statistics and metrics.
    balloon: Option<Arc<Mutex<Balloon>>>,
    /// Every virtio device in slot order.
    virtio: Vec<NewVirtio>,
    /// The console output, unless a virtio-console on stdio took it.
    console_out: Option<Box<dyn Write + Send>>,
}

/// The PIO bus with COM1 (when enabled) and the i8042 on it.
struct LegacyDevices {
    pio: Bus,
    i8042: Arc<Mutex<I8042>>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// COM1's input, when COM1 exists.
    serial_input: Option<Subscriber>,
}

impl<'a> VmBuilder<'a> {
    /// Checks `cfg` and `opts` together, without opening anything: a boot source is there, the
    /// configuration keeps its own rules, the virtio devices fit the IOAPIC, the command line
    /// is one linux-loader takes.
    pub fn new(cfg: &'a VmConfig, opts: &'a VmmOptions) -> Result<Self, VmError> {
        if cfg.boot_source.is_none() {
            return Err(VmError::NoBootSource);
        }
        cfg.validate()?;
        check_device_count(cfg, &opts.console)?;
        GuestCmdline::new(user_cmdline(cfg))?;
        Ok(VmBuilder {
            cfg,
            opts,
            vsock: None,
        })
    }

    /// Builds the vsock device on `listener` (bound for the configured path by `PUT /vsock`)
    /// instead of binding its socket.
    pub fn with_vsock_listener(mut self, listener: Option<VsockListener>) -> Self {
        self.vsock = listener;
        self
    }

    /// Builds the VM (vCPUs created, not running), with the serial console writing to
    /// `console_out`. Everything up to the command line in guest memory needs no KVM.
    pub fn build(
        mut self,
        console_out: Box<dyn Write + Send>,
        ctx: VmContext,
    ) -> Result<Vmm, VmError> {
        let mut devices = self.open_devices(console_out, &ctx)?;
        let guest = load_guest(self.cfg, self.opts.boot_protocol)?;
        let mut cmdline = GuestCmdline::new(user_cmdline(self.cfg))?;
        let virtio = place_virtio_devices(&guest.mem, devices.virtio, &mut cmdline)?;
        if let Some(i) = self.cfg.drives.iter().position(|d| d.is_root_device) {
            // Drives take the first slots, in order: the root drive is the ith virtio disk.
            cmdline.add_root(i, self.cfg.drives[i].is_read_only)?;
        }
        let cmdline = cmdline.finish()?;
        finish_guest(&guest, self.cfg, &cmdline)?;
        let kvm = self.open_kvm()?;
        let track_dirty = self.cfg.machine.track_dirty_pages;
        let vm = create_vm(&kvm, &guest.mem, track_dirty)?;
        let serial_out = self.opts.console.serial_enabled().then(|| {
            devices
                .console_out
                .take()
                .unwrap_or_else(|| Box::new(std::io::sink()))
        });
        let legacy = attach_legacy_devices(&vm, serial_out, &ctx, None)?;
        wire_virtio_devices(&vm, &virtio.placed)?;
        let mut subscribers: Vec<Subscriber> = legacy.serial_input.into_iter().collect();
        subscribers.extend(virtio.subscribers);
        let vcpus = self.create_vcpus(&kvm, &vm, &guest)?;
        let transports = virtio
            .placed
            .iter()
            .map(|p| (p.name.clone(), p.transport.clone()))
            .collect();
        log::info!(
            "VM ready: {} vCPU, {} MiB, {:?} entry at {:#x}, cmdline {:?}",
            self.cfg.machine.vcpu_count,
            self.cfg.machine.mem_size_mib,
            guest.kernel.protocol,
            guest.kernel.entry.0,
            cmdline
        );
        Ok(Vmm {
            vcpu_count: vcpus.len(),
            vcpus,
            threads: Vec::new(),
            control: Arc::new(VcpuControl::default()),
            pio: Arc::new(legacy.pio),
            mmio: Arc::new(virtio.bus),
            subscribers,
            blocks: devices.blocks,
            io_gate: devices.io_gate,
            nets: devices.nets,
            rng: devices.rng,
            balloon: devices.balloon,
            i8042: legacy.i8042,
            serial: legacy.serial,
            config: config_json(self.cfg),
            transports,
            track_dirty,
            uffd: None,
            ctx,
            _vm: vm,
            _kvm: kvm,
            _mem: guest.mem,
        })
    }

    /// Builds the VM a snapshot describes (vCPUs created with their state, not running):
    /// the same devices as the configuration it was taken with, guest memory mapped from
    /// `mem_path` (`MAP_PRIVATE`), the VM's, vCPUs' and devices' state put back.
    pub fn restore(
        mut self,
        state: &MicrovmState,
        mem_path: &std::path::Path,
        uffd: bool,
        track_dirty: bool,
        console_out: Box<dyn Write + Send>,
        ctx: VmContext,
    ) -> Result<Vmm, VmError> {
        let cfg = self.cfg;
        let want = ram_regions((cfg.machine.mem_size_mib as u64).saturating_mul(MIB));
        let have: Vec<(u64, u64)> = state.memory.iter().map(|r| (r.gpa, r.len)).collect();
        let want: Vec<(u64, u64)> = want.iter().map(|(a, l)| (a.0, *l as u64)).collect();
        if have != want {
            return Err(VmError::Snapshot(SnapshotError::RegionMismatch(format!(
                "regions {have:x?}, {} MiB configured",
                cfg.machine.mem_size_mib
            ))));
        }
        if state.vcpus.len() != usize::from(cfg.machine.vcpu_count) {
            return Err(VmError::Snapshot(SnapshotError::Invalid(format!(
                "snapshot: {} vCPU states for {} configured vCPUs",
                state.vcpus.len(),
                cfg.machine.vcpu_count
            ))));
        }
        let (mem, uffd) = if uffd {
            let u = crate::snapshot::uffd::connect(mem_path, &state.memory)?;
            (u.mem, Some((u.handler, u.uffd)))
        } else {
            let m = crate::snapshot::map_memory(mem_path, &state.memory)?;
            (m, None)
        };
        exclude_from_core_dumps(&mem);
        let mut devices = self.open_devices(console_out, &ctx)?;
        let names: Vec<&String> = devices.virtio.iter().map(|(n, _)| n).collect();
        let saved: Vec<&String> = state.devices.virtio.iter().map(|(n, _)| n).collect();
        if names != saved {
            return Err(VmError::Snapshot(SnapshotError::Invalid(format!(
                "snapshot: its virtio devices {saved:?} are not the configuration's {names:?}"
            ))));
        }
        let mut cmdline = GuestCmdline::new(user_cmdline(cfg))?;
        let virtio = place_virtio_devices(&mem, std::mem::take(&mut devices.virtio), &mut cmdline)?;
        let kvm = self.open_kvm()?;
        let vm = create_vm(&kvm, &mem, track_dirty)?;
        crate::vm::restore_vm_state(&vm, &state.vm).map_err(VmError::Snapshot)?;
        let serial_out = self.opts.console.serial_enabled().then(|| {
            devices
                .console_out
                .take()
                .unwrap_or_else(|| Box::new(std::io::sink()))
        });
        let legacy = attach_legacy_devices(&vm, serial_out, &ctx, Some(&state.devices))?;
        wire_virtio_devices(&vm, &virtio.placed)?;
        let mut subscribers: Vec<Subscriber> = legacy.serial_input.into_iter().collect();
        subscribers.extend(virtio.subscribers);
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (i, s) in state.vcpus.iter().enumerate() {
            let index = u8::try_from(i).map_err(|_| VmError::NoVcpus(0))?;
            vcpus.push(Vcpu::restore(&vm, index, s)?);
        }
        // The devices last: an interrupt a restore raises (vsock's transport reset) must find
        // the vCPUs' local APICs restored.
        for (p, (name, st)) in virtio.placed.iter().zip(&state.devices.virtio) {
            let mut t = match p.transport.lock() {
                Ok(g) => g,
                Err(e) => e.into_inner(),
            };
            t.restore(st)
                .map_err(|e| VmError::Snapshot(SnapshotError::Invalid(format!("{name}: {e}"))))?;
        }
        // The balloon's own state, once its transport activated it again.
        if let (Some(b), Some(st)) = (&devices.balloon, &state.devices.balloon) {
            let mut b = match b.lock() {
                Ok(g) => g,
                Err(e) => e.into_inner(),
            };
            b.restore_state(st)
                .map_err(|e| VmError::Snapshot(SnapshotError::Invalid(format!("balloon: {e}"))))?;
        }
        let _ = &mut self;
        log::info!(
            "VM restored: {} vCPU, {} MiB from {}",
            cfg.machine.vcpu_count,
            cfg.machine.mem_size_mib,
            mem_path.display()
        );
        Ok(Vmm {
            vcpu_count: vcpus.len(),
            vcpus,
            threads: Vec::new(),
            control: Arc::new(VcpuControl::default()),
            pio: Arc::new(legacy.pio),
            mmio: Arc::new(virtio.bus),
            subscribers,
            blocks: devices.blocks,
            io_gate: devices.io_gate,
            nets: devices.nets,
            rng: devices.rng,
            balloon: devices.balloon,
            i8042: legacy.i8042,
            serial: legacy.serial,
            config: config_json(cfg),
            transports: virtio
                .placed
                .iter()
                .map(|p| (p.name.clone(), p.transport.clone()))
                .collect(),
            track_dirty,
            uffd,
            ctx,
            _vm: vm,
            _kvm: kvm,
            _mem: mem,
        })
    }

    /// Opens every device's host side before anything else: a missing image or a socket in
    /// use is the user's error, and must be reported as such on any host. The order is the
    /// guest's slot order: drives (the root drive first), network interfaces, rng,
    /// virtio-console, vsock, balloon.
    fn open_devices(
        &mut self,
        console_out: Box<dyn Write + Send>,
        ctx: &VmContext,
    ) -> Result<OpenDevices, VmError> {
        let mut open = OpenDevices {
            blocks: Vec::with_capacity(self.cfg.drives.len()),
            io_gate: Arc::new(IoGate::new()),
            nets: Vec::with_capacity(self.cfg.net.len()),
            rng: None,
            balloon: None,
            virtio: Vec::new(),
            console_out: Some(console_out),
        };
        for d in &self.cfg.drives {
            let serial = (d.drive_id.len() <= 20).then(|| d.drive_id.clone());
            let blk = Block::new(&BlockConfig {
                path: d.path_on_host.clone(),
                read_only: d.is_read_only,
                id: serial,
                allow_block_device: self.cfg.paths.allow_block_devices,
            })
            .map_err(|source| VmError::Drive {
                id: d.drive_id.clone(),
                source,
            })?;
            let mut blk = blk;
            blk.set_rate_limiter(rate_limiter(d.rate_limiter.as_ref()).map_err(|source| {
                VmError::Drive {
                    id: d.drive_id.clone(),
                    source: source.into(),
                }
            })?);
            let dev = Arc::new(Mutex::new(blk));
            // The drive's queue is served by a thread of its own ("blk-<id>", cut to 15
            // bytes), off the device loop.
            let engine = match d.io_engine {
                api::model::IoEngine::Sync => IoEngine::Sync,
                api::model::IoEngine::Async => IoEngine::Async,
                api::model::IoEngine::Auto => IoEngine::Auto,
            };
            Block::start_io_thread(
                &dev,
                &format!("blk-{}", d.drive_id),
                blk_thread_start_hook(),
                open.io_gate.clone(),
                engine,
            )
            .map_err(|source| VmError::Drive {
                id: d.drive_id.clone(),
                source,
            })?;
            open.blocks.push((d.drive_id.clone(), dev.clone()));
            open.virtio.push((format!("drive {}", d.drive_id), dev));
        }
        for n in &self.cfg.net {
            let mac = n.guest_mac.map(|m| m.0).unwrap_or_else(|| {
                generate_mac(format!("{}/{}", n.iface_id, n.host_dev_name).as_bytes())
            });
            let net = Net::new(&NetConfig {
                tap: n.host_dev_name.clone(),
                mac,
                mtu: n.mtu.unwrap_or(DEFAULT_MTU),
            })
            .map_err(|source| VmError::Net {
                id: n.iface_id.clone(),
                source,
            })?;
            let mut net = net;
            let limiters = rate_limiter(n.rx_rate_limiter.as_ref())
                .and_then(|rx| Ok((rx, rate_limiter(n.tx_rate_limiter.as_ref())?)))
                .map_err(|source| VmError::Net {
                    id: n.iface_id.clone(),
                    source: source.into(),
                })?;
            net.set_rate_limiters(Some(limiters.0), Some(limiters.1));
            let dev = Arc::new(Mutex::new(net));
            open.nets.push((n.iface_id.clone(), dev.clone()));
            open.virtio
                .push((format!("network interface {}", n.iface_id), dev));
        }
        if let Some(e) = &self.cfg.entropy {
            let limiter =
                rate_limiter(e.rate_limiter.as_ref()).map_err(|e| VmError::Rng(e.into()))?;
            let dev = Arc::new(Mutex::new(
                Rng::with_rate_limiter(limiter).map_err(VmError::Rng)?,
            ));
            open.rng = Some(dev.clone());
            open.virtio.push(("rng".into(), dev));
        }
        if let ConsoleSpec::Virtio(host) = &self.opts.console {
            let con = open_virtio_console(host, &mut open.console_out, ctx)?;
            let dev = Arc::new(Mutex::new(con));
            open.virtio.push(("console".into(), dev));
        }
        if let Some(v) = &self.cfg.vsock {
            let cfg = VsockConfig {
                guest_cid: u64::from(v.guest_cid),
                uds_path: v.uds_path.clone(),
            };
            let vs = match self.vsock.take() {
                Some(l) if l.path() == cfg.uds_path => Vsock::with_listener(&cfg, l),
                _ => Vsock::new(&cfg),
            };
            let dev = Arc::new(Mutex::new(vs.map_err(VmError::Vsock)?));
            open.virtio.push(("vsock".into(), dev));
        }
        if let Some(b) = &self.cfg.balloon {
            let dev = Arc::new(Mutex::new(
                Balloon::new(BalloonDeviceConfig {
                    amount_mib: b.amount_mib,
                    deflate_on_oom: b.deflate_on_oom,
                    stats_polling_interval_s: b.stats_polling_interval_s,
                    free_page_reporting: b.free_page_reporting,
                })
                .map_err(VmError::Balloon)?,
            ));
            open.balloon = Some(dev.clone());
            open.virtio.push(("balloon".into(), dev));
        }
        Ok(open)
    }

    /// Opens KVM and checks that it takes this many vCPUs.
    fn open_kvm(&self) -> Result<Kvm, VmError> {
        let kvm = crate::kvm::open(&self.opts.kvm_path)?;
        let max = kvm.get_max_vcpus();
        let vcpus = self.cfg.machine.vcpu_count;
        if usize::from(vcpus) > max {
            return Err(VmError::TooManyVcpus {
                got: vcpus,
                limit: "KVM on this host",
                max,
            });
        }
        Ok(kvm)
    }

    /// Creates every vCPU, set up to enter the loaded kernel.
    fn create_vcpus(
        &self,
        kvm: &Kvm,
        vm: &VmFd,
        guest: &PreparedGuest,
    ) -> Result<Vec<Vcpu>, VmError> {
        let supported = kvm
            .get_supported_cpuid(CPUID_ENTRIES)
            .map_err(vm_ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        let opts = CpuidOptions {
            hide_kvm_hypercalls: self.opts.cpu_template == CpuTemplate::NoPvHypercalls,
            tsc_khz: None,
        };
        let count = self.cfg.machine.vcpu_count;
        let mut vcpus = Vec::with_capacity(usize::from(count));
        for i in 0..count {
            vcpus.push(Vcpu::new(
                kvm,
                vm,
                &guest.mem,
                i,
                count,
                &guest.kernel,
                &supported,
                opts,
            )?);
        }
        Ok(vcpus)
    }
}

/// The configuration as a config file, for a snapshot.
fn config_json(cfg: &VmConfig) -> serde_json::Value {
    serde_json::to_value(cfg.to_full_config()).unwrap_or(serde_json::Value::Null)
}

/// Refuses more virtio devices than there are IOAPIC pins for them.
fn check_device_count(cfg: &VmConfig, console: &ConsoleSpec) -> Result<(), VmError> {
    let count = virtio_count(cfg, console);
    if count > MAX_VIRTIO_DEVICES {
        return Err(VmError::TooManyDevices {
            count,
            max: MAX_VIRTIO_DEVICES,
        });
    }
    Ok(())
}

/// Opens a virtio-console's host side. On stdio it takes `console_out` (COM1 is then off).
fn open_virtio_console(
    host: &VirtioConsoleHost,
    console_out: &mut Option<Box<dyn Write + Send>>,
    ctx: &VmContext,
) -> Result<VirtioConsole, VmError> {
    let (input, output): (Option<Box<dyn VirtioConsoleInput>>, Box<dyn Write + Send>) = match host {
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
            Box::new(crate::console::CappedWriter::new(
                File::create(p).map_err(|source| VmError::ConsoleOut {
                    path: p.clone(),
                    source,
                })?,
                crate::console::console_out_max_bytes(),
            )),
        ),
        VirtioConsoleHost::Socket(p) => {
            let sock = std::os::unix::net::UnixStream::connect(p).map_err(|source| {
                VmError::ConsoleSock {
                    path: p.clone(),
                    source,
                }
            })?;
            let input = sock.try_clone().map_err(os("console socket"))?;
            sock.set_nonblocking(true).map_err(os("console socket"))?;
            (Some(Box::new(input)), Box::new(sock))
        }
    };
    VirtioConsole::new(input, output).map_err(VmError::VirtioConsole)
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

/// The host's physical address width, from CPUID leaf 0x80000008.
fn host_phys_bits() -> u32 {
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext >= 0x8000_0008 {
        std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff
    } else {
        36
    }
}

/// Marks every guest RAM region `MADV_DONTDUMP`: a core dump of cinder must not carry the
/// guest's memory (its secrets, and gigabytes of it). Best effort: a refusal is logged.
fn exclude_from_core_dumps(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let len = region.len();
        let Ok(len) = usize::try_from(len) else {
            continue;
        };
        // SAFETY: `as_ptr()` and `len` describe exactly one mapping this process made for the
        // region (vm-memory's MmapRegion, alive as long as `mem`); MADV_DONTDUMP only changes
        // the mapping's core-dump flag, never its contents or protection.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_DONTDUMP) };
        if rc != 0 {
            log::warn!(
                "guest memory at {:#x}: madvise(MADV_DONTDUMP): {}",
                region.start_addr().0,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Maps guest memory for `cfg`'s machine and loads its boot source (kernel by `protocol`,
/// initrd), with `cmdline` as the command line, the boot information and the MP table: what
/// [`VmBuilder::build`] does before KVM, for a given command line. Needs no KVM.
pub fn prepare_guest(
    cfg: &VmConfig,
    protocol: ProtocolChoice,
    cmdline: &str,
) -> Result<PreparedGuest, VmError> {
    let guest = load_guest(cfg, protocol)?;
    finish_guest(&guest, cfg, cmdline)?;
    Ok(guest)
}

/// Maps guest memory for `cfg`'s machine and loads the kernel (by `protocol`) and the initrd.
fn load_guest(cfg: &VmConfig, protocol: ProtocolChoice) -> Result<PreparedGuest, VmError> {
    let boot = cfg.boot_source.as_ref().ok_or(VmError::NoBootSource)?;
    let vcpus = cfg.machine.vcpu_count;
    let mib = cfg.machine.mem_size_mib as u64;
    if vcpus == 0 {
        return Err(VmError::NoVcpus(0));
    }
    if vcpus > MAX_CPUS {
        return Err(VmError::TooManyVcpus {
            got: vcpus,
            limit: "the MP table",
            max: MAX_CPUS as usize,
        });
    }
    if mib == 0 {
        return Err(VmError::NoMemory);
    }
    let mem_size = mib.checked_mul(MIB).ok_or(VmError::MemoryTooLarge {
        mib,
        top: u64::MAX,
        bits: host_phys_bits(),
    })?;
    let bits = host_phys_bits();
    let top = ram_top(mem_size);
    if bits < 64 && top > (1u64 << bits) {
        return Err(VmError::MemoryTooLarge { mib, top, bits });
    }
    let mem =
        GuestMemoryMmap::from_ranges(&ram_regions(mem_size)).map_err(|e| VmError::MemoryMap {
            mib,
            why: e.to_string(),
        })?;
    exclude_from_core_dumps(&mem);
    let kernel = load_kernel(
        &mem,
        &boot.kernel_image_path,
        layout::low_ram_end(mem_size),
        protocol,
    )?;
    let initrd = match &boot.initrd_path {
        None => None,
        Some(path) => {
            let p = path.display().to_string();
            let ierr = |why: String| VmError::Initrd {
                path: p.clone(),
                why,
            };
            // Without blocking or following a link, a regular file only (a FIFO here used to
            // freeze the control loop until it got a writer).
            let mut f = api::paths::open_boot_file("initrd", path).map_err(|e| match e {
                api::paths::PathError::Open { source, .. } => ierr(source.to_string()),
                e => ierr(e.to_string()),
            })?;
            let meta = f.metadata().map_err(|e| ierr(e.to_string()))?;
            let size = meta.len();
            let placement = place_initrd(mem_size, &kernel, size)?;
            // place_initrd fitted it into guest memory, which this process has mapped.
            let len = usize::try_from(size).map_err(|_| ierr("too large".into()))?;
            mem.read_exact_volatile_from(GuestAddress(placement.addr), &mut f, len)
                .map_err(|e| ierr(e.to_string()))?;
            Some(placement)
        }
    };
    Ok(PreparedGuest {
        mem,
        kernel,
        initrd,
    })
}

/// Writes the command line (its length checked against the guest's limit), the boot
/// information and the MP table into the loaded guest.
fn finish_guest(guest: &PreparedGuest, cfg: &VmConfig, cmdline: &str) -> Result<(), VmError> {
    let mem_size = (cfg.machine.mem_size_mib as u64).saturating_mul(MIB);
    let cmdline_len = write_cmdline(&guest.mem, &guest.kernel, cmdline)?;
    write_boot_info(
        &guest.mem,
        mem_size,
        &guest.kernel,
        cmdline_len,
        guest.initrd,
    )?;
    setup_mptable(&guest.mem, cfg.machine.vcpu_count)?;
    Ok(())
}

/// Creates the VM: in-kernel irqchip and PIT, TSS and identity map, memory slots.
fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(vm_ioctl("KVM_CREATE_VM"))?;
    let tss = usize::try_from(layout::KVM_TSS_ADDRESS).map_err(|_| VmError::VmIoctl {
        what: "KVM_SET_TSS_ADDR".into(),
        source: kvm_ioctls::Error::new(libc::EOVERFLOW),
    })?;
    vm.set_tss_address(tss)
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
            // At most a handful of regions (below and above the MMIO gap).
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            flags: if track_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
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

/// Puts COM1 (when `serial_out` is given: its output) and the i8042 on a new PIO bus, each
/// with an irqfd for its ISA IRQ.
fn attach_legacy_devices(
    vm: &VmFd,
    serial_out: Option<Box<dyn Write + Send>>,
    ctx: &VmContext,
    state: Option<&DeviceStates>,
) -> Result<LegacyDevices, VmError> {
    let mut serial_dev = None;
    let mut pio = Bus::new();
    let mut serial_input: Option<Subscriber> = None;
    if let Some(out) = serial_out {
        let serial_irq = efd()?;
        vm.register_irqfd(&serial_irq, legacy::COM1_IRQ)
            .map_err(vm_ioctl("KVM_IRQFD (serial)"))?;
        let serial_in_empty = efd()?;
        let dev = match state.and_then(|s| s.serial.as_ref()) {
            Some(st) => SerialDevice::with_state(serial_irq, serial_in_empty.clone(), out, st)
                .map_err(|e| VmError::Snapshot(SnapshotError::Invalid(e.to_string())))?,
            None => SerialDevice::new(serial_irq, serial_in_empty.clone(), out),
        };
        let serial = Arc::new(Mutex::new(dev));
        serial_dev = Some(serial.clone());
        pio.insert(serial.clone(), legacy::COM1_PORT, legacy::COM1_LEN)?;
        serial_input = Some(Arc::new(Mutex::new(ConsoleInput::new(
            serial,
            serial_in_empty,
            ctx.exit.clone(),
            ctx.interactive,
        ))));
    }
    let kbd_irq = efd()?;
    vm.register_irqfd(&kbd_irq, KBD_IRQ)
        .map_err(vm_ioctl("KVM_IRQFD (i8042)"))?;
    let mut kbd = I8042::new(kbd_irq, ctx.reset_evt.clone());
    if let Some(s) = state {
        kbd.restore(&s.i8042);
    }
    let i8042 = Arc::new(Mutex::new(kbd));
    pio.insert(i8042.clone(), legacy::I8042_PORT, legacy::I8042_LEN)?;
    Ok(LegacyDevices {
        pio,
        i8042,
        serial: serial_dev,
        serial_input,
    })
}

/// The virtio devices in their slots: the MMIO bus with their transports, what KVM must be
/// told about each, and the devices as event-loop subscribers.
struct PlacedVirtio {
    bus: Bus,
    placed: Vec<Placed>,
    subscribers: Vec<Subscriber>,
}

/// One virtio device in slot `slot`, not yet wired to KVM.
struct Placed {
    name: String,
    slot: usize,
    irqfd: Arc<EventFd>,
    transport: Arc<Mutex<MmioTransport>>,
}

/// Puts every virtio device in its slot, in order: its transport (raising its interrupt
/// through a new irqfd) on a new MMIO bus, and its `virtio_mmio.device=` entry on the command
/// line, in the same step so the two cannot disagree. Needs no KVM.
fn place_virtio_devices(
    mem: &GuestMemoryMmap,
    virtio: Vec<NewVirtio>,
    cmdline: &mut GuestCmdline,
) -> Result<PlacedVirtio, VmError> {
    let mut out = PlacedVirtio {
        bus: Bus::new(),
        placed: Vec::with_capacity(virtio.len()),
        subscribers: Vec::with_capacity(virtio.len()),
    };
    for (slot, (name, dev)) in virtio.into_iter().enumerate() {
        let (base, _) = virtio_slot(slot);
        let irqfd = efd()?;
        let as_device: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let transport = MmioTransport::new(mem.clone(), as_device, irqfd.clone()).map_err(|e| {
            VmError::Transport {
                id: name.clone(),
                why: e.to_string(),
            }
        })?;
        let transport = Arc::new(Mutex::new(transport));
        out.bus.insert(transport.clone(), base, mmio::MMIO_SIZE)?;
        cmdline.add_virtio_device(slot)?;
        out.subscribers.push(dev);
        out.placed.push(Placed {
            name,
            slot,
            irqfd,
            transport,
        });
    }
    Ok(out)
}

/// Tells KVM about each placed virtio device: an irqfd for its IRQ, and an ioeventfd per queue
/// at its QueueNotify register (a kick never exits to userspace).
fn wire_virtio_devices(vm: &VmFd, placed: &[Placed]) -> Result<(), VmError> {
    for p in placed {
        let (base, irq) = virtio_slot(p.slot);
        let name = &p.name;
        vm.register_irqfd(&p.irqfd, irq)
            .map_err(vm_ioctl(format!("KVM_IRQFD ({name})")))?;
        let transport = match p.transport.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + mmio::NOTIFY_REG_OFFSET),
                // A device has a few queues (virtio-mmio selects them with a u32).
                u32::try_from(q).unwrap_or(u32::MAX),
            )
            .map_err(vm_ioctl(format!("KVM_IOEVENTFD ({name} queue {q})")))?;
        }
    }
    Ok(())
}

fn efd() -> Result<Arc<EventFd>, VmError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map(Arc::new)
        .map_err(os("eventfd"))
}

/// The device-side limiter of an API `rate_limiter` (`None`: no limiter).
pub(crate) fn rate_limiter(
    r: Option<&api::model::RateLimiter>,
) -> Result<Option<RateLimiter>, RateLimiterError> {
    let Some(r) = r else {
        return Ok(None);
    };
    let b = |t: &Option<api::model::TokenBucket>| {
        t.map(|t| bucket(t.size, t.one_time_burst, t.refill_time))
    };
    RateLimiter::new(b(&r.bandwidth), b(&r.ops)).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::tests::{config, drive};
    use crate::exit::ExitSignal;
    use crate::metrics::Metrics;

    fn opts(console: ConsoleSpec) -> VmmOptions {
        VmmOptions {
            boot_protocol: ProtocolChoice::Auto,
            cpu_template: CpuTemplate::Host,
            kvm_path: "/dev/kvm".into(),
            console,
        }
    }

    fn ctx() -> VmContext {
        VmContext {
            reset_evt: efd().unwrap(),
            exit: Arc::new(ExitSignal::new().unwrap()),
            metrics: Arc::new(Metrics::default()),
            interactive: false,
        }
    }

    fn error(cfg: &VmConfig, opts: &VmmOptions) -> String {
        match VmBuilder::new(cfg, opts) {
            Ok(_) => panic!("{cfg:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn placing_the_devices_writes_the_command_line() {
        // rng and a virtio-console, opened for real (no KVM needed), placed in slots 0 and 1.
        let cfg = config("quiet -- x", vec![]);
        let o = opts(ConsoleSpec::Virtio(VirtioConsoleHost::Stdio));
        let mut b = VmBuilder::new(&cfg, &o).unwrap();
        let open = b.open_devices(Box::new(std::io::sink()), &ctx()).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut line = GuestCmdline::new(user_cmdline(&cfg)).unwrap();
        let placed = place_virtio_devices(&mem, open.virtio, &mut line).unwrap();
        assert_eq!(placed.placed.len(), 2);
        assert_eq!(placed.subscribers.len(), 2);
        assert_eq!(
            line.finish().unwrap(),
            "quiet virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 -- x"
        );
        // Slot 1's transport answers at its window: the magic value "virt".
        let mut magic = [0u8; 4];
        placed.bus.read(0xd000_1000, &mut magic);
        assert_eq!(&magic, b"virt");
    }

    #[test]
    fn a_command_line_linux_loader_refuses_is_refused_early() {
        let cfg = config("quiet\u{7f}", vec![]);
        let e = error(&cfg, &opts(ConsoleSpec::Serial));
        assert!(e.contains("printable ASCII"), "{e}");
    }

    #[test]
    fn no_boot_source_is_refused() {
        let mut cfg = config("", vec![]);
        cfg.boot_source = None;
        let o = opts(ConsoleSpec::Serial);
        assert_eq!(
            error(&cfg, &o),
            "no boot source: configure boot-source (kernel_image_path)"
        );
        assert!(matches!(
            prepare_guest(&cfg, ProtocolChoice::Auto, ""),
            Err(VmError::NoBootSource)
        ));
    }

    #[test]
    fn the_virtio_devices_must_fit_the_ioapic() {
        // 18 drives and the rng fill the 19 pins (IRQ 5 to 23); a virtio-console is one more.
        let drives = (0..18).map(|i| drive(&format!("d{i}"), false, false));
        let cfg = config("", drives.collect());
        assert!(VmBuilder::new(&cfg, &opts(ConsoleSpec::Serial)).is_ok());
        let o = opts(ConsoleSpec::Virtio(VirtioConsoleHost::Stdio));
        assert_eq!(
            error(&cfg, &o),
            "20 virtio devices: at most 19 fit the IOAPIC's pins"
        );
        assert!(matches!(
            VmBuilder::new(&cfg, &o),
            Err(VmError::TooManyDevices { count: 20, max: 19 })
        ));
    }

    #[test]
    fn duplicate_ids_and_roots_are_refused() {
        let o = opts(ConsoleSpec::Serial);
        let cfg = config("", vec![drive("a", false, false), drive("a", false, false)]);
        assert!(error(&cfg, &o).contains("appears more than once"));
        let cfg = config("", vec![drive("a", true, false), drive("b", true, false)]);
        assert!(error(&cfg, &o).contains("is already the root device"));
    }

    #[test]
    fn open_devices_refuses_a_missing_image() {
        let path = "/nonexistent/cinder-builder-test/disk.img";
        let mut d = drive("r", true, false);
        d.path_on_host = path.into();
        let cfg = config("", vec![d]);
        let o = opts(ConsoleSpec::Serial);
        let mut b = VmBuilder::new(&cfg, &o).unwrap();
        let e = match b.open_devices(Box::new(std::io::sink()), &ctx()) {
            Ok(_) => panic!("a missing image was opened"),
            Err(e) => e,
        };
        assert!(
            matches!(e, VmError::Drive { ref id, .. } if id == "r"),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.starts_with("drive r: "), "{msg}");
        assert!(
            msg.contains(path) && msg.contains("does not exist"),
            "{msg}"
        );
    }

    #[test]
    fn a_stdio_virtio_console_takes_the_console_output() {
        let cfg = config("", vec![]);
        let o = opts(ConsoleSpec::Virtio(VirtioConsoleHost::Stdio));
        let mut b = VmBuilder::new(&cfg, &o).unwrap();
        let open = b.open_devices(Box::new(std::io::sink()), &ctx()).unwrap();
        assert!(open.console_out.is_none());
        let names: Vec<&str> = open.virtio.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["rng", "console"]);
        let o = opts(ConsoleSpec::Serial);
        let mut b = VmBuilder::new(&cfg, &o).unwrap();
        let open = b.open_devices(Box::new(std::io::sink()), &ctx()).unwrap();
        assert!(open.console_out.is_some());
    }
}
