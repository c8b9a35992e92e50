//! [`ApiServer`]: the Unix-socket HTTP server. One thread serves every
//! client through a level-triggered epoll loop over non-blocking sockets.
//!
//! Robustness rules:
//! - a request must arrive whole within [`ServerConfig::request_timeout`]
//!   of its first byte, else the client gets 408 and is disconnected; a
//!   client that does not read its answer within the same time is dropped;
//!   so a stalled client never holds up the others;
//! - a connection buffers at most one request (header limit plus body
//!   limit) and one answer: memory per connection is bounded;
//! - at most [`ServerConfig::max_connections`] clients at once. A client
//!   idle (between requests) for [`ServerConfig::idle_timeout`] is
//!   disconnected, and a new client takes the slot of the longest-idle one
//!   when all are taken; only when every slot is mid-request does the new
//!   client get a 503, written once its request has been read (so it sees
//!   the answer, not a reset), from one of [`REJECT_SLOTS`] extra slots;
//! - when accept(2) fails for lack of fds (EMFILE, ENFILE) or memory, the
//!   listener leaves the epoll set for [`ACCEPT_BACKOFF`] (level-triggered,
//!   it would otherwise spin) and the failure is logged at most once per
//!   [`ACCEPT_LOG_PERIOD`];
//! - the socket file is created with mode 0600 whatever the umask;
//! - a framing error (see [`crate::http::HttpError`]) is answered and the
//!   connection closed; a routing or body error is answered and the
//!   connection kept.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::handler::RequestHandler;
use crate::http::{self, HttpError, Parsed, MAX_HEADER_BYTES};
use crate::routes::{parse_api_request, ApiResponse};

/// Tunables of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest accepted body (`--http-api-max-payload-size`; a larger one is a 400).
    pub max_body_bytes: usize,
    /// Time for a whole request to arrive, and for an answer to be read.
    pub request_timeout: Duration,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// How long a connection may stay open between requests.
    pub idle_timeout: Duration,
}

