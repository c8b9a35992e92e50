//! An i8042 PS/2 controller with an AT keyboard behind it (no aux/mouse device).
//!
//! It exists so the VMM can type Ctrl+Alt+Del into the guest (Firecracker's `SendCtrlAltDel`
//! action): Linux's i8042 + atkbd drivers turn that key combination into `ctrl_alt_del()`,
//! an orderly reboot, which cinder sees as the guest's reset. It also carries the classic
//! reset line (command 0xFE, or an output-port write with bit 0 clear).
//!
//! Registered at port 0x60 with length 5: offset 0 is the data port (0x60), offset 4 the
//! status (read) / command (write) port (0x64). Offsets 1..=3 (0x61..0x63: PC speaker, NMI
//! status) are not ours: reads give 0, writes are ignored, as before this device.
//!
//! # Model
//!
//! - One bounded output buffer (16 bytes) shared by controller replies and keyboard bytes.
//!   A controller reply (e.g. the command byte for 0x20) goes to the front: on real hardware
//!   the keyboard holds its data while the controller answers, so the guest's
//!   `command; wait OBF; read` reads the reply even with keystrokes pending. Overflowing
//!   bytes are dropped and counted ([`I8042::dropped`]).
//! - OBF is set while the buffer is not empty. IRQ1 (an edge through the irqfd) is raised
//!   when a byte arrives in an empty buffer, when the guest reads a byte and more remain,
//!   and when the guest enables the keyboard interrupt with data pending; always only while
//!   the command byte's keyboard-interrupt bit is set.
//! - Scan codes: the keyboard speaks scan code set 2 (what a real AT/PS2 keyboard sends
//!   after reset), or set 1 / set 3 if the guest selects them. Everything the keyboard sends
//!   passes the controller's set 2 -> set 1 translation while the command byte's
//!   translation bit is set, exactly as on a PC (this includes replies: `F2` identify gives
//!   `FA AB 41` translated, `FA AB 83` not). The initial command byte is 0x65 (translation,
//!   aux disabled, system flag, keyboard interrupt), what a PC BIOS leaves behind with no
//!   mouse. Linux keeps the translation the firmware left on (and reads set 1: Ctrl+Alt+Del
//!   arrives as `1D 38 E0 53`) unless booted with `i8042.direct`; with the bit clear it
//!   drives the port untranslated and reads set 2 (`14 11 E0 71`). Either way atkbd sees
//!   the right keys, because the translation really happens here.
//! - No aux device: the aux port can be disabled (0xA7) but not enabled (0xA8 leaves the
//!   disable bit set), which is the bit-assignment test Linux's `i8042_check_aux()` uses to
//!   conclude "no AUX port" within a few polls. The aux loopback (0xD3) echoes its byte with
//!   the aux status bit, as the controller does internally; bytes for the aux device (0xD4)
//!   are dropped.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use log::{debug, warn};

use crate::{BusDevice, InterruptTrigger};

/// Data port offset (port 0x60).
pub const DATA_OFFSET: u64 = 0;
/// Status/command port offset (port 0x64).
pub const COMMAND_OFFSET: u64 = 4;
/// Output buffer capacity in bytes.
pub const BUFFER_SIZE: usize = 16;

// Status register bits.
/// Output buffer full: a byte is waiting at the data port.
pub const SR_OBF: u8 = 0x01;
/// System flag (POST passed).
pub const SR_SYS: u8 = 0x04;
/// Last write went to the command port (1) or the data port (0).
pub const SR_CMD: u8 = 0x08;
/// Keyboard not inhibited (keylock switch open).
pub const SR_UNLOCKED: u8 = 0x10;
/// The byte in the output buffer came from the aux port.
pub const SR_AUXDATA: u8 = 0x20;

// Controller command byte (CTR) bits.
/// Keyboard interrupt (IRQ1) enabled.
pub const CTR_KBDINT: u8 = 0x01;
/// Aux interrupt (IRQ12) enabled.
pub const CTR_AUXINT: u8 = 0x02;
/// System flag.
pub const CTR_SYS: u8 = 0x04;
/// Keyboard interface disabled.
pub const CTR_KBDDIS: u8 = 0x10;
/// Aux interface disabled.
pub const CTR_AUXDIS: u8 = 0x20;
/// Set 2 -> set 1 translation.
pub const CTR_XLATE: u8 = 0x40;
/// The command byte after reset: translation, aux disabled, system flag, keyboard IRQ.
pub const CTR_INITIAL: u8 = CTR_XLATE | CTR_AUXDIS | CTR_SYS | CTR_KBDINT;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT_PORT: u8 = 0xc0;
const CMD_READ_MODE: u8 = 0xca;
const CMD_WRITE_MODE: u8 = 0xcb;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;

/// Controller replies.
const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_TEST_OK: u8 = 0x00;

// Keyboard commands (port 0x60) and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_ENABLE: u8 = 0xf4;
const KBD_DISABLE: u8 = 0xf5;
const KBD_SET_DEFAULT: u8 = 0xf6;
const KBD_RESEND: u8 = 0xfe;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_NAK: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPUT_PORT_INITIAL: u8 = 0x03;
/// PS/2 mode, as reported by 0xCA.
const MODE_INITIAL: u8 = 0x01;

/// Ctrl, Alt, Delete make codes per scan code set (1, 2, 3).
const CAD_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53];
const CAD_SET2: &[u8] = &[0x14, 0x11, 0xe0, 0x71];
const CAD_SET3: &[u8] = &[0x11, 0x19, 0x64];

