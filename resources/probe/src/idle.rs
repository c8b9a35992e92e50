//! `idle`: a guest that costs its host nothing while it waits, for density benchmarks
//! (`tests/src/bin/bench_density.rs`): halted at CPL0 (`sti; hlt`) with no timer running,
//! woken only by COM1's receive interrupt (IRQ4 through the I/O APIC, edge, to vector 0x44
//! on this CPU). Each `p` it reads is answered with `PROBE pong <n>`; `q` ends the check.
//! Other bytes are counted and ignored.

use crate::checks::{irq_count, Details, Status};
use crate::cpu::{self, inb, outb, peek, poke, rdtsc};
use crate::lapic;
use crate::paging;
use crate::println;
use crate::time;
use core::fmt::Write;

const COM1: u16 = 0x3f8;
/// Interrupt enable: received data available.
const IER_RDA: u8 = 0x01;
/// Modem control: DTR, RTS and OUT2 (which gates the IRQ line on PC UARTs).
const MCR_IRQ: u8 = 0x0b;
/// Line status: data ready.
const LSR_DR: u8 = 0x01;
const IOAPIC: u64 = 0xfec0_0000;
const SERIAL_PIN: u32 = 4;
const SERIAL_VECTOR: u32 = 0x44;

fn ioapic_read(reg: u32) -> u32 {
    poke::<u32>(IOAPIC, reg);
    peek::<u32>(IOAPIC + 0x10)
}

fn ioapic_write(reg: u32, v: u32) {
    poke::<u32>(IOAPIC, reg);
    poke::<u32>(IOAPIC + 0x10, v);
}

/// Whether an I/O APIC answers at 0xfec00000 with pin 4.
fn ioapic_has_pin4() -> bool {
    if paging::mapped_limit() < IOAPIC + 0x1000 {
        return false;
    }
    let ver = ioapic_read(1);
    ver != u32::MAX && ((ver >> 16) & 0xff) >= SERIAL_PIN
}

/// Routes pin 4 to `SERIAL_VECTOR` on this CPU (fixed, physical, active high, edge), or masks it.
fn route(on: bool) {
    let reg = 0x10 + 2 * SERIAL_PIN;
    if on {
        ioapic_write(reg + 1, lapic::id() << 24);
        ioapic_write(reg, SERIAL_VECTOR);
    } else {
        ioapic_write(reg, 1 << 16 | SERIAL_VECTOR);
    }
}

pub fn check(d: &mut Details) -> Status {
    if let Err(e) = lapic::check_mode() {
        let _ = d.write_str(e);
        return Status::Fail;
    }
    if !ioapic_has_pin4() {
        let _ = d.write_str("no I/O APIC with pin 4: cannot wait for serial input halted");
        return Status::Fail;
    }
    lapic::enable();
    // Whatever arrived before: not ours.
    let mut stale = 0u64;
    while inb(COM1 + 5) & LSR_DR != 0 && stale < 4096 {
        inb(COM1);
        stale += 1;
    }
    route(true);
    outb(COM1 + 4, MCR_IRQ);
    outb(COM1 + 1, IER_RDA);
    let irqs_before = irq_count(SERIAL_VECTOR);
    let start = rdtsc();
    println!("PROBE idle ready tsc={}", start);
    let (mut pings, mut other, mut wakes) = (0u64, 0u64, 0u64);
    'serve: loop {
        // Every byte there is (an edge is raised per byte, but one wake may find several).
        while inb(COM1 + 5) & LSR_DR != 0 {
            match inb(COM1) {
                b'p' => {
                    pings += 1;
                    println!("PROBE pong {}", pings);
                }
                b'q' => break 'serve,
                _ => other += 1,
            }
        }
        // A byte arriving after the LSR read raises the line while IF=0: the interrupt
        // waits in the LAPIC and ends the `hlt` at once (`sti` holds it off one
        // instruction), so no wake-up is lost.
        cpu::wait_irq();
        wakes += 1;
    }
    outb(COM1 + 1, 0);
    route(false);
    let _ = write!(
        d,
        "pings={pings} other={other} stale={stale} wakes={wakes} irqs={} idle_ms={}",
        irq_count(SERIAL_VECTOR) - irqs_before,
        time::tsc_to_us(rdtsc() - start) / 1000
    );
    Status::Ok
}
