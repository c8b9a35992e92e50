//! A tiny cell for globals that the boot CPU fills before the APs run.

use core::cell::UnsafeCell;

/// A global written by the boot CPU (single-threaded phases only).
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: the probe writes a `Global` only from the boot CPU, before any AP
// runs or while the APs are parked; APs only read what was published.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(v: T) -> Self {
        Self(UnsafeCell::new(v))
    }

    /// Shared access.
    pub fn get(&self) -> &T {
        // SAFETY: see the `Sync` impl: no mutable borrow is alive while
        // readers run (the boot CPU does not hold `get_mut` across calls).
        unsafe { &*self.0.get() }
    }

    /// Mutable access; callers hold it only briefly on the boot CPU.
    #[allow(clippy::mut_from_ref)]
    pub fn get_mut(&self) -> &mut T {
        // SAFETY: only the boot CPU mutates, in single-threaded phases.
        unsafe { &mut *self.0.get() }
    }
}
