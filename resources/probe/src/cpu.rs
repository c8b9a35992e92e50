//! CPL3 access to the machine: port I/O (IOPL=3), the TSC, physical memory
//! through the identity map, and the CPL0 service gate (`int 0x80`).

use core::arch::asm;

const SVC_CPUID: u32 = 0;
const SVC_LOAD_CR3: u32 = 1;
const SVC_RDMSR: u32 = 2;
const SVC_RESET: u32 = 3;
const SVC_WAIT_IRQ: u32 = 4;

/// CPUID executed at CPL0 (on the target, CPUID at CPL3 shows the host's
/// values rather than the VMM's table).
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let a: u32;
    let b: u64;
    let c: u32;
    let d: u32;
    // SAFETY: the service gate's function 0 runs CPUID and returns; it
    // clobbers only eax..edx. rbx is reserved by LLVM so it is swapped.
    unsafe {
        asm!(
            "xchg {t}, rbx",
            "int 0x80",
            "xchg {t}, rbx",
            t = inout(reg) 0u64 => b,
            inout("eax") SVC_CPUID => a,
            in("edi") leaf,
            in("esi") subleaf,
            out("ecx") c,
            out("edx") d,
        );
    }
    [a, b as u32, c, d]
}

/// Loads CR3 (flushes the TLB after the page tables were edited).
pub fn load_cr3(v: u64) {
    // SAFETY: function 1 of the gate writes CR3; callers pass the probe's
    // own PML4 which keeps the identity map of the running code.
    unsafe {
        asm!("int 0x80", inout("eax") SVC_LOAD_CR3 => _, in("rdi") v);
    }
}

/// RDMSR at CPL0. A non-existent MSR raises #GP at CPL0, which resets the
/// VM: only read architectural MSRs.
pub fn rdmsr(msr: u32) -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: function 2 of the gate runs RDMSR on `msr`.
    unsafe {
        asm!("int 0x80", inout("eax") SVC_RDMSR => lo, in("edi") msr, out("edx") hi, out("ecx") _);
    }
    ((hi as u64) << 32) | lo as u64
}

/// Triple fault through the gate (last resort to leave the VM).
pub fn reset() {
    // SAFETY: function 3 loads an empty IDT and faults: the VM resets.
    unsafe {
        asm!("int 0x80", inout("eax") SVC_RESET => _);
    }
}

/// Sleeps at CPL0 (`sti; hlt`) until the next interrupt.
pub fn wait_irq() {
    // SAFETY: function 4 of the gate halts with interrupts enabled and
    // returns after one interrupt was handled.
    unsafe {
        asm!("int 0x80", inout("eax") SVC_WAIT_IRQ => _);
    }
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O is allowed at CPL3 with IOPL=3; the probe only
    // touches legacy devices it knows (UART, PIC, PIT, i8042).
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Enables interrupts at CPL3 (allowed by IOPL=3).
pub fn sti() {
    // SAFETY: the IDT is loaded and every vector has a handler.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

pub fn cli() {
    // SAFETY: IOPL=3 lets CPL3 clear IF.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Reads a value from guest-physical memory (identity mapped).
pub fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: callers check `addr` against the mapped limit; every mapped
    // address is readable at CPL3 (user pages).
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Writes a value to guest-physical memory (identity mapped).
pub fn poke<T: Copy>(addr: u64, v: T) {
    // SAFETY: callers only write memory that the probe owns or MMIO
    // registers of devices it drives.
    unsafe { core::ptr::write_volatile(addr as *mut T, v) }
}

/// Address of a linker/assembler symbol.
#[macro_export]
macro_rules! sym_addr {
    ($s:ident) => {{
        extern "C" {
            static $s: u8;
        }
        core::ptr::addr_of!($s) as u64
    }};
}
