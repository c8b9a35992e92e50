//! `kbd`: waits for Ctrl+Alt+Delete typed by the VMM (Firecracker's
//! `SendCtrlAltDel`, QEMU's `sendkey ctrl-alt-delete`) on the i8042
//! keyboard.
//!
//! The output buffer is polled through the status port (the probe drives
//! everything by polling), and IRQ1 is routed through the I/O APIC (pin 1,
//! edge, to vector 0x41 on the boot CPU) so the IDT stub counts the
//! keyboard interrupts the controller raises: `irqs=` on the result line.
//! Accepted make-code sequences: scan code set 2 `14 11 E0 71` (no
//! translation) and its set 1 translation `1D 38 E0 53`.

use crate::checks::{irq_count, key_num, Details, Status};
use crate::cpu::{self, inb, outb, peek, poke, rdtsc};
use crate::lapic;
use crate::paging;
use crate::println;
use crate::smp;
use crate::time;
use core::fmt::Write;
use core::sync::atomic::Ordering;

const DATA: u16 = 0x60;
const STATUS: u16 = 0x64;
const SR_OBF: u8 = 0x01;
const SR_IBF: u8 = 0x02;
const SR_AUXDATA: u8 = 0x20;
const CTR_KBDINT: u8 = 0x01;
const CTR_KBDDIS: u8 = 0x10;
const CTR_XLATE: u8 = 0x40;

const IOAPIC: u64 = 0xfec0_0000;
const KBD_VECTOR: u32 = 0x41;
const KBD_PIN: u32 = 1;

const SET2: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];
const SET1: [u8; 4] = [0x1d, 0x38, 0xe0, 0x53];

/// Bytes kept for the report.
const KEEP: usize = 24;

