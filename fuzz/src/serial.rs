//! The 8250 serial port: any sequence of register reads and writes of any width (DLAB,
//! FIFO control, loopback, scratch, interrupt enable), mixed with host input.
//!
//! Input: ops `(kind, value)`: kind % 4 is 0-1 a write of `value` to register `kind >> 2`
//! (offsets up to 15, past the 8 registers), 2 a read, 3 host input of `value` bytes.

use std::io::{self, Write};
use std::sync::Arc;

use devices::legacy::SerialDevice;
use devices::BusDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Input;

const MAX_OPS: usize = 4096;

struct Sink;
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let efd = || Arc::new(EventFd::new(EFD_NONBLOCK).expect("cannot create an eventfd"));
    let mut dev = SerialDevice::new(efd(), efd(), Box::new(Sink));
    let mut input = Input::new(data);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let kind = input.u8();
        let value = input.u8();
        let offset = u64::from(kind >> 4);
        match kind % 4 {
            0 | 1 => {
                let width = if kind & 8 != 0 { 2 } else { 1 };
                dev.write(offset, &[value, value][..width]);
            }
            2 => {
                let width = if kind & 8 != 0 { 4 } else { 1 };
                let mut b = [0u8; 4];
                dev.read(offset, &mut b[..width]);
            }
            _ => {
                let bytes = input.bytes(usize::from(value));
                let before = dev.fifo_capacity();
                let taken = dev.enqueue(bytes);
                assert!(
                    taken <= bytes.len() && taken <= before,
                    "enqueue took {taken}"
                );
            }
        }
    }
}

/// Seeds: Linux's 8250 probe (scratch, LCR/DLAB, FIFO, loopback, IER), output, input.
pub fn seeds() -> Vec<Vec<u8>> {
    let w = |reg: u8, v: u8| [reg << 4, v];
    let r = |reg: u8| [(reg << 4) | 2, 0];
    let mut probe = Vec::new();
    for op in [
        w(7, 0x55),
        r(7),
        w(3, 0x80),
        w(0, 0x01),
        w(1, 0x00),
        w(3, 0x03),
        w(2, 0xc7),
        r(2),
        w(4, 0x10),
        r(6),
        w(4, 0x0b),
        w(1, 0x0f),
        r(2),
        w(0, b'o'),
        w(0, b'k'),
        r(5),
    ] {
        probe.extend_from_slice(&op);
    }
    let mut input = Vec::new();
    input.extend_from_slice(&w(1, 0x01));
    input.extend_from_slice(&[3, 80]);
    input.extend((0..80u8).map(|i| b'a' + i % 26));
    for _ in 0..70 {
        input.extend_from_slice(&r(0));
    }
    input.extend_from_slice(&r(5));
    vec![probe, input]
}
