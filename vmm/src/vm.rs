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
use crate::vcpu::{kick_handler, Vcpu, VcpuControl};

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