/// The 8042's scan code translation for bytes 0x00..=0x7f (set 2 to set 1). Bytes from
/// 0x80 up pass unchanged except 0x83 (F7 in set 2) -> 0x41; 0xF0 (break prefix) is
/// swallowed and sets bit 7 of the next byte.
const XLATE: [u8; 128] = [
    0xff, 0x43, 0x41, 0x3f, 0x3d, 0x3b, 0x3c, 0x58, 0x64, 0x44, 0x42, 0x40, 0x3e, 0x0f, 0x29, 0x59,
    0x65, 0x38, 0x2a, 0x70, 0x1d, 0x10, 0x02, 0x5a, 0x66, 0x71, 0x2c, 0x1f, 0x1e, 0x11, 0x03, 0x5b,
    0x67, 0x2e, 0x2d, 0x20, 0x12, 0x05, 0x04, 0x5c, 0x68, 0x39, 0x2f, 0x21, 0x14, 0x13, 0x06, 0x5d,
    0x69, 0x31, 0x30, 0x23, 0x22, 0x15, 0x07, 0x5e, 0x6a, 0x72, 0x32, 0x24, 0x16, 0x08, 0x09, 0x5f,
    0x6b, 0x33, 0x25, 0x17, 0x18, 0x0b, 0x0a, 0x60, 0x6c, 0x34, 0x35, 0x26, 0x27, 0x19, 0x0c, 0x61,
    0x6d, 0x73, 0x28, 0x74, 0x1a, 0x0d, 0x62, 0x6e, 0x3a, 0x36, 0x1c, 0x1b, 0x75, 0x2b, 0x63, 0x76,
    0x55, 0x56, 0x77, 0x78, 0x79, 0x7a, 0x0e, 0x7b, 0x7c, 0x4f, 0x7d, 0x4b, 0x47, 0x7e, 0x7f, 0x6f,
    0x52, 0x53, 0x50, 0x4c, 0x4d, 0x48, 0x01, 0x45, 0x57, 0x4e, 0x51, 0x4a, 0x37, 0x49, 0x46, 0x54,
];

/// Why the VMM could not type into the guest.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The output buffer cannot take the whole key sequence: the guest is not reading its
    /// keyboard (no i8042/atkbd driver, or it is wedged).
    #[error(
        "the i8042 output buffer has room for {free} bytes but the key sequence needs \
         {needed}: the guest is not reading its keyboard (does its kernel have the i8042 \
         and AT keyboard drivers?)"
    )]
    BufferFull {
        /// Bytes in the key sequence.
        needed: usize,
        /// Bytes the output buffer has room for.
        free: usize,
    },
    /// The guest disabled the keyboard (command 0xAD, or 0xF5 to the keyboard): a real
    /// keyboard drops keystrokes then.
    #[error("the guest has disabled its keyboard (i8042 command byte {ctr:#04x}, scanning {scanning}): keys would be lost, try again later")]
    KeyboardDisabled {
        /// The controller command byte (bit 4 set: keyboard interface disabled).
        ctr: u8,
        /// Whether the keyboard itself is scanning (0xF5 turns that off).
        scanning: bool,
    },
    /// Raising IRQ1 failed.
    #[error("cannot raise the keyboard interrupt: {0}")]
    Interrupt(#[source] std::io::Error),
}

/// What the next byte written to the data port means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DataTarget {
    /// A command (or its argument) for the keyboard.
    Keyboard,
    /// The new command byte (after 0x60) or internal RAM byte (0x61..=0x7f).
    Ram(u8),
    /// The new output port value (after 0xD1).
    OutputPort,
    /// A byte to place in the output buffer as if from the keyboard (after 0xD2).
    KbdOutput,
    /// A byte to echo as if from the aux device (after 0xD3).
    AuxOutput,
    /// A byte for the (absent) aux device (after 0xD4).
    Aux,
    /// The new mode byte (after 0xCB).
    Mode,
}

/// A keyboard command waiting for its argument byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KbdArg {
    /// No argument expected.
    None,
    /// The LED byte of 0xED.
    Leds,
    /// The typematic byte of 0xF3.
    Rate,
    /// The scan code set of 0xF0.
    ScancodeSet,
}

/// A byte waiting in the output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutByte {
    /// The byte.
    pub value: u8,
    /// From the aux device.
    pub aux: bool,
}

/// The i8042's state for a snapshot: everything but its interrupt lines and counters.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// The output buffer (at most [`BUFFER_SIZE`] bytes are taken back).
    pub out: Vec<OutByte>,
    /// Internal RAM; byte 0 is the command byte.
    pub ram: [u8; 32],
    /// The system flag.
    pub status_sys: bool,
    /// The last write was to the command port.
    pub last_was_command: bool,
    /// What the next data byte means.
    pub data_target: DataTarget,
    /// The output port.
    pub output_port: u8,
    /// The mode byte.
    pub mode: u8,
    /// Set 2 -> 1 translation saw a break prefix.
    pub xlate_break: bool,
    /// A keyboard command waiting for its argument.
    pub kbd_arg: KbdArg,
    /// Keyboard scanning enabled.
    pub scanning: bool,
    /// The keyboard's scan code set.
    pub scancode_set: u8,
    /// LEDs.
    pub leds: u8,
    /// Typematic rate.
    pub rate: u8,
    /// The last byte the keyboard sent (for RESEND).
    pub last_kbd_byte: u8,
}

