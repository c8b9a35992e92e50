//! virtio-vsock (virtio 1.2 §5.10) with Firecracker's host-side Unix socket protocol.
//!
//! * Host-initiated: a client connects to the Unix socket at `uds_path`, writes
//!   `CONNECT <port>\n`, and once the guest accepted reads `OK <host_port>\n`; then the stream
//!   carries the data.
//! * Guest-initiated: a guest connection to host (CID 2) port P connects to the Unix socket
//!   `<uds_path>_<P>`.
//!
//! * [`conn`]: one connection's state machine and credit-based flow control.
//! * `backend`: the host side (listener, host clients before their `CONNECT` line,
//!   connections, RSTs waiting for the guest).
//! * [`device`]: the [`Vsock`] model (rx, tx and event queues; packets through the
//!   `virtio-vsock` crate's `VsockPacket`) over its backend.
//! * [`event_handler`]: the event-loop wiring (queue kicks, the listener, every connection's
//!   socket, pending `CONNECT` lines), with what it registered kept in `interest`.
//!
//! Dependencies point one way: `event_handler` -> `device` -> `backend` -> `conn`.
//!
//! Limits, so that neither the guest nor a host client can stall the event loop or grow
//! cinder without bound:
//! * Nothing blocks: a guest connection's `connect` to `<uds_path>_<P>` is non-blocking
//!   (a full backlog is an RST to the guest), every socket is non-blocking.
//! * Timers (one timerfd per device): [`CONNECT_LINE_TIMEOUT`] for a host client's line,
//!   [`LOCAL_INIT_TIMEOUT`] for the guest's answer to a host-initiated REQUEST,
//!   [`conn::SHUTDOWN_TIMEOUT`] for a shutdown to finish.
//! * Memory: [`TX_BUDGET`] bytes of guest data buffered for host sockets in all, at most
//!   [`conn::CONN_BUF_SIZE`] per connection; host data goes straight into guest buffers.
//! * File descriptors: at most [`MAX_CONNECTIONS`] connections plus [`MAX_PENDING_CONNECTS`]
//!   host clients, the listener, the timer and four event fds (activate, three queues).
//!   When the process is out of descriptors anyway, a guest REQUEST gets RST and the listener
//!   rests for [`ACCEPT_BACKOFF`].
//! * The socket at `uds_path` has mode 0600 (only cinder's user may connect), and only that
//!   socket, not whatever later took its path, is removed when the device goes.

mod backend;
pub mod conn;
pub mod device;
pub mod event_handler;
mod interest;
pub mod packet;

use std::io;
use std::path::PathBuf;

pub use device::{Vsock, VsockConfig, VsockListener};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (device → guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (guest → device).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (transport reset events; unused by cinder so far).
pub const EVENT_QUEUE: usize = 2;
/// Largest packet payload accepted from the guest, and written to it.
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Most connections at once (guest- and host-initiated); beyond, new ones are refused (RST).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most host clients that connected but have not finished their `CONNECT` line.
pub const MAX_PENDING_CONNECTS: usize = 64;
/// Longest `CONNECT <port>\n` line accepted.
pub const MAX_CONNECT_LINE: usize = 32;
/// How long a host client has to send its `CONNECT` line after connecting; then it is dropped
/// (so idle clients cannot hold the [`MAX_PENDING_CONNECTS`] places).
pub const CONNECT_LINE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long the guest has to answer a host-initiated REQUEST; then the connection is reset
/// and the host client sees EOF (Firecracker's 2 s).
pub const LOCAL_INIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long the listener is left out of the event loop after `accept` failed for want of file
/// descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM): the pending client stays in the backlog, and
/// a level-triggered listener would otherwise wake the loop for it again and again.
pub const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(200);
/// Most guest bytes buffered for host sockets across all connections (each connection may
/// buffer [`conn::CONN_BUF_SIZE`], 1024 x 256 KiB = 256 MiB at worst without this); beyond it,
/// the connection whose packet went over is reset.
pub const TX_BUDGET: usize = 32 << 20;

/// Errors creating a [`Vsock`] (checked before the guest starts).
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// CIDs 0-2 are reserved (hypervisor, local, host).
    #[error("vsock guest CID {0} is reserved: use a CID of 3 or more")]
    InvalidCid(u64),
    /// The CID does not fit in 32 bits (the Linux driver reads a 32-bit value).
    #[error("vsock guest CID {0} is too large: use a CID below 2^32")]
    CidTooLarge(u64),
    /// The directory of the socket path does not exist.
    #[error("vsock socket directory {0} does not exist: create it or choose another uds path")]
    DirectoryMissing(PathBuf),
    /// A live process listens on the socket path.
    #[error("vsock socket path {0} is in use by a running process: choose another path")]
    PathInUse(PathBuf),
    /// Something that is not a socket is at the path.
    #[error("vsock socket path {0} exists and is not a socket: remove it or choose another path")]
    PathExists(PathBuf),
    /// Binding the socket failed.
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Creating an event fd failed.
    #[error("cannot create an event fd for the vsock device: {0}")]
    EventFd(io::Error),
}
