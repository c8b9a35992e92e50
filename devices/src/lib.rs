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

/// The guest memory type used by every device: guest memory, with a dirty bitmap that records every write cinder itself makes through
/// vm-memory (diff snapshots OR it with KVM's dirty log, which sees only the guest's).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
