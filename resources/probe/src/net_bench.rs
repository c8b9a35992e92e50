//! `netbench`: packet and bit rates through the first virtio-net device,
//! driven by the host (`tests/src/bin/bench_io.rs`), timed with the TSC.
//!
//! The probe sets up the device like `net` (same driver, [`Net`]), prints
//! `PROBE netbench ready ...`, answers ARP/ICMP/UDP echo as `net` does and
//! serves these UDP messages from the peer (first payload byte; integers
//! little endian):
//!
//! | from | payload | meaning |
//! |---|---|---|
//! | host | `B` len:u16 ms:u32 | guest->host: send `p` datagrams in frames of `len` bytes (Ethernet, no FCS) for `ms`, as fast as the TX ring takes them; then `b` sent:u64 ticks:u64 |
//! | host | `R` count:u64 | the host received `count` `p` datagrams of the last blast; answered `r` |
//! | host | `S` len:u16 | host->guest: start counting `P` datagrams (frames of `len`); answered `s` |
//! | host | `P` ... | one host->guest datagram (counted: frames, frame bytes, TSC of the first and last) |
//! | host | `F` | end of the host->guest phase; answered `f` frames:u64 bytes:u64 ticks:u64 |
//! | host | `X` | STOP: print the result and end |
//!
//! Frame sizes: "64" is a 60-byte frame (64 on the wire with the FCS, 18
//! bytes of UDP payload), "1500" a 1514-byte frame (a 1500-byte IP packet).
//! Mbit/s counts frame bytes without the FCS or the virtio-net header.
//! Guest->host rates use what the host received over the probe's sending
//! time (first frame queued to the last one completed); `g2h_*_sent_pps`
//! is what the device consumed. Host->guest rates are frames received
//! over the time from the first to the last one.

use crate::checks::Status;
use crate::cpu::rdtsc;
use crate::time;
use crate::virtio_net::{self, Details, Net, M_BENCH_G2H_DONE, M_BENCH_G2H_PKT};
use core::fmt::Write;

const LABELS: [&str; 2] = ["64", "1500"];

#[derive(Clone, Copy, Default)]
struct G2h {
    sent: u64,
    ticks: u64,
    host_rx: Option<u64>,
}

#[derive(Clone, Copy, Default)]
struct H2g {
    frames: u64,
    bytes: u64,
    ticks: u64,
    done: bool,
}

fn idx(len: u16) -> usize {
    (len > 64) as usize
}

/// Sends `p` datagrams filling frames of `len` bytes for `ms`; TX kicks are
/// batched (every 32 frames, and when the ring is full).
fn blast(n: &mut Net, len: u16, ms: u32) -> G2h {
    let payload = (len as usize).clamp(60, 1514) - 42;
    let t0 = rdtsc();
    let end = t0.saturating_add(time::us_to_tsc(ms as u64 * 1000));
    let mut sent = 0u64;
    let mut batch = 0;
    while rdtsc() < end {
        let seq = sent as u32;
        if n.send_udp(|o| {
            o[0] = M_BENCH_G2H_PKT;
            o[1..5].copy_from_slice(&seq.to_le_bytes());
            payload
        }) {
            sent += 1;
            batch += 1;
            if batch == 32 {
                n.flush();
                batch = 0;
            }
        } else {
            n.flush();
            batch = 0;
            n.reclaim_tx();
        }
    }
    n.flush();
    let dl = time::deadline(5_000_000);
    while !n.tx_idle() && !time::passed(dl) {
        core::hint::spin_loop();
    }
    let ticks = rdtsc().wrapping_sub(t0).max(1);
    for _ in 0..3 {
        n.send_udp(|o| {
            o[0] = M_BENCH_G2H_DONE;
            o[1..9].copy_from_slice(&sent.to_le_bytes());
            o[9..17].copy_from_slice(&ticks.to_le_bytes());
            17
        });
    }
    n.flush();
    G2h {
        sent,
        ticks,
        host_rx: None,
    }
}

