//! virtio-rng driver (device id 4): one request for a few random bytes,
//! completion by polling the used ring. Exercises the virtqueue core.

use crate::time;
use crate::virtio::{Buf, Transport};

/// Reads up to `want` bytes (at most 64). Returns how many the device gave.
pub fn read(t: &Transport, want: u32) -> Result<u32, &'static str> {
    t.init(0)?;
    let mut q = t.setup_queue(0, 8)?;
    t.driver_ok();
    let want = want.clamp(1, 64);
    let buf = crate::virtio::dma_alloc(want as u64, 8).ok_or("out of buffer memory")?;
    q.submit(&[Buf {
        addr: buf,
        len: want,
        write: true,
    }])?;
    let dl = time::deadline(1_000_000);
    let res = loop {
        if let Some((_, len)) = q.poll() {
            break Ok(len);
        }
        if time::passed(dl) {
            break Err("no used-ring entry within 1 s");
        }
        core::hint::spin_loop();
    };
    t.write(crate::virtio::reg::STATUS, 0); // reset: stop using our memory
    match res {
        Ok(len) if len > want => Err("device reported more bytes than the buffer holds"),
        r => r,
    }
}

/// Bytes each of the `rng` check's two reads collects.
const CHECK_BYTES: usize = 4096;
/// Most requests one read may take (a device may fill buffers partly).
const MAX_REQUESTS: u32 = 64;

#[repr(C, align(4096))]
struct RngBufs([[u8; CHECK_BYTES]; 2]);

static BUFS: crate::sync::Global<RngBufs> =
    crate::sync::Global::new(RngBufs([[0; CHECK_BYTES]; 2]));

fn buf_addr(i: usize) -> u64 {
    BUFS.get().0[i].as_ptr() as u64
}

fn buf_byte(i: usize, off: usize) -> u8 {
    crate::cpu::peek(buf_addr(i) + off as u64)
}

/// Fills buffer `i` completely through the queue (several requests if the
/// device fills partly). Returns the number of requests.
fn fill(q: &mut crate::virtio::Virtqueue, i: usize) -> Result<u32, &'static str> {
    let mut got = 0usize;
    let mut requests = 0;
    while got < CHECK_BYTES {
        if requests == MAX_REQUESTS {
            return Err("device returned too few bytes in 64 requests");
        }
        requests += 1;
        let want = (CHECK_BYTES - got) as u32;
        q.submit(&[Buf {
            addr: buf_addr(i) + got as u64,
            len: want,
            write: true,
        }])?;
        let dl = time::deadline(2_000_000);
        let len = loop {
            if let Some((_, len)) = q.poll() {
                break len;
            }
            if time::passed(dl) {
                return Err("no used-ring entry within 2 s");
            }
            core::hint::spin_loop();
        };
        if len > want {
            return Err("device reported more bytes than the buffer holds");
        }
        got += len as usize;
    }
    Ok(requests)
}

fn hex(d: &mut crate::checks::Details, i: usize) {
    use core::fmt::Write;
    for off in 0..16 {
        let _ = write!(d, "{:02x}", buf_byte(i, off));
    }
}

/// `rng`: on the first virtio-rng device, two reads of 4 KiB each. FAILs if
/// a read's bytes are all equal or both reads are identical. Reports the
/// bytes, the requests used and a hex prefix of each read (`hex1`, `hex2`)
/// so the harness can compare runs.
pub fn check_rng(d: &mut crate::checks::Details) -> crate::checks::Status {
    use crate::checks::Status;
    use core::fmt::Write;
    let dev = crate::virtio::devices(crate::bootinfo::get().cmdline())
        .flatten()
        .filter(|t| t.dev.addr.saturating_add(0x200) <= crate::paging::mapped_limit())
        .find(|t| t.magic() == crate::virtio::MAGIC && t.version() == 2 && t.device_id() == 4);
    let Some(t) = dev else {
        let _ = d.write_str("no version-2 virtio-rng device on the command line");
        return Status::Skip;
    };
    let res = (|| {
        t.init(0)?;
        let mut q = t.setup_queue(0, 8)?;
        t.driver_ok();
        let r1 = fill(&mut q, 0)?;
        let r2 = fill(&mut q, 1)?;
        Ok::<_, &'static str>(r1 + r2)
    })();
    t.write(crate::virtio::reg::STATUS, 0);
    let requests = match res {
        Ok(n) => n,
        Err(e) => {
            let _ = write!(d, "{e}; addr={:#x}", t.dev.addr);
            return Status::Fail;
        }
    };
    let all_equal = |i| (1..CHECK_BYTES).all(|o| buf_byte(i, o) == buf_byte(i, 0));
    let identical = (0..CHECK_BYTES).all(|o| buf_byte(0, o) == buf_byte(1, o));
    let differ = (0..CHECK_BYTES)
        .filter(|&o| buf_byte(0, o) != buf_byte(1, o))
        .count();
    let status = if all_equal(0) || all_equal(1) {
        let _ = d.write_str("a read returned one repeated byte;");
        Status::Fail
    } else if identical {
        let _ = d.write_str("both reads returned the same bytes;");
        Status::Fail
    } else {
        Status::Ok
    };
    let _ = write!(
        d,
        " addr={:#x} bytes={} reads=2 requests={requests} differ={differ} hex1=",
        t.dev.addr,
        2 * CHECK_BYTES
    );
    hex(d, 0);
    let _ = d.write_str(" hex2=");
    hex(d, 1);
    status
}

