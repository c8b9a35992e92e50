//! virtio-vsock driver (device id 19) and the `vsock` check, polled at CPL3.
//!
//! Three queues (virtio 1.2 §5.10.2): receiveq (0), transmitq (1) and eventq
//! (2), each of up to 64 entries in static memory, interrupts suppressed
//! (VRING_AVAIL_F_NO_INTERRUPT), all three used rings polled.
//!
//! - receiveq: up to 16 chains of two device-writable descriptors, the
//!   44-byte header then a 16 KiB data buffer (the layout every device
//!   accepts; VIRTIO_F_ANY_LAYOUT-style single buffers are not used).
//! - transmitq: up to 16 slots; a packet is one descriptor (header only) or
//!   two (header, then its payload).
//! - eventq: four 8-byte buffers; VIRTIO_VSOCK_EVENT_TRANSPORT_RESET drops
//!   every connection and re-reads the CID.
//!
//! The protocol itself (headers, state machine, credit, checksums) is in
//! [`proto`], which has no hardware access and is unit-tested on the host.
//! The check: `PROBE vsock ready cid=.. port=..` once it listens, one
//! `PROBE vsock conn ...` line per closed connection (printed when the check
//! ends, so serving never waits on the slow serial port), then the result line.

pub mod proto;

use crate::bootinfo;
use crate::checks::{key_num, Details, Status};
use crate::cmdline;
use crate::cpu::{peek, poke, rdtsc};
use crate::paging;
use crate::sync::Global;
use crate::time;
use crate::virtio::{self, reg, Transport};
use core::fmt::Write;
use core::sync::atomic::{fence, Ordering};
use proto::{Engine, Hdr, Mode, Report, HDR_LEN};

pub const DEVICE_ID: u32 = 19;
/// VIRTIO_VSOCK_F_STREAM.
const F_STREAM: u64 = 1 << 0;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
const EVENT_TRANSPORT_RESET: u32 = 0;

const QMAX: usize = 64;
const CHAINS: usize = 16;
const DATA: usize = 16 * 1024;
const EVENTS: usize = 4;
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;
const USED_NO_NOTIFY: u16 = 1;

const DEFAULT_PORT: u64 = 5000;
const DEFAULT_MS: u64 = 120_000;
const DEFAULT_BYTES: u64 = 1 << 20;
const DEFAULT_STALL_KIB: u64 = 64;
/// Most `PROBE vsock conn` lines printed (the totals count every connection).
const MAX_CONN_LINES: u32 = 256;

#[repr(C, align(4096))]
struct Rings([u8; 9 * 4096]);
/// Headers: RX chain i at 64 * i, TX slot i at 64 * (CHAINS + i), event
/// buffer i at 64 * (2 * CHAINS + i).
#[repr(C, align(4096))]
struct Small([u8; 4096]);
#[repr(C, align(4096))]
struct Bufs([[u8; DATA]; 2 * CHAINS]);

static RINGS: Global<Rings> = Global::new(Rings([0; 9 * 4096]));
static SMALL: Global<Small> = Global::new(Small([0; 4096]));
static BUFS: Global<Bufs> = Global::new(Bufs([[0; DATA]; 2 * CHAINS]));
static ENGINE: Global<Engine> = Global::new(Engine::new(0, 0, Mode::Sum));
/// The reports of closed connections, printed when the check ends: a line printed while
/// serving cost the next connection its setup time (each byte is a port write from CPL0,
/// ~16 ms a line on kvm-pvm, which was all of `bench_vsock`'s connect latency).
static REPORTS: Global<[Report; MAX_CONN_LINES as usize]> =
    Global::new([proto::NO_REPORT; MAX_CONN_LINES as usize]);

fn small(off: usize) -> u64 {
    SMALL.get() as *const Small as u64 + off as u64
}

fn rx_hdr(i: usize) -> u64 {
    small(64 * i)
}

