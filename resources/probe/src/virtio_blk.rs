//! virtio-blk driver (device id 2) and the `blk` check, polled at CPL3.
//!
//! The driver keeps its own split queue (up to 64 entries) and buffers in
//! static memory: four request slots of 128 KiB, each request split over two
//! data descriptors, so several large requests are in flight at once. The
//! hostile-guest check (`virtio_blk_hostile`) reuses the low-level pieces.
//!
//! `blk` on every virtio-blk device: capacity, GET_ID; on a writable disk the
//! whole disk gets the seeded pattern (see [`pattern_word`]) and is read back,
//! then FLUSH; on a read-only one (VIRTIO_BLK_F_RO) the whole disk is read and
//! hashed, a write must fail with IOERR and leave the data unchanged. On both,
//! requests past the end must fail with IOERR.

use crate::bootinfo;
use crate::checks::Status;
use crate::cmdline;
use crate::cpu::{peek, poke};
use crate::paging;
use crate::serial::{Line, Printable};
use crate::sync::Global;
use crate::time;
use crate::virtio::{self, reg, status, Transport};
use core::fmt::Write;
use core::sync::atomic::{fence, Ordering};

pub type Details = Line<4096>;

pub const DEVICE_ID: u32 = 2;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Written into a status byte before submitting: a device that completes
/// the request overwrites it.
pub const S_UNTOUCHED: u8 = 0xee;

pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

/// virtio_mmio DeviceStatus bit DEVICE_NEEDS_RESET.
pub const NEEDS_RESET: u32 = 0x40;

pub const SECTOR: u64 = 512;
/// Largest ring the driver uses.
pub const QUEUE_MAX: u16 = 64;
/// Descriptor table room (entries): twice the largest ring, so the hostile
/// check can point at indices beyond the queue size that hold real data.
pub const DESC_ROOM: u16 = 128;
const _: () = assert!(16 * DESC_ROOM as usize <= 4096 && QUEUE_MAX <= DESC_ROOM);
pub const SLOTS: usize = 4;
/// Most requests `stream` keeps in flight (`probe.blk_qd`): the data area is then cut into this
/// many smaller buffers, each request using descriptors 4*slot.. (all of [`DESC_ROOM`]).
pub const MAX_QD: usize = 32;
const _: () = assert!(4 * MAX_QD <= DESC_ROOM as usize && MAX_QD <= HDR_SLOTS);
/// Header/status slots in the small page (`blkbench` uses up to this many).
pub const HDR_SLOTS: usize = 64;
pub const SLOT_BYTES: usize = 128 * 1024;
const SLOT_SECTORS: u64 = SLOT_BYTES as u64 / SECTOR;
/// Default `probe.blk_seed`.
pub const DEFAULT_SEED: u64 = 0x5eed;
/// One request may take this long before the device counts as hung.
pub const REQ_TIMEOUT_US: u64 = 5_000_000;

#[repr(C, align(4096))]
struct RingMem([u8; 3 * 4096]);
#[repr(C, align(4096))]
struct SmallMem([u8; 4096]);
#[repr(C, align(4096))]
struct DataMem([[u64; SLOT_BYTES / 8]; SLOTS]);

static RING: Global<RingMem> = Global::new(RingMem([0; 3 * 4096]));
/// Per slot: the 16-byte header at slot*32, the status byte at slot*32+16
/// (slots 0..[`HDR_SLOTS`]); the GET_ID buffer at 2048.
static SMALL: Global<SmallMem> = Global::new(SmallMem([0; 4096]));
static DATA: Global<DataMem> = Global::new(DataMem([[0; SLOT_BYTES / 8]; SLOTS]));

