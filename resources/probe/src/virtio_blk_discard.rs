//! The `blkdiscard` check: VIRTIO_BLK_T_DISCARD and VIRTIO_BLK_T_WRITE_ZEROES (virtio 1.2
//! §5.2.6), polled at CPL3 on every writable virtio-blk device.
//!
//! Per device: negotiate DISCARD and WRITE_ZEROES (both must be offered), print the limits
//! from config space, write the seeded pattern over the whole disk (at least 4 MiB), then
//! - WRITE_ZEROES of [`ZERO`] without UNMAP and of [`ZERO_UNMAP`] with it;
//! - DISCARD of [`DISCARD`] (one range per request) and, when `max_discard_seg` allows, one
//!   request holding both [`DISCARD_PAIR`] ranges;
//! - requests the device must refuse: UNMAP on a DISCARD and an unknown flag (UNSUPP), a
//!   range at or across the end of the disk, at sector 2^64-1, or longer than the advertised
//!   maximum (IOERR), each aimed at patterned sectors;
//! - a read-back of the whole disk: zeroed ranges are zero, each discarded sector is zero or
//!   still the pattern, every other sector is the pattern;
//! - FLUSH.
//!
//! A read-only device is reported as `ro=1,dwz_offered=<0|1>` and left alone.
//! The host checks the image afterwards with the same ranges (tests/tests/blk.rs).

use crate::checks::Status;
use crate::cpu::{peek, poke};
use crate::virtio::reg;
use crate::virtio_blk::{
    block_devices, data_addr, err2_text, flush, hdr_addr, mib, pattern_word, report, seed,
    status_addr, Blk, Details, DESC_NEXT, DESC_WRITE, F_DISCARD, F_WRITE_ZEROES, QUEUE_MAX,
    REQ_TIMEOUT_US, SLOTS, S_IOERR, S_OK, S_UNSUPP, T_IN, T_OUT,
};
use core::fmt::Write;

pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const FLAG_UNMAP: u32 = 1;

/// (first sector, sectors) zeroed without UNMAP.
pub const ZERO: (u64, u64) = (16, 32);
/// Zeroed with UNMAP (1 MiB, 4 KiB aligned).
pub const ZERO_UNMAP: (u64, u64) = (2048, 2048);
/// Discarded, one range per request.
pub const DISCARD: (u64, u64) = (4096, 2048);
/// Discarded together in one request (when `max_discard_seg` >= 2).
pub const DISCARD_PAIR: [(u64, u64); 2] = [(6144, 8), (6160, 8)];
/// The smallest disk the check runs on.
const MIN_SECTORS: u64 = 8192;

/// The device's limits (virtio_blk_config offsets 36..57).
struct Limits {
    max_discard: u32,
    discard_seg: u32,
    discard_align: u32,
    max_wz: u32,
    wz_seg: u32,
    may_unmap: u8,
}

fn limits(b: &Blk) -> Limits {
    let c = |off: u64| b.t.read(reg::CONFIG + off);
    Limits {
        max_discard: c(36),
        discard_seg: c(40),
        discard_align: c(44),
        max_wz: c(48),
        wz_seg: c(52),
        may_unmap: b.t.read8(reg::CONFIG + 56),
    }
}

/// Sends one DISCARD / WRITE_ZEROES request holding `ranges` (sector, sectors, flags), the
/// ranges in slot 1's data buffer. Returns the status byte.
fn send(b: &mut Blk, typ: u32, ranges: &[(u64, u32, u32)]) -> Result<u8, &'static str> {
    let buf = data_addr(1);
    for (i, &(sector, count, flags)) in ranges.iter().enumerate() {
        let at = buf + 16 * i as u64;
        poke(at, sector);
        poke(at + 8, count);
        poke(at + 12, flags);
    }
    let len = 16 * ranges.len() as u32;
    b.set_header(1, typ, 0);
    b.set_desc(0, hdr_addr(1), 16, DESC_NEXT, 1);
    b.set_desc(1, buf, len, DESC_NEXT, 2);
    b.set_desc(2, status_addr(1), 1, DESC_WRITE, 0);
    b.publish(0);
    match b.wait(REQ_TIMEOUT_US) {
        Some((0, _)) => Ok(peek(status_addr(1))),
        Some(_) => Err("used ring returned an unknown id"),
        None => Err("no completion within 5 s"),
    }
}

