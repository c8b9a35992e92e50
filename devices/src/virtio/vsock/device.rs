//! The virtio-vsock device model: queues, the packet plumbing between the virtqueues and the
//! connections, and the host-side sockets.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::VolatileMemory;
use vmm_sys_util::eventfd::EventFd;

use super::conn::{Connection, GuestHeader, RxPacket};
use super::packet::{HOST_CID, OP_REQUEST, OP_RST, OP_RW, TYPE_STREAM};
use super::{
    VsockError, MAX_CONNECTIONS, MAX_CONNECT_LINE, MAX_PENDING_CONNECTS, MAX_PKT_DATA, QUEUE_SIZE,
    RX_QUEUE, TX_QUEUE,
};
use crate::virtio::device_core::{rearm_when_empty, CoreDevice, DeviceCore};
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::{device_type, COMMON_FEATURES};

/// Most RSTs for unknown connections waiting for a receive buffer; more are dropped.
const MAX_PENDING_RST: usize = 256;
/// First port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// How to build a [`Vsock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host clients connect to; guest connections to port P go to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// The checks that need no side effect: CID range, socket directory, path not in use.
    pub fn validate(&self) -> Result<(), VsockError> {
        if self.guest_cid <= HOST_CID {
            return Err(VsockError::InvalidCid(self.guest_cid));
        }
        if self.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::CidTooLarge(self.guest_cid));
        }
        let dir = match self.uds_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(VsockError::DirectoryMissing(dir));
        }
        if let Ok(meta) = self.uds_path.symlink_metadata() {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(VsockError::PathExists(self.uds_path.clone()));
            }
            // A socket nobody listens on is left over from a dead process: `Vsock::new`
            // replaces it. One that answers belongs to a live process.
            if UnixStream::connect(&self.uds_path).is_ok() {
                return Err(VsockError::PathInUse(self.uds_path.clone()));
            }
        }
        Ok(())
    }

    /// Whether a stale socket file (nobody listening) is at the path.
    fn stale_socket(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.uds_path
            .symlink_metadata()
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false)
            && UnixStream::connect(&self.uds_path).is_err()
    }
}

/// Identifies a connection: (host port, guest port).
pub type ConnKey = (u32, u32);

/// A host client that connected to `uds_path` and has not finished its `CONNECT` line.
#[derive(Debug)]
pub(super) struct HostClient {
    pub(super) stream: UnixStream,
    line: Vec<u8>,
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
    /// Connections a device reset dropped: their host peers already see EOF, but the fds stay
    /// open until the event loop has taken them out of its epoll set (event-manager can only
    /// unregister an fd that is still open; a closed one would stay registered under its
    /// number and make the next socket with that number fail to register).
    pub(super) dropped: Vec<(ConnKey, Connection<UnixStream>)>,
    pub(super) clients: HashMap<u32, HostClient>,
    rst_queue: VecDeque<ConnKey>,
    next_local_port: u32,
    scratch: Vec<u8>,
}