pub fn desc_base() -> u64 {
    RING.get() as *const RingMem as u64
}
pub fn avail_base() -> u64 {
    desc_base() + 4096
}
pub fn used_base() -> u64 {
    desc_base() + 8192
}
pub fn hdr_addr(slot: usize) -> u64 {
    SMALL.get() as *const SmallMem as u64 + 32 * slot as u64
}
pub fn status_addr(slot: usize) -> u64 {
    hdr_addr(slot) + 16
}
fn id_addr() -> u64 {
    SMALL.get() as *const SmallMem as u64 + 2048
}
pub fn data_addr(slot: usize) -> u64 {
    DATA.get().0[slot].as_ptr() as u64
}
/// The buffer of request slot `slot` (callers never hold two references to
/// the same slot).
pub fn data(slot: usize) -> &'static mut [u64; SLOT_BYTES / 8] {
    let p = DATA.get_mut() as *mut DataMem;
    // SAFETY: `p` points to the static buffers; the element pointer is in
    // bounds (indexing panics otherwise) and the probe is single-threaded
    // here; slots are disjoint, so references to different slots never
    // overlap.
    unsafe { &mut *core::ptr::addr_of_mut!((*p).0[slot]) }
}

/// Buffer `slot` when the data area is cut into buffers of `slot_bytes`
/// (a divisor of its size; callers never hold two references to the same
/// buffer).
fn chunk(slot: usize, slot_bytes: usize) -> &'static mut [u64] {
    let words = slot_bytes / 8;
    let total = SLOTS * SLOT_BYTES / 8;
    let start = (slot * words).min(total);
    let len = words.min(total - start);
    let p = DATA.get_mut() as *mut DataMem as *mut u64;
    // SAFETY: `p` points to the static data area of `total` words; `start +
    // len <= total`, so the slice is in bounds; the probe is single-threaded
    // here and buffers of different slots are disjoint.
    unsafe { core::slice::from_raw_parts_mut(p.add(start), len) }
}

