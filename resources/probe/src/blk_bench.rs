//! `blkbench`: I/O rates of the first virtio-blk device, timed with the TSC.
//!
//! Six phases of `probe.bench_ms` (default 2000) each, in this order:
//! 4 KiB random reads at queue depth 1 and 32, 4 KiB random writes at queue
//! depth 1 and 32, then 1 MiB sequential reads and writes ([`SEQ_DEPTH`]
//! requests in flight, from LBA 0 on, wrapping at the end of the disk).
//! Random offsets are 4 KiB aligned over the whole disk (xorshift64, fixed
//! seed). Each phase keeps its queue full until the time is up, then drains
//! it; the rate is completed requests over the TSC time from the first
//! submission to the last completion. Writes carry whatever is in the
//! buffers (the disk is scratch): a writable disk is required. No FLUSH is
//! issued while timing; one FLUSH (if offered) ends the check.
//!
//! Requests go through [`Blk`] (the `blk` driver's queue and request code),
//! on a ring of up to 128 entries: a 4 KiB request takes 3 descriptors
//! (header, data, status), a 1 MiB one 10 (eight 128 KiB data segments
//! pointing into the driver's 512 KiB of request buffers; for a benchmark
//! the data may alias).

use crate::checks::{key_num, Status};
use crate::cpu::{peek, rdtsc};
use crate::sync::Global;
use crate::time;
use crate::virtio::reg;
use crate::virtio_blk::{
    block_devices, data_addr, Blk, Details, DESC_ROOM, F_FLUSH, F_SEG_MAX, F_SIZE_MAX, HDR_SLOTS,
    REQ_TIMEOUT_US, SECTOR, SLOTS, SLOT_BYTES, S_OK, T_FLUSH, T_IN, T_OUT,
};
use core::fmt::Write;

/// Requests in flight for the sequential phases.
pub const SEQ_DEPTH: usize = 4;
const SMALL: u32 = 4096;
const LARGE: u32 = 1 << 20;
/// Data segments of a large request (SLOT_BYTES each).
const LARGE_SEGS: usize = LARGE as usize / SLOT_BYTES;
const _: () = assert!(LARGE_SEGS * SLOT_BYTES == LARGE as usize && LARGE_SEGS <= 16);
const _: () = assert!(32 * SMALL as usize <= SLOT_BYTES);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

struct Phase {
    typ: u32,
    bytes: u32,
    depth: usize,
    pat: Pattern,
}

/// Completed requests and TSC ticks of one phase.
struct Result1 {
    ops: u64,
    ticks: u64,
}

fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    x
}

/// One contiguous buffer for a large request in a single data descriptor
/// (a device that does not offer VIRTIO_BLK_F_SEG_MAX: see [`run_all`]).
#[repr(C, align(4096))]
struct OneSeg([u8; LARGE as usize]);
static ONE_SEG: Global<OneSeg> = Global::new(OneSeg([0; LARGE as usize]));

/// Data segments of a request in `slot`: small requests get their own
/// 4 KiB piece of the first buffer; large ones span all buffers (8 segments
/// of 128 KiB), or, when `single`, the one 1 MiB buffer. The data is
/// scratch: requests in flight may share buffers.
fn segments(slot: usize, bytes: u32, single: bool, out: &mut [(u64, u32); LARGE_SEGS]) -> usize {
    if bytes <= SMALL {
        out[0] = (data_addr(0) + (slot as u64) * SMALL as u64, bytes);
        return 1;
    }
    if single {
        out[0] = (ONE_SEG.get() as *const OneSeg as u64, bytes.min(LARGE));
        return 1;
    }
    let n = (bytes as usize).div_ceil(SLOT_BYTES).min(LARGE_SEGS);
    for (i, seg) in out.iter_mut().enumerate().take(n) {
        let off = i * SLOT_BYTES;
        *seg = (
            data_addr(i % SLOTS),
            (bytes as usize - off).min(SLOT_BYTES) as u32,
        );
    }
    n
}

