//! `blkhostile`: the probe as a hostile virtio-blk driver. Each case starts
//! from a freshly reset device, submits one malformed request (most of them
//! a write of bytes that differ from the disk's to the target sectors) or
//! abuses a register, and records what came back within 200 ms: a status
//! byte (`s0` OK, `s1` IOERR, `s2` UNSUPP), `drop` (a used entry but the
//! status byte untouched) or `none` (no used entry), plus `+nr` when the
//! device then shows DEVICE_NEEDS_RESET. After each case the device is
//! reset and renegotiated and must serve a normal read of the target
//! sectors, whose content must be what it was before the case.

use crate::bootinfo::{self, E820_RAM};
use crate::checks::Status;
use crate::cmdline;
use crate::cpu::{peek, poke};
use crate::virtio::reg;
use crate::virtio::Transport;
use crate::virtio_blk::{
    self as blk, data, data_addr, hdr_addr, status_addr, Blk, Details, DESC_NEXT, DESC_WRITE,
    NEEDS_RESET, S_OK, S_UNSUPP, S_UNTOUCHED, T_IN, T_OUT,
};
use core::fmt::Write;

/// Ring size for the hostile cases (small, so "longer than the queue" and
/// "index >= queue size" are cheap to build inside the descriptor room).
const QS: u16 = 16;
/// Target sectors of the hostile writes.
const TARGET: u64 = 64;
const TARGET_SECTORS: u64 = 16;
const TARGET_BYTES: u32 = (TARGET_SECTORS * 512) as u32;
const WORDS: usize = TARGET_BYTES as usize / 8;
/// Wait for a (possibly never coming) completion.
const CASE_WAIT_US: u64 = 200_000;
const OUTSIDE: u64 = 0xffff_0000_0000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The status byte the device wrote.
    Status(u8),
    /// Used entry, status byte untouched.
    Drop,
    /// No used entry within the wait.
    None,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// An error status (not OK), a drop or no completion.
    Error,
    /// UNSUPP, a drop or no completion.
    Unsupp,
    /// Register abuse: the following normal read may succeed (the device
    /// ignored the write) or fail (it gave up): anything but wrong data.
    Any,
}

type Case = fn(&mut Blk, &Ctx) -> Outcome;

struct Ctx {
    ram_end: u64,
}

const CASES: &[(&str, Expect, Case)] = &[
    ("loop", Expect::Error, case_loop),
    ("selfloop", Expect::Error, case_selfloop),
    ("long_chain", Expect::Error, case_long_chain),
    ("next_oob", Expect::Error, case_next_oob),
    ("head_oob", Expect::Error, case_head_oob),
    ("avail_idx", Expect::Any, case_avail_idx),
    ("data_outside", Expect::Error, case_data_outside),
    ("data_past_ram", Expect::Error, case_data_past_ram),
    ("in_past_ram", Expect::Error, case_in_past_ram),
    ("status_outside", Expect::Error, case_status_outside),
    ("zero_hdr", Expect::Error, case_zero_hdr),
    ("zero_status", Expect::Error, case_zero_status),
    ("huge_len", Expect::Error, case_huge_len),
    ("ro_status", Expect::Error, case_ro_status),
    ("short_hdr", Expect::Error, case_short_hdr),
    ("unknown_type", Expect::Unsupp, case_unknown_type),
    ("cfg_write", Expect::Any, case_cfg_write),
    ("late_qnum", Expect::Any, case_late_qnum),
    ("late_qdesc", Expect::Any, case_late_qdesc),
    ("late_features", Expect::Any, case_late_features),
    ("bad_qsel", Expect::Any, case_bad_qsel),
];

fn evil_addr() -> u64 {
    data_addr(0)
}

/// Waits for the completion of `head`'s request in slot 0.
fn outcome(b: &mut Blk) -> Outcome {
    match b.wait(CASE_WAIT_US) {
        None => Outcome::None,
        Some(_) => match peek::<u8>(status_addr(0)) {
            S_UNTOUCHED => Outcome::Drop,
            s => Outcome::Status(s),
        },
    }
}

