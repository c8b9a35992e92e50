//! The host side of a [`super::Vsock`]: the listening socket, the host clients that have not
//! sent their `CONNECT` line yet, the connections and the RSTs waiting for the guest. No
//! virtqueue in here: the device (`device.rs`) moves packets between the queues and this.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use virtio_vsock::packet::VsockPacket;

use super::conn::{Connection, GuestHeader, RxPacket, SHUTDOWN_TIMEOUT};
use super::packet::{HOST_CID, OP_REQUEST, OP_RST, OP_RW, TYPE_STREAM};
use super::{
    ACCEPT_BACKOFF, CONNECT_LINE_TIMEOUT, LOCAL_INIT_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECT_LINE,
};
use crate::virtio::log_limit::warn_ratelimited;

/// Most RSTs for unknown connections waiting for a receive buffer; more are dropped.
const MAX_PENDING_RST: usize = 256;
/// First port handed out to host-initiated connections.
pub(super) const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Identifies a connection: (host port, guest port).
pub type ConnKey = (u32, u32);

/// The device's timers (the constants in `mod.rs`; unit tests shorten them).
#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    /// A host client's `CONNECT` line.
    pub(super) connect_line: Duration,
    /// The guest's RESPONSE to a host-initiated REQUEST.
    pub(super) local_init: Duration,
    /// A connection's shutdown ([`SHUTDOWN_TIMEOUT`]).
    pub(super) shutdown: Duration,
    /// How long the listener stays unwatched after `accept` ran out of file descriptors.
    pub(super) accept_backoff: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_line: CONNECT_LINE_TIMEOUT,
            local_init: LOCAL_INIT_TIMEOUT,
            shutdown: SHUTDOWN_TIMEOUT,
            accept_backoff: ACCEPT_BACKOFF,
        }
    }
}

/// A host client that connected to `uds_path` and has not finished its `CONNECT` line.
#[derive(Debug)]
pub(super) struct HostClient {
    pub(super) stream: UnixStream,
    pub(super) line: Vec<u8>,
    /// Dropped if the line is not complete by then.
    pub(super) deadline: Instant,
}

/// Whether an I/O error means the process (or system) is out of file descriptors or socket
/// memory, so that retrying at once cannot succeed.
pub(super) fn out_of_fds(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Connects to the Unix socket at `path` without blocking: a Unix stream connect either
/// completes at once or fails (`EAGAIN` when the listener's backlog is full), so the event loop
/// never waits for a host listener.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let addr = SockAddr::unix(path)?;
    let sock = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
    match sock.connect(&addr) {
        Ok(()) => Ok(UnixStream::from(sock)),
        // Not seen for AF_UNIX on Linux (a full backlog is EAGAIN), but if it ever were, a
        // connection still in progress is not one cinder can use yet: refused like the rest.
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "connection in progress",
        )),
        Err(e) => Err(e),
    }
}

/// What a host client's `CONNECT` line came to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ClientOutcome {
    /// Still reading.
    Pending,
    /// The line named this guest port.
    Connect(u32),
    /// Bad line, end of file or error: drop the client.
    Drop,
}

/// Parse `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let s = s.strip_suffix('\r').unwrap_or(s);
    let port = s.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl HostClient {
    /// Read what is there (bounded); decide when the line is complete.
    pub(super) fn on_readable(&mut self) -> ClientOutcome {
        // One byte at a time (the line is at most MAX_CONNECT_LINE bytes), so nothing past
        // the newline (the client's first data) is consumed here.
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return ClientOutcome::Drop,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ClientOutcome::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return ClientOutcome::Drop,
            }
            if b[0] == b'\n' {
                return match parse_connect(&self.line) {
                    Some(port) => ClientOutcome::Connect(port),
                    None => ClientOutcome::Drop,
                };
            }
            self.line.push(b[0]);
            if self.line.len() >= MAX_CONNECT_LINE {
                return ClientOutcome::Drop;
            }
        }
    }
}

