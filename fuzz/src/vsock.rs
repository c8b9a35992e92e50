//! virtio-vsock: guest packets of any shape (TX) and the connection state machine on both
//! sides: guest connections to a host listener (`<uds>_1024`), host clients' `CONNECT` lines,
//! data both ways, shutdowns, resets, credit; through the transport and the event loop.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use devices::virtio::vsock::{Vsock, VsockConfig};

use crate::host::TempDir;
use crate::input::Input;
use crate::virtio::{self, Host, Program, BUFFERS, F_NEXT, F_WRITE};

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// The host port the harness listens on for guest connections.
pub const HOST_PORT: u32 = 1024;
/// Most host-side streams the harness keeps (below any listen backlog, so its blocking
/// `connect` never waits).
const MAX_STREAMS: usize = 16;
/// Backlog of the host port's listener.
const BACKLOG: i32 = 4;

struct Peer {
    uds: PathBuf,
    listener: UnixListener,
    streams: Vec<UnixStream>,
    buf: Vec<u8>,
}

impl Peer {
    fn push(&mut self, s: UnixStream) {
        if s.set_nonblocking(true).is_ok() && self.streams.len() < MAX_STREAMS {
            self.streams.push(s);
        }
    }

    fn pick(&mut self, input: &mut Input<'_>) -> Option<usize> {
        let i = usize::from(input.u8());
        (!self.streams.is_empty()).then(|| i % self.streams.len())
    }
}

impl Host for Peer {
    /// `0, raw u8, port u32 | blob`: a host client connects and sends a `CONNECT` line (or
    /// any line); `1`: accept a guest connection; `2, i, blob`: write to stream i; `3, i`:
    /// read stream i; `4, i`: close stream i; `5, i`: shut stream i's write side.
    fn op(&mut self, input: &mut Input<'_>) {
        match input.u8() % 6 {
            0 => {
                let raw = input.u8() & 1 != 0;
                let line = if raw {
                    input.blob(64).to_vec()
                } else {
                    format!("CONNECT {}\n", input.u32()).into_bytes()
                };
                if self.streams.len() < MAX_STREAMS {
                    if let Ok(mut s) = UnixStream::connect(&self.uds) {
                        let _ = s.write_all(&line);
                        self.push(s);
                    }
                }
            }
            1 => {
                let _ = self.listener.set_nonblocking(true);
                if let Ok((s, _)) = self.listener.accept() {
                    self.push(s);
                }
            }
            2 => {
                let i = self.pick(input);
                let data = input.blob(0x1_0000);
                if let Some(i) = i {
                    let _ = self.streams[i].write(data);
                }
            }
            3 => {
                if let Some(i) = self.pick(input) {
                    let _ = self.streams[i].read(&mut self.buf);
                }
            }
            4 => {
                if let Some(i) = self.pick(input) {
                    self.streams.swap_remove(i);
                }
            }
            _ => {
                if let Some(i) = self.pick(input) {
                    let _ = self.streams[i].shutdown(std::net::Shutdown::Write);
                }
            }
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let dir = TempDir::new("vsock");
    let uds = dir.0.join("v.sock");
    let listener = UnixListener::bind(dir.0.join(format!("v.sock_{HOST_PORT}")))
        .expect("cannot bind the host port's listener");
    // A host program that accepts slowly, with a small backlog (socat listens with 5): a
    // guest that connects more often than that must not stall the device loop.
    // SAFETY: listen(2) on a socket this function owns; a second listen only resizes the
    // backlog.
    let r = unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) };
    assert_eq!(r, 0, "listen: {}", std::io::Error::last_os_error());
    let config = VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: uds.clone(),
    };
    let dev = Vsock::new(&config).expect("cannot build the vsock device");
    let peer = Peer {
        uds,
        listener,
        streams: Vec::new(),
        buf: vec![0; 0x1_0000],
    };
    virtio::run(dev, peer, data);
    drop(dir);
}