/// Default [`ServerConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default [`ServerConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections beyond [`ServerConfig::max_connections`] kept just long enough to read their
/// request and answer it 503; past these, a new connection is closed at once.
pub const REJECT_SLOTS: usize = 16;
/// How long the listener rests after accept(2) ran out of fds or memory.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this period about failing accept(2) calls.
pub const ACCEPT_LOG_PERIOD: Duration = Duration::from_secs(10);
/// The most file descriptors the API server holds: its connections, the rejected ones
/// being answered, the listener, its epoll and its stop eventfd (for the process's fd
/// budget).
pub fn fd_budget(cfg: &ServerConfig) -> usize {
    cfg.max_connections.saturating_add(REJECT_SLOTS + 3)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: http::DEFAULT_MAX_BODY_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Errors of binding and running the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The directory of the socket path does not exist.
    #[error("cannot create API socket {path}: directory {dir} does not exist")]
    MissingDirectory {
        /// The socket path.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
    },
    /// A live process listens on the path.
    #[error("API socket {0} is already in use by a running process; pick another path")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("cannot create API socket {0}: the path exists and is not a socket; remove it or pick another path")]
    NotASocket(PathBuf),
    /// A stale socket could not be removed.
    #[error("cannot remove stale API socket {path}: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// bind(2) failed.
    #[error("cannot bind API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// epoll, eventfd or socket setup failed.
    #[error("API server I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Stops a running [`ApiServer`] from another thread.
pub struct ShutdownHandle(EventFd);

impl ShutdownHandle {
    /// Asks the server loop to return. The socket file is removed.
    pub fn shutdown(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A bound API socket, ready to [`run`](ApiServer::run).
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    config: ServerConfig,
    stop: EventFd,
}

const LISTENER: u64 = 0;
const STOP: u64 = 1;
const READ_CHUNK: usize = 4096;
const MAX_EVENTS: usize = 64;

impl ApiServer {
    /// Binds `path` with the default [`ServerConfig`].
    pub fn bind(path: &Path) -> Result<ApiServer, ApiError> {
        Self::bind_with_config(path, ServerConfig::default())
    }

    /// Binds `path`. A socket file left by a dead process is replaced; a
    /// socket some live process listens on is refused, as is any other
    /// kind of file.
    pub fn bind_with_config(path: &Path, config: ServerConfig) -> Result<ApiServer, ApiError> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                return Err(ApiError::MissingDirectory {
                    path: path.to_path_buf(),
                    dir: dir.to_path_buf(),
                });
            }
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|source| ApiError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let listener = bind_private(path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            config,
            stop: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A handle that makes [`run`](ApiServer::run) return.
    pub fn shutdown_handle(&self) -> Result<ShutdownHandle, ApiError> {
        Ok(ShutdownHandle(self.stop.try_clone()?))
    }

    /// Serves clients until a [`ShutdownHandle`] fires, passing each valid
    /// request to `handler`. Removes the socket file on return.
    pub fn run<H: RequestHandler>(self, mut handler: H) -> Result<(), ApiError> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            self.listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            self.stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let mut st = LoopState {
            conns: HashMap::new(),
            next_token: 2,
            accept_paused_until: None,
            accept_log: AcceptLog::default(),
        };
        let mut events = vec![EpollEvent::default(); MAX_EVENTS];
        let result = loop {
            let timeout = st.next_timeout(&self.config);
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => break Err(ApiError::Io(e)),
            };
            let mut stop = false;
            for ev in &events[..n] {
                match ev.data() {
                    STOP => stop = true,
                    LISTENER => self.accept_all(&epoll, &mut st),
                    token => {
                        if let Some(conn) = st.conns.get_mut(&token) {
                            conn.on_event(ev.event_set(), &self.config, &mut handler);
                        }
                    }
                }
            }
            if stop {
                break Ok(());
            }
            let now = Instant::now();
            if st.accept_paused_until.is_some_and(|t| now >= t) {
                // Re-arm the listener after the back-off (a failure leaves it paused for
                // another round on the next accept error).
                if epoll
                    .ctl(
                        ControlOperation::Add,
                        self.listener.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, LISTENER),
                    )
                    .is_ok()
                {
                    st.accept_paused_until = None;
                } else {
                    st.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                }
            }
            for conn in st.conns.values_mut() {
                conn.on_tick(now, &self.config);
            }
            // Dropping a stream closes its fd, which also removes it from the
            // epoll set.
            st.conns.retain(|token, conn| {
                if !conn.closed {
                    conn.update_interest(&epoll, *token);
                }
                !conn.closed
            });
        };
        let _ = std::fs::remove_file(&self.path);
        result
    }

    fn accept_all(&self, epoll: &Epoll, st: &mut LoopState) {
        // Bounded: at most this many accepts per wake-up, so clients already connected are
        // served between bursts of new ones.
        for _ in 0..MAX_EVENTS {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the pending client stays queued and
                    // the level-triggered listener would wake us at once, forever. Rest it.
                    st.accept_log.failed(&e);
                    if epoll
                        .ctl(
                            ControlOperation::Delete,
                            self.listener.as_raw_fd(),
                            EpollEvent::default(),
                        )
                        .is_ok()
                    {
                        st.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    }
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let live = st.conns.values().filter(|c| !c.reject && !c.closed).count();
            let mut reject = false;
            if live >= self.config.max_connections {
                // Every slot taken: the longest-idle client makes room; with none idle, the
                // new client is told 503 once its request is read.
                if let Some(token) = st.oldest_idle() {
                    if let Some(c) = st.conns.get_mut(&token) {
                        log::debug!("API: too many connections; closing the longest-idle one");
                        c.closed = true;
                    }
                    // Closed now, not at the end of this pass: its fd is free for the next
                    // accept.
                    st.conns.remove(&token);
                } else if st.conns.values().filter(|c| c.reject).count() < REJECT_SLOTS {
                    reject = true;
                } else {
                    // Beyond even the reject slots: close at once (the client sees EOF).
                    continue;
                }
            }
            let token = st.next_token;
            st.next_token += 1;
            if epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .is_err()
            {
                continue;
            }
            let mut conn = Conn::new(stream);
            if reject {
                conn.reject = true;
                conn.deadline = Some(Instant::now() + self.config.request_timeout);
            }
            st.conns.insert(token, conn);
        }
    }
}

/// Binds `path` with mode 0600, whatever the process's umask: the API controls the VM, and
/// only its owner may connect.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask(2) only swaps the process's file-creation mask; it cannot fail. The
    // mask is restored right after bind; a file another thread creates meanwhile is at
    // most created with fewer permissions.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    // Also set it explicitly, should another thread have changed the umask meanwhile.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Rate-limits the log line about failing accept(2) calls.
