//! The harness every virtio target shares: a hostile driver, written as a little program in
//! the fuzz input, drives a real device through its real virtio-mmio transport and the real
//! event loop (event-manager), as the guest and the VMM do.
//!
//! Guest memory has two 64 KiB regions with a hole between them (`0..0x10000` and
//! `0x20000..0x30000`). A `SETUP` op negotiates the device through the transport's registers
//! and lays queue `q` out at `0x1000 + 0x3000*q` (descriptor table, then the avail ring at
//! +0x1000, the used ring at +0x2000); the other ops write descriptors, publish avail entries,
//! kick queues (QueueNotify, then the event loop dispatches), scribble on guest memory, poke
//! any register with any width, and do device-specific host-side things ([`Host`]).
//!
//! Invariants checked after every dispatch, on each queue the harness still tracks (a raw
//! status write or a scribble over a ring stops the tracking until the next `SETUP`): the
//! used index moved by at most the queue size, every used id is a valid head, and (unless a
//! writable buffer aliases a ring or descriptor table, so the device may legitimately have
//! rewritten them) every used length is at most the writable bytes of its chain, and the
//! device wrote guest memory only inside the used rings and the device-writable buffers.
//!
//! `CINDER_FUZZ_TRACE=1` prints how many used entries each dispatch produced (to see what a
//! seed reaches).

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{reg, MmioTransport, CONFIG_SPACE_OFFSET};
use devices::virtio::{status, VirtioDevice};
use devices::{BusDevice, GuestMemoryMmap};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::{Builder, Input};

/// Regions of guest memory: (start, size).
pub const REGIONS: [(u64, u64); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];
/// Where the harness puts queue 0; queue `q` is `QUEUE_STRIDE * q` further.
pub const QUEUE_BASE: u64 = 0x1000;
/// Distance between two queues' layouts.
pub const QUEUE_STRIDE: u64 = 0x3000;
/// First guest address the harness never uses for rings (buffers go here or in region 1).
pub const BUFFERS: u64 = 0xa000;
/// Largest queue the harness sets up (its layout has room for 256 entries).
pub const MAX_QUEUE: u16 = 256;
/// Most ops one input runs.
pub const MAX_OPS: usize = 512;

/// Descriptor flags (virtio 1.2 §2.7.5).
pub const F_NEXT: u16 = 1;
/// The device writes this buffer.
pub const F_WRITE: u16 = 2;
/// The buffer is a table of descriptors.
pub const F_INDIRECT: u16 = 4;

/// Op codes of the harness program (the op byte modulo [`OPS`]).
pub mod op {
    /// `mode u8, features u64, size_log u8 per queue`: reset, negotiate, set up every queue,
    /// DRIVER_OK. Mode bit 0: offer the features as given (else masked to what the device
    /// offers, plus VERSION_1); bit 1: leave the last queue not ready.
    pub const SETUP: u8 = 0;
    /// `q u8, index u16, addr u64, len u32, flags u16, next u16`: write a descriptor.
    pub const DESC: u8 = 1;
    /// `q u8, head u16`: publish a head in the avail ring.
    pub const AVAIL: u8 = 2;
    /// `q u8, idx u16`: set the avail index to anything.
    pub const AVAIL_IDX: u8 = 3;
    /// `q u8`: QueueNotify, then dispatch.
    pub const KICK: u8 = 4;
    /// `addr u32, blob`: write bytes anywhere in guest memory.
    pub const MEM: u8 = 5;
    /// `offset u16, width u8, value u64`: a register or config write of any width.
    pub const MMIO_WRITE: u8 = 6;
    /// `offset u16, width u8`: a register or config read of any width.
    pub const MMIO_READ: u8 = 7;
    /// Device specific ([`super::Host::op`]), then dispatch.
    pub const HOST: u8 = 8;
    /// Dispatch whatever the event loop has.
    pub const RUN: u8 = 9;
}
/// Number of op codes.
pub const OPS: u8 = 10;

