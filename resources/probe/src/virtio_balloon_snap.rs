//! `balloonsnap`: a well-behaved balloon driver that lives across a snapshot (issue 17 item 2,
//! `tests/tests/balloon.rs`). It negotiates the statistics queue, then:
//!
//! 1. fills `probe.balloon_pages` pages (default 1024, at most 4096) of free RAM with 0xa5
//!    and inflates them (chains of 256 frame numbers), writes `actual`, posts a statistics
//!    buffer (MemTotal, and MemFree = the number of statistics updates so far, in KiB) and
//!    prints `balloonsnap: ready pages=N first=A last=B contiguous=0|1 target=T`;
//! 2. then, up to 600 s: prints `balloonsnap: target=T` whenever `num_pages` changes, and
//!    `balloonsnap: stats K` each time the device hands the statistics buffer back (it is then
//!    posted again with K); a `d` typed on COM1 deflates every inflated page, writes and reads
//!    each back and sets `actual` to 0 (`balloonsnap: deflated pages=N reused=0|1`); a `g` ends
//!    the wait.
//!
//! The harness snapshots it meanwhile and restores it in a new process: the target, the held
//! statistics buffer and the inflated set must have come along.

use crate::checks::{Details, Status};
use crate::cpu::{inb, peek, poke};
use crate::time;
use crate::virtio::{reg, Buf, Transport, Virtqueue};
use crate::{bootinfo, cmdline, mem, println};
use core::fmt::Write;

const COM1: u16 = 0x3f8;
const PAGE: u64 = 4096;
const MAX_PAGES: usize = 4096;
const PER_CHAIN: usize = 256;
const MAX_WAIT_US: u64 = 600_000_000;
const F_STATS_VQ: u64 = 1 << 1;
const TAG_MEMFREE: u16 = 4;
const TAG_MEMTOT: u16 = 5;

static PFNS: crate::sync::Global<[u32; MAX_PAGES]> = crate::sync::Global::new([0; MAX_PAGES]);

fn pfns() -> u64 {
    PFNS.get().as_ptr() as u64
}

/// Submits one chain and waits (2 s) for it on the used ring.
fn run(q: &mut Virtqueue, bufs: &[Buf]) -> Result<(), &'static str> {
    q.submit(bufs)?;
    let dl = time::deadline(2_000_000);
    loop {
        if q.poll().is_some() {
            return Ok(());
        }
        if time::passed(dl) {
            return Err("no used-ring entry within 2 s");
        }
        core::hint::spin_loop();
    }
}

/// Puts the first `n` frame numbers on `q`, `PER_CHAIN` per chain.
fn send_pfns(q: &mut Virtqueue, n: usize) -> Result<(), &'static str> {
    let mut i = 0;
    while i < n {
        let k = (n - i).min(PER_CHAIN);
        run(
            q,
            &[Buf {
                addr: pfns() + 4 * i as u64,
                len: 4 * k as u32,
                write: false,
            }],
        )?;
        i += k;
    }
    Ok(())
}

/// Writes the statistics buffer (MemTotal, MemFree = `k` KiB) and posts it.
fn post_stats(q: &mut Virtqueue, buf: u64, total: u64, k: u64) -> Result<(), &'static str> {
    for (i, (tag, v)) in [(TAG_MEMTOT, total), (TAG_MEMFREE, k * 1024)]
        .iter()
        .enumerate()
    {
        let e = buf + 10 * i as u64;
        poke::<u16>(e, *tag);
        for (j, b) in v.to_le_bytes().iter().enumerate() {
            poke::<u8>(e + 2 + j as u64, *b);
        }
    }
    q.submit(&[Buf {
        addr: buf,
        len: 20,
        write: false,
    }])
}

fn page_of(i: usize) -> u64 {
    u64::from(peek::<u32>(pfns() + 4 * i as u64)) * PAGE
}

fn fill(p: u64, v: u64) {
    for off in (0..PAGE).step_by(8) {
        poke::<u64>(p + off, v ^ off);
    }
}

fn holds(p: u64, v: u64) -> bool {
    (0..PAGE)
        .step_by(8)
        .all(|off| peek::<u64>(p + off) == v ^ off)
}