#[derive(Default)]
struct AcceptLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl AcceptLog {
    fn failed(&mut self, e: &io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ACCEPT_LOG_PERIOD)
        {
            self.suppressed += 1;
            return;
        }
        log::warn!(
            "API socket accept failed: {e} ({} more failures since the last report); \
             new clients wait (raise the open-files limit, RLIMIT_NOFILE)",
            self.suppressed
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

struct LoopState {
    conns: HashMap<u64, Conn>,
    next_token: u64,
    /// The listener is out of the epoll set until then (see [`ACCEPT_BACKOFF`]).
    accept_paused_until: Option<Instant>,
    accept_log: AcceptLog,
}

impl LoopState {
    /// The connection idle the longest (none: every client is mid-request).
    fn oldest_idle(&self) -> Option<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.is_idle())
            .min_by_key(|(_, c)| c.last_active)
            .map(|(t, _)| *t)
    }

    fn next_timeout(&self, cfg: &ServerConfig) -> i32 {
        let now = Instant::now();
        let conn_deadlines = self.conns.values().filter_map(|c| c.next_deadline(cfg));
        match conn_deadlines.chain(self.accept_paused_until).min() {
            None => -1,
            Some(d) => {
                let ms = d.saturating_duration_since(now).as_millis() + 1;
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }
}

struct Conn {
    stream: UnixStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    deadline: Option<Instant>,
    continue_sent: bool,
    close_after_write: bool,
    peer_closed: bool,
    closed: bool,
    writing: bool,
    /// Over the connection limit: its request is read, then answered 503.
    reject: bool,
    /// When a request or answer last moved (for the idle timeout and eviction).
    last_active: Instant,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Conn {
            stream,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            deadline: None,
            continue_sent: false,
            close_after_write: false,
            peer_closed: false,
            closed: false,
            writing: false,
            reject: false,
            last_active: Instant::now(),
        }
    }

    /// Between requests: nothing buffered either way.
    fn is_idle(&self) -> bool {
        !self.closed
            && !self.reject
            && self.rbuf.is_empty()
            && !self.has_output()
            && !self.close_after_write
    }

    /// When [`Conn::on_tick`] has something to do.
    fn next_deadline(&self, cfg: &ServerConfig) -> Option<Instant> {
        if self.is_idle() {
            Some(self.last_active + cfg.idle_timeout)
        } else {
            self.deadline
        }
    }

    fn on_event<H: RequestHandler>(&mut self, ev: EventSet, cfg: &ServerConfig, h: &mut H) {
        if self.has_output() {
            self.flush(cfg);
        }
        if !self.has_output() && !self.close_after_write && !self.closed {
            if ev.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
                self.read_some(cfg);
            }
            self.process(cfg, h);
        }
        if ev.contains(EventSet::ERROR) && !self.has_output() {
            self.closed = true;
        }
        self.finish_if_done();
    }

    fn has_output(&self) -> bool {
        self.wpos < self.wbuf.len()
    }

    fn capacity(cfg: &ServerConfig) -> usize {
        // `--http-api-max-payload-size` may be as large as a usize.
        MAX_HEADER_BYTES.saturating_add(cfg.max_body_bytes)
    }