fn run_phase(
    b: &mut Blk,
    p: &Phase,
    single: bool,
    ms: u64,
    seed: &mut u64,
) -> Result<Result1, &'static str> {
    let sectors = p.bytes as u64 / SECTOR;
    let units = b.cap / sectors;
    if units == 0 {
        return Err("disk smaller than one request");
    }
    let mut segs = [(0u64, 0u32); LARGE_SEGS];
    let per = segments(0, p.bytes, single, &mut segs) as u16 + 2;
    if p.depth * per as usize > b.size as usize || p.depth > HDR_SLOTS {
        return Err("ring too small for this queue depth");
    }
    let mut seq_next = 0u64;
    let mut next_lba = |seed: &mut u64| match p.pat {
        Pattern::Random => (xorshift(seed) % units) * sectors,
        Pattern::Sequential => {
            let l = (seq_next % units) * sectors;
            seq_next += 1;
            l
        }
    };
    let t0 = rdtsc();
    let end = t0.saturating_add(time::us_to_tsc(ms * 1000));
    let mut submit = |b: &mut Blk, slot: usize, seed: &mut u64| {
        let n = segments(slot, p.bytes, single, &mut segs);
        let lba = next_lba(seed);
        let head = b.build_chain(per * slot as u16, slot, p.typ, lba, &segs[..n]);
        b.publish(head);
    };
    for slot in 0..p.depth {
        submit(b, slot, seed);
    }
    let mut inflight = p.depth;
    let mut ops = 0u64;
    while inflight > 0 {
        let Some((id, _)) = b.wait(REQ_TIMEOUT_US) else {
            return Err("no completion within 5 s");
        };
        let slot = id as usize / per as usize;
        if id % per as u32 != 0 || slot >= p.depth {
            return Err("used ring returned an unknown id");
        }
        if peek::<u8>(crate::virtio_blk::status_addr(slot)) != S_OK {
            return Err("a request did not complete with OK");
        }
        ops += 1;
        if rdtsc() < end {
            submit(b, slot, seed);
        } else {
            inflight -= 1;
        }
    }
    Ok(Result1 {
        ops,
        ticks: rdtsc().wrapping_sub(t0).max(1),
    })
}

/// Events per second (x100, for two decimals).
fn per_sec_x100(n: u128, ticks: u64) -> u64 {
    let khz = time::khz().max(1) as u128;
    (n * khz * 1000 * 100 / ticks as u128) as u64
}

fn dec2(d: &mut Details, v: u64) {
    let _ = write!(d, "{}.{:02}", v / 100, v % 100);
}

pub fn check_blkbench(d: &mut Details) -> Status {
    let ms = match key_num(b"probe.bench_ms", 2000, 1, 600_000) {
        Ok(v) => v,
        Err(e) => {
            let _ = write!(d, "probe.bench_ms: {e};");
            return Status::Fail;
        }
    };
    let Some(t) = block_devices().next() else {
        let _ = d.write_str("no virtio-blk device on the command line");
        return Status::Skip;
    };
    let mut b = match Blk::open(t, DESC_ROOM) {
        Ok(b) => b,
        Err(e) => {
            let _ = write!(d, "open: {e};");
            return Status::Fail;
        }
    };
    let st = run_all(&mut b, ms, d);
    b.reset();
    st
}

