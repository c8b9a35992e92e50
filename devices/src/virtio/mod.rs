//! Virtio devices over the virtio-mmio transport (virtio 1.x, "modern" only).
//!
//! * [`mmio::MmioTransport`] is the register file the guest sees (a [`crate::BusDevice`]).
//! * A device model implements [`VirtioDevice`]; the transport negotiates features, collects
//!   the queue configuration and calls [`VirtioDevice::activate`] on DRIVER_OK.
//! * The device owns one [`EventFd`] per queue for its whole life. The VMM registers each as
//!   an ioeventfd on the transport's QueueNotify register, and the event loop drives the
//!   device when one becomes readable (devices implement
//!   [`event_manager::MutEventSubscriber`]).
//! * The device raises interrupts through the shared [`Interrupt`].

pub mod balloon;
pub mod block;
pub mod console;
pub(crate) mod device_core;
pub mod interrupt;
pub(crate) mod log_limit;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemoryMmap;

pub use interrupt::{Interrupt, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
pub use mmio::MmioTransport;

/// Virtio device IDs (virtio 1.2 §5), from virtio-bindings.
pub mod device_type {
    use virtio_bindings::virtio_ids as ids;
    /// Network card.
    pub const NET: u32 = ids::VIRTIO_ID_NET;
    /// Block device.
    pub const BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
    /// Console.
    pub const CONSOLE: u32 = ids::VIRTIO_ID_CONSOLE;
    /// Entropy source.
    pub const RNG: u32 = ids::VIRTIO_ID_RNG;
    /// Socket device.
    pub const VSOCK: u32 = ids::VIRTIO_ID_VSOCK;
    /// Memory balloon.
    pub const BALLOON: u32 = ids::VIRTIO_ID_BALLOON;
}

/// Device-independent feature bits (virtio 1.2 §6), from virtio-bindings: indirect
/// descriptors, used_event / avail_event suppression, and virtio 1.x compliance (required by
/// cinder: legacy drivers are refused).
pub mod features {
    pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    pub use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
}

/// Device status bits (virtio 1.2 §2.1), from virtio-bindings.
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The guest gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// The feature bits every cinder virtio device offers on top of its own.
pub const COMMON_FEATURES: u64 = (1 << features::VIRTIO_F_VERSION_1)
    | (1 << features::VIRTIO_RING_F_EVENT_IDX)
    | (1 << features::VIRTIO_RING_F_INDIRECT_DESC);

/// Why a device could not start on DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not hand over the queues the device needs.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues it got.
        got: usize,
    },
    /// A queue the device needs was not marked ready by the driver.
    #[error("queue {0} is not ready")]
    QueueNotReady(usize),
    /// A ready queue's rings lie (partly) outside guest memory or are misaligned.
    #[error("queue {0} is not valid: its rings are outside guest memory")]
    InvalidQueue(usize),
    /// The device was already active.
    #[error("device is already active")]
    AlreadyActive,
    /// Telling the event loop about the activation failed.
    #[error("cannot signal the activation to the event loop: {0}")]
    ActivateEvent(std::io::Error),
}

/// A virtio device model that plugs into [`MmioTransport`].
///
/// All methods are called with the device locked, from a vCPU thread (register accesses) or the
/// event-loop thread (queue processing). Every value passed in from the transport can come from
/// a hostile guest: implementations never panic on them.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`device_type`]).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers, including [`COMMON_FEATURES`].
    fn avail_features(&self) -> u64;
    /// The driver accepted `features` (always a subset of [`Self::avail_features`], with
    /// VIRTIO_F_VERSION_1 set: the transport checks this before FEATURES_OK).
    fn set_acked_features(&mut self, features: u64);
    /// The features last passed to [`Self::set_acked_features`] (0 after reset).
    fn acked_features(&self) -> u64;
    /// Maximum size of each queue (each a power of two, at most 32768); the length is the number
    /// of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// One notification EventFd per queue, owned by the device for its whole life (the same fds
    /// across resets), in queue order.
    fn queue_events(&self) -> &[EventFd];
    /// Read `data.len()` bytes of the device configuration space at `offset`. Bytes outside the
    /// configuration space read as zero (`data` is zeroed by the caller).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The guest writes configuration space. Devices with read-only configuration ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device: the driver set DRIVER_OK. `queues` holds one queue per entry of
    /// [`Self::queue_max_sizes`], already configured (event-idx set from the acked features);
    /// queues the driver left unused are not ready.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device: stop using guest memory and the queues, forget acked
    /// features. The queue EventFds stay valid.
    fn reset(&mut self);
    /// Whether [`Self::activate`] succeeded since the last reset.
    fn is_activated(&self) -> bool;
    /// The queues as the running device holds them (where it is in each ring), for a
    /// snapshot; empty while not activated.
    fn active_queues(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }
    /// Called once a snapshot's activation is restored: the device tells the driver what a
    /// new host means for it (vsock: a transport reset event). Nothing by default.
    fn after_restore(&mut self) {}
}

/// A queue's state in a snapshot (virtio-queue's `QueueState`, which has no serde).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered.
    pub max_size: u16,
    /// Next available ring index to read.
    pub next_avail: u16,
    /// Next used ring index to write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueSnapshot {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for virtio_queue::QueueState {
    fn from(q: QueueSnapshot) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport and its device in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The virtio device ID (checked against the device on restore).
    pub device_type: u32,
    /// Device status.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// The queues as the driver configured them.
    pub queues: Vec<QueueSnapshot>,
    /// The queues as the running device holds them (empty while not activated).
    pub active_queues: Vec<QueueSnapshot>,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
}

/// A virtio device model that is also its own event-loop half: the one object a VMM opens,
/// then hands to the transport (as a [`VirtioDevice`]) and to the event loop (as an
/// [`event_manager::MutEventSubscriber`]). Every device model here is one.
pub trait VirtioEventDevice: VirtioDevice + event_manager::MutEventSubscriber {}

impl<T: VirtioDevice + event_manager::MutEventSubscriber> VirtioEventDevice for T {}

/// Copy `data.len()` bytes of `config` at `offset` into `data`; bytes past the end of `config`
/// are left as they are (zero). Never panics.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_config_bytes_bounds() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        let mut d = [0u8; 2];
        read_config_bytes(&cfg, 4, &mut d);
        assert_eq!(d, [0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
