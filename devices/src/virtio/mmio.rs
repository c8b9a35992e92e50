//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! Wiring for the VMM:
//! * register the transport on the MMIO bus at `base`, size [`MMIO_SIZE`];
//! * register each of [`MmioTransport::queue_evts`] as an ioeventfd at
//!   `base + NOTIFY_REG_OFFSET` (4 bytes) with datamatch = its queue index;
//! * the `irq` trigger passed to [`MmioTransport::new`] is the device's irqfd (edge);
//! * the kernel learns about the device from `virtio_mmio.device=4K@0x<base>:<irq>`.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::features::VIRTIO_F_VERSION_1;
use super::log_limit::warn_ratelimited;
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{features::VIRTIO_RING_F_EVENT_IDX, Interrupt, VirtioDevice};
use crate::{BusDevice, GuestMemoryMmap, InterruptTrigger};

/// Size of the MMIO window of one device.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register: the ioeventfd address is `base + NOTIFY_REG_OFFSET`.
pub const NOTIFY_REG_OFFSET: u64 = reg::QUEUE_NOTIFY;
/// Offset of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_CONFIG as u64;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version 2 (virtio 1.x, no legacy interface).
pub const MMIO_VERSION: u32 = 2;
/// The vendor ID the transport reports ("CNDR").
pub const VENDOR_ID: u32 = 0x5244_4e43;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout"), from
/// virtio-bindings (whose names follow the legacy layout: AVAIL is the driver area, USED the
/// device area).
pub mod reg {
    use virtio_bindings::virtio_mmio as m;
    /// R: magic value.
    pub const MAGIC_VALUE: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    /// R: version.
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    /// R: device ID.
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    /// R: vendor ID.
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    /// R: device features, 32 bits selected by DEVICE_FEATURES_SEL.
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    /// W: device features word selector.
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    /// W: driver features, 32 bits selected by DRIVER_FEATURES_SEL.
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    /// W: driver features word selector.
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    /// W: queue selector.
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    /// R: maximum size of the selected queue (0: no such queue).
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    /// W: size of the selected queue.
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    /// RW: the selected queue is ready.
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    /// W: queue notification (value: queue index).
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    /// R: interrupt status.
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    /// W: interrupt acknowledge.
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    /// RW: device status.
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    /// W: descriptor table address, low 32 bits.
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    /// W: descriptor table address, high 32 bits.
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    /// W: available ring address, low 32 bits.
    pub const QUEUE_DRIVER_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    /// W: available ring address, high 32 bits.
    pub const QUEUE_DRIVER_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    /// W: used ring address, low 32 bits.
    pub const QUEUE_DEVICE_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    /// W: used ring address, high 32 bits.
    pub const QUEUE_DEVICE_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    /// W: shared memory region selector.
    pub const SHM_SEL: u64 = m::VIRTIO_MMIO_SHM_SEL as u64;
    /// R: shared memory region length, low.
    pub const SHM_LEN_LOW: u64 = m::VIRTIO_MMIO_SHM_LEN_LOW as u64;
    /// R: shared memory region length, high.
    pub const SHM_LEN_HIGH: u64 = m::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
    /// R: shared memory region base, low.
    pub const SHM_BASE_LOW: u64 = m::VIRTIO_MMIO_SHM_BASE_LOW as u64;
    /// R: shared memory region base, high.
    pub const SHM_BASE_HIGH: u64 = m::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
    /// R: configuration generation.
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A snapshot's transport state does not fit this device.
    #[error("snapshot: {0}")]
    Restore(String),
    /// The device declares a queue size virtio-queue cannot use.
    #[error(
        "device queue {index} has invalid maximum size {size} (must be a power of two, 1..=32768)"
    )]
    InvalidQueueMaxSize {
        /// Queue index.
        index: usize,
        /// Declared maximum size.
        size: u16,
    },
    /// The device declares a different number of queue event fds than queues.
    #[error("device has {queues} queues but {events} queue event fds")]
    QueueEventCount {
        /// Number of queues.
        queues: usize,
        /// Number of event fds.
        events: usize,
    },
    /// Duplicating a queue event fd failed.
    #[error("cannot duplicate queue event fd {index}: {source}")]
    CloneQueueEvent {
        /// Queue index.
        index: usize,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The state sequence the driver walks through (virtio 1.2 §3.1.1).
const STATUS_SEQUENCE: [u32; 4] = [
    ACKNOWLEDGE,
    ACKNOWLEDGE | DRIVER,
    ACKNOWLEDGE | DRIVER | FEATURES_OK,
    ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
];

/// A virtio device behind a virtio-mmio (version 2) register file.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    device_type: u32,
    avail_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    status: u32,
}

