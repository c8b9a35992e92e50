//! Local APIC in xAPIC mode, through its MMIO page (mapped user-accessible).

use crate::cpu::{peek, poke, rdmsr};

pub const BASE: u64 = 0xfee0_0000;
pub const ID: u64 = 0x20;
pub const SVR: u64 = 0xf0;
pub const ICR_LO: u64 = 0x300;
pub const ICR_HI: u64 = 0x310;
pub const LVT_TIMER: u64 = 0x320;
pub const TIMER_INIT: u64 = 0x380;
pub const TIMER_CUR: u64 = 0x390;
pub const TIMER_DIV: u64 = 0x3e0;

pub const SPURIOUS_VECTOR: u32 = 0xff;

pub fn read(reg: u64) -> u32 {
    peek(BASE + reg)
}

pub fn write(reg: u64, v: u32) {
    poke(BASE + reg, v)
}

pub fn id() -> u32 {
    read(ID) >> 24
}

/// IA32_APIC_BASE; Err if the APIC is not usable through MMIO here.
pub fn check_mode() -> Result<u64, &'static str> {
    let base = rdmsr(0x1b);
    if base & (1 << 11) == 0 {
        return Err("local APIC globally disabled (IA32_APIC_BASE)");
    }
    if base & (1 << 10) != 0 {
        return Err("local APIC in x2APIC mode (probe drives xAPIC MMIO)");
    }
    if base & 0xffff_f000 != BASE {
        return Err("local APIC not at 0xfee00000");
    }
    Ok(base)
}

/// Software-enables the APIC with the spurious vector 0xff.
pub fn enable() {
    write(SVR, read(SVR) | 0x100 | SPURIOUS_VECTOR);
}

/// Sends an IPI; waits (bounded) for the delivery-status bit to clear.
pub fn send_ipi(dest: u32, low: u32) -> bool {
    write(ICR_HI, dest << 24);
    write(ICR_LO, low);
    for _ in 0..1_000_000 {
        if read(ICR_LO) & (1 << 12) == 0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}
