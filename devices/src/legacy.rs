//! The COM1 8250 UART (vm-superio) on the [`BusDevice`] seam, and the legacy port map. The
//! i8042 is in [`crate::i8042`].

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, EventFdTrigger};

/// COM1's base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's port range.
pub const COM1_LEN: u64 = 8;
/// COM1's IRQ.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port; the command/status port is at +4.
pub const I8042_PORT: u64 = 0x60;
/// i8042 port range (0x60..=0x64).
pub const I8042_LEN: u64 = 5;

/// A snapshot's UART state (vm-superio's `SerialState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch.
    pub scratch: u8,
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
}

/// A snapshot's UART state that vm-superio refuses (a receive FIFO over its size).
#[derive(Debug, thiserror::Error)]
#[error("serial state refused: {0}")]
pub struct SerialStateError(pub String);

/// Tells the event loop when the guest has drained the UART's input FIFO, so it can push more
/// console input without polling.
pub struct SerialInputEvents {
    /// Written when the receive FIFO becomes empty.
    pub in_buffer_empty: Arc<EventFd>,
}

impl SerialEvents for SerialInputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.in_buffer_empty.write(1);
    }
}

/// The console output sink: bytes go out unbuffered so a host reader sees each line at once.
pub struct ConsoleOut(pub Box<dyn Write + Send>);

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// COM1.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, SerialInputEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A UART raising `irq` (an irqfd), writing to `out`, signalling `in_buffer_empty`.
    pub fn new(
        irq: Arc<EventFd>,
        in_buffer_empty: Arc<EventFd>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        SerialDevice {
            serial: Serial::with_events(
                EventFdTrigger(irq),
                SerialInputEvents { in_buffer_empty },
                ConsoleOut(out),
            ),
        }
    }

    /// A UART as a snapshot left it (registers and receive FIFO), wired as [`SerialDevice::new`].
    pub fn with_state(
        irq: Arc<EventFd>,
        in_buffer_empty: Arc<EventFd>,
        out: Box<dyn Write + Send>,
        state: &SerialSnapshot,
    ) -> Result<Self, SerialStateError> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(
            &s,
            EventFdTrigger(irq),
            SerialInputEvents { in_buffer_empty },
            ConsoleOut(out),
        )
        .map_err(|e| SerialStateError(format!("{e:?}")))?;
        Ok(SerialDevice { serial })
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Room left in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues console input for the guest; returns how many bytes were taken.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.serial.fifo_capacity() == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

/// The UART register a one-byte access at `offset` reaches, if any.
fn uart_register(offset: u64, len: usize) -> Option<u8> {
    if len == 1 && offset < COM1_LEN {
        u8::try_from(offset).ok()
    } else {
        None
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(reg) = uart_register(offset, data.len()) {
            data[0] = self.serial.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(reg) = uart_register(offset, data.len()) {
            if let Err(e) = self.serial.write(reg, data[0]) {
                log::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn efd() -> Arc<EventFd> {
        Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn serial_output_and_input() {
        let sink = Sink::default();
        let (irq, empty) = (efd(), efd());
        let mut s = SerialDevice::new(irq.clone(), empty.clone(), Box::new(sink.clone()));
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then feed input.
        s.write(1, &[1]);
        assert_eq!(s.enqueue(b"ok"), 2);
        assert!(irq.read().is_ok());
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'o');
        s.read(0, &mut b);
        assert_eq!(b[0], b'k');
        assert!(empty.read().is_ok(), "drained FIFO is signalled");
        // Odd widths and offsets are ignored, not panics.
        let mut wide = [0u8; 4];
        s.read(0, &mut wide);
        s.write(100, &[1]);
        s.write(0, &[1, 2]);
    }
}