fn lock_device<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    // A panic elsewhere while holding the lock must not take the vCPU thread down too.
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MmioTransport {
    /// Put `device` behind a transport. `irq` raises the device's interrupt line.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        irq: Arc<dyn InterruptTrigger>,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, queues, queue_evts) = {
            let dev = lock_device(&device);
            let sizes = dev.queue_max_sizes();
            let events = dev.queue_events();
            if sizes.len() != events.len() {
                return Err(MmioError::QueueEventCount {
                    queues: sizes.len(),
                    events: events.len(),
                });
            }
            let queues = sizes
                .iter()
                .enumerate()
                .map(|(index, &size)| {
                    Queue::new(size).map_err(|_| MmioError::InvalidQueueMaxSize { index, size })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let queue_evts = events
                .iter()
                .enumerate()
                .map(|(index, evt)| {
                    evt.try_clone()
                        .map_err(|source| MmioError::CloneQueueEvent { index, source })
                })
                .collect::<Result<Vec<_>, _>>()?;
            (dev.device_type(), dev.avail_features(), queues, queue_evts)
        };
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queue_evts,
            queues,
            device_type,
            avail_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            status: 0,
        })
    }

    /// One EventFd per queue, in queue order: register each as an ioeventfd at
    /// `base + NOTIFY_REG_OFFSET` with datamatch = the index. (Duplicates of the device's fds.)
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The interrupt shared with the device (owns the InterruptStatus bits).
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// The device behind this transport.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// The transport's and its device's state, for a snapshot (the VM paused: no register
    /// access or queue processing meanwhile).
    pub fn state(&self) -> super::TransportState {
        let active_queues = lock_device(&self.device)
            .active_queues()
            .into_iter()
            .map(super::QueueSnapshot::from)
            .collect();
        super::TransportState {
            device_type: self.device_type,
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            active_queues,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
        }
    }

    /// Takes back a snapshot's `state` on a new transport with the same device: registers,
    /// queue configuration and, for a driver that had set DRIVER_OK, the device activated
    /// again with its queues where they were. A state that does not fit the device (another
    /// type, other queues, features not offered) is refused and changes nothing.
    pub fn restore(&mut self, state: &super::TransportState) -> Result<(), MmioError> {
        let bad = |why: String| MmioError::Restore(why);
        if state.device_type != self.device_type {
            return Err(bad(format!(
                "device type {} in the snapshot, {} here",
                state.device_type, self.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(bad(format!(
                "{} queues in the snapshot, {} here",
                state.queues.len(),
                self.queues.len()
            )));
        }
        if state.driver_features & !self.avail_features != 0 {
            return Err(bad(format!(
                "features {:#x} were not offered",
                state.driver_features & !self.avail_features
            )));
        }
        let queues = state
            .queues
            .iter()
            .map(|q| Queue::try_from(virtio_queue::QueueState::from(*q)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("queue: {e}")))?;
        let active = if state.status & DRIVER_OK != 0 {
            if state.active_queues.len() != self.queues.len() {
                return Err(bad("the running device's queues are missing".into()));
            }
            let qs = state
                .active_queues
                .iter()
                .map(|q| Queue::try_from(virtio_queue::QueueState::from(*q)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("queue: {e}")))?;
            for (i, q) in qs.iter().enumerate() {
                if q.ready() && !q.is_valid(&self.mem) {
                    return Err(bad(format!("queue {i} is not valid in guest memory")));
                }
            }
            Some(qs)
        } else {
            None
        };
        self.queues = queues;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.shm_sel = state.shm_sel;
        self.interrupt
            .restore(state.interrupt_status, state.config_generation);
        let mut dev = lock_device(&self.device);
        if state.status & FEATURES_OK != 0 {
            dev.set_acked_features(state.driver_features);
        }
        if let Some(qs) = active {
            dev.activate(self.mem.clone(), qs, self.interrupt.clone())
                .map_err(|e| bad(format!("activation: {e}")))?;
            dev.after_restore();
        }
        self.status = state.status;
        Ok(())
    }

    /// The device status register as the guest last left it.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&self) -> Option<&Queue> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get(i))
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => (self.avail_features & 0xffff_ffff) as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS if self.interrupt.needs_reset() => self.status | DEVICE_NEEDS_RESET,
            reg::STATUS => self.status,
            // No shared memory regions: reading any reports a length (and base) of -1.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                warn_ratelimited!(
                    "virtio-mmio: read of write-only or unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn queue_config_allowed(&self, what: &str) -> bool {
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            warn_ratelimited!(
                "virtio-mmio: {what} write ignored in device status {:#x}",
                self.status
            );
            return false;
        }
        true
    }

    /// The selected queue, if queue configuration is allowed now and the queue is not live.
    fn configurable_queue(&mut self, what: &str) -> Option<&mut Queue> {
        if !self.queue_config_allowed(what) {
            return None;
        }
        let sel = self.queue_sel;
        let Some(queue) = usize::try_from(sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
        else {
            warn_ratelimited!("virtio-mmio: {what} write ignored: QueueSel {sel} out of range");
            return None;
        };
        if queue.ready() {
            warn_ratelimited!("virtio-mmio: {what} write ignored: queue {sel} is ready");
            return None;
        }
        Some(queue)
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.status != ACKNOWLEDGE | DRIVER {
                    warn_ratelimited!(
                        "virtio-mmio: DriverFeatures write ignored in device status {:#x}",
                        self.status
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    sel => {
                        if value != 0 {
                            warn_ratelimited!(
                                "virtio-mmio: driver accepts features {value:#x} in unknown word {sel}"
                            );
                        }
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(queue) = self.configurable_queue("QueueNum") {
                    let size = u16::try_from(value).ok();
                    match size.map(|s| queue.try_set_size(s)) {
                        Some(Ok(())) => {}
                        _ => warn_ratelimited!(
                            "virtio-mmio: QueueNum {value} ignored: not a power of two in 1..={}",
                            queue.max_size()
                        ),
                    }
                }
            }
            reg::QUEUE_READY => match value {
                1 => {
                    if let Some(queue) = self.configurable_queue("QueueReady") {
                        queue.set_ready(true);
                    }
                }
                0 => {
                    // Stopping a queue is always harmless before DRIVER_OK (Linux does it
                    // while tearing down, after reset).
                    if self.status & DRIVER_OK != 0 {
                        warn_ratelimited!("virtio-mmio: QueueReady=0 ignored after DRIVER_OK");
                    } else if let Some(queue) = usize::try_from(self.queue_sel)
                        .ok()
                        .and_then(|i| self.queues.get_mut(i))
                    {
                        queue.set_ready(false);
                    }
                }
                _ => warn_ratelimited!("virtio-mmio: QueueReady value {value} ignored"),
            },
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => {
                self.sync_needs_reset();
                self.set_status(value)
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.set_queue_address(offset, value),
            reg::SHM_SEL => self.shm_sel = value,
            _ => warn_ratelimited!(
                "virtio-mmio: write of read-only or unknown register {offset:#x} ignored"
            ),
        }
    }

    fn set_queue_address(&mut self, offset: u64, value: u32) {
        let Some(queue) = self.configurable_queue("queue address") else {
            return;
        };
        let combine = |old: u64| {
            if offset & 0x4 == 0 {
                (old & !0xffff_ffff) | u64::from(value)
            } else {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            }
        };
        let result = match offset {
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => {
                queue.try_set_desc_table_address(GuestAddress(combine(queue.desc_table())))
            }
            reg::QUEUE_DRIVER_LOW | reg::QUEUE_DRIVER_HIGH => {
                queue.try_set_avail_ring_address(GuestAddress(combine(queue.avail_ring())))
            }
            _ => queue.try_set_used_ring_address(GuestAddress(combine(queue.used_ring()))),
        };
        if let Err(e) = result {
            warn_ratelimited!(
                "virtio-mmio: queue address write {offset:#x}={value:#x} ignored: {e}"
            );
        }
    }

    fn notify(&self, value: u32) {
        let evt = usize::try_from(value)
            .ok()
            .and_then(|i| self.queue_evts.get(i));
        match evt {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn_ratelimited!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => warn_ratelimited!("virtio-mmio: QueueNotify for unknown queue {value}"),
        }
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let cur = self.status;
        if new & cur != cur {
            warn_ratelimited!(
                "virtio-mmio: status {new:#x} clears bits of {cur:#x} without a reset; ignored"
            );
            return;
        }
        let added = new & !cur;
        if added == 0 {
            return;
        }
        if added & FAILED != 0 {
            // The driver gave up; nothing else it asked for in this write matters.
            self.status |= FAILED;
            return;
        }
        if cur & (FAILED | DEVICE_NEEDS_RESET) != 0 || !STATUS_SEQUENCE.contains(&new) {
            warn_ratelimited!(
                "virtio-mmio: invalid status transition {cur:#x} -> {new:#x}; ignored"
            );
            return;
        }
        for step in STATUS_SEQUENCE {
            if step & !cur == 0 || step & !new != 0 {
                continue; // already there, or beyond what the driver asked for
            }
            let stepped = step & !self.status;
            if stepped == FEATURES_OK && !self.accept_features() {
                return;
            }
            if stepped == DRIVER_OK {
                self.activate();
                return;
            }
            self.status = step;
        }
    }

    /// FEATURES_OK: accept the driver's features, or refuse (leaving FEATURES_OK clear).
    fn accept_features(&mut self) -> bool {
        let unoffered = self.driver_features & !self.avail_features;
        if unoffered != 0 {
            warn_ratelimited!(
                "virtio-mmio: driver accepted features {unoffered:#x} that were not offered; refusing FEATURES_OK"
            );
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            warn_ratelimited!(
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy driver); refusing FEATURES_OK"
            );
            return false;
        }
        lock_device(&self.device).set_acked_features(self.driver_features);
        true
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && !queue.is_valid(&self.mem) {
                self.fail_activation(&format!("queue {index} is not valid"));
                return;
            }
            match Queue::try_from(queue.state()) {
                Ok(mut q) => {
                    q.set_event_idx(event_idx);
                    queues.push(q);
                }
                Err(e) => {
                    self.fail_activation(&format!("queue {index}: {e}"));
                    return;
                }
            }
        }
        let result =
            lock_device(&self.device).activate(self.mem.clone(), queues, self.interrupt.clone());
        match result {
            Ok(()) => self.status |= DRIVER_OK,
            Err(e) => self.fail_activation(&e.to_string()),
        }
    }

    fn fail_activation(&mut self, why: &str) {
        warn_ratelimited!(
            "virtio-mmio: device type {} failed to activate: {why}",
            self.device_type
        );
        self.status |= DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.signal_config_change() {
            warn_ratelimited!("virtio-mmio: cannot raise the config-change interrupt: {e}");
        }
    }

    /// Folds a device's request for a reset into the status register.
    fn sync_needs_reset(&mut self) {
        if self.interrupt.needs_reset() {
            self.status |= DEVICE_NEEDS_RESET;
        }
    }

    fn reset(&mut self) {
        {
            let mut dev = lock_device(&self.device);
            if self.status != 0 || dev.is_activated() {
                dev.reset();
            }
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.status = 0;
    }

    fn config_access_ok(offset: u64, len: usize) -> bool {
        matches!(len, 1 | 2 | 4 | 8) && offset & (len.min(4) as u64 - 1) == 0
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset < CONFIG_SPACE_OFFSET {
            if data.len() != 4 || offset & 3 != 0 {
                warn_ratelimited!(
                    "virtio-mmio: {}-byte read at {offset:#x} ignored (registers are 32-bit aligned)",
                    data.len()
                );
                return;
            }
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else if offset < MMIO_SIZE && Self::config_access_ok(offset, data.len()) {
            lock_device(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else {
            warn_ratelimited!(
                "virtio-mmio: {}-byte config read at {offset:#x} ignored",
                data.len()
            );
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < CONFIG_SPACE_OFFSET {
            let Ok(bytes) = <[u8; 4]>::try_from(data) else {
                warn_ratelimited!(
                    "virtio-mmio: {}-byte write at {offset:#x} ignored (registers are 32-bit)",
                    data.len()
                );
                return;
            };
            if offset & 3 != 0 {
                warn_ratelimited!("virtio-mmio: unaligned write at {offset:#x} ignored");
                return;
            }
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else if offset < MMIO_SIZE && Self::config_access_ok(offset, data.len()) {
            if self.status & DRIVER == 0 || self.status & FAILED != 0 {
                warn_ratelimited!(
                    "virtio-mmio: config write ignored in device status {:#x}",
                    self.status
                );
                return;
            }
            lock_device(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
        } else {
            warn_ratelimited!(
                "virtio-mmio: {}-byte config write at {offset:#x} ignored",
                data.len()
            );
        }
    }
}

#[cfg(test)]
mod tests;
