//! `snapmem`: guest state that must survive a snapshot and a restore in another VMM process.
//!
//! Writes a seeded pattern over every word of `probe.snapmem_pages` pages (default 64) spread
//! evenly over all usable RAM (so both regions around the MMIO gap when there are two), then
//! prints `snapmem: ready pages=N seed=S` and counts: every 100 ms it re-checks one page and
//! prints `snapmem: tick K`. The harness snapshots it meanwhile, kills the VMM and restores it
//! elsewhere; the ticks go on from where they were. A `g` typed on COM1 ends the wait: every
//! page is checked again and the result line says how many ticks it counted. No `g` within
//! 600 s is a failure (every wait here is bounded). For clones of one snapshot: `w<c>` stores
//! a value made of the byte `c` in one word of the probe's image (`snapmem: clone wrote=c`),
//! `r` reads it back (`snapmem: clone read=c`): each clone must read its own.
//!
//! `c` checks every page at once (reading only) and goes on: `snapmem: checked pages=N bad=B`.
//! For Diff snapshots: `n` rewrites every chosen page with the next seed (`snapmem: reseeded
//! seed=S`; the checks use it from then on), so the pages a Diff must hold are known, on both
//! sides of the MMIO gap. With `probe.snapmem_blk=1` the first virtio-blk device is opened at
//! the start and a dedicated page zeroed (`snapmem: blk buf=0x..`, its guest-physical address:
//! the probe's memory is identity-mapped); `b` then reads the drive's first 8 sectors into
//! that page (`snapmem: blk read status=S used=N buf=0x..`) and never touches it again, not
//! even to read it: only the VMM has written the page since the start.

use crate::checks::{Details, Status};
use crate::cpu::{inb, peek, poke};
use crate::sync::Global;
use crate::virtio_blk::{self, Blk};
use crate::{bootinfo, cmdline, mem, println, time};
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

const COM1: u16 = 0x3f8;
const PAGE: u64 = 4096;
const DEFAULT_PAGES: u64 = 64;
const MAX_WAIT_US: u64 = 600_000_000;
const TICK_US: u64 = 100_000;
const CLONE_TAG: u64 = 0xc10e_0000_0000_0000;

/// The value a clone writes (`w<c>`) and reads back (`r`): one word in the probe's image,
/// the same guest page in every clone.
static CLONE: AtomicU64 = AtomicU64::new(0);

/// The page a block read (`b`) fills: written by the probe only once, zeroed at the start.
#[repr(C, align(4096))]
struct BlkBuf([u64; 512]);
static BLK_BUF: Global<BlkBuf> = Global::new(BlkBuf([0; 512]));
/// Sectors `b` reads: one page.
const BLK_SECTORS: u64 = PAGE / virtio_blk::SECTOR;

fn blk_buf() -> u64 {
    BLK_BUF.get() as *const BlkBuf as u64
}

/// `b`: reads sectors 0..8 into [`BLK_BUF`], and then leaves the page alone: not even a read
/// (on a shadow-paging host, KVM maps a page the guest reads through a dirty PTE writable at
/// once and counts it dirty then, so a read would put the page in a Diff by itself). The
/// harness compares the data in the snapshot.
fn blk_read(b: &mut Blk) {
    let buf = blk_buf();
    match b.request(virtio_blk::T_IN, 0, buf, PAGE as u32) {
        Ok((st, used)) => println!("snapmem: blk read status={st} used={used} buf={buf:#x}"),
        Err(e) => println!("snapmem: blk read failed: {e}"),
    }
}

fn param(key: &[u8], default: u64) -> u64 {
    cmdline::get(bootinfo::get().cmdline(), key)
        .and_then(cmdline::parse_u64)
        .unwrap_or(default)
}

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn word(seed: u64, addr: u64) -> u64 {
    mix(seed ^ addr)
}

/// Calls `f` with each chosen page (at most `n`, spread evenly); returns how many.
fn for_chosen(n: u64, mut f: impl FnMut(u64) -> bool) -> u64 {
    let mut total = 0u64;
    mem::for_each_page(|_| {
        total += 1;
        true
    });
    let stride = (total / n.max(1)).max(1);
    let (mut i, mut chosen) = (0u64, 0u64);
    mem::for_each_page(|p| {
        let take = i % stride == 0 && chosen < n;
        i += 1;
        if take {
            chosen += 1;
            return f(p);
        }
        chosen < n
    });
    chosen
}

/// The first word of `page` that differs from the pattern: (address, want, got).
fn check_page(seed: u64, page: u64) -> Option<(u64, u64, u64)> {
    let mut a = page;
    while a < page + PAGE {
        let got: u64 = peek(a);
        let want = word(seed, a);
        if got != want {
            return Some((a, want, got));
        }
        a += 8;
    }
    None
}

