//! Interrupt lines and reset requests from devices to the VMM: one trait, [`InterruptTrigger`],
//! implemented by an `EventFd` (an irqfd registered with KVM, or an fd the event loop
//! watches), and [`EventFdTrigger`], the same for vm-superio's devices.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt line in the guest (in cinder, an irqfd registered with KVM), or
/// signals the VMM (the i8042's reset line).
pub trait InterruptTrigger: Send + Sync {
    /// Raise the interrupt once (edge).
    fn trigger(&self) -> io::Result<()>;
}

impl InterruptTrigger for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// An `EventFd` as vm-superio's interrupt trigger (vm-superio has its own trait for it).
#[derive(Clone)]
pub struct EventFdTrigger(pub Arc<EventFd>);

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        InterruptTrigger::trigger(self.0.as_ref())
    }
}