/// Everything but the virtqueues: sockets, connections, pending RSTs.
pub(super) struct Backend {
    pub(super) cid: u64,
    pub(super) uds_path: PathBuf,
    pub(super) listener: UnixListener,
    pub(super) conns: HashMap<ConnKey, Connection<UnixStream>>,
    /// Connections a device reset or a timer dropped: their host peers already see EOF, but the fds stay
    /// open until the event loop has taken them out of its epoll set (event-manager can only
    /// unregister an fd that is still open; a closed one would stay registered under its
    /// number and make the next socket with that number fail to register).
    pub(super) dropped: Vec<(ConnKey, Connection<UnixStream>)>,
    pub(super) clients: HashMap<u32, HostClient>,
    pub(super) rst_queue: VecDeque<ConnKey>,
    pub(super) next_local_port: u32,
    pub(super) scratch: Vec<u8>,
    pub(super) timeouts: Timeouts,
    /// Until when the listener is left unwatched (accept ran out of file descriptors).
    pub(super) listener_backoff: Option<Instant>,
    /// Most guest bytes buffered for host sockets across all connections.
    pub(super) tx_budget: usize,
}

impl Backend {
    pub(super) fn queue_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() < MAX_PENDING_RST {
            self.rst_queue.push_back(key);
        } else {
            warn_ratelimited!("virtio-vsock: too many pending resets; one dropped");
        }
    }

    /// A free host port for a host-initiated connection to `peer_port`.
    pub(super) fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer_port)) {
                return p;
            }
        }
    }

    /// A host client asked for guest port `peer_port`.
    pub(super) fn connect_from_host(
        &mut self,
        stream: UnixStream,
        peer_port: u32,
    ) -> Option<ConnKey> {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn_ratelimited!(
                "virtio-vsock: {MAX_CONNECTIONS} connections open; host client refused"
            );
            return None;
        }
        let local = self.alloc_local_port(peer_port);
        let key = (local, peer_port);
        let mut conn = Connection::from_host(stream, local, peer_port);
        conn.set_shutdown_timeout(self.timeouts.shutdown);
        conn.set_deadline(Instant::now() + self.timeouts.local_init);
        self.conns.insert(key, conn);
        Some(key)
    }

    /// One packet from the guest's transmit queue.
    pub(super) fn on_guest_packet<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        pkt: &VsockPacket<'_, B>,
        data_len: usize,
    ) {
        if pkt.src_cid() != self.cid || pkt.dst_cid() != HOST_CID {
            warn_ratelimited!(
                "virtio-vsock: packet from cid {} to cid {} dropped (guest cid {}, host cid 2)",
                pkt.src_cid(),
                pkt.dst_cid(),
                self.cid
            );
            return;
        }
        let key = (pkt.dst_port(), pkt.src_port());
        let op = pkt.op();
        if pkt.type_() != TYPE_STREAM {
            if op != OP_RST {
                self.queue_rst(key);
            }
            return;
        }
        let hdr = GuestHeader {
            op,
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        };
        let data = self.scratch.get(..data_len).unwrap_or(&[]);
        if op != OP_RW {
            log::debug!(
                "virtio-vsock: guest op {op} flags {:#x} for {key:?} (known: {})",
                hdr.flags,
                self.conns.contains_key(&key)
            );
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            if let Err(e) = conn.on_guest_packet(&hdr, data) {
                warn_ratelimited!("virtio-vsock: connection {key:?} reset: {e}");
            }
            if op == OP_RW && !data.is_empty() && conn.tx_pending() > 0 {
                self.enforce_tx_budget(key);
            }
            return;
        }
        if op == OP_REQUEST {
            if self.conns.len() >= MAX_CONNECTIONS {
                warn_ratelimited!("virtio-vsock: {MAX_CONNECTIONS} connections open; refused");
                self.queue_rst(key);
                return;
            }
            let mut path = self.uds_path.clone().into_os_string();
            path.push(format!("_{}", key.0));
            let path = PathBuf::from(path);
            match connect_nonblocking(&path) {
                Ok(stream) => {
                    let mut conn = Connection::from_guest(stream, key.0, key.1, &hdr);
                    conn.set_shutdown_timeout(self.timeouts.shutdown);
                    self.conns.insert(key, conn);
                }
                Err(e) if out_of_fds(&e) => {
                    warn_ratelimited!(
                        "virtio-vsock: guest connection to {} refused: out of file descriptors ({e})",
                        path.display()
                    );
                    self.queue_rst(key);
                }
                Err(e) => {
                    log::debug!("virtio-vsock: guest connect to {}: {e}", path.display());
                    self.queue_rst(key);
                }
            }
        } else if op != OP_RST {
            self.queue_rst(key);
        }
    }

    /// Guest bytes waiting for host sockets, all connections together.
    pub(super) fn tx_buffered(&self) -> usize {
        self.conns.values().map(|c| c.tx_pending()).sum()
    }

    /// Resets connection `key` if the guest bytes buffered for host sockets are beyond the
    /// budget (its buffer goes at once): a host peer that does not read loses its connection
    /// rather than cinder growing without bound.
    fn enforce_tx_budget(&mut self, key: ConnKey) {
        let total = self.tx_buffered();
        if total <= self.tx_budget {
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            warn_ratelimited!(
                "virtio-vsock: connection {key:?} reset: {total} bytes buffered for host sockets, beyond the budget of {} bytes (host peers do not read)",
                self.tx_budget
            );
            conn.kill();
        }
    }

    /// Timers that ran out by `now`: connections reset (an RST goes to the guest when it has
    /// a receive buffer; the host peer sees EOF at once, as the connection is dropped now, not
    /// when the RST goes out), the listener's back-off ended. Host clients are the event
    /// loop's (they are registered by token); see `expired_clients`.
    pub(super) fn expire(&mut self, now: Instant) {
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline().is_some_and(|at| at <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(mut conn) = self.conns.remove(&key) {
                log::info!("virtio-vsock: connection {key:?} timed out; reset");
                conn.kill();
                let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                // Out of the epoll set, then closed, by the event loop.
                self.dropped.push((key, conn));
                self.queue_rst(key);
            }
        }
        if self.listener_backoff.is_some_and(|t| t <= now) {
            self.listener_backoff = None;
        }
    }

    /// Tokens of the host clients whose `CONNECT` line is overdue by `now`.
    pub(super) fn expired_clients(&self, now: Instant) -> Vec<u32> {
        self.clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(t, _)| *t)
            .collect()
    }

    /// The earliest timer: a host client's line, a connection's, the listener's back-off.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let clients = self.clients.values().map(|c| c.deadline);
        let conns = self.conns.values().filter_map(|c| c.deadline());
        clients.chain(conns).chain(self.listener_backoff).min()
    }

    /// The next packet for the guest: header fields (src port, dst port, packet), data in
    /// `scratch[..len]`.
    pub(super) fn next_rx(&mut self, data_cap: usize) -> Option<(ConnKey, RxPacket)> {
        if let Some(key) = self.rst_queue.pop_front() {
            let pkt = RxPacket {
                op: OP_RST,
                flags: 0,
                len: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            };
            return Some((key, pkt));
        }
        let cap = data_cap.min(self.scratch.len());
        // Bounded: each failed try clears the reason `has_rx` was true for that connection.
        for _ in 0..=self.conns.len() {
            let key = self
                .conns
                .iter()
                .find(|(_, c)| c.has_rx())
                .map(|(k, _)| *k)?;
            let conn = self.conns.get_mut(&key)?;
            if let Some(pkt) = conn.next_rx(&mut self.scratch[..cap]) {
                return Some((key, pkt));
            }
        }
        None
    }

    /// Whether anything waits for a receive buffer.
    pub(super) fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || self.conns.values().any(|c| c.has_rx())
    }
}