/// The i8042 controller and its keyboard. See the module documentation.
pub struct I8042 {
    kbd_irq: Arc<dyn InterruptTrigger>,
    reset: Arc<dyn InterruptTrigger>,
    out: VecDeque<OutByte>,
    /// Internal RAM; byte 0 is the controller command byte.
    ram: [u8; 32],
    status_sys: bool,
    last_was_command: bool,
    data_target: DataTarget,
    output_port: u8,
    mode: u8,
    /// Set 2 -> 1 translation saw an 0xF0 break prefix.
    xlate_break: bool,
    // Keyboard state.
    kbd_arg: KbdArg,
    scanning: bool,
    scancode_set: u8,
    leds: u8,
    rate: u8,
    last_kbd_byte: u8,
    dropped: u64,
    irqs: u64,
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042")
            .field("ctr", &self.ctr())
            .field("pending", &self.out.len())
            .field("scanning", &self.scanning)
            .field("scancode_set", &self.scancode_set)
            .field("dropped", &self.dropped)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// The controller's state, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            out: self.out.iter().copied().collect(),
            ram: self.ram,
            status_sys: self.status_sys,
            last_was_command: self.last_was_command,
            data_target: self.data_target,
            output_port: self.output_port,
            mode: self.mode,
            xlate_break: self.xlate_break,
            kbd_arg: self.kbd_arg,
            scanning: self.scanning,
            scancode_set: self.scancode_set,
            leds: self.leds,
            rate: self.rate,
            last_kbd_byte: self.last_kbd_byte,
        }
    }

    /// Takes back a snapshot's state (an output buffer beyond its size is cut).
    pub fn restore(&mut self, s: &I8042State) {
        self.out = s.out.iter().copied().take(BUFFER_SIZE).collect();
        self.ram = s.ram;
        self.status_sys = s.status_sys;
        self.last_was_command = s.last_was_command;
        self.data_target = s.data_target;
        self.output_port = s.output_port;
        self.mode = s.mode;
        self.xlate_break = s.xlate_break;
        self.kbd_arg = s.kbd_arg;
        self.scanning = s.scanning;
        self.scancode_set = s.scancode_set;
        self.leds = s.leds;
        self.rate = s.rate;
        self.last_kbd_byte = s.last_kbd_byte;
    }

    /// A controller after power-on. `kbd_irq` raises IRQ1 (an irqfd); `reset` is signalled
    /// when the guest pulses the CPU reset line (an EventFd the VMM watches).
    pub fn new(kbd_irq: Arc<dyn InterruptTrigger>, reset: Arc<dyn InterruptTrigger>) -> I8042 {
        let mut ram = [0u8; 32];
        ram[0] = CTR_INITIAL;
        I8042 {
            kbd_irq,
            reset,
            out: VecDeque::with_capacity(BUFFER_SIZE),
            ram,
            status_sys: true,
            last_was_command: false,
            data_target: DataTarget::Keyboard,
            output_port: OUTPUT_PORT_INITIAL,
            mode: MODE_INITIAL,
            xlate_break: false,
            kbd_arg: KbdArg::None,
            scanning: true,
            scancode_set: 2,
            leds: 0,
            rate: 0,
            last_kbd_byte: KBD_ACK,
            dropped: 0,
            irqs: 0,
        }
    }

    /// Types Ctrl+Alt+Delete: queues the three make codes in the keyboard's current scan
    /// code set (set 2: `14 11 E0 71`; through the controller's translation, the default,
    /// the guest reads `1D 38 E0 53`) and raises IRQ1 if the guest enabled it. No break
    /// codes: the keys stay "held", which is all `ctrl_alt_del` needs (Firecracker does
    /// the same). Fails without queuing anything if the sequence does not fit or the guest
    /// has disabled the keyboard.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if !self.scanning || self.ctr() & CTR_KBDDIS != 0 {
            return Err(I8042Error::KeyboardDisabled {
                ctr: self.ctr(),
                scanning: self.scanning,
            });
        }
        let codes = match self.scancode_set {
            1 => CAD_SET1,
            3 => CAD_SET3,
            _ => CAD_SET2,
        };
        let needed = self.translated_len(codes);
        let free = BUFFER_SIZE - self.out.len();
        if needed > free {
            return Err(I8042Error::BufferFull { needed, free });
        }
        let was_empty = self.out.is_empty();
        for &c in codes {
            self.kbd_send(c);
        }
        if was_empty && self.front_is_kbd() && self.ctr() & CTR_KBDINT != 0 {
            self.irqs += 1;
            self.kbd_irq.trigger().map_err(I8042Error::Interrupt)?;
        }
        Ok(())
    }

    /// Bytes lost because the output buffer was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// IRQ1 edges raised so far.
    pub fn irqs_raised(&self) -> u64 {
        self.irqs
    }

    /// Bytes waiting in the output buffer.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// The controller command byte.
    pub fn ctr(&self) -> u8 {
        self.ram[0]
    }

    fn status(&self) -> u8 {
        let mut s = SR_UNLOCKED;
        if let Some(b) = self.out.front() {
            s |= SR_OBF;
            if b.aux {
                s |= SR_AUXDATA;
            }
        }
        if self.status_sys {
            s |= SR_SYS;
        }
        if self.last_was_command {
            s |= SR_CMD;
        }
        s
    }

    fn front_is_kbd(&self) -> bool {
        self.out.front().is_some_and(|b| !b.aux)
    }

    /// One IRQ1 edge, if the guest enabled the keyboard interrupt.
    fn raise_irq(&mut self) {
        if self.ctr() & CTR_KBDINT == 0 {
            return;
        }
        self.irqs += 1;
        if let Err(e) = self.kbd_irq.trigger() {
            warn!("i8042: cannot raise IRQ1: {e}");
        }
    }

    /// Appends a byte (the caller raises IRQ1 if the buffer was empty).
    fn push_back(&mut self, value: u8, aux: bool) {
        if self.out.len() >= BUFFER_SIZE {
            self.dropped += 1;
            debug!("i8042: output buffer full, dropped {value:#04x}");
            return;
        }
        self.out.push_back(OutByte { value, aux });
    }

    /// A controller reply: ahead of any pending keyboard bytes.
    fn reply(&mut self, value: u8) {
        if self.out.len() >= BUFFER_SIZE {
            // Make room for the reply: the newest keyboard byte is the one to lose.
            self.out.pop_back();
            self.dropped += 1;
        }
        self.out.push_front(OutByte { value, aux: false });
    }

    /// How many bytes `codes` occupy in the output buffer after translation.
    fn translated_len(&self, codes: &[u8]) -> usize {
        if self.ctr() & CTR_XLATE == 0 {
            return codes.len();
        }
        codes.iter().filter(|&&c| c != 0xf0).count()
    }

    /// A byte from the keyboard, through the translation if enabled.
    fn kbd_send(&mut self, byte: u8) {
        self.last_kbd_byte = byte;
        if self.ctr() & CTR_XLATE == 0 {
            self.push_back(byte, false);
            return;
        }
        if byte == 0xf0 {
            self.xlate_break = true;
            return;
        }
        let mut v = match byte {
            0x00..=0x7f => XLATE[byte as usize],
            0x83 => 0x41,
            _ => byte,
        };
        if std::mem::take(&mut self.xlate_break) {
            v |= 0x80;
        }
        self.push_back(v, false);
    }

    fn kbd_reset_state(&mut self) {
        self.scancode_set = 2;
        self.leds = 0;
        self.rate = 0;
        self.kbd_arg = KbdArg::None;
    }

    /// A byte written to the data port for the keyboard.
    fn kbd_write(&mut self, byte: u8) {
        match std::mem::replace(&mut self.kbd_arg, KbdArg::None) {
            KbdArg::Leds => {
                self.leds = byte & 0x07;
                self.kbd_send(KBD_ACK);
                return;
            }
            KbdArg::Rate => {
                self.rate = byte & 0x7f;
                self.kbd_send(KBD_ACK);
                return;
            }
            KbdArg::ScancodeSet => {
                match byte {
                    0 => {
                        self.kbd_send(KBD_ACK);
                        self.kbd_send(self.scancode_set);
                    }
                    1..=3 => {
                        self.scancode_set = byte;
                        self.kbd_send(KBD_ACK);
                    }
                    _ => {
                        debug!("i8042: keyboard: unknown scan code set {byte:#04x}");
                        self.kbd_send(KBD_NAK);
                    }
                }
                return;
            }
            KbdArg::None => {}
        }
        match byte {
            KBD_RESET => {
                self.kbd_reset_state();
                self.scanning = true;
                self.kbd_send(KBD_ACK);
                self.kbd_send(KBD_BAT_OK);
            }
            KBD_RESEND => {
                let last = self.last_kbd_byte;
                self.kbd_send(last);
            }
            KBD_SET_DEFAULT => {
                self.kbd_reset_state();
                self.kbd_send(KBD_ACK);
            }
            KBD_DISABLE => {
                self.kbd_reset_state();
                self.scanning = false;
                self.kbd_send(KBD_ACK);
            }
            KBD_ENABLE => {
                self.scanning = true;
                self.kbd_send(KBD_ACK);
            }
            KBD_IDENTIFY => {
                self.kbd_send(KBD_ACK);
                self.kbd_send(KBD_ID[0]);
                self.kbd_send(KBD_ID[1]);
            }
            KBD_ECHO => self.kbd_send(KBD_ECHO),
            KBD_SET_LEDS => {
                self.kbd_arg = KbdArg::Leds;
                self.kbd_send(KBD_ACK);
            }
            KBD_SET_RATE => {
                self.kbd_arg = KbdArg::Rate;
                self.kbd_send(KBD_ACK);
            }
            KBD_SCANCODE_SET => {
                self.kbd_arg = KbdArg::ScancodeSet;
                self.kbd_send(KBD_ACK);
            }
            // Set 3 key-type commands (all keys typematic/make-release/...): accepted.
            0xf7..=0xfd => self.kbd_send(KBD_ACK),
            _ => {
                debug!("i8042: keyboard: unknown command {byte:#04x}");
                self.kbd_send(KBD_NAK);
            }
        }
    }

    fn pulse_reset(&mut self) {
        debug!("i8042: CPU reset requested");
        if let Err(e) = self.reset.trigger() {
            warn!("i8042: cannot signal the reset: {e}");
        }
    }

    fn write_ctr(&mut self, v: u8) {
        let was = self.ctr();
        // The aux port cannot be enabled: there is no aux device.
        self.ram[0] = v | CTR_AUXDIS;
        self.status_sys = v & CTR_SYS != 0;
        if was & CTR_KBDINT == 0 && v & CTR_KBDINT != 0 && !self.out.is_empty() {
            self.raise_irq();
        }
    }

    /// A byte written to the command port.
    fn command(&mut self, cmd: u8) {
        // A new command cancels a pending data-port parameter.
        self.data_target = DataTarget::Keyboard;
        match cmd {
            CMD_READ_CTR..=0x3f => {
                let v = self.ram[(cmd & 0x1f) as usize];
                self.reply(v);
            }
            CMD_WRITE_CTR..=0x7f => self.data_target = DataTarget::Ram(cmd & 0x1f),
            CMD_AUX_DISABLE => self.ram[0] |= CTR_AUXDIS,
            CMD_AUX_ENABLE => debug!("i8042: aux enable ignored: no aux device"),
            CMD_AUX_TEST | CMD_KBD_TEST => self.reply(INTERFACE_TEST_OK),
            CMD_SELF_TEST => {
                self.status_sys = true;
                self.reply(SELF_TEST_OK);
            }
            CMD_KBD_DISABLE => self.ram[0] |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ram[0] &= !CTR_KBDDIS,
            CMD_READ_INPUT_PORT => self.reply(0x00),
            CMD_READ_MODE => self.reply(self.mode),
            CMD_WRITE_MODE => self.data_target = DataTarget::Mode,
            CMD_READ_OUTPUT_PORT => self.reply(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.data_target = DataTarget::OutputPort,
            CMD_WRITE_KBD_OUTPUT => self.data_target = DataTarget::KbdOutput,
            CMD_WRITE_AUX_OUTPUT => self.data_target = DataTarget::AuxOutput,
            CMD_WRITE_AUX => self.data_target = DataTarget::Aux,
            // Pulse output port lines 0..3 low for each clear bit; bit 0 is CPU reset.
            0xf0..=0xff => {
                if cmd & 1 == 0 {
                    self.pulse_reset();
                }
            }
            _ => debug!("i8042: unknown controller command {cmd:#04x}"),
        }
    }

    /// A byte written to the data port.
    fn data(&mut self, v: u8) {
        match std::mem::replace(&mut self.data_target, DataTarget::Keyboard) {
            DataTarget::Keyboard => self.kbd_write(v),
            DataTarget::Ram(0) => self.write_ctr(v),
            DataTarget::Ram(i) => self.ram[(i & 0x1f) as usize] = v,
            DataTarget::OutputPort => {
                self.output_port = v;
                if v & 1 == 0 {
                    self.pulse_reset();
                }
            }
            DataTarget::KbdOutput => self.push_back(v, false),
            DataTarget::AuxOutput => self.push_back(v, true),
            DataTarget::Aux => debug!("i8042: byte {v:#04x} for the absent aux device dropped"),
            DataTarget::Mode => self.mode = v,
        }
    }

    fn read_data(&mut self) -> u8 {
        match self.out.pop_front() {
            Some(b) => {
                if self.front_is_kbd() {
                    self.raise_irq();
                }
                b.value
            }
            // Reading an empty buffer returns the last byte on hardware; 0 is as good.
            None => 0,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [v] = data else {
            debug!(
                "i8042: ignored {}-byte write at offset {offset}",
                data.len()
            );
            return;
        };
        let was_empty = self.out.is_empty();
        match offset {
            DATA_OFFSET => {
                self.last_was_command = false;
                self.data(*v);
            }
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(*v);
            }
            _ => {}
        }
        // OBF && KBDINT is the IRQ1 line: an edge when data arrives in an empty buffer.
        if was_empty && self.front_is_kbd() {
            self.raise_irq();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Counter(AtomicU64);

    impl Counter {
        fn take(&self) -> u64 {
            self.0.swap(0, Ordering::SeqCst)
        }
    }

    impl InterruptTrigger for Counter {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Failing;

    impl InterruptTrigger for Failing {
        fn trigger(&self) -> io::Result<()> {
            Err(io::Error::other("no irqfd"))
        }
    }

    struct Fixture {
        dev: I8042,
        irq: Arc<Counter>,
        reset: Arc<Counter>,
    }

    fn fixture() -> Fixture {
        let irq = Arc::new(Counter::default());
        let reset = Arc::new(Counter::default());
        let dev = I8042::new(irq.clone(), reset.clone());
        Fixture { dev, irq, reset }
    }

    impl Fixture {
        fn outb(&mut self, off: u64, v: u8) {
            self.dev.write(off, &[v]);
        }
        fn inb(&mut self, off: u64) -> u8 {
            let mut b = [0u8];
            self.dev.read(off, &mut b);
            b[0]
        }
        fn cmd(&mut self, c: u8) {
            self.outb(COMMAND_OFFSET, c);
        }
        fn status(&mut self) -> u8 {
            self.inb(COMMAND_OFFSET)
        }
        /// Everything in the output buffer.
        fn drain(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            while self.status() & SR_OBF != 0 && v.len() < 64 {
                v.push(self.inb(DATA_OFFSET));
            }
            v
        }
        fn set_ctr(&mut self, ctr: u8) {
            self.cmd(CMD_WRITE_CTR);
            self.outb(DATA_OFFSET, ctr);
        }
        fn read_ctr(&mut self) -> u8 {
            self.cmd(CMD_READ_CTR);
            let v = self.drain();
            assert_eq!(v.len(), 1, "one reply byte: {v:x?}");
            v[0]
        }
        fn kbd(&mut self, bytes: &[u8]) -> Vec<u8> {
            for &b in bytes {
                self.outb(DATA_OFFSET, b);
            }
            self.drain()
        }
    }

    #[test]
    fn initial_state() {
        let mut f = fixture();
        assert_eq!(f.status(), SR_SYS | SR_UNLOCKED);
        assert_eq!(f.read_ctr(), 0x65);
        assert_eq!(f.dev.pending(), 0);
        assert_eq!(f.inb(DATA_OFFSET), 0, "empty buffer reads 0");
        assert!(format!("{:?}", f.dev).contains("I8042"));
    }

    #[test]
    fn status_command_data_bit() {
        let mut f = fixture();
        f.cmd(CMD_KBD_ENABLE);
        assert_ne!(f.status() & SR_CMD, 0);
        f.outb(DATA_OFFSET, KBD_ECHO);
        assert_eq!(f.status() & SR_CMD, 0);
        assert_eq!(f.drain(), [KBD_ECHO]);
    }

    #[test]
    fn ctr_read_write_and_sys_flag() {
        let mut f = fixture();
        f.set_ctr(CTR_KBDINT | CTR_XLATE);
        // The aux port stays disabled.
        assert_eq!(f.read_ctr(), CTR_KBDINT | CTR_XLATE | CTR_AUXDIS);
        assert_eq!(f.status() & SR_SYS, 0, "SYS follows the CTR");
        f.set_ctr(CTR_SYS);
        assert_ne!(f.status() & SR_SYS, 0);
        // Internal RAM beyond the command byte.
        f.cmd(0x65);
        f.outb(DATA_OFFSET, 0x5a);
        f.cmd(0x25);
        assert_eq!(f.drain(), [0x5a]);
        assert_eq!(f.read_ctr(), CTR_SYS | CTR_AUXDIS);
    }

    #[test]
    fn self_test_and_interface_tests() {
        let mut f = fixture();
        f.set_ctr(0);
        f.cmd(CMD_SELF_TEST);
        assert_eq!(f.drain(), [0x55]);
        assert_ne!(f.status() & SR_SYS, 0, "self-test sets SYS");
        f.cmd(CMD_KBD_TEST);
        assert_eq!(f.drain(), [0x00]);
        f.cmd(CMD_AUX_TEST);
        assert_eq!(f.drain(), [0x00]);
    }

    #[test]
    fn keyboard_disable_enable() {
        let mut f = fixture();
        f.cmd(CMD_KBD_DISABLE);
        assert_ne!(f.read_ctr() & CTR_KBDDIS, 0);
        assert!(matches!(
            f.dev.trigger_ctrl_alt_del(),
            Err(I8042Error::KeyboardDisabled { .. })
        ));
        f.cmd(CMD_KBD_ENABLE);
        assert_eq!(f.read_ctr() & CTR_KBDDIS, 0);
        f.dev.trigger_ctrl_alt_del().unwrap();
    }

    #[test]
    fn aux_port_reports_no_device() {
        let mut f = fixture();
        // Linux's bit-assignment test: disable sets AUXDIS, enable cannot clear it.
        f.cmd(CMD_AUX_DISABLE);
        assert_ne!(f.read_ctr() & CTR_AUXDIS, 0);
        f.cmd(CMD_AUX_ENABLE);
        assert_ne!(f.read_ctr() & CTR_AUXDIS, 0);
        // Loopback echoes with the aux bit, without IRQ1.
        f.irq.take();
        f.cmd(CMD_WRITE_AUX_OUTPUT);
        f.outb(DATA_OFFSET, 0x5a);
        assert_eq!(f.status() & (SR_OBF | SR_AUXDATA), SR_OBF | SR_AUXDATA);
        assert_eq!(f.irq.take(), 0);
        assert_eq!(f.drain(), [0x5a]);
        // Bytes for the aux device vanish and do not reach the keyboard.
        f.cmd(CMD_WRITE_AUX);
        f.outb(DATA_OFFSET, KBD_RESET);
        assert_eq!(f.drain(), Vec::<u8>::new());
    }

    #[test]
    fn mode_byte() {
        let mut f = fixture();
        f.cmd(CMD_READ_MODE);
        assert_eq!(f.drain(), [MODE_INITIAL]);
        f.cmd(CMD_WRITE_MODE);
        f.outb(DATA_OFFSET, 0x00);
        f.cmd(CMD_READ_MODE);
        assert_eq!(f.drain(), [0x00]);
        f.cmd(CMD_READ_INPUT_PORT);
        assert_eq!(f.drain().len(), 1);
    }

    #[test]
    fn reset_by_command_and_output_port() {
        let mut f = fixture();
        f.cmd(0xfe);
        assert_eq!(f.reset.take(), 1);
        f.cmd(0xff); // pulses nothing
        f.cmd(0xfd); // pulses bit 1 (A20) only
        assert_eq!(f.reset.take(), 0);
        f.cmd(0xf0); // pulses all four, including reset
        assert_eq!(f.reset.take(), 1);
        f.cmd(CMD_READ_OUTPUT_PORT);
        assert_eq!(f.drain(), [OUTPUT_PORT_INITIAL]);
        f.cmd(CMD_WRITE_OUTPUT_PORT);
        f.outb(DATA_OFFSET, 0x03);
        assert_eq!(f.reset.take(), 0);
        f.cmd(CMD_WRITE_OUTPUT_PORT);
        f.outb(DATA_OFFSET, 0x02);
        assert_eq!(f.reset.take(), 1);
        // A data byte without 0xD1 is for the keyboard, not the output port.
        f.outb(DATA_OFFSET, 0x00);
        assert_eq!(f.reset.take(), 0);
    }

    #[test]
    fn reset_trigger_failure_is_not_fatal() {
        let mut dev = I8042::new(Arc::new(Failing), Arc::new(Failing));
        dev.write(COMMAND_OFFSET, &[0xfe]);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        let mut b = [0u8];
        dev.read(DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0x55);
        assert!(matches!(
            dev.trigger_ctrl_alt_del(),
            Err(I8042Error::Interrupt(_))
        ));
    }

    #[test]
    fn keyboard_commands_translated() {
        let mut f = fixture();
        assert_eq!(f.kbd(&[KBD_RESET]), [KBD_ACK, KBD_BAT_OK]);
        // Translation maps the 0x83 ID byte to 0x41, as on a PC.
        assert_eq!(f.kbd(&[KBD_IDENTIFY]), [KBD_ACK, 0xab, 0x41]);
        assert_eq!(f.kbd(&[KBD_DISABLE]), [KBD_ACK]);
        assert_eq!(f.kbd(&[KBD_ENABLE]), [KBD_ACK]);
        assert_eq!(f.kbd(&[KBD_SET_DEFAULT]), [KBD_ACK]);
        assert_eq!(f.kbd(&[KBD_SET_LEDS, 0x07]), [KBD_ACK, KBD_ACK]);
        assert_eq!(f.dev.leds, 0x07);
        assert_eq!(f.kbd(&[KBD_SET_RATE, 0x20]), [KBD_ACK, KBD_ACK]);
        assert_eq!(f.kbd(&[KBD_ECHO]), [KBD_ECHO]);
        // Set query: set 2 reads as 0x41 through the translation.
        assert_eq!(f.kbd(&[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 0x41]);
        assert_eq!(f.kbd(&[0xf8]), [KBD_ACK]);
        assert_eq!(f.kbd(&[0x42]), [KBD_NAK]);
        assert_eq!(f.kbd(&[KBD_RESEND]), [KBD_NAK]);
    }

    #[test]
    fn keyboard_commands_untranslated() {
        let mut f = fixture();
        f.set_ctr(CTR_KBDINT | CTR_SYS);
        assert_eq!(f.kbd(&[KBD_RESET]), [KBD_ACK, KBD_BAT_OK]);
        assert_eq!(f.kbd(&[KBD_IDENTIFY]), [KBD_ACK, 0xab, 0x83]);
        assert_eq!(f.kbd(&[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 2]);
        assert_eq!(f.kbd(&[KBD_SCANCODE_SET, 3]), [KBD_ACK, KBD_ACK]);
        assert_eq!(f.kbd(&[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 3]);
        assert_eq!(f.kbd(&[KBD_SCANCODE_SET, 9]), [KBD_ACK, KBD_NAK]);
        // Reset returns to set 2.
        f.kbd(&[KBD_RESET]);
        assert_eq!(f.kbd(&[KBD_SCANCODE_SET, 0]), [KBD_ACK, KBD_ACK, 2]);
    }

    #[test]
    fn ctrl_alt_del_translated_by_default() {
        let mut f = fixture();
        f.irq.take();
        f.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.irq.take(), 1, "IRQ1 for the first byte");
        assert_eq!(f.status() & SR_OBF, SR_OBF);
        let mut got = Vec::new();
        while f.status() & SR_OBF != 0 {
            got.push(f.inb(DATA_OFFSET));
        }
        assert_eq!(got, [0x1d, 0x38, 0xe0, 0x53]);
        // Three more edges: after each read that left data behind.
        assert_eq!(f.irq.take(), 3);
    }

    #[test]
    fn ctrl_alt_del_set2_untranslated() {
        let mut f = fixture();
        f.set_ctr(CTR_KBDINT | CTR_SYS);
        f.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.drain(), [0x14, 0x11, 0xe0, 0x71]);
    }

    #[test]
    fn ctrl_alt_del_other_sets() {
        let mut f = fixture();
        f.set_ctr(CTR_SYS);
        f.kbd(&[KBD_SCANCODE_SET, 1]);
        f.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.drain(), CAD_SET1);
        f.kbd(&[KBD_SCANCODE_SET, 3]);
        f.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.drain(), CAD_SET3);
    }

    #[test]
    fn translation_of_break_codes() {
        let mut f = fixture();
        for b in [0xe0, 0xf0, 0x71, 0xf0, 0x14] {
            f.dev.kbd_send(b);
        }
        assert_eq!(f.drain(), [0xe0, 0xd3, 0x9d]);
        // Spot checks of the table: A, Enter, Esc, Space.
        assert_eq!(XLATE[0x1c], 0x1e);
        assert_eq!(XLATE[0x5a], 0x1c);
        assert_eq!(XLATE[0x76], 0x01);
        assert_eq!(XLATE[0x29], 0x39);
    }

    #[test]
    fn no_irq_while_keyboard_interrupt_disabled() {
        let mut f = fixture();
        f.set_ctr(CTR_XLATE | CTR_SYS);
        f.irq.take();
        f.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.irq.take(), 0);
        assert_eq!(f.status() & SR_OBF, SR_OBF, "pollable");
        // Enabling the interrupt with data pending raises it (OBF && KBDINT is the line).
        f.set_ctr(CTR_XLATE | CTR_SYS | CTR_KBDINT);
        assert_eq!(f.irq.take(), 1);
        assert_eq!(f.drain(), [0x1d, 0x38, 0xe0, 0x53]);
    }

    #[test]
    fn ctrl_alt_del_needs_enabled_scanning() {
        let mut f = fixture();
        f.kbd(&[KBD_DISABLE]);
        let e = f.dev.trigger_ctrl_alt_del().unwrap_err();
        assert!(e.to_string().contains("disabled"), "{e}");
        assert_eq!(f.dev.pending(), 0);
        f.kbd(&[KBD_ENABLE]);
        f.dev.trigger_ctrl_alt_del().unwrap();
    }

    #[test]
    fn buffer_full_is_an_error_and_queues_nothing() {
        let mut f = fixture();
        for _ in 0..BUFFER_SIZE / 4 {
            f.dev.trigger_ctrl_alt_del().unwrap();
        }
        assert_eq!(f.dev.pending(), BUFFER_SIZE);
        match f.dev.trigger_ctrl_alt_del() {
            Err(I8042Error::BufferFull { needed: 4, free: 0 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(f.dev.pending(), BUFFER_SIZE);
        assert_eq!(f.dev.dropped(), 0);
        f.inb(DATA_OFFSET);
        assert!(f.dev.trigger_ctrl_alt_del().is_err(), "3 free < 4 needed");
    }

    #[test]
    fn overflow_drops_and_counts() {
        let mut f = fixture();
        for _ in 0..BUFFER_SIZE + 5 {
            f.outb(DATA_OFFSET, KBD_ECHO);
        }
        assert_eq!(f.dev.pending(), BUFFER_SIZE);
        assert_eq!(f.dev.dropped(), 5);
        // A controller reply still gets through, ahead of the keyboard bytes.
        f.cmd(CMD_SELF_TEST);
        assert_eq!(f.inb(DATA_OFFSET), 0x55);
        assert_eq!(f.dev.dropped(), 6);
        assert_eq!(f.drain().len(), BUFFER_SIZE - 1);
    }

    #[test]
    fn controller_reply_overtakes_pending_keys() {
        let mut f = fixture();
        f.dev.trigger_ctrl_alt_del().unwrap();
        f.cmd(CMD_READ_CTR);
        assert_eq!(f.drain(), [CTR_INITIAL, 0x1d, 0x38, 0xe0, 0x53]);
    }

    #[test]
    fn pending_parameter_is_cancelled_by_a_new_command() {
        let mut f = fixture();
        f.cmd(CMD_WRITE_CTR);
        f.cmd(CMD_KBD_ENABLE);
        // Goes to the keyboard now, not into the CTR.
        assert_eq!(f.kbd(&[KBD_ECHO]), [KBD_ECHO]);
        assert_eq!(f.read_ctr(), CTR_INITIAL);
        // 0xD2 places a byte as if from the keyboard (IRQ1 included).
        f.irq.take();
        f.cmd(CMD_WRITE_KBD_OUTPUT);
        f.outb(DATA_OFFSET, 0x12);
        assert_eq!(f.irq.take(), 1);
        assert_eq!(f.drain(), [0x12]);
    }

    #[test]
    fn probe_kbd_check_sequence() {
        // What resources/probe/src/kbd.rs does, then the VMM types Ctrl+Alt+Del.
        let mut f = fixture();
        assert_eq!(f.drain(), Vec::<u8>::new());
        let ctr = f.read_ctr();
        f.set_ctr((ctr | CTR_KBDINT) & !CTR_KBDDIS);
        f.cmd(CMD_KBD_ENABLE);
        assert_eq!(f.kbd(&[KBD_ENABLE]), [KBD_ACK]);
        f.irq.take();
        f.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.drain(), [0x1d, 0x38, 0xe0, 0x53]);
        assert_eq!(f.irq.take(), 4, "one IRQ1 edge per byte");
    }

    #[test]
    fn linux_probe_sequence() {
        // The order of Linux's i8042 + atkbd initialisation (without i8042.noaux).
        let mut f = fixture();
        f.drain(); // i8042_flush
        f.cmd(CMD_SELF_TEST);
        assert_eq!(f.drain(), [SELF_TEST_OK]);
        let ctr = f.read_ctr();
        assert_eq!(f.read_ctr(), ctr, "stable CTR");
        f.set_ctr(ctr & !(CTR_KBDINT | CTR_AUXINT));
        // i8042_check_aux: loopback works, the bit-assignment test says "no AUX".
        f.cmd(CMD_WRITE_AUX_OUTPUT);
        f.outb(DATA_OFFSET, 0x5a);
        assert_eq!(f.status() & SR_AUXDATA, SR_AUXDATA);
        assert_eq!(f.drain(), [0x5a]);
        f.cmd(CMD_AUX_DISABLE);
        assert_ne!(f.read_ctr() & CTR_AUXDIS, 0);
        f.cmd(CMD_AUX_ENABLE);
        assert_ne!(
            f.read_ctr() & CTR_AUXDIS,
            0,
            "AUX cannot be enabled: no aux port"
        );
        // Keyboard port enabled with its interrupt.
        f.set_ctr((ctr | CTR_KBDINT) & !CTR_KBDDIS);
        // atkbd: probe, reset-disable, rate, LEDs, enable.
        assert_eq!(f.kbd(&[KBD_IDENTIFY]), [KBD_ACK, 0xab, 0x41]);
        assert_eq!(f.kbd(&[KBD_DISABLE]), [KBD_ACK]);
        assert_eq!(f.kbd(&[KBD_SET_RATE, 0x00]), [KBD_ACK, KBD_ACK]);
        assert_eq!(f.kbd(&[KBD_SET_LEDS, 0x00]), [KBD_ACK, KBD_ACK]);
        assert!(f.dev.trigger_ctrl_alt_del().is_err(), "not scanning yet");
        assert_eq!(f.kbd(&[KBD_ENABLE]), [KBD_ACK]);
        f.dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(f.drain(), [0x1d, 0x38, 0xe0, 0x53]);
    }

    #[test]
    fn any_access_is_survived() {
        let mut f = fixture();
        for len in [0usize, 2, 4, 8] {
            for off in 0..8u64 {
                let mut buf = vec![0u8; len];
                f.dev.read(off, &mut buf);
                assert!(buf.iter().all(|&b| b == 0xff));
                f.dev.write(off, &buf);
            }
        }
        assert_eq!(f.reset.take(), 0, "wide writes are ignored");
        for off in [1u64, 2, 3, 5, 100, u64::MAX] {
            assert_eq!(f.inb(off), 0);
            f.outb(off, 0xfe);
        }
        assert_eq!(f.reset.take(), 0);
        // Every command and every data byte, in every state.
        for c in 0..=255u8 {
            f.cmd(c);
            for d in [0x00, 0xf0, 0xff, 0xed, 0x60] {
                f.outb(DATA_OFFSET, d);
                f.inb(DATA_OFFSET);
                f.inb(COMMAND_OFFSET);
            }
        }
        assert!(f.dev.pending() <= BUFFER_SIZE);
    }
}