pub fn check(d: &mut Details) -> Status {
    let n = param(b"probe.snapmem_pages", DEFAULT_PAGES).max(1);
    let mut seed = param(b"probe.seed", 1);
    let mut blk = None;
    if param(b"probe.snapmem_blk", 0) == 1 {
        for a in (blk_buf()..blk_buf() + PAGE).step_by(8) {
            poke(a, 0u64);
        }
        match virtio_blk::block_devices()
            .next()
            .map(|t| Blk::open(t, virtio_blk::QUEUE_MAX))
        {
            Some(Ok(b)) => {
                println!("snapmem: blk buf={:#x} sectors={BLK_SECTORS}", blk_buf());
                blk = Some(b);
            }
            Some(Err(e)) => {
                let _ = write!(d, "virtio-blk: {e}");
                return Status::Fail;
            }
            None => {
                let _ = write!(d, "probe.snapmem_blk=1 but no virtio-blk device");
                return Status::Fail;
            }
        }
    }
    let (mut lo, mut hi) = (u64::MAX, 0u64);
    let pages = for_chosen(n, |p| {
        lo = lo.min(p);
        hi = hi.max(p);
        let mut a = p;
        while a < p + PAGE {
            poke(a, word(seed, a));
            a += 8;
        }
        true
    });
    println!("snapmem: ready pages={pages} seed={seed} first={lo:#x} last={hi:#x}");
    let give_up = time::deadline(MAX_WAIT_US);
    let mut next = time::deadline(TICK_US);
    let mut ticks = 0u64;
    loop {
        if inb(COM1 + 5) & 1 != 0 {
            match inb(COM1) {
                b'g' => break,
                // `w<c>`: a clone writes its own value into one page of the image...
                b'w' => {
                    let dl = time::deadline(1_000_000);
                    while inb(COM1 + 5) & 1 == 0 && !time::passed(dl) {
                        time::delay_us(100);
                    }
                    let c = if inb(COM1 + 5) & 1 != 0 {
                        inb(COM1)
                    } else {
                        b'?'
                    };
                    CLONE.store(CLONE_TAG | u64::from(c), Ordering::SeqCst);
                    println!("snapmem: clone wrote={}", c as char);
                }
                // ...and `r` reads it back.
                b'r' => {
                    let v = CLONE.load(Ordering::SeqCst);
                    let c = if v & !0xff == CLONE_TAG {
                        (v & 0xff) as u8
                    } else {
                        b'-'
                    };
                    println!("snapmem: clone read={} raw={v:#x}", c as char);
                }
                // `n`: every chosen page gets the next seed's pattern.
                b'n' => {
                    seed = seed.wrapping_add(1);
                    for_chosen(n, |p| {
                        let mut a = p;
                        while a < p + PAGE {
                            poke(a, word(seed, a));
                            a += 8;
                        }
                        true
                    });
                    println!("snapmem: reseeded seed={seed}");
                }
                // `c`: every chosen page checked now (read only), and the count goes on.
                b'c' => {
                    let mut bad = 0u64;
                    for_chosen(n, |p| {
                        bad += u64::from(check_page(seed, p).is_some());
                        true
                    });
                    println!("snapmem: checked pages={pages} bad={bad}");
                }
                // `b`: a block read into the dedicated page.
                b'b' => match blk.as_mut() {
                    Some(b) => blk_read(b),
                    None => println!("snapmem: blk read failed: no probe.snapmem_blk=1"),
                },
                _ => {}
            }
        }
        if time::passed(next) {
            ticks += 1;
            // One page per tick, round the chosen ones.
            let k = ticks % pages.max(1);
            let mut bad = None;
            let mut i = 0;
            for_chosen(n, |p| {
                if i == k {
                    bad = check_page(seed, p);
                    return false;
                }
                i += 1;
                true
            });
            if let Some((a, want, got)) = bad {
                let _ = write!(d, "tick {ticks}: at {a:#x} want {want:#x} got {got:#x}");
                return Status::Fail;
            }
            let aps: u64 = crate::smp::AP_TICKS
                .iter()
                .map(|t| t.load(Ordering::Relaxed))
                .sum();
            println!("snapmem: tick {ticks} aps={aps}");
            next = time::deadline(TICK_US);
        }
        if time::passed(give_up) {
            let _ = write!(d, "no `g` on COM1 within {} s", MAX_WAIT_US / 1_000_000);
            return Status::Fail;
        }
        time::delay_us(1000);
    }
    let mut bad = None;
    for_chosen(n, |p| {
        bad = check_page(seed, p);
        bad.is_none()
    });
    if let Some((a, want, got)) = bad {
        let _ = write!(d, "at {a:#x} want {want:#x} got {got:#x} ticks={ticks}");
        return Status::Fail;
    }
    let _ = write!(
        d,
        "pages={pages} seed={seed} ticks={ticks} first={lo:#x} last={hi:#x}"
    );
    Status::Ok
}
