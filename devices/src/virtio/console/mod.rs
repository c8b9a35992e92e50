//! virtio-console with one port (virtio 1.2 §5.3), no MULTIPORT, no emergency write.
//!
//! * [`device`]: the [`Console`] model: receiveq0 (index 0, host → guest) and transmitq0
//!   (index 1, guest → host).
//! * [`event_handler`]: how the event loop drives a [`Console`]: the queue kicks, and the host
//!   input fd, which is watched only while the guest has receive buffers posted.
//!
//! The host side is an input source (stdin, a connected Unix socket, or none) and an output
//! sink (stdout, a file, the same socket). Input is read only into buffers the guest posted,
//! through a fixed stack buffer: a host peer that writes faster than the guest reads is held
//! back by the kernel's socket/pipe buffer, never by memory in cinder. Output is written as the
//! guest transmits; if the sink would block (a non-blocking socket whose peer stopped
//! reading) the rest of that buffer is dropped, as a serial port would, so a slow peer never
//! stalls the event loop.

pub mod device;
pub mod event_handler;

use std::io;

pub use device::{Console, ConsoleInput};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of receiveq0 (host → guest).
pub const RX_QUEUE: usize = 0;
/// Index of transmitq0 (guest → host).
pub const TX_QUEUE: usize = 1;
/// Most input bytes moved into the guest per readiness event (one receive chain).
pub const RX_CHUNK: usize = 4096;
/// Size of the config space (`cols`, `rows`, `max_nr_ports`, `emerg_wr`).
pub const CONFIG_SIZE: usize = 12;

/// Errors creating a [`Console`].
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Creating an event fd failed.
    #[error("cannot create an event fd for the virtio-console device: {0}")]
    EventFd(io::Error),
}