/// Covers `(first, n)` with requests of one range of at most `max` sectors each.
fn cover(b: &mut Blk, typ: u32, (first, n): (u64, u64), max: u32, flags: u32) -> Result<(), u8> {
    let mut at = first;
    while at < first + n {
        let count = (first + n - at).min(u64::from(max.max(1))) as u32;
        match send(b, typ, &[(at, count, flags)]) {
            Ok(S_OK) => {}
            Ok(s) => return Err(s),
            Err(_) => return Err(0xee),
        }
        at += u64::from(count);
    }
    Ok(())
}

fn inside(lba: u64, (first, n): (u64, u64)) -> bool {
    lba >= first && lba < first + n
}

pub fn check_blkdiscard(d: &mut Details) -> Status {
    let seed = match seed() {
        Ok(s) => s,
        Err(e) => {
            let _ = d.write_str(e);
            return Status::Fail;
        }
    };
    let mut n = 0;
    let mut failed = false;
    let mut body = Details::new();
    for t in block_devices() {
        let _ = write!(body, " dev{n}:");
        n += 1;
        if one_device(t, seed, &mut body).is_err() {
            failed = true;
        }
        t.write(reg::STATUS, 0);
    }
    if n == 0 {
        let _ = d.write_str("no virtio-blk device on the command line");
        return Status::Skip;
    }
    report(d, n, seed, failed, &body)
}

