//! The interrupt a virtio device raises through its transport.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use crate::InterruptTrigger;

/// InterruptStatus bit: the device used a buffer in at least one queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// InterruptStatus bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Shared between a transport and its device: the device raises a "used buffer" or a
/// "configuration change" notification, which sets the InterruptStatus bit the transport
/// reports to the guest and then fires the interrupt line (an irqfd in cinder).
///
/// The guest clears the bits through the transport's InterruptACK register.
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    trigger: Arc<dyn InterruptTrigger>,
}

impl Interrupt {
    /// An interrupt with no pending status that fires `trigger`.
    pub fn new(trigger: Arc<dyn InterruptTrigger>) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            trigger,
        }
    }

    /// Tell the guest the device put buffers in a used ring.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.trigger.trigger()
    }

    /// Tell the guest the configuration space changed (bumps ConfigGeneration first).
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        self.trigger.trigger()
    }

    /// The pending InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest acknowledged `bits` (InterruptACK).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Takes back a snapshot's InterruptStatus bits and ConfigGeneration, without firing the
    /// line (the interrupt controller's state is restored with the VM's).
    pub fn restore(&self, status: u32, config_generation: u32) {
        self.status.store(
            status & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG),
            Ordering::SeqCst,
        );
        self.config_generation
            .store(config_generation, Ordering::SeqCst);
    }

    /// The current ConfigGeneration value.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The device cannot go on (the driver broke a queue beyond repair): the transport shows
    /// DEVICE_NEEDS_RESET in the status register, and the driver is told by a config-change
    /// interrupt (virtio 1.x, 2.1.2).
    pub fn signal_needs_reset(&self) -> io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config_change()
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Device reset: drop the pending status bits and the needs-reset flag.
    pub fn reset(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
    }
}

impl fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn status_bits_set_trigger_and_ack() {
        let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let irq = Interrupt::new(fd.clone());
        irq.signal_used_queue().unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        assert_eq!(fd.read().unwrap(), 1);
        irq.signal_config_change().unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.config_generation(), 1);
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.reset();
        assert_eq!(irq.status(), 0);
    }
}