/// `v` per second, x100.
fn rate_x100(v: u128, ticks: u64) -> u64 {
    let khz = time::khz().max(1) as u128;
    (v * khz * 1000 * 100 / ticks.max(1) as u128) as u64
}

fn dec2(d: &mut Details, key: &str, v: u64) {
    let _ = write!(d, " {key}={}.{:02}", v / 100, v % 100);
}

pub fn check_netbench(d: &mut Details) -> Status {
    let (mut n, cfg) = match Net::start(d, "netbench") {
        Ok(x) => x,
        Err(st) => return st,
    };
    n.bench.on = true;
    let mut g2h = [G2h::default(); 2];
    let mut h2g = [H2g::default(); 2];
    let mut last_g2h = 0;
    let deadline = time::deadline(cfg.ms.saturating_mul(1000));
    while !n.stopped() && !time::passed(deadline) {
        n.poll_rx();
        n.reclaim_tx();
        n.flush();
        if let Some((len, ms)) = n.bench.g2h_req.take() {
            last_g2h = idx(len);
            g2h[last_g2h] = blast(&mut n, len, ms);
        }
        if let Some(c) = n.bench.host_rx.take() {
            g2h[last_g2h].host_rx = Some(c);
        }
        if let Some(len) = n.bench.h2g_done.take() {
            let b = &n.bench;
            h2g[idx(len)] = H2g {
                frames: b.h2g_frames,
                bytes: b.h2g_bytes,
                ticks: b.h2g_last.wrapping_sub(b.h2g_first),
                done: true,
            };
        }
        core::hint::spin_loop();
    }
    n.close();
    let mut st = Status::Ok;
    if !n.stopped() {
        let _ = write!(d, "no STOP within probe.net_ms={};", cfg.ms);
        st = Status::Fail;
    }
    for (i, label) in LABELS.iter().enumerate() {
        let g = g2h[i];
        let mut key = virtio_net::Details::new();
        match g.host_rx {
            Some(rx) => {
                let _ = write!(key, "g2h_{label}_pps");
                dec2(d, key_str(&key), rate_x100(rx as u128, g.ticks));
                key = Details::new();
                let _ = write!(key, "g2h_{label}_mbps");
                let bytes = rx as u128 * if i == 0 { 60 } else { 1514 };
                // bits/s / 1e6, x100
                dec2(d, key_str(&key), rate_x100(bytes * 8, g.ticks) / 1_000_000);
            }
            None => {
                let _ = write!(d, " g2h_{label}_pps=none g2h_{label}_mbps=none");
                st = Status::Fail;
            }
        }
        let h = h2g[i];
        if h.done && h.frames > 1 {
            key = Details::new();
            let _ = write!(key, "h2g_{label}_pps");
            dec2(d, key_str(&key), rate_x100(h.frames as u128, h.ticks));
            key = Details::new();
            let _ = write!(key, "h2g_{label}_mbps");
            dec2(
                d,
                key_str(&key),
                rate_x100(h.bytes as u128 * 8, h.ticks) / 1_000_000,
            );
        } else {
            let _ = write!(d, " h2g_{label}_pps=none h2g_{label}_mbps=none");
            st = Status::Fail;
        }
    }
    for (i, label) in LABELS.iter().enumerate() {
        let g = g2h[i];
        let mut key = Details::new();
        let _ = write!(key, "g2h_{label}_sent_pps");
        dec2(d, key_str(&key), rate_x100(g.sent as u128, g.ticks));
        let _ = write!(
            d,
            " g2h_{label}_sent={} g2h_{label}_host_rx={} g2h_{label}_us={} h2g_{label}_frames={} h2g_{label}_us={}",
            g.sent,
            g.host_rx.unwrap_or(0),
            time::tsc_to_us(g.ticks),
            h2g[i].frames,
            time::tsc_to_us(h2g[i].ticks)
        );
    }
    let _ = write!(d, " mrg={} tsc_khz={}", n.mrg as u8, time::khz());
    st
}

fn key_str(k: &Details) -> &str {
    core::str::from_utf8(k.as_bytes()).unwrap_or("?")
}