fn one_device(t: crate::virtio::Transport, seed: u64, d: &mut Details) -> Result<(), ()> {
    let mut b = match Blk::open_with(t, QUEUE_MAX, F_DISCARD | F_WRITE_ZEROES) {
        Ok(b) => b,
        Err(e) => {
            let _ = write!(d, "open_error=\"{e}\"");
            return Err(());
        }
    };
    let offered = b.features & (F_DISCARD | F_WRITE_ZEROES);
    if b.read_only() {
        let _ = write!(d, "cap={},ro=1,dwz_offered={}", b.cap, (offered != 0) as u8);
        return Ok(());
    }
    let _ = write!(d, "cap={},ro=0", b.cap);
    if offered != F_DISCARD | F_WRITE_ZEROES {
        let _ = write!(
            d,
            ",error=\"DISCARD offered {}, WRITE_ZEROES offered {}\"",
            (b.features & F_DISCARD != 0) as u8,
            (b.features & F_WRITE_ZEROES != 0) as u8
        );
        return Err(());
    }
    if b.cap < MIN_SECTORS {
        let _ = write!(d, ",error=\"disk smaller than {MIN_SECTORS} sectors\"");
        return Err(());
    }
    let l = limits(&b);
    let _ = write!(
        d,
        ",max_discard={},discard_seg={},discard_align={},max_wz={},wz_seg={},may_unmap={}",
        l.max_discard, l.discard_seg, l.discard_align, l.max_wz, l.wz_seg, l.may_unmap
    );

    if let Err(e) = b.stream(T_OUT, seed, SLOTS, |_, _| Ok(())) {
        let _ = d.write_str(",error=\"");
        err2_text(d, "write", e);
        let _ = d.write_str("\"");
        return Err(());
    }

    // The requests that must succeed.
    let good = [
        ("zero", T_WRITE_ZEROES, ZERO, l.max_wz, 0),
        (
            "zero_unmap",
            T_WRITE_ZEROES,
            ZERO_UNMAP,
            l.max_wz,
            FLAG_UNMAP,
        ),
        ("discard", T_DISCARD, DISCARD, l.max_discard, 0),
    ];
    for (what, typ, range, max, flags) in good {
        if let Err(s) = cover(&mut b, typ, range, max, flags) {
            let _ = write!(d, ",error=\"{what}: status {s}, expected OK\"");
            return Err(());
        }
    }
    let pair = l.discard_seg >= 2;
    if pair {
        let ranges = DISCARD_PAIR.map(|(s, n)| (s, n as u32, 0));
        match send(&mut b, T_DISCARD, &ranges) {
            Ok(S_OK) => {}
            Ok(s) => {
                let _ = write!(d, ",error=\"two-range discard: status {s}, expected OK\"");
                return Err(());
            }
            Err(e) => {
                let _ = write!(d, ",error=\"two-range discard: {e}\"");
                return Err(());
            }
        }
    }
    let _ = write!(d, ",discard_pair={}", pair as u8);

    // The requests that must be refused, aimed at patterned sectors.
    let cap = b.cap;
    // (what, request type, (sector, sectors, flags), expected status); "" = left out.
    type Bad<'a> = (&'a str, u32, (u64, u32, u32), u8);
    let mut bad: [Bad; 7] = [
        (
            "discard with UNMAP",
            T_DISCARD,
            (100, 1, FLAG_UNMAP),
            S_UNSUPP,
        ),
        ("unknown flag", T_WRITE_ZEROES, (100, 1, 2), S_UNSUPP),
        ("zeroes at capacity", T_WRITE_ZEROES, (cap, 1, 0), S_IOERR),
        (
            "discard across the end",
            T_DISCARD,
            (cap - 1, 2, 0),
            S_IOERR,
        ),
        (
            "zeroes at 2^64-1",
            T_WRITE_ZEROES,
            (u64::MAX, 1, 0),
            S_IOERR,
        ),
        (
            "zeroes over max_wz",
            T_WRITE_ZEROES,
            (0, l.max_wz.wrapping_add(1), 0),
            S_IOERR,
        ),
        (
            "discard over max",
            T_DISCARD,
            (0, l.max_discard.wrapping_add(1), 0),
            S_IOERR,
        ),
    ];
    // A maximum of 2^32-1 sectors cannot be exceeded in one range.
    if l.max_wz == u32::MAX {
        bad[5].0 = "";
    }
    if l.max_discard == u32::MAX {
        bad[6].0 = "";
    }
    for (what, typ, range, want) in bad {
        if what.is_empty() {
            continue;
        }
        match send(&mut b, typ, &[range]) {
            Ok(s) if s == want => {}
            Ok(s) => {
                let _ = write!(d, ",error=\"{what}: status {s}, expected {want}\"");
                return Err(());
            }
            Err(e) => {
                let _ = write!(d, ",error=\"{what}: {e}\"");
                return Err(());
            }
        }
    }
    let _ = d.write_str(",refused=ok");

    // Read back everything.
    let mut discarded_zero = 0u64;
    let r = b.stream(T_IN, seed, SLOTS, |lba, w| {
        for (s, sector) in w.chunks(64).enumerate() {
            let lba = lba + s as u64;
            let zero = sector.iter().all(|&x| x == 0);
            let pattern = sector
                .iter()
                .enumerate()
                .all(|(i, &x)| x == pattern_word(seed, lba, i as u64));
            let discarded =
                inside(lba, DISCARD) || (pair && DISCARD_PAIR.iter().any(|&r| inside(lba, r)));
            if inside(lba, ZERO) || inside(lba, ZERO_UNMAP) {
                if !zero {
                    return Err(lba);
                }
            } else if discarded {
                if zero {
                    discarded_zero += 1;
                } else if !pattern {
                    return Err(lba);
                }
            } else if !pattern {
                return Err(lba);
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        let _ = d.write_str(",error=\"");
        err2_text(d, "read back", e);
        let _ = d.write_str("\"");
        return Err(());
    }
    let _ = write!(
        d,
        ",verified={},discarded_zero={discarded_zero}",
        mib(b.cap)
    );
    flush(&mut b, d)
}