impl Backend {
    fn queue_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() < MAX_PENDING_RST {
            self.rst_queue.push_back(key);
        } else {
            warn_ratelimited!("virtio-vsock: too many pending resets; one dropped");
        }
    }

    /// A free host port for a host-initiated connection to `peer_port`.
    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
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
        self.conns
            .insert(key, Connection::from_host(stream, local, peer_port));
        Some(key)
    }

    /// One packet from the guest's transmit queue.
    fn on_guest_packet(&mut self, pkt: &VsockPacket<'_, ()>, data_len: usize) {
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
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(stream) => {
                    self.conns
                        .insert(key, Connection::from_guest(stream, key.0, key.1, &hdr));
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

    /// The next packet for the guest: header fields (src port, dst port, packet), data in
    /// `scratch[..len]`.
    fn next_rx(&mut self, data_cap: usize) -> Option<(ConnKey, RxPacket)> {
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
    fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || self.conns.values().any(|c| c.has_rx())
    }
}

/// A virtio-vsock device.
pub struct Vsock {
    pub(super) backend: Backend,
    pub(super) core: DeviceCore,
    pub(super) interest: super::event_handler::Interest,
}

impl fmt::Debug for Vsock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.backend.cid)
            .field("uds_path", &self.backend.uds_path)
            .field("connections", &self.backend.conns.len())
            .field("activated", &self.core.is_activated())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// Validate the configuration and listen on `uds_path` (non-blocking).
    pub fn new(config: &VsockConfig) -> Result<Self, VsockError> {
        config.validate()?;
        if config.stale_socket() {
            let _ = std::fs::remove_file(&config.uds_path);
        }
        let listener = UnixListener::bind(&config.uds_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| VsockError::Bind {
                path: config.uds_path.clone(),
                source,
            })?;
        let config_space = config.guest_cid.to_le_bytes().to_vec();
        let core = DeviceCore::new(
            "virtio-vsock",
            COMMON_FEATURES,
            config_space,
            &[QUEUE_SIZE; 3],
        )
        .map_err(VsockError::EventFd)?;
        Ok(Vsock {
            backend: Backend {
                cid: config.guest_cid,
                uds_path: config.uds_path.clone(),
                listener,
                conns: HashMap::new(),
                dropped: Vec::new(),
                clients: HashMap::new(),
                rst_queue: VecDeque::new(),
                next_local_port: FIRST_LOCAL_PORT,
                scratch: vec![0u8; MAX_PKT_DATA as usize],
            },
            core,
            interest: super::event_handler::Interest::default(),
        })
    }

    /// The guest CID.
    pub fn cid(&self) -> u64 {
        self.backend.cid
    }

    /// The host socket path.
    pub fn uds_path(&self) -> &Path {
        &self.backend.uds_path
    }

    /// Written once per activation; the event loop reacts by registering the queue events.
    pub fn activate_event(&self) -> &EventFd {
        self.core.activate_event()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.backend.conns.len()
    }

    /// Accept a pending host client (if any, and if there is room).
    pub(super) fn accept_client(&mut self) -> Option<UnixStream> {
        match self.backend.listener.accept() {
            Ok((s, _)) => {
                if self.backend.clients.len() >= MAX_PENDING_CONNECTS
                    || self.backend.conns.len() >= MAX_CONNECTIONS
                {
                    warn_ratelimited!("virtio-vsock: too many host clients; one refused");
                    return None;
                }
                s.set_nonblocking(true).ok()?;
                Some(s)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                warn_ratelimited!("virtio-vsock: accept failed: {e}");
                None
            }
        }
    }

    pub(super) fn add_client(&mut self, token: u32, stream: UnixStream) {
        self.backend.clients.insert(
            token,
            HostClient {
                stream,
                line: Vec::with_capacity(MAX_CONNECT_LINE),
            },
        );
    }

    /// On reset: the guest's sockets are gone, so every connection is dropped (host peers see
    /// EOF).
    fn drop_connections(&mut self) {
        for (key, conn) in self.backend.conns.drain() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            self.backend.dropped.push((key, conn));
        }
        self.backend.rst_queue.clear();
    }

    /// Process the guest's transmit queue.
    pub fn process_tx(&mut self) {
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let backend = &mut self.backend;
        // The shared loop re-enables notifications before it stops (with EVENT_IDX that
        // publishes avail_event; without it the driver would stop kicking this queue).
        active.drain_queue(TX_QUEUE, |mut chain, mem| {
            match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => {
                    let len = match pkt.data_slice() {
                        Some(slice) if !pkt.is_empty() => {
                            let n = (pkt.len() as usize).min(backend.scratch.len());
                            slice.copy_to(&mut backend.scratch[..n])
                        }
                        _ => 0,
                    };
                    let pkt_ref: &VsockPacket<'_, ()> = &pkt;
                    backend.on_guest_packet(pkt_ref, len);
                }
                Err(e) => warn_ratelimited!("virtio-vsock: bad transmit packet dropped: {e}"),
            }
            0
        });
    }

    /// Fill the guest's receive buffers with whatever is pending.
    pub fn process_rx(&mut self) {
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(RX_QUEUE) else {
            return;
        };
        let mut used_any = false;
        let mut rearmed = false;
        while self.backend.has_rx() {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    warn_ratelimited!("virtio-vsock: receive queue: {e}");
                    break;
                }
            };
            let Some(mut chain) = chain else {
                // Out of receive buffers with packets pending.
                if rearm_when_empty(queue, mem, &mut rearmed, "virtio-vsock") {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let mut pkt = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(p) => p,
                Err(e) => {
                    warn_ratelimited!("virtio-vsock: bad receive buffer: {e}");
                    if let Err(e) = queue.add_used(mem, head, 0) {
                        warn_ratelimited!("virtio-vsock: cannot add used entry: {e}");
                    }
                    used_any = true;
                    continue;
                }
            };
            let cap = pkt.data_slice().map_or(0, |s| s.len());
            let Some((key, rx)) = self.backend.next_rx(cap) else {
                queue.go_to_previous_position();
                break;
            };
            let len = rx.len as usize;
            if rx.op != OP_RW {
                log::debug!(
                    "virtio-vsock: op {} flags {:#x} to the guest for {key:?}",
                    rx.op,
                    rx.flags
                );
            }
            let ok = pkt.set_header_from_raw(&[0u8; PKT_HEADER_SIZE]).is_ok();
            pkt.set_src_cid(HOST_CID)
                .set_dst_cid(self.backend.cid)
                .set_src_port(key.0)
                .set_dst_port(key.1)
                .set_type(TYPE_STREAM)
                .set_op(rx.op)
                .set_flags(rx.flags)
                .set_buf_alloc(rx.buf_alloc)
                .set_fwd_cnt(rx.fwd_cnt)
                .set_len(rx.len);
            let mut written = 0;
            if len > 0 {
                if let (Some(slice), Some(data)) =
                    (pkt.data_slice(), self.backend.scratch.get(..len))
                {
                    written = slice
                        .get_slice(0, len)
                        .map(|s| {
                            s.copy_from(data);
                            len
                        })
                        .unwrap_or(0);
                }
            }
            if !ok || written != len {
                warn_ratelimited!("virtio-vsock: cannot write a receive packet");
            }
            let used_len = u32::try_from(PKT_HEADER_SIZE + written).unwrap_or(0);
            if let Err(e) = queue.add_used(mem, head, used_len) {
                warn_ratelimited!("virtio-vsock: cannot add used entry: {e}");
            }
            used_any = true;
        }
        if used_any {
            active.signal_used(RX_QUEUE);
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.backend.uds_path);
    }
}

impl CoreDevice for Vsock {
    const DEVICE_TYPE: u32 = device_type::VSOCK;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn on_reset(&mut self) {
        self.drop_connections();
    }
}

#[cfg(test)]
mod tests;
