//! A built microVM ([`Vmm`]: guest memory, KVM VM, devices and vCPUs) and its lifecycle:
//! start, pause, resume, Ctrl+Alt+Del, drive changes, device metrics and shutdown. It is
//! built by [`crate::builder::VmBuilder`].

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arch::GuestMemoryMmap;
use devices::i8042::{I8042Error, I8042};
use devices::virtio::block::{Block, BlockError, IoGate};
use devices::virtio::net::Net;
use event_manager::MutEventSubscriber;
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::bus::Bus;
use crate::error::{os, VmError};
use crate::exit::ExitSignal;
use crate::metrics::Metrics;
use crate::signal::kick_signal;
use crate::snapshot::{DeviceStates, MicrovmState, SnapshotError, VmState};
use crate::vcpu::{kick_handler, Vcpu, VcpuControl};

/// KVM's VM-wide state: PIT, both PICs, the IOAPIC, the KVM clock.
pub(crate) fn save_vm_state(vm: &VmFd) -> Result<VmState, SnapshotError> {
    let e = |what: &'static str| {
        move |err: kvm_ioctls::Error| SnapshotError::Kvm(format!("{what}: {err}"))
    };
    let pit = vm.get_pit2().map_err(e("KVM_GET_PIT2"))?;
    let chip = |id: u32| {
        let mut c = kvm_bindings::kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).map(|_| c)
    };
    let pic_master =
        chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER).map_err(e("KVM_GET_IRQCHIP (PIC master)"))?;
    let pic_slave =
        chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE).map_err(e("KVM_GET_IRQCHIP (PIC slave)"))?;
    let ioapic = chip(kvm_bindings::KVM_IRQCHIP_IOAPIC).map_err(e("KVM_GET_IRQCHIP (IOAPIC)"))?;
    let clock = vm.get_clock().map_err(e("KVM_GET_CLOCK"))?;
    Ok(VmState {
        pit,
        pic_master,
        pic_slave,
        ioapic,
        clock,
    })
}

/// Gives a new VM a snapshot's PIT, PICs, IOAPIC and clock.
pub(crate) fn restore_vm_state(vm: &VmFd, s: &VmState) -> Result<(), SnapshotError> {
    let e = |what: &'static str| {
        move |err: kvm_ioctls::Error| SnapshotError::Kvm(format!("{what}: {err}"))
    };
    vm.set_pit2(&s.pit).map_err(e("KVM_SET_PIT2"))?;
    // The clock's value, and the wall-clock time it was read at only when the load asked for
    // `clock_realtime` (see `snapshot::set_clock_realtime`): KVM then adds the wall time
    // that passed since. The other flags KVM reported (TSC_STABLE, HOST_TSC) are not input.
    let realtime = s.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME != 0;
    let clock = kvm_bindings::kvm_clock_data {
        clock: s.clock.clock,
        flags: if realtime {
            kvm_bindings::KVM_CLOCK_REALTIME
        } else {
            0
        },
        realtime: if realtime { s.clock.realtime } else { 0 },
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(e("KVM_SET_CLOCK"))?;
    vm.set_irqchip(&s.pic_master)
        .map_err(e("KVM_SET_IRQCHIP (PIC master)"))?;
    vm.set_irqchip(&s.pic_slave)
        .map_err(e("KVM_SET_IRQCHIP (PIC slave)"))?;
    vm.set_irqchip(&s.ioapic)
        .map_err(e("KVM_SET_IRQCHIP (IOAPIC)"))?;
    Ok(())
}

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

/// Why Ctrl+Alt+Del did not reach the guest.
#[derive(Debug, thiserror::Error)]
#[error("the guest is not taking keyboard input ({source})")]
pub struct CtrlAltDelError {
    /// What the i8042 said.
    #[source]
    pub source: I8042Error,
}

