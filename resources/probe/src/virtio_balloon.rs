//! `balloon`: a hostile driver for the first virtio-balloon device (id 5). It negotiates no
//! device feature (inflate and deflate queues only), then:
//!
//! 1. inflates one page of its own (filled with 0xa5) with a list that also holds that page
//!    again (a duplicate), a frame beyond RAM, a frame in the MMIO gap (3.25 GiB) and frame
//!    0xffffffff; the page must read back as zeros (the host discarded it);
//! 2. posts a descriptor of 4 MiB of frame numbers (a huge count, pointing at the probe's own
//!    image: taken, it would discard the running code) and one outside memory;
//! 3. deflates the page twice (one duplicate) and writes and reads it again;
//! 4. reads `num_pages` (the target) and writes `actual`.
//!
//! Every chain must come back on the used ring within 2 s. Prints `target`, `zeroed` (1 when
//! the inflated page read back as zeros) and `reused` (1 when the deflated page kept what was
//! written). The harness checks the device's counters (metrics `balloon`).

use crate::checks::{Details, Status};
use crate::cpu::{peek, poke};
use crate::time;
use crate::virtio::{reg, Buf, Transport, Virtqueue};
use core::fmt::Write;

#[repr(C, align(4096))]
struct Page([u8; 4096]);

static PAGE: crate::sync::Global<Page> = crate::sync::Global::new(Page([0; 4096]));
static LIST: crate::sync::Global<[u32; 16]> = crate::sync::Global::new([0; 16]);

fn page() -> u64 {
    PAGE.get().0.as_ptr() as u64
}

fn list() -> u64 {
    LIST.get().as_ptr() as u64
}

fn fill(v: u8) {
    for off in (0..4096).step_by(8) {
        poke::<u64>(page() + off, u64::from_ne_bytes([v; 8]));
    }
}

fn all(v: u8) -> bool {
    (0..4096)
        .step_by(8)
        .all(|off| peek::<u64>(page() + off) == u64::from_ne_bytes([v; 8]))
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

fn pfns(list_of: &[u32]) -> Buf {
    for (i, p) in list_of.iter().enumerate() {
        poke::<u32>(list() + 4 * i as u64, *p);
    }
    Buf {
        addr: list(),
        len: 4 * list_of.len() as u32,
        write: false,
    }
}

pub fn check(d: &mut Details) -> Status {
    let dev = crate::virtio::devices(crate::bootinfo::get().cmdline())
        .flatten()
        .filter(|t| t.dev.addr.saturating_add(0x200) <= crate::paging::mapped_limit())
        .find(|t| t.magic() == crate::virtio::MAGIC && t.version() == 2 && t.device_id() == 5);
    let Some(t) = dev else {
        let _ = d.write_str("no version-2 virtio-balloon device on the command line");
        return Status::Skip;
    };
    let res = drive(&t, d);
    t.write(reg::STATUS, 0);
    match res {
        Ok(true) => Status::Ok,
        Ok(false) => Status::Fail,
        Err(e) => {
            let _ = write!(d, " {e}; addr={:#x}", t.dev.addr);
            Status::Fail
        }
    }
}

fn drive(t: &Transport, d: &mut Details) -> Result<bool, &'static str> {
    t.init(0)?;
    let mut inflate = t.setup_queue(0, 8)?;
    let mut deflate = t.setup_queue(1, 8)?;
    t.driver_ok();
    let ram_end = crate::bootinfo::get()
        .mem()
        .iter()
        .filter(|e| e.kind == crate::bootinfo::E820_RAM)
        .map(|e| e.end())
        .max()
        .unwrap_or(0);
    let pfn = (page() >> 12) as u32;
    fill(0xa5);
    let beyond = ((ram_end >> 12) + 16) as u32;
    let gap = (0xd000_0000u64 >> 12) as u32;
    run(&mut inflate, &[pfns(&[pfn, pfn, beyond, gap, u32::MAX])])?;
    let zeroed = all(0);
    // A huge count over the probe's own image, and a descriptor outside memory.
    let image = crate::sym_addr!(__image_start);
    run(
        &mut inflate,
        &[Buf {
            addr: image,
            len: 4 << 20,
            write: false,
        }],
    )?;
    run(
        &mut inflate,
        &[Buf {
            addr: 0xffff_f000_0000,
            len: 64,
            write: false,
        }],
    )?;
    run(&mut deflate, &[pfns(&[pfn, pfn])])?;
    fill(0x5c);
    let reused = all(0x5c);
    let target = t.read(reg::CONFIG);
    t.write(reg::CONFIG + 4, 1);
    let actual = t.read(reg::CONFIG + 4);
    let _ = write!(
        d,
        "target={target} actual={actual} zeroed={} reused={} pfn={pfn:#x} beyond={beyond:#x}",
        zeroed as u8, reused as u8
    );
    Ok(zeroed && reused && actual == 1)
}