/// Header (OUT to the target) at descriptor `i` -> `next`.
fn hdr_desc(b: &Blk, i: u16, len: u32, typ: u32, next: u16) {
    b.set_header(0, typ, TARGET);
    b.set_desc(i, hdr_addr(0), len, DESC_NEXT, next);
}

fn status_desc(b: &Blk, i: u16) {
    b.set_desc(i, status_addr(0), 1, DESC_WRITE, 0);
}

/// A well-formed OUT of the evil bytes to the target at descriptors i..i+2.
fn good_out(b: &Blk, i: u16) {
    hdr_desc(b, i, 16, T_OUT, i + 1);
    b.set_desc(i + 1, evil_addr(), TARGET_BYTES, DESC_NEXT, i + 2);
    status_desc(b, i + 2);
}

fn case_loop(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, T_OUT, 1);
    b.set_desc(1, evil_addr(), 4096, DESC_NEXT, 2);
    b.set_desc(2, evil_addr() + 4096, 4096, DESC_NEXT, 1);
    b.publish(0);
    outcome(b)
}

fn case_selfloop(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, T_OUT, 1);
    b.set_desc(1, evil_addr(), 512, DESC_NEXT, 1);
    b.publish(0);
    outcome(b)
}

/// Every descriptor of the queue chained, the last pointing on to index QS
/// (a well-formed status descriptor in the room past the queue): QS+1
/// descriptors, longer than the queue.
fn case_long_chain(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, T_OUT, 1);
    for i in 1..QS {
        b.set_desc(i, evil_addr() + 512 * (i as u64 - 1), 512, DESC_NEXT, i + 1);
    }
    status_desc(b, QS);
    b.publish(0);
    outcome(b)
}

fn case_next_oob(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, T_OUT, QS + 2);
    b.set_desc(QS + 2, evil_addr(), TARGET_BYTES, DESC_NEXT, QS + 3);
    status_desc(b, QS + 3);
    b.publish(0);
    outcome(b)
}

fn case_head_oob(b: &mut Blk, _: &Ctx) -> Outcome {
    good_out(b, QS + 4);
    b.publish(QS + 4);
    outcome(b)
}

/// The avail index jumps QS+3 entries ahead; every ring entry names a
/// well-formed read (QEMU serves up to QS of them before it gives up,
/// cinder none: both are fine).
fn case_avail_idx(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, T_IN, 1);
    b.set_desc(1, data_addr(2), TARGET_BYTES, DESC_NEXT | DESC_WRITE, 2);
    status_desc(b, 2);
    for s in 0..QS as u64 {
        poke::<u16>(blk::avail_base() + 4 + 2 * s, 0);
    }
    b.publish_idx(b.next_avail.wrapping_add(QS + 3));
    outcome(b)
}

fn out_with_data(b: &mut Blk, addr: u64, len: u32, typ: u32) -> Outcome {
    hdr_desc(b, 0, 16, typ, 1);
    let w = if typ == T_IN { DESC_WRITE } else { 0 };
    b.set_desc(1, addr, len, DESC_NEXT | w, 2);
    status_desc(b, 2);
    b.publish(0);
    outcome(b)
}

fn case_data_outside(b: &mut Blk, _: &Ctx) -> Outcome {
    out_with_data(b, OUTSIDE, TARGET_BYTES, T_OUT)
}

/// Straddles the end of RAM.
fn case_data_past_ram(b: &mut Blk, c: &Ctx) -> Outcome {
    out_with_data(b, c.ram_end - 2048, 4096, T_OUT)
}

fn case_in_past_ram(b: &mut Blk, c: &Ctx) -> Outcome {
    out_with_data(b, c.ram_end, 4096, T_IN)
}

fn case_status_outside(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, T_OUT, 1);
    b.set_desc(1, evil_addr(), TARGET_BYTES, DESC_NEXT, 2);
    b.set_desc(2, OUTSIDE, 1, DESC_WRITE, 0);
    b.publish(0);
    outcome(b)
}

fn case_zero_hdr(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 0, T_OUT, 1);
    b.set_desc(1, evil_addr(), TARGET_BYTES, DESC_NEXT, 2);
    status_desc(b, 2);
    b.publish(0);
    outcome(b)
}