/// Why a drive could not be switched to a new image.
#[derive(Debug, thiserror::Error)]
pub enum PatchDriveError {
    /// The VM has no drive with this id.
    #[error("drive {0} does not exist")]
    NotFound(String),
    /// The new image cannot back the drive.
    #[error("drive {id}: {source}")]
    Backing {
        /// The drive id.
        id: String,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The new rate limiter is out of range.
    #[error("drives[{id}].rate_limiter: {source}")]
    RateLimiter {
        /// The drive id.
        id: String,
        /// Why.
        #[source]
        source: devices::rate_limiter::RateLimiterError,
    },
}

/// Why `PATCH /network-interfaces/{id}` failed.
#[derive(Debug, thiserror::Error)]
pub enum PatchNetError {
    /// The VM has no interface with this id.
    #[error("network interface {0} does not exist")]
    NotFound(String),
    /// A new rate limiter is out of range.
    #[error("network-interfaces[{id}]: rate_limiter: {source}")]
    RateLimiter {
        /// The interface id.
        id: String,
        /// Why.
        #[source]
        source: devices::rate_limiter::RateLimiterError,
    },
}

/// Why a balloon request on the running VM failed.
#[derive(Debug, thiserror::Error)]
pub enum BalloonOpError {
    /// The VM has no balloon device.
    #[error("No balloon device found.")]
    NoBalloon,
    /// The device refused.
    #[error("{0}")]
    Device(#[from] devices::virtio::balloon::BalloonError),
}

/// A built microVM: memory, KVM VM, devices and vCPUs.
pub struct Vmm {
    // Field order matters for drop: threads are joined in `shutdown`, then the VM goes, then
    // guest memory.
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) vcpu_count: usize,
    pub(crate) control: Arc<VcpuControl>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) subscribers: Vec<Subscriber>,
    pub(crate) blocks: Vec<(String, Arc<Mutex<Block>>)>,
    /// Shut while the devices are paused: no block I/O thread touches guest memory then.
    pub(crate) io_gate: Arc<IoGate>,
    pub(crate) nets: Vec<(String, Arc<Mutex<Net>>)>,
    /// The entropy device, for metrics.
    pub(crate) rng: Option<Arc<Mutex<devices::virtio::rng::Rng>>>,
    /// The balloon, for PATCH /balloon, its statistics and metrics.
    pub(crate) balloon: Option<Arc<Mutex<devices::virtio::balloon::Balloon>>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    /// COM1, when the VM has it (its state goes into a snapshot).
    pub(crate) serial: Option<Arc<Mutex<devices::legacy::SerialDevice>>>,
    /// The configuration it was built from, as a config file (for a snapshot).
    pub(crate) config: serde_json::Value,
    /// Dirty pages are tracked (KVM's log on every slot): Diff snapshots possible.
    pub(crate) track_dirty: bool,
    /// The page-fault handler serving guest memory (`mem_backend` Uffd), and the uffd.
    pub(crate) uffd: Option<(std::os::unix::net::UnixStream, userfaultfd::Uffd)>,
    /// The virtio devices' transports by name, in slot order (for a snapshot).
    pub(crate) transports: Vec<(String, Arc<Mutex<devices::virtio::MmioTransport>>)>,
    pub(crate) ctx: VmContext,
    pub(crate) _vm: VmFd,
    pub(crate) _kvm: Kvm,
    pub(crate) _mem: GuestMemoryMmap,
}

impl Vmm {
    /// The event-loop subscribers of this VM's devices (console input, virtio queues).
    pub fn subscribers(&self) -> Vec<Subscriber> {
        self.subscribers.clone()
    }