/// Packet operations (virtio 1.2 §5.10.6).
pub mod vop {
    /// Connect.
    pub const REQUEST: u16 = 1;
    /// Accept.
    pub const RESPONSE: u16 = 2;
    /// Reset.
    pub const RST: u16 = 3;
    /// Shut down.
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// Credit update.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Credit request.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// A 44-byte packet header.
pub fn header(src_port: u32, dst_port: u32, len: u32, op: u16, flags: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(&GUEST_CID.to_le_bytes());
    h.extend_from_slice(&2u64.to_le_bytes());
    h.extend_from_slice(&src_port.to_le_bytes());
    h.extend_from_slice(&dst_port.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // STREAM
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&65536u32.to_le_bytes()); // buf_alloc
    h.extend_from_slice(&0u32.to_le_bytes()); // fwd_cnt
    h
}

/// Puts a TX packet (header at `at`, data right after in a second descriptor) at head `i`.
fn tx(p: &mut Program, i: u16, at: u64, hdr: &[u8], data: &[u8]) {
    let mut bytes = hdr.to_vec();
    bytes.extend_from_slice(data);
    p.mem(at as u32, &bytes);
    if data.is_empty() {
        p.desc(1, 2 * i, at, 44, 0, 0);
    } else {
        p.desc(1, 2 * i, at, 44, F_NEXT, 2 * i + 1).desc(
            1,
            2 * i + 1,
            at + 44,
            data.len() as u32,
            0,
            0,
        );
    }
}

fn rx_buffers(p: &mut Program, n: u16) {
    for i in 0..n {
        p.desc(0, i, 0x2_0000 + 0x1000 * u64::from(i), 0x1000, F_WRITE, 0)
            .avail(0, i);
    }
}

/// Seeds: a guest connection to the host port with data both ways and a shutdown; a host
/// client's CONNECT answered by the guest; hostile packets (unknown op, bad CID, RST for
/// nothing, oversized length).
pub fn seeds() -> Vec<Vec<u8>> {
    let mut guest = Program::new();
    guest.setup(u64::MAX, 3, 4);
    rx_buffers(&mut guest, 8);
    guest.kick(0);
    tx(
        &mut guest,
        0,
        BUFFERS,
        &header(5000, HOST_PORT, 0, vop::REQUEST, 0),
        &[],
    );
    guest.avail(1, 0).kick(1).host();
    guest.raw().u8(1);
    tx(
        &mut guest,
        1,
        BUFFERS + 0x100,
        &header(5000, HOST_PORT, 5, vop::RW, 0),
        b"hello",
    );
    guest.avail(1, 2).kick(1).host();
    guest.raw().u8(3).u8(0);
    guest.host();
    guest.raw().u8(2).u8(0).blob(b"from the host");
    guest.kick(0);
    tx(
        &mut guest,
        3,
        BUFFERS + 0x200,
        &header(5000, HOST_PORT, 0, vop::CREDIT_REQUEST, 0),
        &[],
    );
    tx(
        &mut guest,
        4,
        BUFFERS + 0x300,
        &header(5000, HOST_PORT, 0, vop::SHUTDOWN, 3),
        &[],
    );
    guest.avail(1, 6).avail(1, 8).kick(1).host();
    guest.raw().u8(4).u8(0);
    guest.run();

    let mut host = Program::new();
    host.setup(u64::MAX, 3, 4);
    rx_buffers(&mut host, 8);
    host.kick(0).host();
    host.raw().u8(0).u8(0).u32(52);
    host.run();
    // The guest accepts: the host side picked local port 1 << 30 or so; the harness guesses
    // and lets mutations find the rest.
    tx(
        &mut host,
        0,
        BUFFERS,
        &header(52, 0x4000_0000, 0, vop::RESPONSE, 0),
        &[],
    );
    host.avail(1, 0).kick(1).host();
    host.raw().u8(2).u8(0).blob(b"data from a host client");
    host.kick(0);

    let mut hostile = Program::new();
    hostile.setup(u64::MAX, 3, 4);
    rx_buffers(&mut hostile, 4);
    tx(&mut hostile, 0, BUFFERS, &header(1, 2, 0, 99, 0), &[]);
    tx(
        &mut hostile,
        1,
        BUFFERS + 0x100,
        &header(7, 8, 0, vop::RST, 0),
        &[],
    );
    tx(
        &mut hostile,
        2,
        BUFFERS + 0x200,
        &header(9, HOST_PORT, 0x10_0000, vop::RW, 0),
        b"x",
    );
    tx(
        &mut hostile,
        3,
        BUFFERS + 0x300,
        &header(9, 4242, 0, vop::REQUEST, 0),
        &[],
    );
    tx(
        &mut hostile,
        4,
        BUFFERS + 0x400,
        &header(9, HOST_PORT, 0, vop::CREDIT_UPDATE, 0),
        &[],
    );
    hostile
        .avail(1, 0)
        .avail(1, 1)
        .avail(1, 4)
        .avail(1, 6)
        .avail(1, 8)
        .kick(1)
        .kick(0)
        .kick(2);
    vec![guest.build(), host.build(), hostile.build()]
}

/// The guest connects 12 times to a host port whose program never accepts (backlog 4): the
/// device must refuse (RST) what does not fit instead of blocking the device loop in
/// connect(2). Before vsock's non-blocking connect this input hung the harness. (In the
/// corpus as `crash-connect-backlog`, not a generated seed.)
pub fn full_backlog() -> Vec<u8> {
    let mut p = Program::new();
    p.setup(u64::MAX, 3, 5);
    rx_buffers(&mut p, 16);
    p.kick(0);
    for i in 0..12u16 {
        let at = BUFFERS + 0x40 * u64::from(i);
        tx(
            &mut p,
            i,
            at,
            &header(6000 + u32::from(i), HOST_PORT, 0, vop::REQUEST, 0),
            &[],
        );
        p.avail(1, 2 * i);
    }
    p.kick(1).kick(0);
    p.build()
}

fn payload(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    let ports = [5000u32, 5001, HOST_PORT, 4242, 52, 0x4000_0000, 0x4000_0001];
    let src = ports[rng.below(ports.len())];
    let dst = ports[rng.below(ports.len())];
    let op = if rng.below(10) == 0 {
        rng.next_u64() as u16
    } else {
        1 + rng.below(7) as u16
    };
    let len = [0u32, 1, 5, 4096, 0x1_0000, 0x1_0001, u32::MAX][rng.below(7)];
    let mut h = header(src, dst, len, op, rng.below(4) as u32);
    if rng.below(8) == 0 {
        h[0..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    if rng.below(8) == 0 {
        h[28..30].copy_from_slice(&2u16.to_le_bytes()); // SEQPACKET
    }
    h[36..40].copy_from_slice(&[0u32, 4096, 65_536][rng.below(3)].to_le_bytes());
    h.extend((0..rng.below(32)).map(|i| i as u8));
    h
}

fn host(rng: &mut crate::mutate::Rng, b: &mut crate::input::Builder) {
    match rng.below(6) {
        0 => {
            if rng.below(4) == 0 {
                b.u8(0).u8(1).blob(b"CONNECT 99999999999\n");
            } else {
                b.u8(0).u8(0).u32([52u32, 5000, 0, u32::MAX][rng.below(4)]);
            }
        }
        1 => {
            b.u8(1);
        }
        2 => {
            let data: Vec<u8> = (0..[1usize, 100, 70_000][rng.below(3)])
                .map(|i| i as u8)
                .collect();
            b.u8(2).u8(rng.below(4) as u8).blob(&data);
        }
        k => {
            b.u8(k as u8).u8(rng.below(4) as u8);
        }
    }
}

/// A random plausible input.
pub fn generate(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    virtio::generate(rng, 3, payload, host)
}