pub fn check(d: &mut Details) -> Status {
    let dev = crate::virtio::devices(bootinfo::get().cmdline())
        .flatten()
        .filter(|t| t.dev.addr.saturating_add(0x200) <= crate::paging::mapped_limit())
        .find(|t| t.magic() == crate::virtio::MAGIC && t.version() == 2 && t.device_id() == 5);
    let Some(t) = dev else {
        let _ = d.write_str("no version-2 virtio-balloon device on the command line");
        return Status::Skip;
    };
    match drive(&t, d) {
        Ok(true) => Status::Ok,
        Ok(false) => Status::Fail,
        Err(e) => {
            let _ = write!(d, " {e}; addr={:#x}", t.dev.addr);
            t.write(reg::STATUS, 0);
            Status::Fail
        }
    }
}

fn drive(t: &Transport, d: &mut Details) -> Result<bool, &'static str> {
    let n = cmdline::get(bootinfo::get().cmdline(), b"probe.balloon_pages")
        .and_then(cmdline::parse_u64)
        .unwrap_or(1024)
        .clamp(1, MAX_PAGES as u64) as usize;
    if t.init(F_STATS_VQ)? & F_STATS_VQ == 0 {
        return Err("the device offers no statistics queue (stats_polling_interval_s=0?)");
    }
    let mut inflate = t.setup_queue(0, 8)?;
    let mut deflate = t.setup_queue(1, 8)?;
    let mut stats = t.setup_queue(2, 2)?;
    let sbuf = crate::virtio::dma_alloc(32, 8).ok_or("out of queue memory")?;
    t.driver_ok();
    let total: u64 = bootinfo::get()
        .mem()
        .iter()
        .filter(|e| e.kind == bootinfo::E820_RAM)
        .map(|e| e.end() - e.addr)
        .sum();

    // The first n free pages, filled, then inflated.
    let mut got = 0usize;
    mem::for_each_page(|p| {
        poke::<u32>(pfns() + 4 * got as u64, (p / PAGE) as u32);
        got += 1;
        got < n
    });
    if got < n {
        return Err("not enough free pages");
    }
    let (first, last) = (page_of(0), page_of(n - 1));
    let contiguous = last - first == (n as u64 - 1) * PAGE;
    for i in 0..n {
        fill(page_of(i), 0xa5a5_a5a5_a5a5_a5a5);
    }
    send_pfns(&mut inflate, n)?;
    t.write(reg::CONFIG + 4, n as u32);
    let mut updates = 0u64;
    post_stats(&mut stats, sbuf, total, updates)?;
    let mut target = t.read(reg::CONFIG);
    println!(
        "balloonsnap: ready pages={n} first={first:#x} last={last:#x} contiguous={} target={target}",
        contiguous as u8
    );

    let give_up = time::deadline(MAX_WAIT_US);
    let mut deflated = None;
    loop {
        if inb(COM1 + 5) & 1 != 0 {
            match inb(COM1) {
                b'g' => break,
                b'd' if deflated.is_none() => {
                    send_pfns(&mut deflate, n)?;
                    let mut reused = true;
                    for i in 0..n {
                        let v = 0x5c5c_0000_0000_0000 | i as u64;
                        fill(page_of(i), v);
                        reused &= holds(page_of(i), v);
                    }
                    t.write(reg::CONFIG + 4, 0);
                    println!("balloonsnap: deflated pages={n} reused={}", reused as u8);
                    deflated = Some(reused);
                }
                _ => {}
            }
        }
        let now = t.read(reg::CONFIG);
        if now != target {
            target = now;
            println!("balloonsnap: target={target}");
        }
        if stats.poll().is_some() {
            updates += 1;
            println!("balloonsnap: stats {updates}");
            post_stats(&mut stats, sbuf, total, updates)?;
        }
        if time::passed(give_up) {
            let _ = write!(d, "no `g` on COM1 within {} s", MAX_WAIT_US / 1_000_000);
            return Ok(false);
        }
        time::delay_us(1000);
    }
    let _ = write!(
        d,
        "pages={n} target={target} stats={updates} deflated={}",
        match deflated {
            None => "no",
            Some(true) => "reused",
            Some(false) => "broken",
        }
    );
    Ok(deflated != Some(false))
}