/// The host side of a device (its TAP, socket or console peer), driven by [`op::HOST`].
pub trait Host {
    /// Do one host-side thing described by the input.
    fn op(&mut self, input: &mut Input<'_>);
    /// After each dispatch: check what reached the host and keep buffers bounded.
    fn after_dispatch(&mut self) {}
}

/// A host side that does nothing.
#[derive(Debug, Default)]
pub struct NoHost;
impl Host for NoHost {
    fn op(&mut self, _input: &mut Input<'_>) {}
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, Clone, Copy, Default)]
struct QueueTrack {
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    tracked: bool,
}

/// The guest memory every virtio target uses.
pub fn guest_memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("cannot map the fuzz guest memory")
}

fn desc_addr(q: usize) -> u64 {
    QUEUE_BASE + QUEUE_STRIDE * q as u64
}
fn avail_addr(q: usize) -> u64 {
    desc_addr(q) + 0x1000
}
fn used_addr(q: usize) -> u64 {
    desc_addr(q) + 0x2000
}

/// One hostile driver at work.
struct Harness<H: Host> {
    mem: GuestMemoryMmap,
    transport: MmioTransport,
    em: EventManager<Subscriber>,
    queues: Vec<QueueTrack>,
    host: H,
}

/// A byte range [start, end).
type Range = (u64, u64);

fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// What the harness saw of the queues' descriptors before a dispatch.
struct Snapshot {
    /// Per queue: the descriptor table (addr, len, flags, next) by index.
    tables: Vec<Vec<(u64, u32, u16, u16)>>,
    /// Some device-writable buffer overlaps a ring, a descriptor table or an indirect table:
    /// the device may legitimately rewrite what the checks would read.
    aliased: bool,
    /// Every device-writable buffer the descriptors (and their indirect tables) name.
    writable: Vec<Range>,
    /// Guest memory, region by region, when the harness knows where every ring is.
    memory: Option<Vec<Vec<u8>>>,
}

