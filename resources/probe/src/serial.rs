//! COM1 (8250 at 0x3f8) output by polling LSR.THRE, plus a fixed-size
//! line buffer implementing `fmt::Write` (no allocator in the probe).

use crate::cpu::{inb, outb};
use core::fmt;

const COM1: u16 = 0x3f8;

pub fn init() {
    outb(COM1 + 1, 0x00); // no UART interrupts
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
}

pub fn putb(b: u8) {
    // Bounded wait: a missing UART reads 0xff (THRE set) anyway.
    for _ in 0..100_000 {
        if inb(COM1 + 5) & 0x20 != 0 {
            break;
        }
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

pub fn write_bytes(s: &[u8]) {
    for &b in s {
        putb(b);
    }
}

/// A line being built; excess text is dropped and marked with `...`.
pub struct Line<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> Line<N> {
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            truncated: false,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

impl<const N: usize> fmt::Write for Line<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len + 4 >= N {
                self.truncated = true;
                return Ok(());
            }
            // Keep the output one line of printable ASCII.
            let b = if (0x20..0x7f).contains(&b) { b } else { b'?' };
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Writes text straight to the port.
pub struct Port;

impl fmt::Write for Port {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Shows guest-provided bytes safely (printable ASCII, others escaped).
pub struct Printable<'a>(pub &'a [u8]);

impl fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
                fmt::Write::write_char(f, b as char)?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Port, format_args!($($arg)*));
        $crate::serial::write_bytes(b"\n");
    }};
}
