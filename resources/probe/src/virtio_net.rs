//! virtio-net driver (device id 1) and the `net` check, polled at CPL3.
//!
//! The probe is a tiny IPv4 host on the first virtio-net device: it answers
//! ARP and ICMP echo requests for `probe.net_ip`, runs a UDP service on
//! `probe.udp_port` (echo, and bulk transfers both ways with a go-back-N
//! window so loss is repaired by retransmission), and stops when the peer
//! sends STOP. The protocol is described in README.md ("net protocol").
//!
//! Queues of up to 64 entries live in static memory; each RX descriptor owns
//! a 2 KiB buffer (a whole 1514-byte frame plus the 12-byte header: neither
//! GUEST_TSO nor big packets are negotiated), each TX descriptor likewise.
//! Interrupts are suppressed (VRING_AVAIL_F_NO_INTERRUPT); both used rings
//! are polled.

use crate::bootinfo;
use crate::checks::Status;
use crate::cmdline;
use crate::cpu::{peek, poke};
use crate::paging;
use crate::serial::Line;
use crate::sync::Global;
use crate::time;
use crate::virtio::{self, reg, status, Transport};
use core::fmt::Write;
use core::sync::atomic::{fence, Ordering};

pub type Details = Line<4096>;

pub const DEVICE_ID: u32 = 1;
const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;

const QMAX: usize = 64;
const BUF: usize = 2048;
const HDR: usize = 12;
const DESC_WRITE: u16 = 2;
const USED_NO_NOTIFY: u16 = 1;

/// Default `probe.udp_port`.
pub const DEFAULT_PORT: u16 = 7777;
/// Default `probe.net_ms`.
pub const DEFAULT_MS: u64 = 600_000;
/// Bytes of bulk data per datagram (a multiple of 8).
pub const CHUNK: usize = 1400;
/// Bulk datagrams in flight (probe -> host).
const TX_WINDOW: u32 = 32;
/// Go-back-N retransmission timeout (probe -> host).
const RTO_US: u64 = 100_000;

// Datagram types (first byte of the UDP payload).
const M_ECHO: u8 = b'E';
const M_ECHO_REPLY: u8 = b'e';
const M_DATA: u8 = b'D';
const M_DATA_ACK: u8 = b'A';
const M_QUERY: u8 = b'Q';
const M_QUERY_REPLY: u8 = b'q';
const M_GET: u8 = b'G';
const M_TDATA: u8 = b'T';
const M_TDATA_ACK: u8 = b'K';
const M_STOP: u8 = b'X';
// `netbench` (see `net_bench`): ignored by `net`.
pub const M_BENCH_G2H: u8 = b'B';
pub const M_BENCH_G2H_DONE: u8 = b'b';
pub const M_BENCH_HOST_RX: u8 = b'R';
pub const M_BENCH_HOST_RX_ACK: u8 = b'r';
pub const M_BENCH_H2G: u8 = b'S';
pub const M_BENCH_H2G_ACK: u8 = b's';
pub const M_BENCH_PKT: u8 = b'P';
pub const M_BENCH_G2H_PKT: u8 = b'p';
pub const M_BENCH_FIN: u8 = b'F';
pub const M_BENCH_FIN_REPLY: u8 = b'f';

#[repr(C, align(4096))]
struct Rings([u8; 6 * 4096]);
#[repr(C, align(4096))]
struct Bufs([[u8; BUF]; 2 * QMAX]);

static RINGS: Global<Rings> = Global::new(Rings([0; 6 * 4096]));
static BUFS: Global<Bufs> = Global::new(Bufs([[0; BUF]; 2 * QMAX]));

fn buf_addr(i: usize) -> u64 {
    BUFS.get().0[i].as_ptr() as u64
}

/// Buffer `i` (0..QMAX: RX, QMAX..: TX). Callers never hold two references
/// to the same buffer.
fn buf(i: usize) -> &'static mut [u8; BUF] {
    let p = BUFS.get_mut() as *mut Bufs;
    // SAFETY: `p` points to the static buffers; indexing is bounds-checked;
    // the probe is single-threaded here and buffers are disjoint.
    unsafe { &mut *core::ptr::addr_of_mut!((*p).0[i]) }
}

