//! One vsock stream connection between a guest port and a host Unix socket, as a state machine
//! with credit-based flow control (virtio 1.2 §5.10.6.3). No virtqueue in here: the device
//! feeds it the guest's packets ([`Connection::on_guest_packet`]) and asks it for the next
//! packet for the guest ([`Connection::next_rx`]), so it is unit-testable with any stream.
//!
//! Bounds: guest → host bytes wait in `tx_buf`, at most [`CONN_BUF_SIZE`] bytes, which is the
//! `buf_alloc` cinder advertises; a guest that sends beyond the credit it was given (a credit
//! lie) gets its connection reset. Host → guest bytes are read from the socket only when the
//! guest has credit and a receive buffer is at hand, straight into that buffer's size.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::time::{Duration, Instant};

use super::packet::{
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// Per-connection buffer for guest → host bytes, and the `buf_alloc` cinder advertises.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Send a CREDIT_UPDATE unprompted once the guest's view of our free space is this stale.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// How long a closing connection may take: after cinder sent SHUTDOWN the guest has this long
/// to answer RST; after the guest sent SHUTDOWN, the host socket has this long without taking
/// a byte to take the rest of the guest's data. Then the connection is reset.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or pending) to the guest, waiting for RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
    /// Done: the device sends a pending RST if any, then drops the connection.
    Closed,
}

/// Header fields of a packet from the guest that the state machine needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestHeader {
    /// Operation.
    pub op: u16,
    /// Flags (SHUTDOWN bits).
    pub flags: u32,
    /// The guest's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the guest consumed so far.
    pub fwd_cnt: u32,
}

/// A packet for the guest: header fields; `len` data bytes were put in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPacket {
    /// Operation.
    pub op: u16,
    /// Flags.
    pub flags: u32,
    /// Data length.
    pub len: u32,
    /// Our buffer size.
    pub buf_alloc: u32,
    /// Bytes we forwarded to the host so far.
    pub fwd_cnt: u32,
}

/// Why a connection went down.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnError {
    /// The guest sent more than the credit it was given.
    #[error("guest sent {len} bytes with only {free} bytes of credit")]
    CreditExceeded {
        /// Packet length.
        len: usize,
        /// Free space it was entitled to.
        free: u32,
    },
    /// An operation that makes no sense in the current state.
    #[error("unexpected op {op} in state {state:?}")]
    UnexpectedOp {
        /// The op.
        op: u16,
        /// The state.
        state: State,
    },
    /// The host socket failed.
    #[error("host socket error: {0}")]
    Host(io::ErrorKind),
}

/// Control packets waiting for a guest receive buffer.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    request: bool,
    response: bool,
    rst: bool,
    credit_update: bool,
    credit_request: bool,
    shutdown: bool,
}

/// A stream connection. `S` is the host side (a non-blocking `UnixStream` in the device).
#[derive(Debug)]
pub struct Connection<S> {
    /// The host end.
    pub stream: S,
    /// Host-side port (the guest's dst_port).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    state: State,
    pending: Pending,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    /// Guest bytes written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    tx_buf: VecDeque<u8>,
    /// A readiness event said the host socket has data (cleared when a read would block).
    host_readable: bool,
    host_eof: bool,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// Host-initiated connections still owe the host client `OK <port>\n`.
    owe_ok: bool,
    /// When the connection is reset unless it moved on: the guest's RESPONSE (host-initiated,
    /// set by the owner with [`Connection::set_deadline`]) or the end of a shutdown.
    deadline: Option<Instant>,
    /// How long a shutdown may take ([`SHUTDOWN_TIMEOUT`]).
    shutdown_timeout: Duration,
}

