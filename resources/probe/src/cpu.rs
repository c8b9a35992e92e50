//! CPL3 access to the machine: the CPL0 service gate (`probe_svc` in
//! entry.S, entered through a `ud2`), the port I/O, cli/sti and CPUID that
//! go through it, the TSC, and physical memory through the identity map.
//!
//! CPL3 runs with IOPL=0: on some hosts (kvm-pvm) `in`, `out`, `cli` and
//! `sti` fault at CPL3 whatever the IOPL, and `int n` from CPL3 does not
//! reach the IDT, while a hardware exception such as #UD from `ud2` does.
//! So the gate is the one way into CPL0, and every privileged operation
//! uses it.

use core::arch::asm;

const SVC_CPUID: u32 = 0;
const SVC_LOAD_CR3: u32 = 1;
const SVC_RDMSR: u32 = 2;
const SVC_RESET: u32 = 3;
const SVC_WAIT_IRQ: u32 = 4;
const SVC_OUTB: u32 = 5;
const SVC_INB: u32 = 6;
const SVC_STI: u32 = 7;
const SVC_CLI: u32 = 8;
const SVC_WRITE: u32 = 9;
const SVC_CPU: u32 = 10;
const SVC_WRMSR: u32 = 11;

/// Most bytes one `SVC_WRITE` call sends (entry.S caps it there too).
pub const WRITE_MAX: usize = 4096;

/// One call through the service gate: function `f` with arguments `a`
/// (RDI) and `b` (RSI); returns EAX, EBX, ECX, EDX as the service left them.
#[inline(always)]
fn svc(f: u32, a: u64, b: u64) -> [u32; 4] {
    let ax: u32;
    let bx: u64;
    let cx: u32;
    let dx: u32;
    // SAFETY: `probe_svc` is a `ud2; ret` whose #UD handler (entry.S) runs
    // service `f` at CPL0 and returns past the ud2; the services change
    // only RAX, RBX, RCX, RDX, RDI and RSI (declared here; RBX, which LLVM
    // reserves, is swapped with a temporary) and the call uses the stack
    // (no `nostack`, so no red zone is live across it). Services that
    // write memory or registers beyond those are documented at their
    // callers below.
    unsafe {
        asm!(
            "xchg {t}, rbx",
            "call probe_svc",
            "xchg {t}, rbx",
            t = inout(reg) 0u64 => bx,
            inout("eax") f => ax,
            inout("rdi") a => _,
            inout("rsi") b => _,
            out("ecx") cx,
            out("edx") dx,
        );
    }
    [ax, bx as u32, cx, dx]
}

/// CPUID executed at CPL0 (on kvm-pvm, CPUID at CPL3 shows the host's
/// values rather than the VMM's table).
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    svc(SVC_CPUID, leaf as u64, subleaf as u64)
}

/// Loads CR3 (flushes the TLB after the page tables were edited); callers
/// pass the probe's own PML4, which keeps the identity map of the code.
pub fn load_cr3(v: u64) {
    svc(SVC_LOAD_CR3, v, 0);
}

/// RDMSR at CPL0. A non-existent MSR raises #GP at CPL0, which resets the
/// VM: only read architectural MSRs.
pub fn rdmsr(msr: u32) -> u64 {
    let r = svc(SVC_RDMSR, msr as u64, 0);
    ((r[3] as u64) << 32) | r[0] as u64
}

/// WRMSR at CPL0. As with `rdmsr`, a #GP at CPL0 resets the VM: only write
/// MSRs that CPUID says exist (the KVM clock MSRs, see `time.rs`).
pub fn wrmsr(msr: u32, v: u64) {
    svc(SVC_WRMSR, msr as u64, v);
}

/// Resets the VM: i8042 reset command, then a triple fault.
pub fn reset() {
    svc(SVC_RESET, 0, 0);
}

/// Sleeps at CPL0 (`sti; hlt`) until the next interrupt.
pub fn wait_irq() {
    svc(SVC_WAIT_IRQ, 0, 0);
}

/// Port output; the probe only touches legacy devices it knows (UART, PIC,
/// PIT, i8042).
pub fn outb(port: u16, v: u8) {
    svc(SVC_OUTB, port as u64, v as u64);
}

pub fn inb(port: u16) -> u8 {
    svc(SVC_INB, port as u64, 0)[0] as u8
}

/// Enables interrupts at CPL3 (the gate sets IF in the frame it returns
/// through). The IDT is loaded and every vector has a handler.
pub fn sti() {
    svc(SVC_STI, 0, 0);
}

pub fn cli() {
    svc(SVC_CLI, 0, 0);
}

/// Writes bytes to COM1 from CPL0, one gate call per `WRITE_MAX` bytes.
pub fn serial_write(bytes: &[u8]) {
    for chunk in bytes.chunks(WRITE_MAX) {
        svc(SVC_WRITE, chunk.as_ptr() as u64, chunk.len() as u64);
    }
}

/// This CPU's index (0 for the boot CPU), as CPL0 knows it.
pub fn cpu_index() -> usize {
    svc(SVC_CPU, 0, 0)[0] as usize
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
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