impl<H: Host> Harness<H> {
    fn new<D>(device: D, host: H) -> Self
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let mem = guest_memory();
        let dev = Arc::new(Mutex::new(device));
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).expect("cannot create an eventfd"));
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let transport =
            MmioTransport::new(mem.clone(), as_virtio, irq).expect("cannot build the transport");
        let mut em: EventManager<Subscriber> =
            EventManager::new().expect("cannot create an event manager");
        let sub: Subscriber = dev;
        em.add_subscriber(sub);
        let nq = transport.queue_evts().len();
        Harness {
            mem,
            transport,
            em,
            queues: vec![QueueTrack::default(); nq],
            host,
        }
    }

    fn w32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn r32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn queue_index(&self, input: &mut Input<'_>) -> usize {
        let q = usize::from(input.u8());
        // Mostly a real queue; now and then one past the end.
        q % (self.queues.len() + 1)
    }

    fn setup(&mut self, input: &mut Input<'_>) {
        let mode = input.u8();
        let features = input.u64();
        let sizes: Vec<u8> = (0..self.queues.len()).map(|_| input.u8()).collect();
        self.w32(reg::STATUS, 0);
        self.w32(reg::STATUS, status::ACKNOWLEDGE);
        self.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w32(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(reg::DEVICE_FEATURES);
        self.w32(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r32(reg::DEVICE_FEATURES);
        let offered = u64::from(lo) | (u64::from(hi) << 32);
        let features = if mode & 1 != 0 {
            features
        } else {
            (features & offered) | (1 << devices::virtio::features::VIRTIO_F_VERSION_1)
        };
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, features as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.w32(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        let nq = self.queues.len();
        for (q, size_log) in sizes.into_iter().enumerate() {
            self.queues[q] = QueueTrack::default();
            self.w32(reg::QUEUE_SEL, q as u32);
            let max = self.r32(reg::QUEUE_NUM_MAX).min(u32::from(MAX_QUEUE));
            if max == 0 {
                continue;
            }
            let size = (1u32 << (size_log % 9)).min(max);
            self.w32(reg::QUEUE_NUM, size);
            let (d, a, u) = (desc_addr(q), avail_addr(q), used_addr(q));
            // A fresh driver starts from zeroed rings.
            let _ = self.mem.write_slice(&[0u8; 0x3000], GuestAddress(d));
            self.w32(reg::QUEUE_DESC_LOW, d as u32);
            self.w32(reg::QUEUE_DESC_HIGH, (d >> 32) as u32);
            self.w32(reg::QUEUE_DRIVER_LOW, a as u32);
            self.w32(reg::QUEUE_DRIVER_HIGH, (a >> 32) as u32);
            self.w32(reg::QUEUE_DEVICE_LOW, u as u32);
            self.w32(reg::QUEUE_DEVICE_HIGH, (u >> 32) as u32);
            if mode & 2 != 0 && q + 1 == nq {
                continue;
            }
            self.w32(reg::QUEUE_READY, 1);
            self.queues[q].size = size as u16;
        }
        self.w32(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        let live = self.transport.status() & status::DRIVER_OK != 0;
        for t in &mut self.queues {
            t.tracked = live && t.size != 0;
        }
        self.dispatch();
    }

    fn desc(&mut self, input: &mut Input<'_>) {
        let q = self.queue_index(input);
        let index = input.u16();
        let (addr, len, flags, next) = (input.u64(), input.u32(), input.u16(), input.u16());
        let Some(t) = self.queues.get(q) else { return };
        let size = t.size.max(1);
        let at = desc_addr(q) + 16 * u64::from(index % size);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self.mem.write_slice(&raw, GuestAddress(at));
    }

    fn avail(&mut self, input: &mut Input<'_>, raw_idx: bool) {
        let q = self.queue_index(input);
        let v = input.u16();
        let Some(t) = self.queues.get_mut(q) else {
            return;
        };
        let size = t.size.max(1);
        let a = avail_addr(q);
        if raw_idx {
            t.avail_idx = v;
        } else {
            let slot = a + 4 + 2 * u64::from(t.avail_idx % size);
            let _ = self.mem.write_obj(v, GuestAddress(slot));
            t.avail_idx = t.avail_idx.wrapping_add(1);
        }
        let _ = self.mem.write_obj(t.avail_idx, GuestAddress(a + 2));
    }

    fn scribble(&mut self, input: &mut Input<'_>) {
        let addr = u64::from(input.u32());
        let data = input.blob(0x1000);
        let _ = self.mem.write_slice(data, GuestAddress(addr));
        let written = (addr, addr + data.len() as u64);
        for (q, t) in self.queues.iter_mut().enumerate() {
            if overlaps(written, (avail_addr(q), desc_addr(q) + QUEUE_STRIDE)) {
                t.tracked = false;
            }
        }
    }

    fn mmio_write(&mut self, input: &mut Input<'_>) {
        let offset = u64::from(input.u16() & 0x1fff);
        let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
        let value = input.u64().to_le_bytes();
        if offset == reg::STATUS {
            // The driver may reset or re-activate the device: the harness's view is stale.
            for t in &mut self.queues {
                t.tracked = false;
            }
        }
        self.transport.write(offset, &value[..width]);
        if offset == reg::QUEUE_NOTIFY {
            self.dispatch();
        }
    }

    fn mmio_read(&mut self, input: &mut Input<'_>) {
        let offset = u64::from(input.u16() & 0x1fff);
        let width = [1usize, 2, 4, 8][usize::from(input.u8() % 4)];
        let mut data = [0xa5u8; 8];
        self.transport.read(offset, &mut data[..width]);
        if width == 4 && offset == reg::MAGIC_VALUE {
            assert_eq!(
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                0x7472_6976
            );
        }
        if offset >= 0x1000 || (offset < CONFIG_SPACE_OFFSET && (width != 4 || offset & 3 != 0)) {
            assert_eq!(
                &data[..width],
                &[0u8; 8][..width],
                "ignored read not zeroed"
            );
        }
    }

    fn snapshot(&self) -> Snapshot {
        let mut tables = Vec::with_capacity(self.queues.len());
        let mut writable: Vec<Range> = Vec::new();
        let mut indirect: Vec<Range> = Vec::new();
        for (q, t) in self.queues.iter().enumerate() {
            let mut table = Vec::with_capacity(usize::from(t.size));
            for i in 0..u64::from(t.size) {
                let d = read_desc(&self.mem, desc_addr(q) + 16 * i);
                note_desc(&self.mem, d, &mut writable, &mut indirect, true);
                table.push(d);
            }
            tables.push(table);
        }
        let mut rings: Vec<Range> = indirect;
        for q in 0..self.queues.len() {
            rings.push((desc_addr(q), desc_addr(q) + QUEUE_STRIDE));
        }
        let aliased = writable
            .iter()
            .any(|w| rings.iter().any(|r| overlaps(*w, *r)));
        let memory = (!aliased && self.all_tracked()).then(|| self.read_memory());
        Snapshot {
            tables,
            aliased,
            writable,
            memory,
        }
    }

    /// Whether the harness set up every queue itself and nothing reconfigured them since.
    fn all_tracked(&self) -> bool {
        self.queues.iter().all(|t| t.tracked)
    }

    /// A copy of guest memory, read with aligned 8-byte volatile loads (vm-memory's own copy
    /// is slow in debug builds, and this runs around every dispatch).
    fn read_memory(&self) -> Vec<Vec<u8>> {
        REGIONS
            .iter()
            .map(|&(start, size)| {
                let size = size as usize;
                let mut out = Vec::with_capacity(size);
                match self.mem.get_host_address(GuestAddress(start)) {
                    Ok(host) if host.align_offset(8) == 0 => {
                        let words = host.cast::<u64>();
                        for i in 0..size / 8 {
                            // SAFETY: `host` is the page-aligned start of a mapped region of
                            // `size` bytes (REGIONS is what `guest_memory` mapped), alive as
                            // long as `self.mem`, and `i * 8 + 8 <= size`. Guest memory may be
                            // written by other threads (a device's I/O worker), so it is only
                            // read through volatile loads, as vm-memory itself does.
                            let w = unsafe { std::ptr::read_volatile(words.add(i)) };
                            out.extend_from_slice(&w.to_ne_bytes());
                        }
                    }
                    _ => {
                        out.resize(size, 0);
                        let _ = self.mem.read_slice(&mut out, GuestAddress(start));
                    }
                }
                out
            })
            .collect()
    }

    /// The device wrote guest memory only in used rings and in device-writable buffers.
    fn check_writes(&self, snap: &Snapshot) {
        let Some(before) = &snap.memory else { return };
        if !self.all_tracked() {
            return;
        }
        let after = self.read_memory();
        for ((&(start, _), old), new) in REGIONS.iter().zip(before).zip(&after) {
            if old == new {
                continue;
            }
            const CHUNK: usize = 64;
            let changed = old
                .chunks(CHUNK)
                .zip(new.chunks(CHUNK))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .flat_map(|(c, (a, b))| {
                    a.iter()
                        .zip(b.iter())
                        .enumerate()
                        .filter(|(_, (x, y))| x != y)
                        .map(move |(i, (x, y))| (c * CHUNK + i, *x, *y))
                });
            for (i, a, b) in changed {
                let addr = start + i as u64;
                let in_used = (0..self.queues.len())
                    .any(|q| (used_addr(q)..desc_addr(q) + QUEUE_STRIDE).contains(&addr));
                let in_buffer = snap.writable.iter().any(|&(s, e)| (s..e).contains(&addr));
                assert!(
                    in_used || in_buffer,
                    "the device wrote guest memory at {addr:#x} ({a:#04x} -> {b:#04x}), \
                     outside the used rings and every device-writable buffer"
                );
            }
        }
    }

    /// Runs the event loop until it has nothing more (at most a few rounds), then checks the
    /// used rings against the descriptors as they were before.
    fn dispatch(&mut self) {
        let snap = self.snapshot();
        for _ in 0..4 {
            match self.em.run_with_timeout(0) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.host.after_dispatch();
        self.check(&snap);
        self.check_writes(&snap);
    }

    fn check(&mut self, snap: &Snapshot) {
        for (q, t) in self.queues.iter_mut().enumerate() {
            if !t.tracked {
                continue;
            }
            let u = used_addr(q);
            let Ok(idx) = self.mem.read_obj::<u16>(GuestAddress(u + 2)) else {
                continue;
            };
            let new = idx.wrapping_sub(t.used_seen);
            if std::env::var_os("CINDER_FUZZ_TRACE").is_some() && new != 0 {
                eprintln!("trace: queue {q}: {new} used (aliased: {})", snap.aliased);
            }
            if snap.aliased {
                // The device may have written over the rings through a buffer the guest
                // aimed at them: nothing to compare with.
                t.used_seen = idx;
                continue;
            }
            assert!(
                new <= t.size,
                "queue {q}: used index moved by {new}, more than the queue size {}",
                t.size
            );
            for k in 0..new {
                let slot = u64::from(t.used_seen.wrapping_add(k) % t.size);
                let at = GuestAddress(u + 4 + 8 * slot);
                let id: u32 = self.mem.read_obj(at).unwrap_or(0);
                let len: u32 = self.mem.read_obj(GuestAddress(at.0 + 4)).unwrap_or(0);
                assert!(
                    id < u32::from(t.size),
                    "queue {q}: used id {id} is not a head of a {}-entry queue",
                    t.size
                );
                let cap = writable_bytes(&self.mem, &snap.tables[q], id as usize);
                assert!(
                    u64::from(len) <= cap,
                    "queue {q}: used length {len} for head {id}, whose chain has {cap} writable bytes"
                );
            }
            t.used_seen = idx;
        }
    }
}

fn read_desc(mem: &GuestMemoryMmap, at: u64) -> (u64, u32, u16, u16) {
    let mut raw = [0u8; 16];
    let _ = mem.read_slice(&mut raw, GuestAddress(at));
    let addr = u64::from_le_bytes(raw[..8].try_into().unwrap_or_default());
    let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
    let flags = u16::from_le_bytes([raw[12], raw[13]]);
    let next = u16::from_le_bytes([raw[14], raw[15]]);
    (addr, len, flags, next)
}

/// Most entries of an indirect table the harness looks at (virtio-queue refuses more).
const MAX_INDIRECT: u64 = 0x1_0000 / 16;

fn note_desc(
    mem: &GuestMemoryMmap,
    d: (u64, u32, u16, u16),
    writable: &mut Vec<Range>,
    indirect: &mut Vec<Range>,
    follow_indirect: bool,
) {
    let (addr, len, flags, _) = d;
    if flags & F_INDIRECT != 0 {
        if follow_indirect {
            let end = addr.saturating_add(u64::from(len));
            indirect.push((addr, end));
            for i in 0..(u64::from(len) / 16).min(MAX_INDIRECT) {
                let e = read_desc(mem, addr.saturating_add(16 * i));
                note_desc(mem, e, writable, indirect, false);
            }
        }
    } else if flags & F_WRITE != 0 && len > 0 {
        writable.push((addr, addr.saturating_add(u64::from(len))));
    }
}

/// An upper bound of the bytes the device may write for the chain at `head`: every writable
/// descriptor reachable from it (an indirect table counts whole), loops counted as walked.
fn writable_bytes(mem: &GuestMemoryMmap, table: &[(u64, u32, u16, u16)], head: usize) -> u64 {
    let mut total = 0u64;
    let mut index = head;
    for _ in 0..=table.len() {
        let Some(&(addr, len, flags, next)) = table.get(index) else {
            break;
        };
        if flags & F_INDIRECT != 0 {
            for i in 0..(u64::from(len) / 16).min(MAX_INDIRECT) {
                let (_, l, f, _) = read_desc(mem, addr.saturating_add(16 * i));
                if f & F_WRITE != 0 {
                    total = total.saturating_add(u64::from(l));
                }
            }
        } else if flags & F_WRITE != 0 {
            total = total.saturating_add(u64::from(len));
        }
        if flags & F_NEXT == 0 {
            break;
        }
        index = usize::from(next);
    }
    total
}

/// Runs the harness program `data` against `device`, with `host` as its host side.
pub fn run<D, H>(device: D, host: H, data: &[u8])
where
    D: VirtioDevice + MutEventSubscriber + 'static,
    H: Host,
{
    let mut h = Harness::new(device, host);
    let mut input = Input::new(data);
    let trace = std::env::var_os("CINDER_FUZZ_TRACE").is_some();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let code = input.u8() % OPS;
        if trace {
            eprintln!("trace: op {code}, status {:#x}", h.transport.status());
        }
        match code {
            op::SETUP => h.setup(&mut input),
            op::DESC => h.desc(&mut input),
            op::AVAIL => h.avail(&mut input, false),
            op::AVAIL_IDX => h.avail(&mut input, true),
            op::KICK => {
                let q = input.u8() % 4;
                h.w32(reg::QUEUE_NOTIFY, u32::from(q));
                h.dispatch();
            }
            op::MEM => h.scribble(&mut input),
            op::MMIO_WRITE => h.mmio_write(&mut input),
            op::MMIO_READ => h.mmio_read(&mut input),
            op::HOST => {
                h.host.op(&mut input);
                h.dispatch();
            }
            _ => h.dispatch(),
        }
    }
}

/// Writing harness programs (for seeds).
#[derive(Debug, Default, Clone)]
pub struct Program(pub Builder);

impl Program {
    /// An empty program.
    pub fn new() -> Self {
        Program(Builder::new())
    }
    /// `SETUP` with masked features and every queue of `2^size_log` entries.
    pub fn setup(&mut self, features: u64, queues: usize, size_log: u8) -> &mut Self {
        self.0.u8(op::SETUP).u8(0).u64(features);
        for _ in 0..queues {
            self.0.u8(size_log);
        }
        self
    }
    /// A descriptor.
    pub fn desc(
        &mut self,
        q: u8,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        self.0
            .u8(op::DESC)
            .u8(q)
            .u16(index)
            .u64(addr)
            .u32(len)
            .u16(flags)
            .u16(next);
        self
    }
    /// Publish `head` on queue `q`.
    pub fn avail(&mut self, q: u8, head: u16) -> &mut Self {
        self.0.u8(op::AVAIL).u8(q).u16(head);
        self
    }
    /// Set queue `q`'s avail index.
    pub fn avail_idx(&mut self, q: u8, idx: u16) -> &mut Self {
        self.0.u8(op::AVAIL_IDX).u8(q).u16(idx);
        self
    }
    /// Kick queue `q`.
    pub fn kick(&mut self, q: u8) -> &mut Self {
        self.0.u8(op::KICK).u8(q);
        self
    }
    /// Write `data` at `addr`.
    pub fn mem(&mut self, addr: u32, data: &[u8]) -> &mut Self {
        self.0.u8(op::MEM).u32(addr).blob(data);
        self
    }
    /// A register write.
    pub fn mmio_write(&mut self, offset: u16, width_sel: u8, value: u64) -> &mut Self {
        self.0
            .u8(op::MMIO_WRITE)
            .u16(offset)
            .u8(width_sel)
            .u64(value);
        self
    }
    /// A register read.
    pub fn mmio_read(&mut self, offset: u16, width_sel: u8) -> &mut Self {
        self.0.u8(op::MMIO_READ).u16(offset).u8(width_sel);
        self
    }
    /// A host op; its arguments follow through [`Self::raw`].
    pub fn host(&mut self) -> &mut Self {
        self.0.u8(op::HOST);
        self
    }
    /// Run the event loop.
    pub fn run(&mut self) -> &mut Self {
        self.0.u8(op::RUN);
        self
    }
    /// Raw bytes (host op arguments).
    pub fn raw(&mut self) -> &mut Builder {
        &mut self.0
    }
    /// The program.
    pub fn build(&self) -> Vec<u8> {
        self.0.build()
    }
}

/// Writes a random but plausible harness program: negotiation, then descriptors aimed at
/// buffers, ring edges, the memory hole and the end of memory, chains, loops and indirect
/// tables, avail entries, kicks, host ops and now and then a raw register write. `payload`
/// makes the bytes of a device-readable buffer (a request header, a packet); `host` writes
/// the arguments of one host op.
pub fn generate(
    rng: &mut crate::mutate::Rng,
    queues: usize,
    payload: fn(&mut crate::mutate::Rng) -> Vec<u8>,
    host: fn(&mut crate::mutate::Rng, &mut Builder),
) -> Vec<u8> {
    let mut p = Program::new();
    let size_log = 1 + rng.below(5) as u8;
    let size = 1u16 << size_log;
    let features = if rng.below(4) == 0 {
        rng.next_u64()
    } else {
        u64::MAX
    };
    p.setup(features, queues, size_log);
    let addrs = |rng: &mut crate::mutate::Rng| -> u64 {
        match rng.below(10) {
            0 => 0xfff0 + rng.below(0x20) as u64,
            1 => 0x2_fff0 + rng.below(0x20) as u64,
            2 if rng.below(4) == 0 => QUEUE_BASE + rng.below(0x9000) as u64,
            3 if rng.below(2) == 0 => rng.next_u64(),
            4..=6 => BUFFERS + 0x100 * rng.below(0x50) as u64,
            _ => 0x2_0000 + 0x100 * rng.below(0xff) as u64,
        }
    };
    let lens = [0u32, 1, 12, 16, 44, 60, 512, 1500, 4096, 0x1_0000, u32::MAX];
    for _ in 0..1 + rng.below(40) {
        let q = rng.below(queues) as u8;
        match rng.below(40) {
            0..=13 => {
                let flags = match rng.below(6) {
                    0 => F_WRITE,
                    1 => F_NEXT,
                    2 => F_WRITE | F_NEXT,
                    3 => F_INDIRECT,
                    4 => rng.next_u64() as u16,
                    _ => 0,
                };
                let len = if rng.below(3) == 0 {
                    rng.next_u64() as u32 % 0x2000
                } else {
                    lens[rng.below(lens.len())]
                };
                let index = rng.below(usize::from(size)) as u16;
                let next = if rng.below(8) == 0 {
                    rng.next_u64() as u16
                } else {
                    (index + 1) % size
                };
                p.desc(q, index, addrs(rng), len, flags, next);
            }
            14..=17 => {
                // Mostly into the buffer areas; now and then anywhere (rings included).
                let at = if rng.below(8) == 0 {
                    addrs(rng)
                } else {
                    [BUFFERS, 0x2_0000][rng.below(2)] + 0x100 * rng.below(0x50) as u64
                };
                p.mem(at as u32, &payload(rng));
            }
            18 | 19 => {
                // An indirect table of 1 to 4 entries.
                let at = 0x2_8000 + 0x100 * rng.below(0x40) as u64;
                let mut table = Vec::new();
                let n = 1 + rng.below(4);
                for i in 0..n {
                    let flags = [0, F_WRITE, F_NEXT, F_WRITE | F_NEXT][rng.below(4)];
                    let len = lens[rng.below(lens.len())];
                    table.extend_from_slice(&addrs(rng).to_le_bytes());
                    table.extend_from_slice(&len.to_le_bytes());
                    table.extend_from_slice(&flags.to_le_bytes());
                    table.extend_from_slice(&((i + 1) as u16).to_le_bytes());
                }
                p.mem(at as u32, &table);
                let index = rng.below(usize::from(size)) as u16;
                p.desc(q, index, at, 16 * n as u32, F_INDIRECT, 0);
            }
            20..=29 => {
                p.avail(q, rng.below(usize::from(size) + 1) as u16);
            }
            30..=33 => {
                p.kick(q);
            }
            34..=36 => {
                p.host();
                host(rng, &mut p.0);
            }
            37 | 38 => {
                if rng.below(4) == 0 {
                    let off = [0x30u16, 0x38, 0x44, 0x50, 0x64, 0x70, 0x100][rng.below(7)];
                    p.mmio_write(off, 2, rng.next_u64() % 8);
                } else {
                    p.run();
                }
            }
            _ => {
                // Usually a few entries ahead (the driver forgot to fill them), now and then
                // anything (the device must ask for a reset, not loop).
                let idx = if rng.below(4) == 0 {
                    rng.next_u64() as u16
                } else {
                    rng.below(usize::from(size) + 2) as u16
                };
                p.avail_idx(q, idx);
            }
        }
    }
    for q in 0..queues {
        p.kick(q as u8);
    }
    p.build()
}

/// The arguments of a [`NoHost`] op: none.
pub fn no_host(_rng: &mut crate::mutate::Rng, _b: &mut Builder) {}

/// Random bytes as a payload.
pub fn random_payload(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::rng::Rng;

    fn rng_harness() -> Harness<NoHost> {
        let mut h = Harness::new(Rng::new().unwrap(), NoHost);
        let mut p = Program::new();
        p.setup(u64::MAX, 1, 3);
        let data = p.build();
        h.setup(&mut Input::new(&data[1..]));
        assert!(h.all_tracked());
        h
    }

    /// The write check is not blind: a byte changed outside every writable buffer and used
    /// ring fails it.
    #[test]
    #[should_panic(expected = "outside the used rings")]
    fn stray_write_is_caught() {
        let h = rng_harness();
        let snap = h.snapshot();
        h.mem
            .write_obj(0xffu8, GuestAddress(BUFFERS + 0x10))
            .unwrap();
        h.check_writes(&snap);
    }

    /// ... and a write inside a writable buffer passes it.
    #[test]
    fn write_to_a_writable_buffer_passes() {
        let mut h = rng_harness();
        let mut p = Program::new();
        p.desc(0, 0, BUFFERS, 64, F_WRITE, 0);
        let data = p.build();
        h.desc(&mut Input::new(&data[1..]));
        let snap = h.snapshot();
        h.mem
            .write_obj(0xffu8, GuestAddress(BUFFERS + 0x10))
            .unwrap();
        h.check_writes(&snap);
    }

    /// The used-length check is not blind either.
    #[test]
    #[should_panic(expected = "writable bytes")]
    fn used_length_beyond_the_chain_is_caught() {
        let mut h = rng_harness();
        let mut p = Program::new();
        p.desc(0, 0, BUFFERS, 64, F_WRITE, 0);
        let data = p.build();
        h.desc(&mut Input::new(&data[1..]));
        let snap = h.snapshot();
        // Forge a used entry: head 0, 65 bytes.
        let u = used_addr(0);
        h.mem.write_obj(0u32, GuestAddress(u + 4)).unwrap();
        h.mem.write_obj(65u32, GuestAddress(u + 8)).unwrap();
        h.mem.write_obj(1u16, GuestAddress(u + 2)).unwrap();
        h.check(&snap);
    }
}