impl<S: Read + Write> Connection<S> {
    /// A connection the guest asked for (its REQUEST was accepted): RESPONSE is pending.
    pub fn from_guest(stream: S, local_port: u32, peer_port: u32, hdr: &GuestHeader) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::Established);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.pending.response = true;
        c
    }

    /// A connection the host asked for (`CONNECT <peer_port>`): REQUEST is pending.
    pub fn from_host(stream: S, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, State::LocalInit);
        c.pending.request = true;
        c.owe_ok = true;
        c
    }

    fn new(stream: S, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            state,
            pending: Pending::default(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            tx_buf: VecDeque::new(),
            host_readable: false,
            host_eof: false,
            peer_shutdown: 0,
            owe_ok: false,
            deadline: None,
            shutdown_timeout: SHUTDOWN_TIMEOUT,
        }
    }

    /// Reset the connection at `at` unless it moves on before: for a host-initiated one, until
    /// the guest's RESPONSE.
    pub fn set_deadline(&mut self, at: Instant) {
        self.deadline = Some(at);
    }

    /// How long a shutdown may take (default [`SHUTDOWN_TIMEOUT`]).
    pub fn set_shutdown_timeout(&mut self, d: Duration) {
        self.shutdown_timeout = d;
    }

    /// When the owner should reset it (None: no timer runs, or already closed).
    pub fn deadline(&self) -> Option<Instant> {
        if self.state == State::Closed {
            None
        } else {
            self.deadline
        }
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes the guest may still send us (our free buffer space).
    pub fn our_free(&self) -> u32 {
        CONN_BUF_SIZE.saturating_sub(u32::try_from(self.tx_buf.len()).unwrap_or(u32::MAX))
    }

    /// Bytes we may still send the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes waiting to go to the host socket.
    pub fn tx_pending(&self) -> usize {
        self.tx_buf.len()
    }

    /// Reset the connection: an RST goes to the guest, then it is dropped.
    pub fn kill(&mut self) {
        self.state = State::Closed;
        self.pending = Pending {
            rst: true,
            ..Pending::default()
        };
        // Nothing more goes to the host: free the buffer now.
        self.tx_buf = VecDeque::new();
        self.deadline = None;
    }

    /// Closed with nothing left to send: the device drops it.
    pub fn is_done(&self) -> bool {
        self.state == State::Closed && !self.pending.rst
    }

    /// The host socket became readable.
    pub fn set_host_readable(&mut self) {
        self.host_readable = true;
    }

    /// Watch the host socket for input: we can pass data on, and do not already know there
    /// is some.
    pub fn wants_host_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.host_readable
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Watch the host socket for writability: guest bytes are waiting.
    pub fn wants_host_write(&self) -> bool {
        self.state != State::Closed && !self.tx_buf.is_empty()
    }

    /// Something for the guest (needs a receive buffer).
    pub fn has_rx(&self) -> bool {
        let p = self.pending;
        p.rst
            || p.request
            || p.response
            || p.credit_update
            || p.credit_request
            || p.shutdown
            || (self.state == State::Established
                && self.host_readable
                && !self.host_eof
                && self.peer_credit() > 0
                && self.peer_shutdown & SHUTDOWN_RCV == 0)
    }

    /// A packet from the guest for this connection. `data` is the payload of an RW packet.
    pub fn on_guest_packet(&mut self, hdr: &GuestHeader, data: &[u8]) -> Result<(), ConnError> {
        if self.state == State::Closed {
            return Ok(());
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        let res = match (hdr.op, self.state) {
            (OP_RST, _) => {
                self.state = State::Closed;
                self.pending = Pending::default();
                return Ok(());
            }
            (OP_RESPONSE, State::LocalInit) => {
                self.state = State::Established;
                self.deadline = None;
                if self.owe_ok {
                    self.owe_ok = false;
                    let line = format!("OK {}\n", self.local_port);
                    // A fresh socket buffer has room for these few bytes; anything else means
                    // the client is gone.
                    match self.stream.write(line.as_bytes()) {
                        Ok(n) if n == line.len() => {}
                        Ok(_) => return self.fail(ConnError::Host(io::ErrorKind::WriteZero)),
                        Err(e) => return self.fail(ConnError::Host(e.kind())),
                    }
                }
                Ok(())
            }
            (OP_RW, State::Established) => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    Err(ConnError::UnexpectedOp {
                        op: hdr.op,
                        state: self.state,
                    })
                } else if data.len() > self.our_free() as usize {
                    Err(ConnError::CreditExceeded {
                        len: data.len(),
                        free: self.our_free(),
                    })
                } else {
                    self.tx_buf.extend(data);
                    self.flush_host().map(|_| ())
                }
            }
            (OP_CREDIT_UPDATE, State::Established) => Ok(()),
            (OP_CREDIT_REQUEST, State::Established) => {
                self.pending.credit_update = true;
                Ok(())
            }
            (OP_SHUTDOWN, State::Established) => {
                let was = self.peer_shutdown;
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    if was != self.peer_shutdown {
                        self.deadline = Some(Instant::now() + self.shutdown_timeout);
                    }
                    // The guest is done: pass on everything it sent, then reset. What the host
                    // socket cannot take now is written as it drains (`flush_host` sends the
                    // RST once the buffer is empty), so nothing the guest sent is lost.
                    self.flush_host().map(|_| ())
                } else {
                    Ok(())
                }
            }
            (op, state) => Err(ConnError::UnexpectedOp { op, state }),
        };
        if let Err(e) = res {
            return self.fail(e);
        }
        Ok(())
    }

    fn fail(&mut self, e: ConnError) -> Result<(), ConnError> {
        self.kill();
        Err(e)
    }

    /// Write buffered guest bytes to the host socket until it would block. Returns the bytes
    /// written. Queues a CREDIT_UPDATE when the guest's view of our space is stale.
    pub fn flush_host(&mut self) -> Result<usize, ConnError> {
        let mut total = 0;
        while !self.tx_buf.is_empty() {
            let (a, _) = self.tx_buf.as_slices();
            match self.stream.write(a) {
                Ok(0) => {
                    return self
                        .fail(ConnError::Host(io::ErrorKind::WriteZero))
                        .map(|_| 0)
                }
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    total += n;
                    self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(ConnError::Host(e.kind())).map(|_| 0),
            }
        }
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            if self.tx_buf.is_empty() && self.state != State::Closed {
                self.kill();
            } else if total > 0 && self.state != State::Closed {
                // The host still takes the guest's last bytes: its time starts again.
                self.deadline = Some(Instant::now() + self.shutdown_timeout);
            }
            return Ok(total);
        }
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending.credit_update = true;
        }
        Ok(total)
    }

    fn header(&mut self, op: u16, flags: u32, len: u32) -> RxPacket {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        RxPacket {
            op,
            flags,
            len,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, data going into `buf` (the receive buffer's size). None
    /// when there is nothing to send.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<RxPacket> {
        let p = &mut self.pending;
        if p.rst {
            *p = Pending::default();
            self.state = State::Closed;
            return Some(self.header(OP_RST, 0, 0));
        }
        if p.request {
            p.request = false;
            return Some(self.header(OP_REQUEST, 0, 0));
        }
        if p.response {
            p.response = false;
            return Some(self.header(OP_RESPONSE, 0, 0));
        }
        if p.shutdown {
            p.shutdown = false;
            return Some(self.header(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0));
        }
        if self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
        {
            let credit = self.peer_credit() as usize;
            let n = credit.min(buf.len());
            if n > 0 {
                match self.stream.read(&mut buf[..n]) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.host_readable = false;
                        // The guest answers RST; if it does not in time, cinder resets.
                        if self.deadline.is_none() {
                            self.deadline = Some(Instant::now() + self.shutdown_timeout);
                        }
                        return Some(self.header(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0));
                    }
                    Ok(got) => {
                        let len = u32::try_from(got).unwrap_or(0);
                        self.rx_cnt += Wrapping(len);
                        self.pending.credit_update = false;
                        return Some(self.header(OP_RW, 0, len));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.kill();
                        return self.next_rx(buf);
                    }
                }
            } else if credit == 0 && !self.pending.credit_request {
                self.pending.credit_request = true;
            }
        }
        let p = &mut self.pending;
        if p.credit_update {
            p.credit_update = false;
            return Some(self.header(OP_CREDIT_UPDATE, 0, 0));
        }
        if p.credit_request {
            p.credit_request = false;
            return Some(self.header(OP_CREDIT_REQUEST, 0, 0));
        }
        None
    }
}

#[cfg(test)]
mod tests;
