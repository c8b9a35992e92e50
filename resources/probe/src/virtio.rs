//! virtio-mmio core at CPL3: device discovery from the command line, the
//! transport registers (version 2, "modern"), and a split virtqueue that is
//! driven by polling the used ring (no interrupts needed). Device drivers
//! (block, net, console, vsock, rng) go in their own modules on top.

#![allow(dead_code)] // the queue API is for the drivers that come later

use crate::cmdline::{self, MmioDev};
use crate::cpu::{peek, poke};
use crate::sync::Global;
use core::sync::atomic::{fence, Ordering};

pub const MAGIC: u32 = 0x7472_6976; // "virt"

pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC: u64 = 0x080;
    pub const QUEUE_DRIVER: u64 = 0x090;
    pub const QUEUE_DEVICE: u64 = 0x0a0;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 128;
}

pub const F_VERSION_1: u64 = 1 << 32;

pub fn device_name(id: u32) -> &'static str {
    match id {
        0 => "none",
        1 => "net",
        2 => "block",
        3 => "console",
        4 => "rng",
        5 => "balloon",
        19 => "vsock",
        _ => "other",
    }
}

/// One virtio-mmio device window.
#[derive(Clone, Copy)]
pub struct Transport {
    pub dev: MmioDev,
}

impl Transport {
    pub fn read(&self, off: u64) -> u32 {
        peek(self.dev.addr + off)
    }

    pub fn write(&self, off: u64, v: u32) {
        poke(self.dev.addr + off, v)
    }

    /// One byte of config space (u8 fields are read with 8-bit accesses).
    pub fn read8(&self, off: u64) -> u8 {
        peek(self.dev.addr + off)
    }

    pub fn magic(&self) -> u32 {
        self.read(reg::MAGIC)
    }

    pub fn version(&self) -> u32 {
        self.read(reg::VERSION)
    }

    pub fn device_id(&self) -> u32 {
        self.read(reg::DEVICE_ID)
    }

    pub fn vendor_id(&self) -> u32 {
        self.read(reg::VENDOR_ID)
    }

    pub fn device_features(&self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read(reg::DEVICE_FEATURES) as u64;
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read(reg::DEVICE_FEATURES) as u64;
        hi << 32 | lo
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (`wanted` & offered,
    /// VERSION_1 required), FEATURES_OK. Returns the accepted features.
    pub fn init(&self, wanted: u64) -> Result<u64, &'static str> {
        if self.magic() != MAGIC {
            return Err("bad magic");
        }
        if self.version() != 2 {
            return Err("not a version 2 (modern) virtio-mmio device");
        }
        self.write(reg::STATUS, 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            return Err("device does not offer VIRTIO_F_VERSION_1");
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, accepted as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (accepted >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, s);
        if self.read(reg::STATUS) & status::FEATURES_OK == 0 {
            self.write(reg::STATUS, s | status::FAILED);
            return Err("device refused FEATURES_OK");
        }
        Ok(accepted)
    }

    pub fn driver_ok(&self) {
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | status::DRIVER_OK);
    }

    /// Sets up queue `idx` with `size` entries in probe-owned memory.
    pub fn setup_queue(&self, idx: u32, size: u16) -> Result<Virtqueue, &'static str> {
        self.write(reg::QUEUE_SEL, idx);
        if self.read(reg::QUEUE_READY) != 0 {
            return Err("queue already ready");
        }
        let max = self.read(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err("queue not available");
        }
        let size = size.min(max.min(256) as u16);
        if !size.is_power_of_two() {
            return Err("queue size not a power of two");
        }
        let n = size as u64;
        let desc = dma_alloc(16 * n, 16).ok_or("out of queue memory")?;
        let avail = dma_alloc(6 + 2 * n, 2).ok_or("out of queue memory")?;
        let used = dma_alloc(6 + 8 * n, 4).ok_or("out of queue memory")?;
        self.write(reg::QUEUE_NUM, size as u32);
        self.write(reg::QUEUE_DESC, desc as u32);
        self.write(reg::QUEUE_DESC + 4, (desc >> 32) as u32);
        self.write(reg::QUEUE_DRIVER, avail as u32);
        self.write(reg::QUEUE_DRIVER + 4, (avail >> 32) as u32);
        self.write(reg::QUEUE_DEVICE, used as u32);
        self.write(reg::QUEUE_DEVICE + 4, (used >> 32) as u32);
        self.write(reg::QUEUE_READY, 1);
        Ok(Virtqueue {
            transport: *self,
            idx,
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
        })
    }
}