fn case_zero_status(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, T_OUT, 1);
    b.set_desc(1, evil_addr(), TARGET_BYTES, DESC_NEXT, 2);
    b.set_desc(2, status_addr(0), 0, DESC_WRITE, 0);
    b.publish(0);
    outcome(b)
}

fn case_huge_len(b: &mut Blk, _: &Ctx) -> Outcome {
    out_with_data(b, evil_addr(), u32::MAX, T_OUT)
}

fn case_ro_status(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, T_OUT, 1);
    b.set_desc(1, evil_addr(), TARGET_BYTES, DESC_NEXT, 2);
    b.set_desc(2, status_addr(0), 1, 0, 0);
    b.publish(0);
    outcome(b)
}

fn case_short_hdr(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 8, T_OUT, 1);
    b.set_desc(1, evil_addr(), TARGET_BYTES, DESC_NEXT, 2);
    status_desc(b, 2);
    b.publish(0);
    outcome(b)
}

fn case_unknown_type(b: &mut Blk, _: &Ctx) -> Outcome {
    hdr_desc(b, 0, 16, 0x7fff_0001, 1);
    status_desc(b, 1);
    b.publish(0);
    outcome(b)
}

/// A normal read of the target on the live queue after a register abuse:
/// OK only with the right data.
fn read_after(b: &mut Blk) -> Outcome {
    let dst = data_addr(1);
    hdr_desc(b, 0, 16, T_IN, 1);
    b.set_desc(1, dst, TARGET_BYTES, DESC_NEXT | DESC_WRITE, 2);
    status_desc(b, 2);
    for w in data(1)[..WORDS].iter_mut() {
        *w = 0;
    }
    b.publish(0);
    match outcome(b) {
        Outcome::Status(S_OK) if data(1)[..WORDS] != data(3)[..WORDS] => Outcome::Status(0xbd),
        o => o,
    }
}

fn case_cfg_write(b: &mut Blk, _: &Ctx) -> Outcome {
    let cap = b.capacity();
    for off in [0u64, 4, 8, 0x14] {
        b.t.write(reg::CONFIG + off, 0xdead_beef);
    }
    if b.capacity() != cap {
        return Outcome::Status(0xca); // reported as s202: capacity changed
    }
    read_after(b)
}

fn case_late_qnum(b: &mut Blk, _: &Ctx) -> Outcome {
    b.t.write(reg::QUEUE_SEL, 0);
    b.t.write(reg::QUEUE_NUM, (QS / 2) as u32);
    read_after(b)
}

fn case_late_qdesc(b: &mut Blk, _: &Ctx) -> Outcome {
    b.t.write(reg::QUEUE_SEL, 0);
    b.t.write(reg::QUEUE_DESC, OUTSIDE as u32);
    b.t.write(reg::QUEUE_DESC + 4, (OUTSIDE >> 32) as u32);
    read_after(b)
}

fn case_late_features(b: &mut Blk, _: &Ctx) -> Outcome {
    for sel in 0..2 {
        b.t.write(reg::DRIVER_FEATURES_SEL, sel);
        b.t.write(reg::DRIVER_FEATURES, u32::MAX);
    }
    read_after(b)
}

fn case_bad_qsel(b: &mut Blk, _: &Ctx) -> Outcome {
    b.t.write(reg::QUEUE_SEL, 7);
    b.t.write(reg::QUEUE_NUM, 8);
    b.t.write(reg::QUEUE_READY, 1);
    b.t.write(reg::QUEUE_NOTIFY, 7);
    b.t.write(reg::QUEUE_SEL, 0);
    read_after(b)
}

/// Reset, open, read the target into slot 1. Err(text) if the device does
/// not serve it.
fn fresh_read(t: Transport) -> Result<Blk, &'static str> {
    let mut b = Blk::open(t, QS)?;
    for w in data(1)[..WORDS].iter_mut() {
        *w = 0;
    }
    match b.request(T_IN, TARGET, data_addr(1), TARGET_BYTES) {
        Ok((S_OK, _)) => Ok(b),
        Ok(_) => Err("normal read did not return OK"),
        Err(e) => Err(e),
    }
}

