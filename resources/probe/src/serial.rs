//! COM1 (8250 at 0x3f8) output, plus a fixed-size line buffer
//! implementing `fmt::Write` (no allocator in the probe). The bytes go out
//! at CPL0 through one service-gate call per buffer (`cpu::serial_write`,
//! which polls LSR.THRE per byte): on a host that emulates CPL0, a gate call
//! per byte would make every line cost hundreds of emulated entries.

use crate::cpu::{outb, serial_write};
use core::fmt;

const COM1: u16 = 0x3f8;

pub fn init() {
    outb(COM1 + 1, 0x00); // no UART interrupts
    outb(COM1 + 3, 0x03); // 8N1, DLAB off
}

/// Writes bytes to COM1 (the wait for THRE is bounded: a missing UART reads
/// 0xff, THRE set, anyway).
pub fn write_bytes(s: &[u8]) {
    serial_write(s);
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

/// Text to the port through a small buffer: one gate call per 256 bytes
/// and one at `flush` (the caller flushes; nothing is lost on overflow).
pub struct Port {
    buf: [u8; 256],
    len: usize,
}

impl Port {
    pub const fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    pub fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Port {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
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
        let mut port = $crate::serial::Port::new();
        let _ = core::fmt::Write::write_fmt(&mut port, format_args!($($arg)*));
        let _ = core::fmt::Write::write_str(&mut port, "\n");
        port.flush();
    }};
}
