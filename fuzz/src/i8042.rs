//! The i8042 controller: any sequence of port reads and writes of any width (commands,
//! their arguments, keyboard commands, reads of the output buffer), plus Ctrl+Alt+Del from
//! the host.
//!
//! Input: ops of 2 bytes, `(kind, value)`: kind % 8 is 0-1 a data-port write, 2-3 a command
//! write, 4 a data read, 5 a status read, 6 an access of another offset or width, 7
//! Ctrl+Alt+Del.

use std::sync::Arc;

use devices::i8042::{COMMAND_OFFSET, DATA_OFFSET, I8042};
use devices::BusDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Input;

/// Most ops one input runs.
const MAX_OPS: usize = 4096;

/// Runs one input.
pub fn run(data: &[u8]) {
    let efd = || Arc::new(EventFd::new(EFD_NONBLOCK).expect("cannot create an eventfd"));
    let mut dev = I8042::new(efd(), efd());
    let mut input = Input::new(data);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let kind = input.u8();
        let value = input.u8();
        match kind % 8 {
            0 | 1 => dev.write(DATA_OFFSET, &[value]),
            2 | 3 => dev.write(COMMAND_OFFSET, &[value]),
            4 => {
                let mut b = [0u8];
                dev.read(DATA_OFFSET, &mut b);
            }
            5 => {
                let mut b = [0u8];
                dev.read(COMMAND_OFFSET, &mut b);
            }
            6 => {
                let offset = u64::from(value & 7);
                let width = [1usize, 2, 4, 8][usize::from(kind >> 6)];
                let mut b = [0u8; 8];
                if kind & 8 != 0 {
                    dev.write(offset, &b[..width]);
                } else {
                    dev.read(offset, &mut b[..width]);
                }
            }
            _ => {
                let _ = dev.trigger_ctrl_alt_del();
            }
        }
        assert!(
            dev.pending() <= 16,
            "{} bytes pending in the i8042",
            dev.pending()
        );
    }
}

/// Seeds: Linux's probe (self test, CTR read/write, keyboard reset, scan code set), a
/// reset pulse, commands with missing arguments, Ctrl+Alt+Del with a full buffer.
pub fn seeds() -> Vec<Vec<u8>> {
    let cmd = |v: u8| [2u8, v];
    let data = |v: u8| [0u8, v];
    let read = [4u8, 0];
    let status = [5u8, 0];
    let mut probe = Vec::new();
    for op in [
        cmd(0xaa),
        read,
        cmd(0x20),
        read,
        cmd(0x60),
        data(0x47),
        cmd(0xab),
        read,
        data(0xff),
        read,
        read,
        data(0xf0),
        data(0x02),
        read,
        data(0xf0),
        data(0x00),
        read,
        read,
        status,
        data(0xed),
        data(0x07),
        read,
        read,
        cmd(0xd4),
        data(0xf4),
        read,
    ] {
        probe.extend_from_slice(&op);
    }
    let mut reset = Vec::new();
    for op in [cmd(0xd0), read, cmd(0xd1), data(0xfe), cmd(0xfe), cmd(0xf0)] {
        reset.extend_from_slice(&op);
    }
    let mut cad = Vec::new();
    for _ in 0..8 {
        cad.extend_from_slice(&[7, 0]);
        cad.extend_from_slice(&data(0xee));
    }
    cad.extend_from_slice(&[6 | 0x40 | 8, 0, 6 | 0xc0, 4, cmd(0x60)[0], 0x60]);
    vec![probe, reset, cad]
}
