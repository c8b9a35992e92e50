//! The vsock stream protocol of the `vsock` check, without any virtqueue or
//! hardware access: the 44-byte `virtio_vsock_hdr`, the connection state
//! machine with credit-based flow control (virtio 1.2 §5.10.6), the stream
//! checksum and the guest's send pattern.
//!
//! Only `core` is used, so the host test crate includes this file too
//! (`tests/tests/vsock.rs`) and unit-tests it without KVM.
//!
//! The driver feeds every received packet to [`Engine::on_rx`], asks
//! [`Engine::next_tx`] for packets to transmit while it has free transmit
//! buffers, calls [`Engine::tick`] with the time, and prints what
//! [`Engine::take_report`] returns (one report per closed connection).

/// `struct virtio_vsock_hdr`, little endian, packed.
pub const HDR_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`.
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Connection slots (connections open at the same time).
pub const MAX_CONNS: usize = 8;
/// Per-connection buffer of echo mode (its `buf_alloc` there).
pub const ECHO_CAP: usize = 16 * 1024;
/// [`ECHO_CAP`] as the header's `u32` `buf_alloc` field.
const ECHO_BUF_ALLOC: u32 = 16 * 1024;
const _: () = assert!(ECHO_BUF_ALLOC as usize == ECHO_CAP);
/// `buf_alloc` advertised in `sum` and `stall` modes.
pub const SUM_BUF_ALLOC: u32 = 256 * 1024;
/// First local port of guest-initiated connections.
pub const FIRST_OUT_PORT: u32 = 49152;
/// How long a REQUEST may wait for its RESPONSE, and a SHUTDOWN for the RST.
pub const HANDSHAKE_MS: u64 = 5_000;
/// How long a finished sender waits for the peer to forward every byte.
pub const LINGER_MS: u64 = 30_000;
/// CREDIT_REQUEST interval while lingering.
pub const LINGER_ASK_MS: u64 = 20;
/// Reports waiting to be printed.
const REPORTS: usize = 16;

pub const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x100_0000_01b3;

/// 64-bit FNV-1a over bytes, continued from `h`.
pub fn fnv1a(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
    }
    h
}

/// Word `w` of the guest's send pattern: splitmix64's finalizer of
/// `w + 0x7e57_0000` (wrapping); the stream is the words in little endian.
pub fn pattern_word(w: u64) -> u64 {
    let mut x = w.wrapping_add(0x7e57_0000);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `out` with the pattern's bytes from stream offset `off` on.
pub fn fill_pattern(off: u64, out: &mut [u8]) {
    let mut i = 0;
    while i < out.len() {
        let pos = off + i as u64;
        let bytes = pattern_word(pos / 8).to_le_bytes();
        let start = (pos % 8) as usize;
        let n = (8 - start).min(out.len() - i);
        out[i..i + n].copy_from_slice(&bytes[start..start + n]);
        i += n;
    }
}

/// The header fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    le32(b, at) as u64 | (le32(b, at + 4) as u64) << 32
}

impl Hdr {
    /// The 44 wire bytes.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the first 44 bytes of `b` (None if shorter).
    pub fn decode(b: &[u8]) -> Option<Hdr> {
        if b.len() < HDR_LEN {
            return None;
        }
        Some(Hdr {
            src_cid: le64(b, 0),
            dst_cid: le64(b, 8),
            src_port: le32(b, 16),
            dst_port: le32(b, 20),
            len: le32(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le32(b, 32),
            buf_alloc: le32(b, 36),
            fwd_cnt: le32(b, 40),
        })
    }
}

/// What the check does with the bytes it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Checksum them and consume them at once.
    Sum,
    /// Checksum them and send them back on the same connection.
    Echo,
    /// Checksum and consume the first `n` bytes of each connection, then
    /// stop reading (no more credit).
    Stall(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Free,
    /// Guest-initiated: REQUEST queued or sent, waiting for RESPONSE.
    Connecting,
    Open,
    /// Our SHUTDOWN is queued or sent; waiting for the peer's RST.
    Closing,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The peer sent RST after our SHUTDOWN (orderly).
    PeerRstAfterShutdown,
    /// The peer shut down; we answered with RST (orderly).
    PeerShutdown,
    /// The peer sent RST out of the blue.
    PeerRst,
    /// No RESPONSE / no RST in time.
    Timeout,
    /// The peer broke the protocol; we sent RST.
    Protocol,
    /// The device reset its transport (event queue).
    TransportReset,
    /// Still open when the check ended.
    StillOpen,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            End::PeerRstAfterShutdown => "shutdown",
            End::PeerShutdown => "peer_shutdown",
            End::PeerRst => "peer_rst",
            End::Timeout => "timeout",
            End::Protocol => "protocol",
            End::TransportReset => "transport_reset",
            End::StillOpen => "still_open",
        }
    }

    /// Whether the stream ended cleanly.
    pub fn orderly(self) -> bool {
        matches!(self, End::PeerRstAfterShutdown | End::PeerShutdown)
    }
}

/// One closed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub n: u32,
    pub outbound: bool,
    pub local_port: u32,
    pub peer_port: u32,
    pub rx_bytes: u64,
    pub rx_sum: u64,
    pub tx_bytes: u64,
    pub tx_sum: u64,
    pub end: End,
}

/// An empty report (a placeholder in fixed arrays).
pub const NO_REPORT: Report = Report {
    n: 0,
    outbound: false,
    local_port: 0,
    peer_port: 0,
    rx_bytes: 0,
    rx_sum: 0,
    tx_bytes: 0,
    tx_sum: 0,
    end: End::PeerRstAfterShutdown,
};

#[derive(Clone, Copy)]
struct Conn {
    st: St,
    n: u32,
    outbound: bool,
    local_port: u32,
    peer_port: u32,
    // Receive side (host -> guest), wrapping counters.
    buf_alloc: u32,
    rx_cnt: u32,
    fwd_cnt: u32,
    fwd_sent: u32,
    // Send side.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    peer_shut: u32,
    // Control packets owed.
    want_request: bool,
    want_response: bool,
    want_update: bool,
    want_credit_request: bool,
    want_shutdown: bool,
    /// A CREDIT_REQUEST went out and no packet from the peer came since.
    asked: bool,
    // Stream accounting.
    rx_bytes: u64,
    rx_sum: u64,
    tx_bytes: u64,
    tx_sum: u64,
    /// Pattern bytes still to send (guest-initiated connections).
    tx_left: u64,
    // Echo ring (storage in `Engine::echo`).
    echo_head: usize,
    echo_len: usize,
    /// Timeout of Connecting / Closing / lingering, in ms.
    deadline: u64,
    next_ask: u64,
}

const FREE: Conn = Conn {
    st: St::Free,
    n: 0,
    outbound: false,
    local_port: 0,
    peer_port: 0,
    buf_alloc: 0,
    rx_cnt: 0,
    fwd_cnt: 0,
    fwd_sent: 0,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    tx_cnt: 0,
    peer_shut: 0,
    want_request: false,
    want_response: false,
    want_update: false,
    want_credit_request: false,
    want_shutdown: false,
    asked: false,
    rx_bytes: 0,
    rx_sum: 0,
    tx_bytes: 0,
    tx_sum: 0,
    tx_left: 0,
    echo_head: 0,
    echo_len: 0,
    deadline: 0,
    next_ask: 0,
};

impl Conn {
    /// Bytes the peer may still send us: what we advertised, minus what
    /// arrived since the `fwd_cnt` it last heard.
    fn our_credit(&self) -> u32 {
        self.buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_sent))
    }

    /// Bytes we may still send the peer.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn has_data(&self, mode: Mode) -> bool {
        self.peer_shut & SHUTDOWN_RCV == 0
            && match mode {
                Mode::Echo => self.echo_len > 0,
                _ => self.tx_left > 0,
            }
    }
}

/// Totals over the closed connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Host-initiated connections accepted / closed.
    pub accepted: u32,
    pub closed_in: u32,
    /// Guest-initiated connections opened / closed.
    pub opened: u32,
    pub closed_out: u32,
    /// Connections that did not end orderly.
    pub unorderly: u32,
    pub rx_bytes: u64,
    /// Wrapping sum of the per-connection FNV-1a sums (order-independent;
    /// equal to the stream's FNV-1a with a single connection).
    pub rx_sum: u64,
    pub tx_bytes: u64,
    pub tx_sum: u64,
    /// RW bytes beyond the credit we had granted (the device broke flow control).
    pub credit_violations: u64,
    /// Packets that did not belong anywhere (wrong CID/type/port, bad op).
    pub bad_packets: u32,
    /// REQUESTs refused with RST (wrong port, no free slot).
    pub refused: u32,
    /// RW payload bytes received after the peer's SHUTDOWN(SEND) or outside Open.
    pub stray_bytes: u64,
    /// Data bytes left unconsumed (stall mode).
    pub unread: u64,
    /// Connections that reached the stall point.
    pub stalled: u32,
}

/// All the connections of the check.
pub struct Engine {
    pub cid: u64,
    pub listen_port: u32,
    pub mode: Mode,
    /// Wait for the peer to forward every byte before SHUTDOWN.
    pub linger: bool,
    conns: [Conn; MAX_CONNS],
    echo: [[u8; ECHO_CAP]; MAX_CONNS],
    /// RSTs owed for packets that match no connection: (local, peer port).
    rst_owed: [(u32, u32); 8],
    rst_owed_len: usize,
    /// Reports in close order: `reports[..reports_len]`.
    reports: [Report; REPORTS],
    reports_len: usize,
    /// Reports dropped because the queue was full (totals still count them).
    pub reports_dropped: u32,
    next_n: u32,
    next_out_port: u32,
    cursor: usize,
    pub totals: Totals,
}

impl Engine {
    /// An engine with all-zero state (so a `static` of it costs no image
    /// bytes); [`Engine::reset`] makes it usable.
    pub const fn new(cid: u64, listen_port: u32, mode: Mode) -> Engine {
        Engine {
            cid,
            listen_port,
            mode,
            linger: false,
            conns: [FREE; MAX_CONNS],
            echo: [[0; ECHO_CAP]; MAX_CONNS],
            rst_owed: [(0, 0); 8],
            rst_owed_len: 0,
            reports: [NO_REPORT; REPORTS],
            reports_len: 0,
            reports_dropped: 0,
            next_n: 0,
            next_out_port: 0,
            cursor: 0,
            totals: Totals {
                accepted: 0,
                closed_in: 0,
                opened: 0,
                closed_out: 0,
                unorderly: 0,
                rx_bytes: 0,
                rx_sum: 0,
                tx_bytes: 0,
                tx_sum: 0,
                credit_violations: 0,
                bad_packets: 0,
                refused: 0,
                stray_bytes: 0,
                unread: 0,
                stalled: 0,
            },
        }
    }

    /// Starts over: every connection forgotten, `linger` on.
    pub fn reset(&mut self, cid: u64, listen_port: u32, mode: Mode) {
        self.cid = cid;
        self.listen_port = listen_port;
        self.mode = mode;
        self.linger = true;
        self.conns = [FREE; MAX_CONNS];
        self.rst_owed_len = 0;
        self.reports_len = 0;
        self.reports_dropped = 0;
        self.next_n = 0;
        self.next_out_port = FIRST_OUT_PORT;
        self.cursor = 0;
        self.totals = Totals::default();
    }

    /// Open connections.
    pub fn open_count(&self) -> usize {
        self.conns.iter().filter(|c| c.st != St::Free).count()
    }

    fn buf_alloc(&self) -> u32 {
        match self.mode {
            Mode::Echo => ECHO_BUF_ALLOC,
            _ => SUM_BUF_ALLOC,
        }
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.st != St::Free && c.local_port == local && c.peer_port == peer)
    }

    fn alloc(&mut self) -> Option<usize> {
        let i = self.conns.iter().position(|c| c.st == St::Free)?;
        let mut c = FREE;
        c.rx_sum = FNV_INIT;
        c.tx_sum = FNV_INIT;
        c.n = self.next_n;
        c.buf_alloc = self.buf_alloc();
        self.next_n = self.next_n.wrapping_add(1);
        self.conns[i] = c;
        Some(i)
    }

    fn owe_rst(&mut self, local: u32, peer: u32) {
        if self.rst_owed_len < self.rst_owed.len() {
            self.rst_owed[self.rst_owed_len] = (local, peer);
            self.rst_owed_len += 1;
        }
    }

    /// Opens a guest-initiated connection to host port `port` that sends
    /// `bytes` of the pattern. None when every slot is taken.
    pub fn connect(&mut self, port: u32, bytes: u64, now_ms: u64) -> Option<u32> {
        let i = self.alloc()?;
        let local = self.next_out_port;
        self.next_out_port = if local == u32::MAX {
            FIRST_OUT_PORT
        } else {
            local + 1
        };
        let c = &mut self.conns[i];
        c.st = St::Connecting;
        c.outbound = true;
        c.local_port = local;
        c.peer_port = port;
        c.tx_left = bytes;
        c.want_request = true;
        c.deadline = now_ms + HANDSHAKE_MS;
        self.totals.opened += 1;
        Some(local)
    }

    /// Ends connection `i`: totals, a report, the slot freed.
    fn close(&mut self, i: usize, end: End) {
        let c = self.conns[i];
        if c.st == St::Free {
            return;
        }
        let t = &mut self.totals;
        if c.outbound {
            t.closed_out += 1;
        } else {
            t.closed_in += 1;
        }
        if !end.orderly() {
            t.unorderly += 1;
        }
        t.rx_bytes += c.rx_bytes;
        t.rx_sum = t.rx_sum.wrapping_add(c.rx_sum);
        t.tx_bytes += c.tx_bytes;
        t.tx_sum = t.tx_sum.wrapping_add(c.tx_sum);
        t.unread += c.rx_cnt.wrapping_sub(c.fwd_cnt) as u64;
        let r = Report {
            n: c.n,
            outbound: c.outbound,
            local_port: c.local_port,
            peer_port: c.peer_port,
            rx_bytes: c.rx_bytes,
            rx_sum: c.rx_sum,
            tx_bytes: c.tx_bytes,
            tx_sum: c.tx_sum,
            end,
        };
        if self.reports_len < REPORTS {
            self.reports[self.reports_len] = r;
            self.reports_len += 1;
        } else {
            self.reports_dropped += 1;
        }
        self.conns[i] = FREE;
    }

    /// Ends connection `i` with an RST from us.
    fn abort(&mut self, i: usize, end: End) {
        let (l, p) = (self.conns[i].local_port, self.conns[i].peer_port);
        self.owe_rst(l, p);
        self.close(i, end);
    }

    /// The oldest report of a closed connection.
    pub fn take_report(&mut self) -> Option<Report> {
        if self.reports_len == 0 {
            return None;
        }
        let r = self.reports[0];
        self.reports[..self.reports_len].rotate_left(1);
        self.reports_len -= 1;
        Some(r)
    }

    /// The device reset its transport: every connection is gone.
    pub fn transport_reset(&mut self, cid: u64) {
        self.cid = cid;
        for i in 0..MAX_CONNS {
            self.close(i, End::TransportReset);
        }
        self.rst_owed_len = 0;
    }

    /// The check ends: every open connection is reported as still open.
    pub fn abandon_all(&mut self) {
        for i in 0..MAX_CONNS {
            self.close(i, End::StillOpen);
        }
    }

    /// A packet from the device; `data` is its payload (`hdr.len` bytes,
    /// already checked against the buffer by the caller).
    pub fn on_rx(&mut self, h: &Hdr, data: &[u8], now_ms: u64) {
        if h.dst_cid != self.cid || h.src_cid != HOST_CID {
            self.totals.bad_packets += 1;
            return;
        }
        let (local, peer) = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            self.totals.bad_packets += 1;
            if h.op != OP_RST {
                self.owe_rst(local, peer);
            }
            return;
        }
        let Some(i) = self.find(local, peer) else {
            match h.op {
                OP_REQUEST if local == self.listen_port => match self.alloc() {
                    Some(i) => {
                        let c = &mut self.conns[i];
                        c.st = St::Open;
                        c.local_port = local;
                        c.peer_port = peer;
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        c.want_response = true;
                        self.totals.accepted += 1;
                    }
                    None => {
                        self.totals.refused += 1;
                        self.owe_rst(local, peer);
                    }
                },
                OP_REQUEST => {
                    self.totals.refused += 1;
                    self.owe_rst(local, peer);
                }
                OP_RST => {}
                _ => {
                    self.totals.bad_packets += 1;
                    self.owe_rst(local, peer);
                }
            }
            return;
        };
        let mode = self.mode;
        let c = &mut self.conns[i];
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.asked = false;
        match (h.op, c.st) {
            (OP_RST, St::Closing) => self.close(i, End::PeerRstAfterShutdown),
            (OP_RST, _) => self.close(i, End::PeerRst),
            (OP_RESPONSE, St::Connecting) => {
                c.st = St::Open;
                c.want_request = false;
                // The linger clock of a connection with nothing to send.
                c.deadline = now_ms + LINGER_MS;
                c.next_ask = now_ms;
            }
            (OP_RW, St::Open | St::Closing) => {
                // The payload is at most `h.len` bytes, a u32; a longer one cannot be
                // accounted for in the u32 counters, so it is a protocol error.
                let Ok(len) = u32::try_from(data.len()) else {
                    self.totals.bad_packets += 1;
                    self.abort(i, End::Protocol);
                    return;
                };
                if c.peer_shut & SHUTDOWN_SEND != 0 {
                    self.totals.stray_bytes += len as u64;
                    return;
                }
                let credit = c.our_credit();
                if len > credit {
                    self.totals.credit_violations += (len - credit) as u64;
                }
                c.rx_cnt = c.rx_cnt.wrapping_add(len);
                c.rx_bytes += len as u64;
                c.rx_sum = fnv1a(c.rx_sum, data);
                match mode {
                    Mode::Sum => c.fwd_cnt = c.fwd_cnt.wrapping_add(len),
                    Mode::Stall(limit) => {
                        let before = c.rx_bytes - len as u64;
                        // Bytes still to take before the limit, clamped to u32 (the
                        // `min` with `len` makes the clamp exact).
                        let to_limit = limit.saturating_sub(before);
                        let take = u32::try_from(to_limit).unwrap_or(u32::MAX).min(len);
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(take);
                        if before < limit && c.rx_bytes >= limit {
                            self.totals.stalled += 1;
                        }
                    }
                    Mode::Echo => {
                        // Stored for sending back; consumed (fwd_cnt) once sent.
                        let room = ECHO_CAP - c.echo_len;
                        let n = data.len().min(room);
                        for (k, &b) in data[..n].iter().enumerate() {
                            self.echo[i][(c.echo_head + c.echo_len + k) % ECHO_CAP] = b;
                        }
                        c.echo_len += n;
                        // Beyond the ring only with a credit violation:
                        // those bytes are counted, not echoed. At most
                        // `data.len()`, which is `len`, so the clamp never bites.
                        let over = u32::try_from(data.len() - n).unwrap_or(len);
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(over);
                    }
                }
                self.credit_check(i);
            }
            (OP_CREDIT_UPDATE, St::Open | St::Closing | St::Connecting) => {}
            (OP_CREDIT_REQUEST, St::Open | St::Closing) => c.want_update = true,
            (OP_SHUTDOWN, St::Open | St::Closing) => {
                c.peer_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.maybe_finish(i, now_ms);
            }
            _ => {
                self.totals.bad_packets += 1;
                self.abort(i, End::Protocol);
            }
        }
    }

    /// Queues a CREDIT_UPDATE once the peer's view of our free space is a
    /// quarter of `buf_alloc` stale.
    fn credit_check(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.fwd_cnt.wrapping_sub(c.fwd_sent) >= c.buf_alloc / 4 {
            c.want_update = true;
        }
    }

    /// Decides whether connection `i` is done.
    fn maybe_finish(&mut self, i: usize, now_ms: u64) {
        let (mode, linger) = (self.mode, self.linger);
        let c = &mut self.conns[i];
        if c.st != St::Open {
            return;
        }
        if c.peer_shut == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // The peer will neither send nor receive: like Linux, answer
            // with RST and forget the connection.
            self.abort(i, End::PeerShutdown);
            return;
        }
        if c.has_data(mode) {
            return;
        }
        if !c.outbound {
            if c.peer_shut & SHUTDOWN_SEND != 0 {
                c.want_shutdown = true;
                c.st = St::Closing;
                c.deadline = now_ms + HANDSHAKE_MS;
            }
            return;
        }
        // Guest-initiated and every byte sent: with `linger`, wait until the
        // peer forwarded them all (its fwd_cnt), asking now and then.
        if !linger || c.peer_fwd_cnt == c.tx_cnt || now_ms >= c.deadline {
            c.want_shutdown = true;
            c.st = St::Closing;
            c.deadline = now_ms + HANDSHAKE_MS;
        } else if now_ms >= c.next_ask {
            c.want_credit_request = true;
            c.next_ask = now_ms + LINGER_ASK_MS;
        }
    }

    /// Timeouts and lingering; call often.
    pub fn tick(&mut self, now_ms: u64) {
        for i in 0..MAX_CONNS {
            let c = &self.conns[i];
            match c.st {
                St::Connecting | St::Closing if now_ms >= c.deadline => self.abort(i, End::Timeout),
                St::Open => self.maybe_finish(i, now_ms),
                _ => {}
            }
        }
    }

    fn hdr(&self, i: usize, op: u16, flags: u32, len: u32) -> Hdr {
        let c = &self.conns[i];
        Hdr {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: c.buf_alloc,
            fwd_cnt: c.fwd_cnt,
        }
    }

    /// The next packet to transmit, its payload written to `out` (the
    /// transmit buffer). Returns the header (`len` = payload bytes).
    pub fn next_tx(&mut self, out: &mut [u8], now_ms: u64) -> Option<Hdr> {
        if self.rst_owed_len > 0 {
            self.rst_owed_len -= 1;
            let (l, p) = self.rst_owed[self.rst_owed_len];
            return Some(Hdr {
                src_cid: self.cid,
                dst_cid: HOST_CID,
                src_port: l,
                dst_port: p,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Hdr::default()
            });
        }
        // Round robin over the slots so one busy connection cannot starve
        // the others' control packets.
        for k in 0..MAX_CONNS {
            let i = (self.cursor + k) % MAX_CONNS;
            if let Some(h) = self.next_tx_of(i, out, now_ms) {
                self.cursor = (i + 1) % MAX_CONNS;
                if h.op != OP_RST {
                    self.conns[i].fwd_sent = h.fwd_cnt;
                }
                return Some(h);
            }
        }
        None
    }

    fn next_tx_of(&mut self, i: usize, out: &mut [u8], now_ms: u64) -> Option<Hdr> {
        let mode = self.mode;
        let c = &mut self.conns[i];
        if c.st == St::Free {
            return None;
        }
        if c.want_request {
            c.want_request = false;
            return Some(self.hdr(i, OP_REQUEST, 0, 0));
        }
        if c.want_response {
            c.want_response = false;
            return Some(self.hdr(i, OP_RESPONSE, 0, 0));
        }
        if c.st == St::Connecting {
            return None;
        }
        if c.want_shutdown {
            c.want_shutdown = false;
            return Some(self.hdr(i, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0));
        }
        if c.st == St::Open && c.has_data(mode) {
            let credit = c.peer_credit();
            let avail = match mode {
                Mode::Echo => c.echo_len,
                _ => usize::try_from(c.tx_left).unwrap_or(usize::MAX),
            };
            // At most `credit`, a u32: clamping the rest to u32 first changes nothing.
            let n32 = credit.min(u32::try_from(avail.min(out.len())).unwrap_or(u32::MAX));
            let n = n32 as usize;
            if n > 0 {
                match mode {
                    Mode::Echo => {
                        for (k, b) in out[..n].iter_mut().enumerate() {
                            *b = self.echo[i][(c.echo_head + k) % ECHO_CAP];
                        }
                        c.echo_head = (c.echo_head + n) % ECHO_CAP;
                        c.echo_len -= n;
                        c.fwd_cnt = c.fwd_cnt.wrapping_add(n32);
                    }
                    _ => {
                        fill_pattern(c.tx_bytes, &mut out[..n]);
                        c.tx_left -= u64::from(n32);
                        if c.tx_left == 0 {
                            c.deadline = now_ms + LINGER_MS;
                            c.next_ask = now_ms;
                        }
                    }
                }
                c.tx_cnt = c.tx_cnt.wrapping_add(n32);
                c.tx_bytes += u64::from(n32);
                c.tx_sum = fnv1a(c.tx_sum, &out[..n]);
                c.want_update = false;
                return Some(self.hdr(i, OP_RW, 0, n32));
            }
            if credit == 0 && !c.asked && now_ms >= c.next_ask {
                c.want_credit_request = true;
                c.next_ask = now_ms + LINGER_ASK_MS;
            }
        }
        if c.want_update {
            c.want_update = false;
            return Some(self.hdr(i, OP_CREDIT_UPDATE, 0, 0));
        }
        if c.want_credit_request {
            c.want_credit_request = false;
            c.asked = true;
            return Some(self.hdr(i, OP_CREDIT_REQUEST, 0, 0));
        }
        None
    }
}