/// A split virtqueue; the probe owns all its memory (guest-physical =
/// virtual through the identity map).
pub struct Virtqueue {
    pub transport: Transport,
    pub idx: u32,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_avail: u16,
    last_used: u16,
}

/// One buffer of a chain: guest-physical address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Virtqueue {
    /// Puts a chain at descriptors 0..n (one request in flight at a time),
    /// publishes it and notifies the device.
    pub fn submit(&mut self, bufs: &[Buf]) -> Result<(), &'static str> {
        if bufs.is_empty() || bufs.len() > self.size as usize {
            return Err("chain length");
        }
        for (i, b) in bufs.iter().enumerate() {
            let d = self.desc + 16 * i as u64;
            let last = i + 1 == bufs.len();
            let flags: u16 = if last { 0 } else { 1 } | if b.write { 2 } else { 0 };
            poke(d, b.addr);
            poke(d + 8, b.len);
            poke(d + 12, flags);
            poke(d + 14, if last { 0u16 } else { i as u16 + 1 });
        }
        let slot = self.next_avail % self.size;
        poke::<u16>(self.avail + 4 + 2 * slot as u64, 0);
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        poke::<u16>(self.avail + 2, self.next_avail);
        fence(Ordering::SeqCst);
        self.transport.write(reg::QUEUE_NOTIFY, self.idx);
        Ok(())
    }

    /// Polls the used ring: Some((id, len)) once the device returned a chain.
    pub fn poll(&mut self) -> Option<(u32, u32)> {
        let idx: u16 = peek(self.used + 2);
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        self.last_used = self.last_used.wrapping_add(1);
        Some((peek(e), peek(e + 4)))
    }
}

/// Memory for queues and buffers (bump allocator, never freed).
#[repr(C, align(4096))]
struct Pool([u8; 64 * 1024]);

static POOL: Global<Pool> = Global::new(Pool([0; 64 * 1024]));
static POOL_USED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// Programs queue `idx` of `t` with its three rings in the 12 KiB at `base` (descriptor
/// table, available ring, used ring: one page each), zeroes them, asks the device not to
/// interrupt (polling drivers), and marks the queue ready. Returns the queue size: the
/// device's maximum, capped at `max_size`; fails when the device offers fewer than
/// `min_size` entries.
pub fn setup_ring_queue(
    t: Transport,
    idx: u32,
    base: u64,
    max_size: usize,
    min_size: u32,
) -> Result<u16, &'static str> {
    t.write(reg::QUEUE_SEL, idx);
    if t.read(reg::QUEUE_READY) != 0 {
        return Err("queue already ready");
    }
    let max = t.read(reg::QUEUE_NUM_MAX);
    if max == 0 || max < min_size {
        return Err("queue not available or too small");
    }
    let size = (max as usize).min(max_size);
    if !size.is_power_of_two() {
        return Err("queue size not a power of two");
    }
    for a in (base..base + 3 * 4096).step_by(8) {
        crate::cpu::poke::<u64>(a, 0);
    }
    t.write(reg::QUEUE_NUM, size as u32);
    for (r, a) in [
        (reg::QUEUE_DESC, base),
        (reg::QUEUE_DRIVER, base + 4096),
        (reg::QUEUE_DEVICE, base + 8192),
    ] {
        t.write(r, a as u32);
        t.write(r + 4, (a >> 32) as u32);
    }
    // VIRTQ_AVAIL_F_NO_INTERRUPT
    crate::cpu::poke::<u16>(base + 4096, 1);
    t.write(reg::QUEUE_READY, 1);
    Ok(size as u16)
}

pub fn dma_alloc(len: u64, align: u64) -> Option<u64> {
    let base = POOL.get() as *const Pool as u64;
    let used = POOL_USED.load(Ordering::Relaxed);
    let start = (base + used).div_ceil(align) * align;
    let end = start.checked_add(len)?;
    if end > base + 64 * 1024 {
        return None;
    }
    POOL_USED.store(end - base, Ordering::Relaxed);
    for a in start..end {
        poke::<u8>(a, 0);
    }
    Some(start)
}

/// The devices named on the command line.
pub fn devices(cmd: &[u8]) -> impl Iterator<Item = Result<Transport, &[u8]>> {
    cmdline::mmio_devices(cmd).map(|r| r.map(|dev| Transport { dev }))
}