fn run_all(b: &mut Blk, ms: u64, d: &mut Details) -> Status {
    if b.read_only() {
        let _ = d.write_str("the first virtio-blk device is read-only;");
        return Status::Fail;
    }
    // A large request is 8 segments of 128 KiB when the device allows that
    // (seg_max >= 8, size_max >= 128 KiB), else one segment of 1 MiB. A
    // device that does not offer VIRTIO_BLK_F_SEG_MAX states no limit, and
    // virtio 1.2 (2.7.4, Message Framing) says it must not assume an
    // arrangement of descriptors; Linux's driver still sends one data segment
    // per request then (sg_elems = 1), and so does this: Firecracker offers
    // neither SEG_MAX nor SIZE_MAX and takes exactly one data descriptor.
    let seg_max = if b.features & F_SEG_MAX != 0 {
        b.t.read(reg::CONFIG + 12)
    } else {
        1
    };
    let size_max = if b.features & F_SIZE_MAX != 0 {
        b.t.read(reg::CONFIG + 8)
    } else {
        u32::MAX
    };
    let single = if seg_max >= LARGE_SEGS as u32 && size_max >= SLOT_BYTES as u32 {
        false
    } else if size_max >= LARGE {
        true
    } else {
        let _ = write!(
            d,
            "seg_max {seg_max} and size_max {size_max} allow no {LARGE}-byte request;"
        );
        return Status::Fail;
    };
    let phases: [(&str, Phase); 6] = [
        ("qd1_randread_iops", phase(T_IN, SMALL, 1, Pattern::Random)),
        (
            "qd32_randread_iops",
            phase(T_IN, SMALL, 32, Pattern::Random),
        ),
        (
            "qd1_randwrite_iops",
            phase(T_OUT, SMALL, 1, Pattern::Random),
        ),
        (
            "qd32_randwrite_iops",
            phase(T_OUT, SMALL, 32, Pattern::Random),
        ),
        (
            "seq_read_mibs",
            phase(T_IN, LARGE, SEQ_DEPTH, Pattern::Sequential),
        ),
        (
            "seq_write_mibs",
            phase(T_OUT, LARGE, SEQ_DEPTH, Pattern::Sequential),
        ),
    ];
    let mut seed = 0x0b1c_be4c_u64;
    let mut out = Details::new();
    let mut ops_line = Details::new();
    for (name, p) in &phases {
        match run_phase(b, p, single, ms, &mut seed) {
            Ok(r) => {
                let _ = write!(out, "{name}=");
                let v = if p.pat == Pattern::Sequential {
                    per_sec_x100(r.ops as u128 * p.bytes as u128, r.ticks) / (1 << 20)
                } else {
                    per_sec_x100(r.ops as u128, r.ticks)
                };
                dec2(&mut out, v);
                let _ = out.write_str(" ");
                let short = name.rsplit_once('_').map_or(*name, |(a, _)| a);
                let _ = write!(
                    ops_line,
                    " {short}_ops={} {short}_us={}",
                    r.ops,
                    time::tsc_to_us(r.ticks)
                );
            }
            Err(e) => {
                let _ = write!(d, "{name}: {e}; ");
                let _ = d.write_str(core::str::from_utf8(out.as_bytes()).unwrap_or(""));
                return Status::Fail;
            }
        }
    }
    let flush = if b.features & F_FLUSH == 0 {
        "not-offered"
    } else {
        match b.request(T_FLUSH, 0, 0, 0) {
            Ok((S_OK, _)) => "ok",
            _ => {
                let _ = d.write_str("final FLUSH failed; ");
                let _ = d.write_str(core::str::from_utf8(out.as_bytes()).unwrap_or(""));
                return Status::Fail;
            }
        }
    };
    let _ = d.write_str(core::str::from_utf8(out.as_bytes()).unwrap_or(""));
    let _ = write!(
        d,
        "bench_ms={ms} cap_mib={} queue={} seq_qd={SEQ_DEPTH} seq_segs={} flush={flush} tsc_khz={}",
        (b.cap * SECTOR) >> 20,
        b.size,
        if single { 1 } else { LARGE_SEGS },
        time::khz()
    );
    let _ = d.write_str(core::str::from_utf8(ops_line.as_bytes()).unwrap_or(""));
    Status::Ok
}

fn phase(typ: u32, bytes: u32, depth: usize, pat: Pattern) -> Phase {
    Phase {
        typ,
        bytes,
        depth,
        pat,
    }
}