fn wait_input_empty() -> bool {
    let dl = time::deadline(10_000);
    while inb(STATUS) & SR_IBF != 0 {
        if time::passed(dl) {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// Next byte from the output buffer within `us`, skipping aux bytes.
fn read_byte(us: u64) -> Option<u8> {
    let dl = time::deadline(us);
    loop {
        let s = inb(STATUS);
        if s & SR_OBF != 0 {
            let b = inb(DATA);
            if s & SR_AUXDATA == 0 {
                return Some(b);
            }
        } else if time::passed(dl) {
            return None;
        }
        core::hint::spin_loop();
    }
}

fn command(c: u8) -> bool {
    let ok = wait_input_empty();
    outb(STATUS, c);
    ok
}

fn write_data(v: u8) -> bool {
    let ok = wait_input_empty();
    outb(DATA, v);
    ok
}

/// Reads and drops what is in the output buffer (bounded).
fn flush() -> usize {
    let mut n = 0;
    while inb(STATUS) & SR_OBF != 0 && n < 64 {
        let _ = inb(DATA);
        n += 1;
    }
    n
}

fn ioapic_read(reg: u32) -> u32 {
    poke::<u32>(IOAPIC, reg);
    peek::<u32>(IOAPIC + 0x10)
}

fn ioapic_write(reg: u32, v: u32) {
    poke::<u32>(IOAPIC, reg);
    poke::<u32>(IOAPIC + 0x10, v);
}

/// The I/O APIC at 0xfec00000, if one answers: its number of pins.
fn ioapic_pins() -> Option<u32> {
    if paging::mapped_limit() < IOAPIC + 0x1000 {
        return None;
    }
    let ver = ioapic_read(1);
    if ver == u32::MAX || ver & 0xff == 0 {
        return None;
    }
    Some(((ver >> 16) & 0xff) + 1)
}

/// Routes pin 1 to `KBD_VECTOR` on the boot CPU (or masks it).
fn route_irq1(on: bool) {
    let reg = 0x10 + 2 * KBD_PIN;
    if on {
        let dest = smp::BSP_APIC.load(Ordering::Relaxed);
        ioapic_write(reg + 1, dest << 24);
        // Fixed delivery, physical destination, active high, edge, unmasked.
        ioapic_write(reg, KBD_VECTOR);
    } else {
        ioapic_write(reg, 1 << 16 | KBD_VECTOR);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn hex(d: &mut Details, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        let _ = write!(d, "{}{:02x}", if i == 0 { "" } else { "," }, b);
    }
    if bytes.is_empty() {
        let _ = d.write_str("none");
    }
}

pub fn check(d: &mut Details) -> Status {
    let timeout_ms = match key_num(b"probe.kbd_timeout_ms", 30_000, 1, 3_600_000) {
        Ok(v) => v,
        Err(e) => {
            let _ = write!(d, "probe.kbd_timeout_ms: {e}");
            return Status::Fail;
        }
    };
    // Translation on/off as asked, else as the probe found it.
    let xlate = match key_num(b"probe.kbd_xlate", 2, 0, 1) {
        Ok(2) => None,
        Ok(v) => Some(v == 1),
        Err(e) => {
            let _ = write!(d, "probe.kbd_xlate: {e}");
            return Status::Fail;
        }
    };
    if inb(STATUS) == 0xff {
        let _ = d.write_str("no i8042 (status port reads 0xff)");
        return Status::Skip;
    }
    let stale = flush();
    // The command byte; a controller that does not answer is no i8042.
    command(0x20);
    let Some(ctr) = read_byte(100_000) else {
        let _ = d.write_str("no i8042 controller (no answer to command 0x20)");
        return Status::Skip;
    };
    // Keyboard interface and its interrupt on.
    let mut new_ctr = (ctr | CTR_KBDINT) & !CTR_KBDDIS;
    match xlate {
        Some(true) => new_ctr |= CTR_XLATE,
        Some(false) => new_ctr &= !CTR_XLATE,
        None => {}
    }
    command(0x60);
    write_data(new_ctr);
    command(0xae);
    // Enable scanning (a firmware may have disabled it); a missing ACK is
    // only reported.
    write_data(0xf4);
    let ack = read_byte(100_000);
    let stale = stale + flush();

    let apic_ok = lapic::check_mode().is_ok();
    let pins = if apic_ok { ioapic_pins() } else { None };
    if pins.is_some() {
        lapic::enable();
        route_irq1(true);
    }
    let irq_before = irq_count(KBD_VECTOR);
    println!("PROBE kbd ready timeout_ms={} tsc={}", timeout_ms, rdtsc());

    let start = rdtsc();
    let dl = time::deadline(timeout_ms * 1000);
    let mut kept = [0u8; KEEP];
    let mut n_kept = 0;
    let mut total = 0u64;
    let mut aux = 0u64;
    let mut matched: Option<&[u8]> = None;
    cpu::sti();
    while !time::passed(dl) {
        let s = inb(STATUS);
        if s & SR_OBF == 0 {
            time::delay_us(50);
            continue;
        }
        let b = inb(DATA);
        if s & SR_AUXDATA != 0 {
            aux += 1;
            continue;
        }
        total += 1;
        if n_kept < KEEP {
            kept[n_kept] = b;
            n_kept += 1;
        }
        let got = &kept[..n_kept];
        if find(got, &SET2) {
            matched = Some(&SET2);
        } else if find(got, &SET1) {
            matched = Some(&SET1);
        }
        if matched.is_some() {
            break;
        }
    }
    // Let an interrupt for the last byte land before counting. The VMM raises IRQ1 after it
    // fills the buffer, from another host thread: on a loaded host that can take a while, so
    // wait (bounded, 500 ms) for the first one rather than a fixed 1 ms.
    if matched.is_some() && pins.is_some() {
        let irq_dl = time::deadline(500_000);
        while irq_count(KBD_VECTOR) == irq_before && !time::passed(irq_dl) {
            time::delay_us(100);
        }
    }
    time::delay_us(1000);
    cpu::cli();
    let waited_us = time::tsc_to_us(rdtsc() - start);
    let irqs = irq_count(KBD_VECTOR) - irq_before;
    if pins.is_some() {
        route_irq1(false);
    }
    // Restore the command byte the probe found.
    command(0x60);
    write_data(ctr);

    let mut status = Status::Ok;
    match matched {
        None => {
            let _ = write!(
                d,
                "timeout: no Ctrl+Alt+Del make codes within {timeout_ms} ms;"
            );
            status = Status::Fail;
        }
        Some(_) if pins.is_some() && irqs == 0 => {
            let _ = d.write_str("keys arrived but no IRQ1 was counted;");
            status = Status::Fail;
        }
        Some(_) => {}
    }
    let _ = d.write_str(" seq=");
    match matched {
        Some(m) => hex(d, m),
        None => hex(d, &kept[..n_kept]),
    }
    let _ = write!(
        d,
        " set={} irqs={} ioapic={} bytes={} received=",
        match matched {
            Some(m) if m == SET1 => "1",
            Some(_) => "2",
            None => "none",
        },
        irqs,
        if pins.is_some() { "pin1" } else { "none" },
        total
    );
    hex(d, &kept[..n_kept]);
    let _ = write!(
        d,
        " aux={} stale={} ack={} ctr={:#04x} xlate={} wait_ms={}",
        aux,
        stale,
        match ack {
            Some(0xfa) => "fa",
            Some(_) => "other",
            None => "none",
        },
        ctr,
        (new_ctr & CTR_XLATE != 0) as u8,
        waited_us / 1000
    );
    status
}