fn tx_hdr(i: usize) -> u64 {
    small(64 * (CHAINS + i))
}

fn ev_buf(i: usize) -> u64 {
    small(64 * (2 * CHAINS + i))
}

/// Data buffer `i` (0..CHAINS: receive, CHAINS..: transmit).
fn data(i: usize) -> &'static mut [u8; DATA] {
    let p = BUFS.get_mut() as *mut Bufs;
    // SAFETY: `p` points to the static buffers; indexing is bounds-checked;
    // the probe is single-threaded here and callers never hold two
    // references to one buffer.
    unsafe { &mut *core::ptr::addr_of_mut!((*p).0[i]) }
}

fn now_ms() -> u64 {
    time::tsc_to_us(rdtsc()) / 1000
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
        let size = virtio::setup_ring_queue(t, idx, base, QMAX, 2)?;
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

    fn set_desc(&self, i: usize, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * i as u64;
        poke(d, addr);
        poke(d + 8, len);
        poke(d + 12, flags);
        poke(d + 14, next);
    }

    /// Offers the chain starting at descriptor `head` (visible after `publish`).
    fn push(&mut self, head: usize) {
        let slot = self.avail_idx % self.size;
        poke::<u16>(self.avail + 4 + 2 * slot as u64, head as u16);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn publish_and_notify(&self) {
        fence(Ordering::SeqCst);
        poke::<u16>(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
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

/// Configuration from the command line.
struct Cfg {
    port: u32,
    conns: u64,
    host_port: Option<u32>,
    bytes: u64,
    mode: Mode,
    ms: u64,
    linger: bool,
}

fn config() -> Result<Cfg, &'static str> {
    let cmd = bootinfo::get().cmdline();
    let num = |k: &[u8], def, min, max, what| key_num(k, def, min, max).map_err(|_| what);
    let port = num(
        b"probe.vsock_port",
        DEFAULT_PORT,
        0,
        u32::MAX as u64,
        "probe.vsock_port: value out of range or not a number",
    )?;
    let host_port = match cmdline::get(cmd, b"probe.vsock_host_port") {
        None => None,
        Some(_) => Some(num(
            b"probe.vsock_host_port",
            0,
            0,
            u32::MAX as u64,
            "probe.vsock_host_port: value out of range or not a number",
        )? as u32),
    };
    let default_conns = if host_port.is_some() { 0 } else { 1 };
    let conns = num(
        b"probe.vsock_conns",
        default_conns,
        0,
        1 << 32,
        "probe.vsock_conns: value out of range or not a number",
    )?;
    let bytes = num(
        b"probe.vsock_bytes",
        DEFAULT_BYTES,
        0,
        1 << 40,
        "probe.vsock_bytes: value out of range or not a number",
    )?;
    let ms = num(
        b"probe.vsock_ms",
        DEFAULT_MS,
        1,
        3_600_000,
        "probe.vsock_ms: value out of range or not a number",
    )?;
    let stall = num(
        b"probe.vsock_stall_kib",
        DEFAULT_STALL_KIB,
        0,
        1 << 30,
        "probe.vsock_stall_kib: value out of range or not a number",
    )?;
    let linger = num(
        b"probe.vsock_linger",
        1,
        0,
        1,
        "probe.vsock_linger: value out of range or not a number",
    )? == 1;
    let mode = match cmdline::get(cmd, b"probe.vsock_mode") {
        None | Some(b"sum") => Mode::Sum,
        Some(b"echo") => Mode::Echo,
        Some(b"stall") => Mode::Stall(stall * 1024),
        Some(_) => return Err("probe.vsock_mode is not sum, echo or stall"),
    };
    Ok(Cfg {
        port: port as u32,
        conns,
        host_port,
        bytes,
        mode,
        ms,
        linger,
    })
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Sum => "sum",
        Mode::Echo => "echo",
        Mode::Stall(_) => "stall",
    }
}

/// What the run saw besides the engine's totals.
#[derive(Default)]
struct Run {
    cid: u64,
    rx_pkts: u64,
    tx_pkts: u64,
    /// Used entries that were malformed (unknown id, short, len mismatch).
    bad_used: u32,
    events: u32,
    conn_lines: u32,
    timed_out: bool,
    ms: u64,
}

/// Keeps the report of a closed connection for [`print_reports`] (the first
/// `MAX_CONN_LINES`; the totals count every connection).
fn keep_report(r: &Report, run: &mut Run) {
    if let Some(slot) = REPORTS.get_mut().get_mut(run.conn_lines as usize) {
        *slot = *r;
    }
    run.conn_lines += 1;
}

/// One `PROBE vsock conn` line per kept report, in the order they closed.
fn print_reports(run: &Run) {
    let kept = (run.conn_lines as usize).min(MAX_CONN_LINES as usize);
    for r in &REPORTS.get_mut()[..kept] {
        crate::println!(
            "PROBE vsock conn n={} dir={} port={} peer={} rx_bytes={} rx_sum={:#x} tx_bytes={} tx_sum={:#x} end={}",
            r.n,
            if r.outbound { "out" } else { "in" },
            r.local_port,
            r.peer_port,
            r.rx_bytes,
            r.rx_sum,
            r.tx_bytes,
            r.tx_sum,
            r.end.name()
        );
    }
}

fn read_cid(t: &Transport) -> u64 {
    loop {
        let g = t.read(reg::CONFIG_GENERATION);
        let lo = t.read(reg::CONFIG) as u64;
        let hi = t.read(reg::CONFIG + 4) as u64;
        if t.read(reg::CONFIG_GENERATION) == g {
            return hi << 32 | lo;
        }
    }
}

fn post_rx(q: &mut Queue, i: usize) {
    q.push(2 * i);
}

fn run(t: &Transport, cfg: &Cfg, run: &mut Run) -> Result<(), &'static str> {
    t.init(F_STREAM)?;
    let cid = read_cid(t);
    run.cid = cid;
    if cid <= 2 || cid >= u32::MAX as u64 {
        return Err("the device's guest_cid is reserved (0-2) or does not fit 32 bits");
    }
    let mut rxq = Queue::setup(*t, 0)?;
    let mut txq = Queue::setup(*t, 1)?;
    let mut evq = Queue::setup(*t, 2)?;
    let chains = CHAINS.min(rxq.size as usize / 2);
    let slots = CHAINS.min(txq.size as usize / 2);
    let events = EVENTS.min(evq.size as usize);
    for i in 0..chains {
        rxq.set_desc(
            2 * i,
            rx_hdr(i),
            HDR_LEN as u32,
            DESC_WRITE | DESC_NEXT,
            2 * i as u16 + 1,
        );
        rxq.set_desc(
            2 * i + 1,
            data(i).as_ptr() as u64,
            DATA as u32,
            DESC_WRITE,
            0,
        );
        post_rx(&mut rxq, i);
    }
    for i in 0..events {
        evq.set_desc(i, ev_buf(i), 8, DESC_WRITE, 0);
        evq.push(i);
    }
    t.driver_ok();
    rxq.publish_and_notify();
    evq.publish_and_notify();

    let eng = ENGINE.get_mut();
    eng.reset(cid, cfg.port, cfg.mode);
    eng.linger = cfg.linger;
    crate::println!(
        "PROBE vsock ready cid={} port={} mode={} conns={} tsc={}",
        cid,
        cfg.port,
        mode_name(cfg.mode),
        cfg.conns,
        rdtsc()
    );
    let start = now_ms();
    if let Some(p) = cfg.host_port {
        eng.connect(p, cfg.bytes, start)
            .ok_or("no free connection slot")?;
    }
    let want_out = cfg.host_port.is_some() as u32;
    let mut rx_posted = [true; CHAINS];
    let mut tx_busy = [false; CHAINS];
    let dl = time::deadline(cfg.ms.saturating_mul(1000));
    loop {
        let now = now_ms();
        let mut reposted = false;
        // Receive.
        while let Some((id, len)) = rxq.pop_used() {
            let id = id as usize;
            if !id.is_multiple_of(2) || id / 2 >= chains || !rx_posted[id / 2] {
                run.bad_used += 1;
                continue;
            }
            let i = id / 2;
            run.rx_pkts += 1;
            let mut raw = [0u8; HDR_LEN];
            for (k, b) in raw.iter_mut().enumerate() {
                *b = peek(rx_hdr(i) + k as u64);
            }
            let h = Hdr::decode(&raw).unwrap_or_default();
            let used = len as usize;
            if used < HDR_LEN || h.len as usize > DATA || h.len as usize > used - HDR_LEN {
                run.bad_used += 1;
            } else {
                eng.on_rx(&h, &data(i)[..h.len as usize], now);
            }
            // Offered again after this batch, so a chain the device returns
            // twice in one batch is caught.
            rx_posted[i] = false;
        }
        for (i, posted) in rx_posted[..chains].iter_mut().enumerate() {
            if !*posted {
                post_rx(&mut rxq, i);
                *posted = true;
                reposted = true;
            }
        }
        if reposted {
            rxq.publish_and_notify();
        }
        // Transmit completions.
        while let Some((id, _)) = txq.pop_used() {
            let id = id as usize;
            if !id.is_multiple_of(2) || id / 2 >= slots || !tx_busy[id / 2] {
                run.bad_used += 1;
                continue;
            }
            tx_busy[id / 2] = false;
        }
        // Events.
        let mut ev_reposted = false;
        while let Some((id, len)) = evq.pop_used() {
            let id = id as usize;
            if id >= events || len < 4 {
                run.bad_used += 1;
                continue;
            }
            run.events += 1;
            if peek::<u32>(ev_buf(id)) == EVENT_TRANSPORT_RESET {
                let cid = read_cid(t);
                run.cid = cid;
                eng.transport_reset(cid);
            }
            evq.push(id);
            ev_reposted = true;
        }
        if ev_reposted {
            evq.publish_and_notify();
        }
        eng.tick(now);
        // Transmit.
        let mut sent = false;
        for (s, busy) in tx_busy[..slots].iter_mut().enumerate() {
            if *busy {
                continue;
            }
            let buf = data(CHAINS + s);
            let Some(h) = eng.next_tx(&mut buf[..], now) else {
                break;
            };
            for (k, b) in h.encode().iter().enumerate() {
                poke::<u8>(tx_hdr(s) + k as u64, *b);
            }
            if h.len == 0 {
                txq.set_desc(2 * s, tx_hdr(s), HDR_LEN as u32, 0, 0);
            } else {
                txq.set_desc(
                    2 * s,
                    tx_hdr(s),
                    HDR_LEN as u32,
                    DESC_NEXT,
                    2 * s as u16 + 1,
                );
                txq.set_desc(2 * s + 1, buf.as_ptr() as u64, h.len, 0, 0);
            }
            txq.push(2 * s);
            *busy = true;
            run.tx_pkts += 1;
            sent = true;
        }
        if sent {
            txq.publish_and_notify();
        }
        while let Some(r) = eng.take_report() {
            keep_report(&r, run);
        }
        let tot = &eng.totals;
        if (tot.closed_in as u64) >= cfg.conns
            && tot.closed_out >= want_out
            && eng.open_count() == 0
            && !matches!(cfg.mode, Mode::Stall(_))
        {
            break;
        }
        if time::passed(dl) {
            run.timed_out = true;
            break;
        }
        core::hint::spin_loop();
    }
    // Let the last RSTs go out (bounded), then stop.
    let until = time::deadline(50_000);
    while tx_busy[..slots].iter().any(|&b| b) && !time::passed(until) {
        while let Some((id, _)) = txq.pop_used() {
            if let Some(b) = tx_busy.get_mut(id as usize / 2) {
                *b = false;
            }
        }
        core::hint::spin_loop();
    }
    run.ms = now_ms() - start;
    Ok(())
}

pub fn check(d: &mut Details) -> Status {
    let cfg = match config() {
        Ok(c) => c,
        Err(e) => {
            let _ = write!(d, "{e}");
            return Status::Fail;
        }
    };
    let dev = virtio::devices(bootinfo::get().cmdline())
        .flatten()
        .filter(|t| t.dev.addr.saturating_add(0x200) <= paging::mapped_limit())
        .find(|t| t.magic() == virtio::MAGIC && t.version() == 2 && t.device_id() == DEVICE_ID);
    let Some(t) = dev else {
        let _ = d.write_str("no version-2 virtio-vsock device on the command line");
        return Status::Skip;
    };
    let mut r = Run::default();
    let res = run(&t, &cfg, &mut r);
    t.write(reg::STATUS, 0); // reset: stop using our memory
    let eng = ENGINE.get_mut();
    eng.abandon_all();
    while let Some(rep) = eng.take_report() {
        keep_report(&rep, &mut r);
    }
    print_reports(&r);
    let tot = eng.totals;
    let stall = matches!(cfg.mode, Mode::Stall(_));
    let mut fail = true;
    match res {
        Err(e) => {
            let _ = write!(d, "{e};");
        }
        Ok(()) if r.timed_out && !stall => {
            let _ = write!(
                d,
                "timed out after probe.vsock_ms={} with {}/{} connections closed;",
                cfg.ms,
                tot.closed_in + tot.closed_out,
                cfg.conns + cfg.host_port.is_some() as u64
            );
        }
        Ok(()) if stall && tot.stalled == 0 => {
            let _ = d.write_str("stall mode: no connection reached the stall point;");
        }
        Ok(()) if tot.credit_violations > 0 => {
            let _ = d.write_str("the device sent beyond the credit it was given;");
        }
        Ok(()) if r.bad_used > 0 || tot.bad_packets > 0 => {
            let _ = d.write_str("malformed used entries or packets;");
        }
        Ok(()) if tot.unorderly > 0 && !stall => {
            let _ = d.write_str("connections ended without an orderly shutdown;");
        }
        Ok(()) if cfg.host_port.is_some() && !stall && tot.tx_bytes != cfg.bytes => {
            let _ = d.write_str("not every byte was sent to the host;");
        }
        Ok(()) => fail = false,
    }
    let _ = write!(
        d,
        " cid={} port={} mode={} conns={} in={} out={} rx_bytes={} rx_sum={:#x} tx_bytes={} tx_sum={:#x} \
         unorderly={} refused={} bad_packets={} bad_used={} credit_violations={} stray_bytes={} \
         stalled={} unread={} events={} rx_pkts={} tx_pkts={} open={} ms={}",
        r.cid,
        cfg.port,
        mode_name(cfg.mode),
        tot.closed_in + tot.closed_out,
        tot.closed_in,
        tot.closed_out,
        tot.rx_bytes,
        tot.rx_sum,
        tot.tx_bytes,
        tot.tx_sum,
        tot.unorderly,
        tot.refused,
        tot.bad_packets,
        r.bad_used,
        tot.credit_violations,
        tot.stray_bytes,
        tot.stalled,
        tot.unread,
        r.events,
        r.rx_pkts,
        r.tx_pkts,
        eng.open_count(),
        r.ms
    );
    if let Some(p) = cfg.host_port {
        let _ = write!(d, " host_port={p} bytes={}", cfg.bytes);
    }
    if r.conn_lines > MAX_CONN_LINES {
        let _ = write!(d, " conn_lines_dropped={}", r.conn_lines - MAX_CONN_LINES);
    }
    if fail {
        Status::Fail
    } else {
        Status::Ok
    }
}
