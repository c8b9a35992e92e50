//! The virtio-mmio transport: register accesses of any offset, width and value in any order
//! (status transitions out of order, features before and after FEATURES_OK, queue
//! configuration while live, rings outside memory, notifies of unknown queues, config-space
//! reads and writes), with an rng device behind it so activations really happen.

use devices::virtio::mmio::reg;
use devices::virtio::rng::Rng;

use crate::virtio::{self, NoHost, Program, BUFFERS, F_WRITE};

/// Runs one input.
pub fn run(data: &[u8]) {
    let dev = Rng::new().expect("cannot create the rng device");
    virtio::run(dev, NoHost, data);
}

const W32: u8 = 2;

/// Seeds: a hand-written driver bring-up with rings in the memory hole, every register read,
/// status abuse, odd widths and offsets, a reset and re-activation.
pub fn seeds() -> Vec<Vec<u8>> {
    let r = |offset: u64| offset as u16;
    let mut manual = Program::new();
    manual
        .mmio_write(r(reg::STATUS), W32, 1)
        .mmio_write(r(reg::STATUS), W32, 3)
        .mmio_write(r(reg::DRIVER_FEATURES_SEL), W32, 1)
        .mmio_write(r(reg::DRIVER_FEATURES), W32, 1)
        .mmio_write(r(reg::STATUS), W32, 11)
        .mmio_write(r(reg::QUEUE_SEL), W32, 0)
        .mmio_write(r(reg::QUEUE_NUM), W32, 8)
        .mmio_write(r(reg::QUEUE_DESC_LOW), W32, 0x1_8000)
        .mmio_write(r(reg::QUEUE_DRIVER_LOW), W32, 0x1000)
        .mmio_write(r(reg::QUEUE_DEVICE_LOW), W32, 0x2000)
        .mmio_write(r(reg::QUEUE_READY), W32, 1)
        .mmio_write(r(reg::STATUS), W32, 15)
        .mmio_read(r(reg::STATUS), W32)
        .mmio_write(r(reg::STATUS), W32, 0)
        .mmio_write(r(reg::STATUS), W32, 1)
        .mmio_write(r(reg::STATUS), W32, 3)
        .mmio_write(r(reg::DRIVER_FEATURES_SEL), W32, 1)
        .mmio_write(r(reg::DRIVER_FEATURES), W32, 1)
        .mmio_write(r(reg::STATUS), W32, 11)
        .mmio_write(r(reg::QUEUE_NUM), W32, 3)
        .mmio_write(r(reg::QUEUE_NUM), W32, 4)
        .mmio_write(r(reg::QUEUE_DESC_LOW), W32, 0x3000)
        .mmio_write(r(reg::QUEUE_DRIVER_LOW), W32, 0x1000)
        .mmio_write(r(reg::QUEUE_DEVICE_LOW), W32, 0x2000)
        .mmio_write(r(reg::QUEUE_READY), W32, 1)
        .mmio_write(r(reg::STATUS), W32, 15)
        .desc(0, 0, BUFFERS, 16, F_WRITE, 0)
        .mmio_write(r(reg::QUEUE_NOTIFY), W32, 0)
        .mmio_write(r(reg::QUEUE_NOTIFY), W32, 7)
        .mmio_write(r(reg::INTERRUPT_ACK), W32, 3);
    let mut reads = Program::new();
    for off in (0..0x100u16).step_by(4) {
        reads.mmio_read(off, W32);
    }
    reads
        .mmio_read(0x100, 0)
        .mmio_read(0x101, 1)
        .mmio_read(0x104, 3)
        .mmio_read(0xfff, 0);
    reads
        .mmio_read(0x1000, W32)
        .mmio_read(0x2, W32)
        .mmio_read(0x0, 1);
    let mut abuse = Program::new();
    abuse
        .setup(u64::MAX, 1, 3)
        .mmio_write(r(reg::QUEUE_NUM), W32, 2)
        .mmio_write(r(reg::QUEUE_DESC_HIGH), W32, 0xffff_ffff)
        .mmio_write(r(reg::QUEUE_READY), W32, 0)
        .mmio_write(r(reg::STATUS), W32, 0x80)
        .mmio_write(r(reg::STATUS), W32, 0x4f)
        .mmio_write(r(reg::DRIVER_FEATURES), W32, 0xffff_ffff)
        .mmio_write(0x100, 0, 0xff)
        .mmio_write(0x103, 3, u64::MAX)
        .mmio_write(r(reg::STATUS), 1, 0)
        .mmio_write(r(reg::STATUS), W32, 0)
        .mmio_write(r(reg::STATUS), W32, 15)
        .kick(0);
    vec![manual.build(), reads.build(), abuse.build()]
}
