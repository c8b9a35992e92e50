//! virtio-rng: an entropy source backed by getrandom(2) (virtio 1.2 §5.4).
//!
//! * [`device`]: the [`Rng`] model (one request queue, no config space, no feature bits).
//! * [`event_handler`]: how the event loop drives an [`Rng`].
//!
//! Each request is a chain of device-writable buffers; the device fills them with bytes from
//! the kernel's CSPRNG (getrandom(2), non-blocking pool semantics) up to
//! [`MAX_BYTES_PER_REQUEST`] per chain, through a fixed stack buffer: a guest cannot make the
//! VMM allocate. A chain with a device-readable descriptor, a buffer outside guest memory or a
//! malformed link is completed with used length 0 (and a rate-limited warning).

pub mod device;
pub mod event_handler;

use std::io;

pub use device::Rng;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes the device writes for one request (the rest of a larger chain is left alone and
/// the used length says how much was filled).
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// Errors creating an [`Rng`].
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// Creating an event fd failed.
    #[error("cannot create an event fd for the virtio-rng device: {0}")]
    EventFd(io::Error),
    /// The rate limiter's buckets are out of range.
    #[error("entropy.rate_limiter: {0}")]
    RateLimiter(#[from] crate::rate_limiter::RateLimiterError),
    /// Creating the rate limiter's timer failed.
    #[error("cannot create the virtio-rng rate limiter timer: {0}")]
    TimerFd(io::Error),
}
