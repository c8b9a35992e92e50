//! The virtio-vsock device model: queues, the packet plumbing between the virtqueues and the
//! connections, and the host-side sockets.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use socket2::{Domain, SockAddr, Socket, Type};

use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::VolatileMemory;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::backend::{out_of_fds, Backend, HostClient, Timeouts, FIRST_LOCAL_PORT};
pub use super::backend::{parse_connect, ConnKey};
use super::packet::{HOST_CID, OP_RW, TYPE_STREAM};
use super::{
    VsockError, MAX_CONNECTIONS, MAX_CONNECT_LINE, MAX_PENDING_CONNECTS, MAX_PKT_DATA, QUEUE_SIZE,
    RX_QUEUE, TX_BUDGET, TX_QUEUE,
};
use crate::virtio::device_core::{rearm_when_empty, CoreDevice, DeviceCore};
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::{device_type, COMMON_FEATURES};

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

/// Mode of the socket file at `uds_path`: only cinder's own user may connect.
pub const SOCKET_MODE: u32 = 0o600;
/// Backlog of the listener at `uds_path`.
const LISTEN_BACKLOG: i32 = 128;

/// Which file cinder created at a path (device and inode), so that only that file is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The socket file at `path`, if a socket is there.
    fn of_socket(path: &Path) -> Option<FileId> {
        let m = path.symlink_metadata().ok()?;
        m.file_type().is_socket().then(|| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Removes the socket file at `path` if it is still the one cinder bound (`id`): whatever
/// replaced it since (another process's socket, a file) is left alone.
fn remove_own_socket(path: &Path, id: Option<FileId>) {
    if id.is_some() && FileId::of_socket(path) == id {
        if let Err(e) = std::fs::remove_file(path) {
            log::warn!("virtio-vsock: cannot remove {}: {e}", path.display());
        }
    }
}

/// Binds a listening Unix socket at `path` whose file has mode [`SOCKET_MODE`] whatever the
/// umask. The mode is set between bind() and listen(): in that window the file exists with
/// the umask's mode, but a connect() to a socket that does not listen yet is refused, so no
/// client gets in before the mode is 0600 (and no process-wide umask is touched, which other
/// threads would see). Returns the listener (non-blocking) and the file's identity.
fn bind_private(path: &Path) -> io::Result<(UnixListener, Option<FileId>)> {
    let addr = SockAddr::unix(path)?;
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    sock.bind(&addr)?;
    let id = FileId::of_socket(path);
    let listen = std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| sock.listen(LISTEN_BACKLOG))
        .and_then(|()| sock.set_nonblocking(true));
    if let Err(e) = listen {
        remove_own_socket(path, id);
        return Err(e);
    }
    Ok((UnixListener::from(sock), id))
}

/// The listening socket of a vsock device, bound ahead of the device. Until a [`Vsock`]
/// takes it, dropping it removes the socket file (as dropping the device does), if the file
/// at the path is still the socket it bound.
#[derive(Debug)]
pub struct VsockListener {
    path: PathBuf,
    listener: Option<UnixListener>,
    id: Option<FileId>,
}

impl VsockListener {
    /// Checks `config` ([`VsockConfig::validate`]), replaces a stale socket file nobody
    /// listens on, and binds a non-blocking listener at `config.uds_path`.
    pub fn bind(config: &VsockConfig) -> Result<Self, VsockError> {
        config.validate()?;
        if config.stale_socket() {
            let _ = std::fs::remove_file(&config.uds_path);
        }
        let (listener, id) = bind_private(&config.uds_path).map_err(|source| VsockError::Bind {
            path: config.uds_path.clone(),
            source,
        })?;
        Ok(VsockListener {
            path: config.uds_path.clone(),
            listener: Some(listener),
            id,
        })
    }

    /// The path it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the socket over to the device, which removes the file when dropped (`None`
    /// cannot happen: only this takes it, and it consumes `self`).
    fn into_listener(mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        if self.listener.is_some() {
            remove_own_socket(&self.path, self.id);
        }
    }
}

/// A virtio-vsock device.
pub struct Vsock {
    pub(super) backend: Backend,
    pub(super) core: DeviceCore,
    pub(super) interest: super::interest::Interest,
    /// One-shot timer at the backend's earliest deadline (non-blocking).
    pub(super) timer: TimerFd,
    /// What `timer` is armed for (None: disarmed).
    pub(super) timer_at: Option<Instant>,
    /// The socket file this device removes when dropped (if still the same).
    socket_id: Option<FileId>,
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
        Self::with_listener(config, VsockListener::bind(config)?)
    }

    /// A device for `config` on a listener bound before (by [`VsockListener::bind`] for the
    /// same path), so that the socket can exist before the device does (Firecracker creates
    /// it when `PUT /vsock` is handled).
    pub fn with_listener(
        config: &VsockConfig,
        listener: VsockListener,
    ) -> Result<Self, VsockError> {
        if listener.path != config.uds_path {
            return Err(VsockError::Bind {
                path: config.uds_path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the bound socket is {}", listener.path.display()),
                ),
            });
        }
        let path = listener.path.clone();
        let socket_id = listener.id;
        let listener = listener.into_listener().ok_or_else(|| VsockError::Bind {
            path,
            source: io::Error::other("the listener was already handed over"),
        })?;
        let config_space = config.guest_cid.to_le_bytes().to_vec();
        let core = DeviceCore::new(
            "virtio-vsock",
            COMMON_FEATURES,
            config_space,
            &[QUEUE_SIZE; 3],
        )
        .map_err(VsockError::EventFd)?;
        let timer = TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?;
        // SAFETY: fcntl(F_GETFL/F_SETFL) on the timerfd this function owns; no memory is passed.
        let nonblocking = unsafe {
            let fd = timer.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !nonblocking {
            return Err(VsockError::EventFd(io::Error::last_os_error()));
        }
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
                timeouts: Timeouts::default(),
                listener_backoff: None,
                tx_budget: TX_BUDGET,
            },
            core,
            interest: super::interest::Interest::default(),
            timer,
            timer_at: None,
            socket_id,
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
            Err(e) if out_of_fds(&e) => {
                // The client stays in the backlog and the listener stays readable: leave it
                // out of the event loop for a while instead of waking up for it again and
                // again.
                let pause = self.backend.timeouts.accept_backoff;
                warn_ratelimited!(
                    "virtio-vsock: cannot accept a host client: {e}; not accepting for {pause:?}"
                );
                self.backend.listener_backoff = Some(Instant::now() + pause);
                None
            }
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
                deadline: Instant::now() + self.backend.timeouts.connect_line,
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
                    let pkt_ref = &pkt;
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
        remove_own_socket(&self.backend.uds_path, self.socket_id);
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

    /// A restored guest's connections lived in another process: tell its driver with a
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (it closes them and reads the
    /// guest CID again), so new connections work.
    fn after_restore(&mut self) {
        self.drop_connections();
        self.send_transport_reset();
    }
}

/// The event queue's index.
const EVENT_QUEUE: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

impl Vsock {
    /// Puts a transport reset event in the first buffer of the event queue.
    fn send_transport_reset(&mut self) {
        use vm_memory::Bytes;
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(EVENT_QUEUE) else {
            return;
        };
        let chain = match queue.pop_descriptor_chain(&mem) {
            Some(c) => c,
            None => {
                warn_ratelimited!("virtio-vsock: no event buffer for the transport reset");
                return;
            }
        };
        let head = chain.head_index();
        let mut len = 0u32;
        if let Some(d) = chain
            .into_iter()
            .find(|d| d.is_write_only() && d.len() >= 4)
        {
            match mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr()) {
                Ok(()) => len = 4,
                Err(e) => warn_ratelimited!("virtio-vsock: cannot write the reset event: {e}"),
            }
        }
        if let Err(e) = queue.add_used(&mem, head, len) {
            warn_ratelimited!("virtio-vsock: cannot add the reset event: {e}");
            return;
        }
        active.signal_used(EVENT_QUEUE);
    }
}

#[cfg(test)]
mod tests;