fn outcome_str(d: &mut Details, o: Outcome) {
    let _ = match o {
        Outcome::Status(s) => write!(d, "s{s}"),
        Outcome::Drop => write!(d, "drop"),
        Outcome::None => write!(d, "none"),
    };
}

pub fn check_blkhostile(d: &mut Details) -> Status {
    // Prefer a writable device (so "nothing reached the disk" means more).
    let mut dev = None;
    for t in blk::block_devices() {
        let ro = t.device_features() & blk::F_RO != 0;
        if dev.is_none() || (!ro && dev.is_some_and(|(_, r)| r)) {
            dev = Some((t, ro));
        }
    }
    let Some((t, ro)) = dev else {
        let _ = d.write_str("no virtio-blk device on the command line");
        return Status::Skip;
    };
    let ram_end = bootinfo::get()
        .mem()
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .map(|e| e.end())
        .max()
        .unwrap_or(0);
    let ctx = Ctx { ram_end };
    // The target's content before anything: slot 3.
    let b = match fresh_read(t) {
        Ok(b) => b,
        Err(e) => {
            let _ = write!(d, "first read: {e}");
            t.write(reg::STATUS, 0);
            return Status::Fail;
        }
    };
    if b.cap < TARGET + TARGET_SECTORS {
        let _ = write!(d, "disk of {} sectors is too small", b.cap);
        b.reset();
        return Status::Fail;
    }
    let (d3, d1) = (data(3), data(1));
    d3[..WORDS].copy_from_slice(&d1[..WORDS]);
    for (i, w) in data(0)[..WORDS].iter_mut().enumerate() {
        *w = d3[i] ^ 0xa5a5_a5a5_a5a5_a5a5;
    }
    let mut body = Details::new();
    let mut bad = 0;
    let mut wrote = 0;
    let mut dead: Option<&str> = None;
    let mut b = b;
    let skip = cmdline::get(bootinfo::get().cmdline(), b"probe.blkhostile_skip").unwrap_or(b"");
    let mut skipped = 0;
    for &(name, expect, case) in CASES {
        if skip.split(|&c| c == b',').any(|s| s == name.as_bytes()) {
            skipped += 1;
            continue;
        }
        let o = case(&mut b, &ctx);
        let nr = b.t.read(reg::STATUS) & NEEDS_RESET != 0;
        let _ = write!(body, " {name}=");
        outcome_str(&mut body, o);
        if nr {
            let _ = body.write_str("+nr");
        }
        let acceptable = match (expect, o) {
            (_, Outcome::Drop | Outcome::None) => true,
            (Expect::Error, Outcome::Status(s)) => s != S_OK && s != 0xbd,
            (Expect::Unsupp, Outcome::Status(s)) => s == S_UNSUPP,
            (Expect::Any, Outcome::Status(s)) => s != 0xbd && s != 0xca,
        };
        if !acceptable {
            bad += 1;
            let _ = body.write_str("!");
        }
        b.reset();
        match fresh_read(t) {
            Ok(nb) => b = nb,
            Err(e) => {
                dead = Some(e);
                let _ = write!(body, " after_{name}=\"{e}\"");
                break;
            }
        }
        if data(1)[..WORDS] != data(3)[..WORDS] {
            wrote += 1;
            let _ = write!(body, " {name}_wrote_disk");
            // Restore the target for the next cases.
            data(2)[..WORDS].copy_from_slice(&data(3)[..WORDS]);
            let _ = b.request(T_OUT, TARGET, data_addr(2), TARGET_BYTES);
        }
    }
    b.reset();
    let status = if let Some(e) = dead {
        let _ = write!(d, "device stopped serving reads: {e};");
        Status::Fail
    } else if bad > 0 || wrote > 0 {
        let _ = write!(
            d,
            "{bad} cases answered OK (or wrong data), {wrote} wrote to the disk;"
        );
        Status::Fail
    } else {
        Status::Ok
    };
    let _ = write!(
        d,
        " dev={:#x} ro={} cases={} skipped={} target={}+{}",
        t.dev.addr,
        ro as u8,
        CASES.len() - skipped,
        skipped,
        TARGET,
        TARGET_SECTORS
    );
    let _ = d.write_str(core::str::from_utf8(body.as_bytes()).unwrap_or(""));
    status
}