    fn read_some(&mut self, cfg: &ServerConfig) {
        let cap = Self::capacity(cfg);
        let mut chunk = [0u8; READ_CHUNK];
        while self.rbuf.len() < cap && !self.peer_closed {
            let want = (cap - self.rbuf.len()).min(READ_CHUNK);
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => self.peer_closed = true,
                Ok(n) => {
                    self.last_active = Instant::now();
                    if self.rbuf.is_empty() {
                        self.deadline = Some(Instant::now() + cfg.request_timeout);
                    }
                    self.rbuf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    /// Answers every complete request in the buffer, as long as answers
    /// drain at once.
    fn process<H: RequestHandler>(&mut self, cfg: &ServerConfig, h: &mut H) {
        while !self.has_output() && !self.close_after_write && !self.closed {
            if self.rbuf.is_empty() {
                if !self.reject {
                    self.deadline = None;
                }
                return;
            }
            match http::parse_request(&self.rbuf, cfg.max_body_bytes) {
                Ok(Parsed::Complete(req, used)) => {
                    self.rbuf.drain(..used);
                    self.continue_sent = false;
                    self.deadline = if self.rbuf.is_empty() {
                        None
                    } else {
                        Some(Instant::now() + cfg.request_timeout)
                    };
                    if self.reject {
                        self.queue_rejection(cfg);
                        return;
                    }
                    let resp = match parse_api_request(&req.method, &req.path, &req.body) {
                        Ok(api_req) => h.handle(api_req),
                        Err(e) => {
                            log::debug!("API request refused: {e}");
                            e.to_response()
                        }
                    };
                    let close = !req.keep_alive;
                    self.queue(resp.status, resp.body.as_deref(), close, cfg);
                    self.flush(cfg);
                }
                Ok(Parsed::Incomplete { expect_continue }) => {
                    if self.peer_closed && self.reject {
                        self.queue_rejection(cfg);
                    } else if self.peer_closed {
                        let e = HttpError::Malformed(
                            "connection closed before the request was complete".into(),
                        );
                        self.queue_error(&e, cfg);
                    } else if expect_continue && !self.continue_sent {
                        self.continue_sent = true;
                        self.wbuf = http::CONTINUE.to_vec();
                        self.wpos = 0;
                        self.flush(cfg);
                    }
                    return;
                }
                Err(_) if self.reject => {
                    self.queue_rejection(cfg);
                    return;
                }
                Err(e) => {
                    log::debug!("bad HTTP request on the API socket: {e}");
                    self.queue_error(&e, cfg);
                    return;
                }
            }
        }
    }

    /// The 503 of a client over the connection limit; the connection closes after it.
    fn queue_rejection(&mut self, cfg: &ServerConfig) {
        let msg = format!(
            "too many API connections (limit {}), all busy; retry later",
            cfg.max_connections
        );
        let resp = ApiResponse::error(503, msg);
        self.rbuf.clear();
        self.queue(resp.status, resp.body.as_deref(), true, cfg);
        self.flush(cfg);
    }

    fn queue_error(&mut self, e: &HttpError, cfg: &ServerConfig) {
        let resp = ApiResponse::error(e.status(), e.to_string());
        self.rbuf.clear();
        self.queue(resp.status, resp.body.as_deref(), true, cfg);
        self.flush(cfg);
    }

    fn queue(&mut self, status: u16, body: Option<&str>, close: bool, cfg: &ServerConfig) {
        self.wbuf = http::serialize_response(status, body, close);
        self.wpos = 0;
        self.close_after_write = close;
        self.deadline = Some(Instant::now() + cfg.request_timeout);
    }

    fn flush(&mut self, cfg: &ServerConfig) {
        while self.has_output() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => {
                    self.closed = true;
                    return;
                }
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        self.last_active = Instant::now();
        // Answer delivered: the clock restarts with the next request.
        self.deadline = if self.rbuf.is_empty() {
            None
        } else {
            Some(Instant::now() + cfg.request_timeout)
        };
    }

    fn finish_if_done(&mut self) {
        if !self.has_output() && (self.close_after_write || self.peer_closed) {
            self.closed = true;
        }
    }

    fn on_tick(&mut self, now: Instant, cfg: &ServerConfig) {
        if self.closed {
            return;
        }
        if self.is_idle() {
            if now >= self.last_active + cfg.idle_timeout {
                // An idle keep-alive connection may be closed at any time (RFC 9112 9.8).
                self.closed = true;
            }
            return;
        }
        if let Some(d) = self.deadline {
            if now >= d {
                if self.has_output() {
                    // The client does not read its answer.
                    self.closed = true;
                } else if self.reject {
                    self.queue_rejection(cfg);
                    self.finish_if_done();
                } else {
                    let e = HttpError::Timeout(cfg.request_timeout.as_millis());
                    self.queue_error(&e, cfg);
                    self.finish_if_done();
                }
            }
        }
    }

    fn update_interest(&mut self, epoll: &Epoll, token: u64) {
        let writing = self.has_output();
        if writing != self.writing {
            let set = if writing { EventSet::OUT } else { EventSet::IN };
            if epoll
                .ctl(
                    ControlOperation::Modify,
                    self.stream.as_raw_fd(),
                    EpollEvent::new(set, token),
                )
                .is_err()
            {
                self.closed = true;
            }
            self.writing = writing;
        }
    }
}
