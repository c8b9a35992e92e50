//! Device models for cinder: legacy devices (8250 serial, i8042) and virtio-mmio devices.
//!
//! A device never touches KVM: it is handed guest memory, an interrupt trigger and event
//! fds by the VMM. Register accesses from the guest reach a device through [`BusDevice`].

pub mod bus;
pub mod i8042;
pub mod irq;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

pub use bus::BusDevice;
pub use irq::{EventFdTrigger, InterruptTrigger};

/// The guest memory type used by every device.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