/// The pattern: 64-bit word `i` (0..64) of sector `lba`, stored little
/// endian, is splitmix64's finalizer applied to
/// `seed * 0x9e3779b97f4a7c15 + lba * 64 + i` (all wrapping).
pub fn pattern_word(seed: u64, lba: u64, i: u64) -> u64 {
    let mut x = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(lba.wrapping_mul(64))
        .wrapping_add(i);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fill_pattern(buf: &mut [u64], seed: u64, lba: u64) {
    for (s, sector) in buf.chunks_mut(64).enumerate() {
        for (i, w) in sector.iter_mut().enumerate() {
            *w = pattern_word(seed, lba + s as u64, i as u64);
        }
    }
}

/// First sector (absolute LBA) whose content differs from the pattern.
fn check_pattern(buf: &[u64], seed: u64, lba: u64) -> Option<u64> {
    for (s, sector) in buf.chunks(64).enumerate() {
        for (i, w) in sector.iter().enumerate() {
            if *w != pattern_word(seed, lba + s as u64, i as u64) {
                return Some(lba + s as u64);
            }
        }
    }
    None
}

fn fnv1a(mut h: u64, words: &[u64]) -> u64 {
    for w in words {
        for b in w.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}
const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// A virtio-blk device with its one request queue set up and DRIVER_OK.
pub struct Blk {
    pub t: Transport,
    pub features: u64,
    pub size: u16,
    pub next_avail: u16,
    pub last_used: u16,
    pub cap: u64,
}

impl Blk {
    /// Reset, negotiate (RO, FLUSH, SEG_MAX, SIZE_MAX, BLK_SIZE), queue 0
    /// with at most `qsize` entries (at most [`DESC_ROOM`]; the checks ask
    /// for [`QUEUE_MAX`], `blkbench` for more), DRIVER_OK, read the capacity.
    pub fn open(t: Transport, qsize: u16) -> Result<Blk, &'static str> {
        Blk::open_with(t, qsize, 0)
    }

    /// [`Blk::open`], also accepting the `extra` feature bits when offered.
    pub fn open_with(t: Transport, qsize: u16, extra: u64) -> Result<Blk, &'static str> {
        let features = t.init(F_RO | F_FLUSH | F_SEG_MAX | F_SIZE_MAX | F_BLK_SIZE | extra)?;
        t.write(reg::QUEUE_SEL, 0);
        if t.read(reg::QUEUE_READY) != 0 {
            return Err("queue 0 ready right after reset");
        }
        let max = t.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue 0 not available");
        }
        let size = (qsize.min(DESC_ROOM) as u32).min(max) as u16;
        if !size.is_power_of_two() {
            return Err("queue size not a power of two");
        }
        for a in (desc_base()..desc_base() + 3 * 4096).step_by(8) {
            poke::<u64>(a, 0);
        }
        t.write(reg::QUEUE_NUM, size as u32);
        for (r, a) in [
            (reg::QUEUE_DESC, desc_base()),
            (reg::QUEUE_DRIVER, avail_base()),
            (reg::QUEUE_DEVICE, used_base()),
        ] {
            t.write(r, a as u32);
            t.write(r + 4, (a >> 32) as u32);
        }
        t.write(reg::QUEUE_READY, 1);
        t.driver_ok();
        let st = t.read(reg::STATUS);
        if st & status::DRIVER_OK == 0 || st & (status::FAILED | NEEDS_RESET) != 0 {
            return Err("device did not accept DRIVER_OK");
        }
        let mut b = Blk {
            t,
            features,
            size,
            next_avail: 0,
            last_used: 0,
            cap: 0,
        };
        b.cap = b.capacity();
        Ok(b)
    }

    /// Capacity from config space (generation-checked 64-bit read).
    pub fn capacity(&self) -> u64 {
        for _ in 0..8 {
            let g = self.t.read(reg::CONFIG_GENERATION);
            let lo = self.t.read(reg::CONFIG) as u64;
            let hi = self.t.read(reg::CONFIG + 4) as u64;
            if g == self.t.read(reg::CONFIG_GENERATION) {
                return hi << 32 | lo;
            }
        }
        u64::MAX
    }

    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    /// Reset: the device stops using probe memory.
    pub fn reset(&self) {
        self.t.write(reg::STATUS, 0);
    }

    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = desc_base() + 16 * i as u64;
        poke(d, addr);
        poke(d + 8, len);
        poke(d + 12, flags);
        poke(d + 14, next);
    }

    pub fn set_header(&self, slot: usize, typ: u32, sector: u64) {
        poke(hdr_addr(slot), typ);
        poke(hdr_addr(slot) + 4, 0u32);
        poke(hdr_addr(slot) + 8, sector);
        poke::<u8>(status_addr(slot), S_UNTOUCHED);
    }

    /// Puts `head` in the next avail slot and publishes it.
    pub fn publish(&mut self, head: u16) {
        let slot = self.next_avail % self.size;
        poke::<u16>(avail_base() + 4 + 2 * slot as u64, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.publish_idx(self.next_avail);
    }

    /// Writes the avail index (any value) and notifies.
    pub fn publish_idx(&self, idx: u16) {
        fence(Ordering::SeqCst);
        poke::<u16>(avail_base() + 2, idx);
        fence(Ordering::SeqCst);
        self.t.write(reg::QUEUE_NOTIFY, 0);
    }

    pub fn poll(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = peek(used_base() + 2);
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = used_base() + 4 + 8 * (self.last_used % self.size) as u64;
        self.last_used = self.last_used.wrapping_add(1);
        Some((peek(e), peek(e + 4)))
    }

    /// Polls for up to `us` microseconds.
    pub fn wait(&mut self, us: u64) -> Option<(u32, u32)> {
        let dl = time::deadline(us);
        loop {
            if let Some(r) = self.poll() {
                return Some(r);
            }
            if time::passed(dl) {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Builds a request chain at descriptors `base..`: the header and
    /// status byte of `slot`, and one data descriptor per `(addr, len)`
    /// segment in between (device-writable unless `typ` is OUT). Returns the
    /// head (`base`); it is not published.
    pub fn build_chain(
        &self,
        base: u16,
        slot: usize,
        typ: u32,
        sector: u64,
        segs: &[(u64, u32)],
    ) -> u16 {
        self.set_header(slot, typ, sector);
        let dflags = DESC_NEXT | if typ == T_OUT { 0 } else { DESC_WRITE };
        self.set_desc(base, hdr_addr(slot), 16, DESC_NEXT, base + 1);
        let mut d = base + 1;
        for &(addr, len) in segs {
            self.set_desc(d, addr, len, dflags, d + 1);
            d += 1;
        }
        self.set_desc(d, status_addr(slot), 1, DESC_WRITE, 0);
        base
    }

    /// Builds request `slot` at descriptors slot*4..: header, the data
    /// (split in two descriptors when it holds 2+ sectors), status.
    fn build(&self, slot: usize, typ: u32, sector: u64, addr: u64, len: u32) -> u16 {
        let base = 4 * slot as u16;
        if len == 0 {
            return self.build_chain(base, slot, typ, sector, &[]);
        }
        let first = if len as u64 >= 2 * SECTOR {
            (len as u64 / SECTOR / 2 * SECTOR) as u32
        } else {
            len
        };
        if first < len {
            let segs = [(addr, first), (addr + first as u64, len - first)];
            self.build_chain(base, slot, typ, sector, &segs)
        } else {
            self.build_chain(base, slot, typ, sector, &[(addr, len)])
        }
    }

    /// One request, waited for: the status byte.
    pub fn request(
        &mut self,
        typ: u32,
        sector: u64,
        addr: u64,
        len: u32,
    ) -> Result<(u8, u32), &'static str> {
        let head = self.build(0, typ, sector, addr, len);
        self.publish(head);
        match self.wait(REQ_TIMEOUT_US) {
            Some((id, used)) if id == head as u32 => Ok((peek(status_addr(0)), used)),
            Some(_) => Err("used ring returned an unknown id"),
            None => Err("no completion within 5 s"),
        }
    }

    /// Streams `[0, cap)` through the slots, `depth` requests in flight
    /// (1..[`MAX_QD`]; past [`SLOTS`] each request is smaller, the data area
    /// being shared): OUT with the pattern, or IN with `on_data(lba, words)`
    /// on each completed buffer (in LBA order only when `depth` is 1). A used
    /// id that is not a request in flight (unknown, or completed twice) fails.
    pub fn stream(
        &mut self,
        typ: u32,
        seed: u64,
        depth: usize,
        mut on_data: impl FnMut(u64, &[u64]) -> Result<(), u64>,
    ) -> Result<(), Err2> {
        // Each request takes 4 descriptors of a ring of `size`.
        let depth = depth.clamp(1, MAX_QD).min((self.size as usize / 4).max(1));
        let slot_bytes = SLOT_BYTES * SLOTS / depth.max(SLOTS);
        let slot_sectors = slot_bytes as u64 / SECTOR;
        let mut busy: [Option<(u64, u64)>; MAX_QD] = [None; MAX_QD];
        let mut next = 0u64;
        let mut inflight = 0;
        while next < self.cap || inflight > 0 {
            while inflight < depth && next < self.cap {
                let Some(s) = busy[..depth].iter().position(|b| b.is_none()) else {
                    break;
                };
                let n = slot_sectors.min(self.cap - next);
                let bytes = (n * SECTOR) as usize;
                if typ == T_OUT {
                    fill_pattern(&mut chunk(s, slot_bytes)[..bytes / 8], seed, next);
                }
                let addr = chunk(s, slot_bytes).as_ptr() as u64;
                let head = self.build(s, typ, next, addr, bytes as u32);
                self.publish(head);
                busy[s] = Some((next, n));
                next += n;
                inflight += 1;
            }
            let Some((id, _len)) = self.wait(REQ_TIMEOUT_US) else {
                return Err(Err2::Text("no completion within 5 s"));
            };
            let s = id as usize / 4;
            let Some((lba, n)) = busy.get(s).copied().flatten() else {
                return Err(Err2::Text("used ring returned an unknown id"));
            };
            if id % 4 != 0 {
                return Err(Err2::Text("used ring returned an unknown id"));
            }
            busy[s] = None;
            inflight -= 1;
            let st: u8 = peek(status_addr(s));
            if st != S_OK {
                return Err(Err2::Status(lba, st));
            }
            if typ == T_IN {
                on_data(lba, &chunk(s, slot_bytes)[..(n * SECTOR) as usize / 8])
                    .map_err(Err2::Data)?;
            }
        }
        Ok(())
    }

    /// GET_ID into a 20-byte buffer.
    pub fn get_id(&mut self) -> Result<[u8; 20], &'static str> {
        for i in 0..20 {
            poke::<u8>(id_addr() + i, 0);
        }
        let (st, _) = self.request(T_GET_ID, 0, id_addr(), 20)?;
        if st != S_OK {
            return Err("GET_ID did not return OK");
        }
        let mut id = [0u8; 20];
        for (i, b) in id.iter_mut().enumerate() {
            *b = peek(id_addr() + i as u64);
        }
        Ok(id)
    }
}

pub enum Err2 {
    Text(&'static str),
    /// A request at this LBA completed with this status.
    Status(u64, u8),
    /// The data read at this LBA differs.
    Data(u64),
}

pub fn err2_text(d: &mut Details, what: &str, e: Err2) {
    match e {
        Err2::Text(t) => {
            let _ = write!(d, "{what}: {t}");
        }
        Err2::Status(lba, s) => {
            let _ = write!(d, "{what}: status {s} at lba {lba}");
        }
        Err2::Data(lba) => {
            let _ = write!(d, "{what}: data mismatch at lba {lba}");
        }
    }
}

/// `probe.blk_seed` (default [`DEFAULT_SEED`]).
pub fn seed() -> Result<u64, &'static str> {
    match cmdline::get(bootinfo::get().cmdline(), b"probe.blk_seed") {
        None => Ok(DEFAULT_SEED),
        Some(v) => cmdline::parse_u64(v).ok_or("probe.blk_seed is not a number"),
    }
}

/// The virtio-blk devices on the command line (mapped, magic ok, version 2,
/// device id 2).
pub fn block_devices() -> impl Iterator<Item = Transport> {
    virtio::devices(bootinfo::get().cmdline())
        .flatten()
        .filter(|t| t.dev.addr.saturating_add(0x200) <= paging::mapped_limit())
        .filter(|t| t.magic() == virtio::MAGIC && t.version() == 2)
        .filter(|t| t.device_id() == DEVICE_ID)
}

fn id_str(d: &mut Details, id: &[u8; 20]) {
    let n = id.iter().position(|&b| b == 0).unwrap_or(20);
    let _ = write!(d, "{}", Printable(&id[..n]));
}

/// Expects IOERR for requests past the end: one sector at `cap`, two at
/// `cap - 1`, one at a huge LBA. Err(text) on the first other outcome.
fn past_end(b: &mut Blk) -> Result<(), (&'static str, u8)> {
    let buf = data_addr(0);
    for (what, sector, len) in [
        ("IN at capacity", b.cap, 512u32),
        ("IN straddling the end", b.cap.saturating_sub(1), 1024),
        ("IN at lba 2^63", 1u64 << 63, 512),
        ("IN at lba 2^64-1", u64::MAX, 512),
    ] {
        match b.request(T_IN, sector, buf, len) {
            Ok((S_IOERR, _)) => {}
            Ok((s, _)) => return Err((what, s)),
            Err(_) => return Err((what, S_UNTOUCHED)),
        }
    }
    if !b.read_only() {
        match b.request(T_OUT, b.cap, buf, 512) {
            Ok((S_IOERR, _)) => {}
            Ok((s, _)) => return Err(("OUT at capacity", s)),
            Err(_) => return Err(("OUT at capacity", S_UNTOUCHED)),
        }
    }
    Ok(())
}

pub fn mib(sectors: u64) -> u64 {
    (sectors * SECTOR) >> 20
}

/// `blk`: see the module comment. With `probe.blk_mode=flushspin` it only
/// writes the marker (pattern on the first and last 128 KiB of every
/// writable disk), FLUSHes, prints `PROBE blk flushed` and spins (for the
/// host to kill the VMM; 300 s at most, then FAIL).
pub fn check_blk(d: &mut Details) -> Status {
    let seed = match seed() {
        Ok(s) => s,
        Err(e) => {
            let _ = d.write_str(e);
            return Status::Fail;
        }
    };
    let mode = cmdline::get(bootinfo::get().cmdline(), b"probe.blk_mode").unwrap_or(b"full");
    let flushspin = match mode {
        b"full" => false,
        b"flushspin" => true,
        _ => {
            let _ = write!(d, "unknown probe.blk_mode={}", Printable(mode));
            return Status::Fail;
        }
    };
    let mut body = Details::new();
    let mut n = 0;
    let mut failed = false;
    for t in block_devices() {
        let _ = write!(body, " dev{n}:");
        n += 1;
        let r = if flushspin {
            marker(t, seed, &mut body)
        } else {
            one_device(t, seed, &mut body)
        };
        if let Err(()) = r {
            failed = true;
        }
        t.write(reg::STATUS, 0);
    }
    if n == 0 {
        let _ = d.write_str("no virtio-blk device on the command line");
        return Status::Skip;
    }
    if flushspin && !failed {
        crate::println!("PROBE blk flushed devs={n} seed={seed}");
        let dl = time::deadline(300_000_000);
        while !time::passed(dl) {
            core::hint::spin_loop();
        }
        let _ = d.write_str("flushspin: not killed within 300 s;");
        failed = true;
    }
    report(d, n, seed, failed, &body)
}

/// The end of a per-device check's line: `a device failed;` when one did, `devs=N seed=S`,
/// then each device's part (`body`). FAIL when a device failed.
pub fn report(d: &mut Details, n: usize, seed: u64, failed: bool, body: &Details) -> Status {
    if failed {
        let _ = d.write_str("a device failed;");
    }
    let _ = write!(d, " devs={n} seed={seed}");
    let _ = d.write_str(core::str::from_utf8(body.as_bytes()).unwrap_or(""));
    if failed {
        Status::Fail
    } else {
        Status::Ok
    }
}

fn one_device(t: Transport, seed: u64, d: &mut Details) -> Result<(), ()> {
    let _ = write!(d, "addr={:#x},", t.dev.addr);
    let qd = match cmdline::get(bootinfo::get().cmdline(), b"probe.blk_qd") {
        None => SLOTS,
        Some(v) => match cmdline::parse_u64(v) {
            Some(n) if (1..=MAX_QD as u64).contains(&n) => n as usize,
            _ => {
                let _ = d.write_str("error=\"probe.blk_qd is not 1..32\"");
                return Err(());
            }
        },
    };
    // A request takes descriptors 4*slot..4*slot+3: past 16 in flight the
    // ring needs all of DESC_ROOM.
    let qsize = if 4 * qd > QUEUE_MAX as usize {
        DESC_ROOM
    } else {
        QUEUE_MAX
    };
    let mut b = match Blk::open(t, qsize) {
        Ok(b) => b,
        Err(e) => {
            let _ = write!(d, "open_error=\"{e}\"");
            return Err(());
        }
    };
    let ro = b.read_only();
    let _ = write!(d, "cap={},id=", b.cap);
    match b.get_id() {
        Ok(id) => id_str(d, &id),
        Err(e) => {
            let _ = write!(d, "ERROR,error=\"GET_ID: {e}\"");
            return Err(());
        }
    }
    let _ = write!(d, ",ro={}", ro as u8);
    if b.cap == 0 || b.cap > (1 << 40) {
        let _ = d.write_str(",error=\"implausible capacity\"");
        return Err(());
    }
    if ro {
        // Read and hash everything, in order (one request in flight);
        // keep sector 0.
        let mut h = FNV_INIT;
        let mut first = [0u64; 64];
        let r = b.stream(T_IN, seed, 1, |lba, w| {
            if lba == 0 {
                first.copy_from_slice(&w[..64]);
            }
            h = fnv1a(h, w);
            Ok(())
        });
        if let Err(e) = r {
            let _ = d.write_str(",error=\"");
            err2_text(d, "read", e);
            let _ = d.write_str("\"");
            return Err(());
        }
        let _ = write!(d, ",read={},hash={h:#018x}", mib(b.cap));
        // A write must fail and change nothing.
        let buf = data(0);
        for (i, w) in buf[..64].iter_mut().enumerate() {
            *w = !first[i];
        }
        match b.request(T_OUT, 0, data_addr(0), 512) {
            Ok((S_IOERR, _)) => {}
            Ok((s, _)) => {
                let _ = write!(d, ",error=\"write to a read-only disk: status {s}\"");
                return Err(());
            }
            Err(e) => {
                let _ = write!(d, ",error=\"write to a read-only disk: {e}\"");
                return Err(());
            }
        }
        match b.request(T_IN, 0, data_addr(1), 512) {
            Ok((S_OK, _)) if data(1)[..64] == first => {
                let _ = d.write_str(",ro_write=ioerr");
            }
            Ok((S_OK, _)) => {
                let _ = d.write_str(",error=\"sector 0 changed after a refused write\"");
                return Err(());
            }
            Ok((s, _)) => {
                let _ = write!(d, ",error=\"re-read: status {s}\"");
                return Err(());
            }
            Err(e) => {
                let _ = write!(d, ",error=\"re-read: {e}\"");
                return Err(());
            }
        }
    } else {
        if let Err(e) = b.stream(T_OUT, seed, qd, |_, _| Ok(())) {
            let _ = d.write_str(",error=\"");
            err2_text(d, "write", e);
            let _ = d.write_str("\"");
            return Err(());
        }
        let _ = write!(d, ",written={}", mib(b.cap));
        let r = b.stream(T_IN, seed, qd, |lba, w| match check_pattern(w, seed, lba) {
            None => Ok(()),
            Some(bad) => Err(bad),
        });
        if let Err(e) = r {
            let _ = d.write_str(",error=\"");
            err2_text(d, "read back", e);
            let _ = d.write_str("\"");
            return Err(());
        }
        let _ = write!(d, ",verified={}", mib(b.cap));
        if let Err(()) = flush(&mut b, d) {
            return Err(());
        }
    }
    match past_end(&mut b) {
        Ok(()) => {
            let _ = d.write_str(",past_end=ioerr");
        }
        Err((what, s)) => {
            let _ = write!(d, ",error=\"{what}: status {s}, expected IOERR\"");
            return Err(());
        }
    }
    Ok(())
}

pub fn flush(b: &mut Blk, d: &mut Details) -> Result<(), ()> {
    if b.features & F_FLUSH == 0 {
        let _ = d.write_str(",flush=not-offered");
        return Ok(());
    }
    match b.request(T_FLUSH, 0, 0, 0) {
        Ok((S_OK, _)) => {
            let _ = d.write_str(",flush=ok");
            Ok(())
        }
        Ok((s, _)) => {
            let _ = write!(d, ",error=\"FLUSH: status {s}\"");
            Err(())
        }
        Err(e) => {
            let _ = write!(d, ",error=\"FLUSH: {e}\"");
            Err(())
        }
    }
}

/// Sectors of the flushspin marker at each end of the disk.
const MARKER_SECTORS: u64 = SLOT_SECTORS;

fn marker(t: Transport, seed: u64, d: &mut Details) -> Result<(), ()> {
    let mut b = match Blk::open(t, QUEUE_MAX) {
        Ok(b) => b,
        Err(e) => {
            let _ = write!(d, "open_error=\"{e}\"");
            return Err(());
        }
    };
    let _ = write!(d, "cap={},ro={}", b.cap, b.read_only() as u8);
    if b.read_only() {
        return Ok(());
    }
    let n = MARKER_SECTORS.min(b.cap);
    if n == 0 {
        let _ = d.write_str(",error=\"empty disk\"");
        return Err(());
    }
    for lba in [0, b.cap - n] {
        let bytes = (n * SECTOR) as usize;
        fill_pattern(&mut data(0)[..bytes / 8], seed, lba);
        match b.request(T_OUT, lba, data_addr(0), bytes as u32) {
            Ok((S_OK, _)) => {}
            Ok((s, _)) => {
                let _ = write!(d, ",error=\"marker write at {lba}: status {s}\"");
                return Err(());
            }
            Err(e) => {
                let _ = write!(d, ",error=\"marker write at {lba}: {e}\"");
                return Err(());
            }
        }
    }
    let _ = write!(d, ",marker_sectors={n}");
    flush(&mut b, d)
}