/// FNV-1a over 64-bit little-endian words: the bulk transfer checksum.
pub fn hash_words(mut h: u64, data: &[u8]) -> u64 {
    for w in data.chunks_exact(8) {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub const HASH_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Word `k` of probe->host chunk `seq`: splitmix64's finalizer of
/// `seq * 175 + k + 0x7e57` (wrapping).
pub fn tx_word(seq: u32, k: u64) -> u64 {
    let mut x = (seq as u64)
        .wrapping_mul((CHUNK / 8) as u64)
        .wrapping_add(k)
        .wrapping_add(0x7e57);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Queue {
    t: Transport,
    idx: u32,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
}

impl Queue {
    fn setup(t: Transport, idx: u32) -> Result<Queue, &'static str> {
        let base = RINGS.get() as *const Rings as u64 + idx as u64 * 3 * 4096;
        let size = virtio::setup_ring_queue(t, idx, base, QMAX, 1)?;
        Ok(Queue {
            t,
            idx,
            size,
            desc: base,
            avail: base + 4096,
            used: base + 8192,
            avail_idx: 0,
            last_used: 0,
        })
    }

    fn set_desc(&self, i: usize, addr: u64, len: u32, flags: u16) {
        let d = self.desc + 16 * i as u64;
        poke(d, addr);
        poke(d + 8, len);
        poke(d + 12, flags);
        poke(d + 14, 0u16);
    }

    /// Offers descriptor `i` (not yet visible: see `publish`).
    fn push(&mut self, i: usize) {
        let slot = self.avail_idx % self.size;
        poke::<u16>(self.avail + 4 + 2 * slot as u64, i as u16);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn publish(&self) {
        fence(Ordering::SeqCst);
        poke::<u16>(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    fn notify(&self) {
        if peek::<u16>(self.used) & USED_NO_NOTIFY == 0 {
            self.t.write(reg::QUEUE_NOTIFY, self.idx);
        }
    }

    fn pop_used(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = peek(self.used + 2);
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        self.last_used = self.last_used.wrapping_add(1);
        Some((peek(e), peek(e + 4)))
    }
}

pub struct Config {
    ip: [u8; 4],
    peer: [u8; 4],
    port: u16,
    pub ms: u64,
}

fn parse_ip(s: &[u8]) -> Option<[u8; 4]> {
    let mut ip = [0u8; 4];
    let mut n = 0;
    for part in s.split(|&b| b == b'.') {
        if n == 4 || part.is_empty() || part.len() > 3 {
            return None;
        }
        let v = cmdline::parse_u64(part)?;
        if v > 255 {
            return None;
        }
        ip[n] = v as u8;
        n += 1;
    }
    (n == 4).then_some(ip)
}

fn config() -> Result<Config, &'static str> {
    let cmd = bootinfo::get().cmdline();
    let ip = match cmdline::get(cmd, b"probe.net_ip") {
        Some(v) => parse_ip(v).ok_or("bad probe.net_ip")?,
        None => [10, 0, 2, 15],
    };
    let peer = match cmdline::get(cmd, b"probe.net_peer") {
        Some(v) => parse_ip(v).ok_or("bad probe.net_peer")?,
        None => [10, 0, 2, 2],
    };
    let port = match cmdline::get(cmd, b"probe.udp_port") {
        Some(v) => match cmdline::parse_u64(v) {
            Some(p) if (1..=65535).contains(&p) => p as u16,
            _ => return Err("bad probe.udp_port"),
        },
        None => DEFAULT_PORT,
    };
    let ms = match cmdline::get(cmd, b"probe.net_ms") {
        Some(v) => match cmdline::parse_u64(v) {
            Some(m) if (1..=3_600_000).contains(&m) => m,
            _ => return Err("bad probe.net_ms"),
        },
        None => DEFAULT_MS,
    };
    if ip[..3] != peer[..3] {
        return Err("probe.net_ip and probe.net_peer are not in the same /24");
    }
    Ok(Config { ip, peer, port, ms })
}

/// What `netbench` messages asked for or carried (the `net` check only
/// ignores them).
#[derive(Default)]
pub struct Bench {
    /// Serve `netbench` messages (else they count as ignored).
    pub on: bool,
    /// A guest->host blast was asked for: (frame length, ms).
    pub g2h_req: Option<(u16, u32)>,
    /// The host's count of blast datagrams it received.
    pub host_rx: Option<u64>,
    /// Frame length of the host->guest phase being counted (0: none).
    pub h2g_len: u16,
    pub h2g_frames: u64,
    pub h2g_bytes: u64,
    pub h2g_first: u64,
    pub h2g_last: u64,
    /// FIN received for this frame length: the counters above are final.
    pub h2g_done: Option<u16>,
}

#[derive(Default)]
struct Counters {
    frames_in: u64,
    frames_out: u64,
    arp: u64,
    icmp: u64,
    echo: u64,
    ignored: u64,
    tx_full: u64,
    rx_extra_bufs: u64,
}

pub struct Net {
    rx: Queue,
    tx: Queue,
    free: [u16; QMAX],
    nfree: usize,
    pub t: Transport,
    pub mrg: bool,
    pub bench: Bench,
    kick: bool,
    mac: [u8; 6],
    ip: [u8; 4],
    peer_ip: [u8; 4],
    port: u16,
    peer_mac: Option<[u8; 6]>,
    peer_port: u16,
    c: Counters,
    // host -> probe stream
    rx_next: u32,
    rx_sum: u64,
    // probe -> host stream
    tx_count: u32,
    tx_base: u32,
    tx_next: u32,
    tx_hashed: u32,
    tx_sum: u64,
    tx_deadline: u64,
    tx_retx: u64,
    stop: bool,
}

fn csum_add(mut s: u32, data: &[u8]) -> u32 {
    let mut it = data.chunks_exact(2);
    for w in &mut it {
        s += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = it.remainder() {
        s += u32::from(*b) << 8;
    }
    s
}

fn csum_fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

impl Net {
    pub fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            if (id as usize) < QMAX && self.nfree < QMAX {
                self.free[self.nfree] = id as u16;
                self.nfree += 1;
            }
        }
    }

    /// Sends one frame built by `fill` (given the frame area after the
    /// virtio-net header, returns the frame length). False if the TX ring
    /// is full.
    pub fn send(&mut self, fill: impl FnOnce(&mut [u8]) -> usize) -> bool {
        if self.nfree == 0 {
            self.reclaim_tx();
            if self.nfree == 0 {
                self.c.tx_full += 1;
                return false;
            }
        }
        self.nfree -= 1;
        let i = self.free[self.nfree] as usize;
        let b = buf(QMAX + i);
        b[..HDR].fill(0);
        let len = fill(&mut b[HDR..]).max(60);
        self.tx
            .set_desc(i, buf_addr(QMAX + i), (HDR + len) as u32, 0);
        self.tx.push(i);
        self.tx.publish();
        self.kick = true;
        self.c.frames_out += 1;
        true
    }

    pub fn flush(&mut self) {
        if self.kick {
            self.tx.notify();
            self.kick = false;
        }
    }

    /// Ethernet + IPv4 + UDP headers to the peer; the payload is written by
    /// `payload` (returns its length).
    pub fn send_udp(&mut self, payload: impl FnOnce(&mut [u8]) -> usize) -> bool {
        let Some(dst) = self.peer_mac else {
            return false;
        };
        let (mac, ip, peer, sport, dport) =
            (self.mac, self.ip, self.peer_ip, self.port, self.peer_port);
        self.send(|f| {
            let n = payload(&mut f[42..BUF - HDR]);
            f[0..6].copy_from_slice(&dst);
            f[6..12].copy_from_slice(&mac);
            f[12..14].copy_from_slice(&[0x08, 0x00]);
            let ip_len = (20 + 8 + n) as u16;
            let iph = &mut f[14..34];
            iph.copy_from_slice(&[
                0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ]);
            iph[2..4].copy_from_slice(&ip_len.to_be_bytes());
            iph[12..16].copy_from_slice(&ip);
            iph[16..20].copy_from_slice(&peer);
            let c = csum_fold(csum_add(0, iph));
            iph[10..12].copy_from_slice(&c.to_be_bytes());
            let udp = &mut f[34..42];
            udp[0..2].copy_from_slice(&sport.to_be_bytes());
            udp[2..4].copy_from_slice(&dport.to_be_bytes());
            udp[4..6].copy_from_slice(&((8 + n) as u16).to_be_bytes());
            udp[6..8].copy_from_slice(&[0, 0]); // no UDP checksum (IPv4)
            14 + ip_len as usize
        })
    }

    fn handle_arp(&mut self, f: &[u8]) {
        // htype 1, ptype 0x0800, hlen 6, plen 4, op 1 (request) for our IP.
        if f.len() < 42 || f[14..22] != [0, 1, 8, 0, 6, 4, 0, 1] || f[38..42] != self.ip {
            self.c.ignored += 1;
            return;
        }
        let mut sha = [0u8; 6];
        sha.copy_from_slice(&f[22..28]);
        let mut spa = [0u8; 4];
        spa.copy_from_slice(&f[28..32]);
        if spa == self.peer_ip {
            self.peer_mac = Some(sha);
        }
        let (mac, ip) = (self.mac, self.ip);
        if self.send(|o| {
            o[0..6].copy_from_slice(&sha);
            o[6..12].copy_from_slice(&mac);
            o[12..14].copy_from_slice(&[0x08, 0x06]);
            o[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
            o[22..28].copy_from_slice(&mac);
            o[28..32].copy_from_slice(&ip);
            o[32..38].copy_from_slice(&sha);
            o[38..42].copy_from_slice(&spa);
            42
        }) {
            self.c.arp += 1;
        }
    }

    fn handle_ip(&mut self, f: &[u8]) {
        if f.len() < 34 || f[14] >> 4 != 4 {
            self.c.ignored += 1;
            return;
        }
        let ihl = (f[14] & 0xf) as usize * 4;
        let total = u16::from_be_bytes([f[16], f[17]]) as usize;
        let frag = u16::from_be_bytes([f[20], f[21]]) & 0x3fff;
        if ihl < 20 || total < ihl || 14 + total > f.len() || frag != 0 || f[30..34] != self.ip {
            self.c.ignored += 1;
            return;
        }
        if csum_fold(csum_add(0, &f[14..14 + ihl])) != 0 {
            self.c.ignored += 1;
            return;
        }
        let src = [f[26], f[27], f[28], f[29]];
        if src == self.peer_ip {
            let mut m = [0u8; 6];
            m.copy_from_slice(&f[6..12]);
            self.peer_mac = Some(m);
        }
        let l4 = &f[14 + ihl..14 + total];
        match f[23] {
            1 => self.handle_icmp(f, l4, src),
            17 if src == self.peer_ip => self.handle_udp(l4),
            _ => self.c.ignored += 1,
        }
    }

    fn handle_icmp(&mut self, f: &[u8], icmp: &[u8], src: [u8; 4]) {
        if icmp.len() < 8 || icmp[0] != 8 || csum_fold(csum_add(0, icmp)) != 0 {
            self.c.ignored += 1;
            return;
        }
        let (mac, ip) = (self.mac, self.ip);
        let n = icmp.len();
        if n + 42 > BUF - HDR {
            self.c.ignored += 1;
            return;
        }
        if self.send(|o| {
            o[0..6].copy_from_slice(&f[6..12]);
            o[6..12].copy_from_slice(&mac);
            o[12..14].copy_from_slice(&[0x08, 0x00]);
            let ip_len = (20 + n) as u16;
            o[14..34].copy_from_slice(&[
                0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ]);
            o[16..18].copy_from_slice(&ip_len.to_be_bytes());
            o[26..30].copy_from_slice(&ip);
            o[30..34].copy_from_slice(&src);
            let c = csum_fold(csum_add(0, &o[14..34]));
            o[24..26].copy_from_slice(&c.to_be_bytes());
            let r = &mut o[34..34 + n];
            r.copy_from_slice(icmp);
            r[0] = 0;
            r[2] = 0;
            r[3] = 0;
            let c = csum_fold(csum_add(0, r));
            r[2..4].copy_from_slice(&c.to_be_bytes());
            34 + n
        }) {
            self.c.icmp += 1;
        }
    }

    fn handle_udp(&mut self, u: &[u8]) {
        if u.len() < 9 {
            self.c.ignored += 1;
            return;
        }
        let sport = u16::from_be_bytes([u[0], u[1]]);
        let dport = u16::from_be_bytes([u[2], u[3]]);
        let ulen = u16::from_be_bytes([u[4], u[5]]) as usize;
        if dport != self.port || ulen < 9 || ulen > u.len() {
            self.c.ignored += 1;
            return;
        }
        self.peer_port = sport;
        let p = &u[8..ulen];
        match p[0] {
            M_ECHO => {
                if self.send_udp(|o| {
                    o[..p.len()].copy_from_slice(p);
                    o[0] = M_ECHO_REPLY;
                    p.len()
                }) {
                    self.c.echo += 1;
                }
            }
            M_DATA if p.len() == 6 + CHUNK => {
                let seq = u32::from_le_bytes([p[2], p[3], p[4], p[5]]);
                let in_order = seq == self.rx_next;
                if in_order {
                    self.rx_sum = hash_words(self.rx_sum, &p[6..]);
                    self.rx_next += 1;
                }
                if !in_order || p[1] & 1 != 0 || self.rx_next & 15 == 0 {
                    let next = self.rx_next;
                    self.send_udp(|o| {
                        o[0] = M_DATA_ACK;
                        o[1..5].copy_from_slice(&next.to_le_bytes());
                        5
                    });
                }
            }
            M_QUERY => {
                let (a, b, c, d) = (self.rx_next, self.rx_sum, self.tx_base, self.tx_sum);
                self.send_udp(|o| {
                    o[0] = M_QUERY_REPLY;
                    o[1..5].copy_from_slice(&a.to_le_bytes());
                    o[5..13].copy_from_slice(&b.to_le_bytes());
                    o[13..17].copy_from_slice(&c.to_le_bytes());
                    o[17..25].copy_from_slice(&d.to_le_bytes());
                    25
                });
            }
            M_GET if p.len() >= 5 => {
                let count = u32::from_le_bytes([p[1], p[2], p[3], p[4]]);
                // A repeated GET for the same count does not restart.
                if count != self.tx_count {
                    self.tx_count = count;
                    self.tx_base = 0;
                    self.tx_next = 0;
                    self.tx_hashed = 0;
                    self.tx_sum = HASH_INIT;
                }
                self.tx_deadline = time::deadline(RTO_US);
            }
            M_TDATA_ACK if p.len() >= 5 => {
                let next = u32::from_le_bytes([p[1], p[2], p[3], p[4]]);
                if next > self.tx_base && next <= self.tx_next.max(self.tx_hashed) {
                    self.tx_base = next;
                    self.tx_deadline = time::deadline(RTO_US);
                }
            }
            M_STOP => self.stop = true,
            _ if self.bench.on => self.handle_bench(p, ulen),
            _ => self.c.ignored += 1,
        }
    }

    /// `netbench` messages (payload `p` of a UDP datagram of `ulen` bytes).
    fn handle_bench(&mut self, p: &[u8], ulen: usize) {
        let b = &mut self.bench;
        match p[0] {
            M_BENCH_PKT => {
                if b.h2g_len != 0 {
                    let now = crate::cpu::rdtsc();
                    if b.h2g_frames == 0 {
                        b.h2g_first = now;
                    }
                    b.h2g_last = now;
                    b.h2g_frames += 1;
                    b.h2g_bytes += (42 + ulen).max(60) as u64;
                }
            }
            M_BENCH_G2H if p.len() >= 7 => {
                let len = u16::from_le_bytes([p[1], p[2]]);
                let ms = u32::from_le_bytes([p[3], p[4], p[5], p[6]]);
                b.g2h_req = Some((len, ms));
            }
            M_BENCH_HOST_RX if p.len() >= 9 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&p[1..9]);
                b.host_rx = Some(u64::from_le_bytes(n));
                self.send_udp(|o| {
                    o[0] = M_BENCH_HOST_RX_ACK;
                    1
                });
            }
            M_BENCH_H2G if p.len() >= 3 => {
                let len = u16::from_le_bytes([p[1], p[2]]);
                if b.h2g_len != len {
                    b.h2g_len = len;
                    b.h2g_frames = 0;
                    b.h2g_bytes = 0;
                    b.h2g_done = None;
                }
                self.send_udp(|o| {
                    o[0] = M_BENCH_H2G_ACK;
                    1
                });
            }
            M_BENCH_FIN => {
                if b.h2g_len != 0 {
                    b.h2g_done = Some(b.h2g_len);
                    b.h2g_len = 0;
                }
                let (f, n, t) = (b.h2g_frames, b.h2g_bytes, b.h2g_last - b.h2g_first);
                self.send_udp(|o| {
                    o[0] = M_BENCH_FIN_REPLY;
                    o[1..9].copy_from_slice(&f.to_le_bytes());
                    o[9..17].copy_from_slice(&n.to_le_bytes());
                    o[17..25].copy_from_slice(&t.to_le_bytes());
                    25
                });
            }
            _ => self.c.ignored += 1,
        }
    }

    /// TX descriptors free right now (after reclaiming).
    pub fn tx_idle(&mut self) -> bool {
        self.reclaim_tx();
        self.nfree == self.tx.size as usize
    }

    pub fn stopped(&self) -> bool {
        self.stop
    }

    /// Reset the device (after letting the last frames go, 20 ms at most).
    pub fn close(&mut self) {
        let dl = time::deadline(20_000);
        while !time::passed(dl) && !self.tx_idle() {}
        self.t.write(reg::STATUS, 0);
    }

    /// Probe -> host bulk: go-back-N with TX_WINDOW datagrams in flight.
    fn pump_tx(&mut self) {
        if self.tx_base >= self.tx_count {
            return;
        }
        if time::passed(self.tx_deadline) && self.tx_next > self.tx_base {
            self.tx_next = self.tx_base;
            self.tx_retx += 1;
            self.tx_deadline = time::deadline(RTO_US);
        }
        let end = self.tx_count.min(self.tx_base + TX_WINDOW);
        while self.tx_next < end {
            let seq = self.tx_next;
            let last = seq + 1 == end;
            let hash_it = seq == self.tx_hashed;
            let mut h = self.tx_sum;
            let sent = self.send_udp(|o| {
                o[0] = M_TDATA;
                o[1] = last as u8;
                o[2..6].copy_from_slice(&seq.to_le_bytes());
                for k in 0..CHUNK / 8 {
                    let w = tx_word(seq, k as u64);
                    o[6 + 8 * k..14 + 8 * k].copy_from_slice(&w.to_le_bytes());
                }
                if hash_it {
                    h = hash_words(h, &o[6..6 + CHUNK]);
                }
                6 + CHUNK
            });
            if !sent {
                break;
            }
            if hash_it {
                self.tx_sum = h;
                self.tx_hashed += 1;
            }
            self.tx_next += 1;
        }
    }

    pub fn poll_rx(&mut self) {
        let mrg = self.mrg;
        let mut reposted = false;
        let mut skip = 0u16;
        for _ in 0..self.rx.size {
            let Some((id, len)) = self.rx.pop_used() else {
                break;
            };
            let i = id as usize;
            if i >= self.rx.size as usize {
                continue;
            }
            if skip > 0 {
                skip -= 1;
                self.c.rx_extra_bufs += 1;
            } else {
                self.c.frames_in += 1;
                let b = buf(i);
                let len = (len as usize).min(BUF);
                if mrg && len >= HDR {
                    let n = u16::from_le_bytes([b[10], b[11]]);
                    if n > 1 {
                        // Never expected with 2 KiB buffers: drop the frame.
                        skip = n - 1;
                        self.c.rx_extra_bufs += 1;
                    }
                }
                if skip == 0 && len >= HDR + 14 {
                    let f: &[u8] = &b[HDR..len];
                    match [f[12], f[13]] {
                        [0x08, 0x06] => self.handle_arp(f),
                        [0x08, 0x00] => self.handle_ip(f),
                        _ => self.c.ignored += 1,
                    }
                }
            }
            self.rx.push(i);
            reposted = true;
        }
        if reposted {
            self.rx.publish();
            self.rx.notify();
        }
    }
}

fn net_devices() -> impl Iterator<Item = Transport> {
    virtio::devices(bootinfo::get().cmdline())
        .flatten()
        .filter(|t| t.dev.addr.saturating_add(0x200) <= paging::mapped_limit())
        .filter(|t| t.magic() == virtio::MAGIC && t.version() == 2)
        .filter(|t| t.device_id() == DEVICE_ID)
}

fn fail(d: &mut Details, why: &str) -> Status {
    let _ = write!(d, "{why};");
    Status::Fail
}

impl Net {
    /// The first virtio-net device, negotiated and with both queues set up
    /// (RX buffers posted), DRIVER_OK; prints `PROBE <name> ready ...`.
    /// Err: the check's status (details written).
    pub fn start(d: &mut Details, name: &str) -> Result<(Net, Config), Status> {
        let cfg = config().map_err(|e| fail(d, e))?;
        let Some(t) = net_devices().next() else {
            let _ = d.write_str("no virtio-net device on the command line");
            return Err(Status::Skip);
        };
        let features = t.init(F_MAC | F_MRG_RXBUF).map_err(|e| fail(d, e))?;
        if features & F_MAC == 0 {
            t.write(reg::STATUS, status::FAILED);
            return Err(fail(d, "device does not offer VIRTIO_NET_F_MAC"));
        }
        let mrg = features & F_MRG_RXBUF != 0;
        let mut mac = [0u8; 6];
        for (i, m) in mac.iter_mut().enumerate() {
            *m = peek::<u8>(t.dev.addr + reg::CONFIG + i as u64);
        }
        let link = if t.device_features() & F_STATUS != 0 {
            peek::<u16>(t.dev.addr + reg::CONFIG + 6)
        } else {
            1
        };
        let rx = Queue::setup(t, 0).map_err(|e| fail(d, e))?;
        let tx = Queue::setup(t, 1).map_err(|e| fail(d, e))?;
        let mut n = Net {
            free: [0; QMAX],
            nfree: 0,
            t,
            mrg,
            bench: Bench::default(),
            kick: false,
            mac,
            ip: cfg.ip,
            peer_ip: cfg.peer,
            port: cfg.port,
            peer_mac: None,
            peer_port: cfg.port,
            c: Counters::default(),
            rx_next: 0,
            rx_sum: HASH_INIT,
            tx_count: 0,
            tx_base: 0,
            tx_next: 0,
            tx_hashed: 0,
            tx_sum: HASH_INIT,
            tx_deadline: 0,
            tx_retx: 0,
            stop: false,
            rx,
            tx,
        };
        for i in 0..n.tx.size as usize {
            n.free[i] = i as u16;
        }
        n.nfree = n.tx.size as usize;
        for i in 0..n.rx.size as usize {
            n.rx.set_desc(i, buf_addr(i), BUF as u32, DESC_WRITE);
            n.rx.push(i);
        }
        n.rx.publish();
        t.driver_ok();
        if t.read(reg::STATUS) & status::DRIVER_OK == 0 {
            return Err(fail(d, "device did not accept DRIVER_OK"));
        }
        n.rx.notify();
        let [a, b, c, e] = cfg.ip;
        crate::println!(
            "PROBE {name} ready mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={a}.{b}.{c}.{e} port={} mrg={} link={} tsc={}",
            mac[0],
            mac[1],
            mac[2],
            mac[3],
            mac[4],
            mac[5],
            cfg.port,
            mrg as u8,
            link,
            crate::cpu::rdtsc()
        );
        Ok((n, cfg))
    }
}

pub fn check_net(d: &mut Details) -> Status {
    let (mut n, cfg) = match Net::start(d, "net") {
        Ok(x) => x,
        Err(st) => return st,
    };
    let mac = n.mac;
    let deadline = time::deadline(cfg.ms.saturating_mul(1000));
    let t0 = crate::cpu::rdtsc();
    while !n.stop {
        n.poll_rx();
        n.reclaim_tx();
        n.pump_tx();
        n.flush();
        if time::passed(deadline) {
            break;
        }
        core::hint::spin_loop();
    }
    let ms = time::tsc_to_us(crate::cpu::rdtsc().wrapping_sub(t0)) / 1000;
    // Let the last frames (ACKs) go out before the reset.
    n.close();
    let mrg = n.mrg;
    let c = &n.c;
    let st = if n.stop {
        Status::Ok
    } else {
        let _ = write!(d, "no STOP within probe.net_ms={};", cfg.ms);
        Status::Fail
    };
    let _ = write!(
        d,
        " rx_bytes={} tx_bytes={} sum={:#018x} tx_sum={:#018x} rx_chunks={} tx_chunks={} \
         tx_retx={} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} mrg={} arp={} icmp={} echo={} \
         frames_in={} frames_out={} ignored={} tx_full={} ms={ms}",
        n.rx_next as u64 * CHUNK as u64,
        n.tx_base as u64 * CHUNK as u64,
        n.rx_sum,
        n.tx_sum,
        n.rx_next,
        n.tx_base,
        n.tx_retx,
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        mrg as u8,
        c.arp,
        c.icmp,
        c.echo,
        c.frames_in,
        c.frames_out,
        c.ignored,
        c.tx_full,
    );
    st
}