/// `rngbench`: what the first virtio-rng device lets through, timed with the TSC (for its
/// rate limiter). For `probe.bench_ms` (default 3000) it keeps one request of `probe.rng_req`
/// bytes (default 4096, 1..=4096) in flight, waiting up to 5 s for each (a throttled device
/// must resume, never drop one). Every completion must be the chain just submitted, with at
/// most its length. Prints `bytes ops us` (totals, TSC time from the first submission to the
/// last completion), `early_bytes` (completed within the first `probe.rng_early_ms`, default
/// 200), `req` and `tsc_khz`. FAILs on a lost, foreign or over-long completion.
pub fn check_rngbench(d: &mut crate::checks::Details) -> crate::checks::Status {
    use crate::checks::{key_num, Status};
    use crate::cpu::rdtsc;
    use core::fmt::Write;
    let args = (|| {
        Ok::<_, &'static str>((
            key_num(b"probe.bench_ms", 3000, 1, 600_000)?,
            key_num(b"probe.rng_req", CHECK_BYTES as u64, 1, CHECK_BYTES as u64)?,
            key_num(b"probe.rng_early_ms", 200, 1, 600_000)?,
        ))
    })();
    let (ms, req, early_ms) = match args {
        Ok(a) => a,
        Err(e) => {
            let _ = write!(d, "probe.bench_ms/rng_req/rng_early_ms: {e}");
            return Status::Fail;
        }
    };
    let dev = crate::virtio::devices(crate::bootinfo::get().cmdline())
        .flatten()
        .filter(|t| t.dev.addr.saturating_add(0x200) <= crate::paging::mapped_limit())
        .find(|t| t.magic() == crate::virtio::MAGIC && t.version() == 2 && t.device_id() == 4);
    let Some(t) = dev else {
        let _ = d.write_str("no version-2 virtio-rng device on the command line");
        return Status::Skip;
    };
    let khz = time::khz();
    let mut bytes = 0u64;
    let mut ops = 0u64;
    let mut early_bytes = 0u64;
    let mut t_end = 0u64;
    let t0 = rdtsc();
    let end = t0 + time::us_to_tsc(ms * 1000);
    let early_end = t0 + time::us_to_tsc(early_ms * 1000);
    let res = (|| {
        t.init(0)?;
        let mut q = t.setup_queue(0, 8)?;
        t.driver_ok();
        while rdtsc() < end {
            q.submit(&[Buf {
                addr: buf_addr(0),
                len: req as u32,
                write: true,
            }])?;
            let dl = time::deadline(5_000_000);
            let (id, len) = loop {
                if let Some(c) = q.poll() {
                    break c;
                }
                if time::passed(dl) {
                    return Err("request lost: no used-ring entry within 5 s");
                }
                core::hint::spin_loop();
            };
            if id != 0 {
                return Err("completion of a chain not submitted");
            }
            if u64::from(len) > req {
                return Err("device reported more bytes than the buffer holds");
            }
            if q.poll().is_some() {
                return Err("a request completed twice");
            }
            t_end = rdtsc();
            bytes += u64::from(len);
            ops += 1;
            if t_end <= early_end {
                early_bytes += u64::from(len);
            }
        }
        Ok::<_, &'static str>(())
    })();
    t.write(crate::virtio::reg::STATUS, 0);
    let us = time::tsc_to_us(t_end.saturating_sub(t0));
    let _ = write!(
        d,
        "bytes={bytes} ops={ops} us={us} early_bytes={early_bytes} req={req} bench_ms={ms} tsc_khz={khz}"
    );
    match res {
        Ok(()) => Status::Ok,
        Err(e) => {
            let _ = write!(d, " error=\"{e}\"");
            Status::Fail
        }
    }
}