    /// The gate the block devices' I/O threads pass for every request (the device loop
    /// closes it when it parks).
    pub fn io_gate(&self) -> Arc<IoGate> {
        self.io_gate.clone()
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
                .spawn(move || {
                    // Its own filter first, before the guest runs (vmm/src/seccomp).
                    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Vcpu) {
                        exit.request(crate::exit::ExitReason::VmmError(e.to_string()));
                        return;
                    }
                    vcpu.run(pio, mmio, control, exit, metrics)
                })
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
    pub fn send_ctrl_alt_del(&self) -> Result<(), CtrlAltDelError> {
        let mut k = match self.i8042.lock() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        };
        k.trigger_ctrl_alt_del()
            .map_err(|source| CtrlAltDelError { source })
    }

    /// Switches drive `id` to a new backing image (same read-only mode); the guest is told of
    /// the new size.
    pub fn patch_drive(&self, id: &str, path: &std::path::Path) -> Result<(), PatchDriveError> {
        let (_, dev) = self
            .blocks
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| PatchDriveError::NotFound(id.to_string()))?;
        let lock = || match dev.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        // Switched without holding the device: the switch waits for the request its I/O
        // thread is doing, and the device loop and the vCPUs need the device meanwhile.
        let backing = lock().backing();
        let nsectors = backing
            .switch(path)
            .map_err(|source| PatchDriveError::Backing {
                id: id.to_string(),
                source,
            })?;
        lock().announce_capacity(nsectors);
        Ok(())
    }

    /// Tells the guest drive `id`'s capacity (a config-change interrupt): after a restore
    /// that gave the drive a new backing file.
    pub fn announce_drive_capacity(&self, id: &str) -> Result<(), PatchDriveError> {
        let (_, dev) = self
            .blocks
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| PatchDriveError::NotFound(id.to_string()))?;
        let mut d = match dev.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        let n = d.nsectors();
        d.announce_capacity(n);
        Ok(())
    }

    /// Replaces drive `id`'s rate limiter (its new buckets start full).
    pub fn patch_drive_limiter(
        &self,
        id: &str,
        limiter: &api::model::RateLimiter,
    ) -> Result<(), PatchDriveError> {
        let (_, dev) = self
            .blocks
            .iter()
            .find(|(d, _)| d == id)
            .ok_or_else(|| PatchDriveError::NotFound(id.to_string()))?;
        let limiter = crate::builder::rate_limiter(Some(limiter)).map_err(|source| {
            PatchDriveError::RateLimiter {
                id: id.to_string(),
                source,
            }
        })?;
        match dev.lock() {
            Ok(mut d) => d.set_rate_limiter(limiter),
            Err(p) => p.into_inner().set_rate_limiter(limiter),
        }
        Ok(())
    }

    /// Replaces interface `id`'s receive and/or transmit rate limiter (new buckets start full;
    /// `None` leaves that direction as it is).
    pub fn patch_net_limiters(
        &self,
        id: &str,
        rx: Option<&api::model::RateLimiter>,
        tx: Option<&api::model::RateLimiter>,
    ) -> Result<(), PatchNetError> {
        let (_, dev) = self
            .nets
            .iter()
            .find(|(n, _)| n == id)
            .ok_or_else(|| PatchNetError::NotFound(id.to_string()))?;
        let build = |r: Option<&api::model::RateLimiter>| {
            r.map(|r| crate::builder::rate_limiter(Some(r)))
                .transpose()
                .map_err(|source| PatchNetError::RateLimiter {
                    id: id.to_string(),
                    source,
                })
        };
        let (rx, tx) = (build(rx)?, build(tx)?);
        match dev.lock() {
            Ok(mut d) => d.set_rate_limiters(rx, tx),
            Err(p) => p.into_inner().set_rate_limiters(rx, tx),
        }
        Ok(())
    }

    /// Writes a snapshot of the paused VM: the state to `params.snapshot_path`, all of guest
    /// memory to `params.mem_file_path` (a Full snapshot; Diff is refused for now).
    pub fn snapshot_create(
        &self,
        params: &api::model::SnapshotCreateParams,
    ) -> Result<(), SnapshotError> {
        if !self.control.is_paused() {
            return Err(SnapshotError::NotPaused);
        }
        let diff = params.snapshot_type == Some(api::model::SnapshotType::Diff);
        if diff && !self.track_dirty {
            return Err(SnapshotError::Invalid(
                "snapshot_type Diff needs dirty page tracking: set track_dirty_pages in the \
                 machine configuration (or at snapshot/load)"
                    .into(),
            ));
        }
        let started = std::time::Instant::now();
        // No block request is in flight: a drive's I/O thread leaves the IoGate (which a pause
        // closes) only with every request it took in the used ring and its interrupt raised
        // (on io_uring it stays inside until the ring is drained), so both are in the state
        // saved below.
        let mut msrs: Vec<u32> = self
            ._kvm
            .get_msr_index_list()
            .map_err(|e| SnapshotError::Kvm(format!("KVM_GET_MSR_INDEX_LIST: {e}")))?
            .as_slice()
            .to_vec();
        crate::vcpu::order_msrs(&mut msrs);
        let vcpus = self
            .control
            .save_all(self.vcpu_count, Arc::new(msrs))
            .map_err(SnapshotError::Kvm)?;
        let vm = save_vm_state(&self._vm)?;
        let lock = |m: &Mutex<I8042>| match m.lock() {
            Ok(g) => g.state(),
            Err(p) => p.into_inner().state(),
        };
        let serial = self.serial.as_ref().map(|s| match s.lock() {
            Ok(g) => g.state(),
            Err(p) => p.into_inner().state(),
        });
        let state = MicrovmState {
            config: self.config.clone(),
            memory: crate::snapshot::mem_regions(&self._mem),
            vm,
            vcpus,
            devices: DeviceStates {
                serial,
                i8042: lock(&self.i8042),
                virtio: self
                    .transports
                    .iter()
                    .map(|(name, t)| {
                        let st = match t.lock() {
                            Ok(g) => g.state(),
                            Err(p) => p.into_inner().state(),
                        };
                        (name.clone(), st)
                    })
                    .collect(),
                balloon: self.balloon.as_ref().map(|b| match b.lock() {
                    Ok(g) => g.state(),
                    Err(p) => p.into_inner().state(),
                }),
            },
        };
        let mem_path = std::path::Path::new(&params.mem_file_path);
        let data = if diff {
            let dirty = self.dirty_pages()?;
            crate::snapshot::write_dirty_memory(mem_path, &self._mem, &dirty)?
        } else {
            let n = crate::snapshot::write_memory(mem_path, &self._mem)?;
            if self.track_dirty {
                // A later Diff holds what was written after this one.
                self.dirty_pages()?;
            }
            n
        };
        let size =
            crate::snapshot::write_state(std::path::Path::new(&params.snapshot_path), &state)?;
        log::info!(
            "snapshot written in {:.1?}: state {size} bytes to {}, memory ({} MiB of data) to {}",
            started.elapsed(),
            params.snapshot_path,
            data >> 20,
            params.mem_file_path
        );
        Ok(())
    }

    /// Why guest memory can no longer be served, if its page-fault handler went away.
    pub fn memory_backend_lost(&self) -> Option<String> {
        let (handler, _) = self.uffd.as_ref()?;
        crate::snapshot::uffd::handler_gone(handler).then(|| {
            "the page-fault handler of guest memory (mem_backend Uffd) closed its socket: \
             guest memory can no longer be served"
                .to_string()
        })
    }

    /// The pages written since the last snapshot (or boot), per memory region: KVM's dirty log
    /// (the guest's writes) OR'd with guest memory's own bitmap (cinder's writes: used rings,
    /// block reads, vsock and net buffers). Reading clears both.
    fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, SnapshotError> {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut out = Vec::new();
        for (slot, region) in self._mem.iter().enumerate() {
            let len =
                usize::try_from(region.len()).map_err(|e| SnapshotError::Kvm(e.to_string()))?;
            let slot = u32::try_from(slot).map_err(|e| SnapshotError::Kvm(e.to_string()))?;
            let mut bits = self
                ._vm
                .get_dirty_log(slot, len)
                .map_err(|e| SnapshotError::Kvm(format!("KVM_GET_DIRTY_LOG (slot {slot}): {e}")))?;
            let own: &vm_memory::bitmap::AtomicBitmap = vm_memory::mmap::MmapRegion::bitmap(region);
            let pages = len / 4096;
            for page in 0..pages {
                if own.dirty_at(page * 4096) {
                    if let Some(w) = bits.get_mut(page / 64) {
                        *w |= 1u64 << (page % 64);
                    }
                }
            }
            own.reset();
            out.push(bits);
        }
        Ok(out)
    }

    /// The balloon device, locked (a poisoned lock is taken over: the device's state is
    /// plain counters and sizes).
    fn balloon(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, devices::virtio::balloon::Balloon>, BalloonOpError> {
        let dev = self.balloon.as_ref().ok_or(BalloonOpError::NoBalloon)?;
        Ok(match dev.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        })
    }

    /// Sets the balloon's target (`PATCH /balloon`).
    pub fn patch_balloon(&self, amount_mib: u32) -> Result<(), BalloonOpError> {
        Ok(self.balloon()?.set_target_mib(amount_mib)?)
    }

    /// Sets the balloon's statistics interval (`PATCH /balloon/statistics`).
    pub fn patch_balloon_stats(&self, secs: u16) -> Result<(), BalloonOpError> {
        Ok(self.balloon()?.set_stats_interval(secs)?)
    }

    /// The balloon's sizes and the guest's latest statistics (`GET /balloon/statistics`).
    pub fn balloon_stats(&self) -> Result<api::model::BalloonStats, BalloonOpError> {
        use devices::virtio::balloon::tags;
        let dev = self.balloon()?;
        let g = dev.guest_stats()?;
        let (target, actual) = (dev.target_pages(), dev.actual_pages());
        Ok(api::model::BalloonStats {
            target_pages: target,
            actual_pages: actual,
            target_mib: target / 256,
            actual_mib: actual / 256,
            swap_in: g.get(tags::SWAP_IN),
            swap_out: g.get(tags::SWAP_OUT),
            major_faults: g.get(tags::MAJFLT),
            minor_faults: g.get(tags::MINFLT),
            free_memory: g.get(tags::MEMFREE),
            total_memory: g.get(tags::MEMTOT),
            available_memory: g.get(tags::AVAIL),
            disk_caches: g.get(tags::CACHES),
            hugetlb_allocations: g.get(tags::HTLB_PGALLOC),
            hugetlb_failures: g.get(tags::HTLB_PGFAIL),
            oom_kill: g.get(tags::OOM_KILLS),
            alloc_stall: g.get(tags::ALLOC_STALL),
            async_scan: g.get(tags::ASYNC_SCAN),
            direct_scan: g.get(tags::DIRECT_SCAN),
            async_reclaim: g.get(tags::ASYNC_RECLAIM),
            direct_reclaim: g.get(tags::DIRECT_RECLAIM),
        })
    }

    /// Per-device metrics sections (cumulative counters), as JSON objects.
    pub fn device_metrics(&self) -> Vec<(String, serde_json::Value)> {
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            match m.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            }
        }
        // Each device's counters serialise themselves (devices' BlockStats and NetStats).
        let section = |stats: Result<serde_json::Value, serde_json::Error>| {
            stats.unwrap_or(serde_json::Value::Null)
        };
        let mut out = Vec::new();
        for (id, dev) in &self.blocks {
            let dev = lock(dev);
            let mut v = section(serde_json::to_value(dev.stats()));
            if let Some(o) = v.as_object_mut() {
                // Times the rate limiter stopped the queue for want of tokens.
                o.insert(
                    "rate_limiter_throttled".into(),
                    dev.throttled_events().into(),
                );
            }
            out.push((format!("block_{id}"), v));
        }
        for (id, dev) in &self.nets {
            let dev = lock(dev);
            let mut v = section(serde_json::to_value(dev.stats()));
            if let Some(o) = v.as_object_mut() {
                // Times each direction's rate limiter stopped for want of tokens.
                let (rx, tx) = dev.throttled_events();
                o.insert("rx_rate_limiter_throttled".into(), rx.into());
                o.insert("tx_rate_limiter_throttled".into(), tx.into());
            }
            out.push((format!("net_{id}"), v));
        }
        if let Some(dev) = &self.balloon {
            let dev = lock(dev);
            let mut v = section(serde_json::to_value(dev.counters()));
            if let Some(o) = v.as_object_mut() {
                o.insert("target_pages".into(), dev.target_pages().into());
                o.insert("actual_pages".into(), dev.actual_pages().into());
            }
            out.push(("balloon".into(), v));
        }
        if let Some(dev) = &self.rng {
            let dev = lock(dev);
            out.push((
                "entropy".into(),
                serde_json::json!({
                    "bytes": dev.bytes_served(),
                    "rate_limiter_throttled": dev.throttled_events(),
                }),
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
