//! The boot vCPU's initial state: GDT, identity page tables, general and segment
//! registers, FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use crate::loader::BootProtocol;
use crate::GuestMemoryMmap;

/// Errors while preparing vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT or page tables to guest memory failed.
    #[error("cannot write {what} at guest address {addr:#x}")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
    },
}

// CR0, CR4 and EFER bits.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_MP: u64 = 1 << 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_WP: u64 = 1 << 16;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT selectors the Linux boot protocol names: __BOOT_CS and __BOOT_DS.
pub const BOOT_CS: u16 = 0x10;
/// Data selector.
pub const BOOT_DS: u16 = 0x18;
/// TSS selector.
pub const BOOT_TSS: u16 = 0x20;

/// Builds a GDT descriptor from flags (the access byte in bits 0-7 and the flags nibble in
/// bits 12-15), a base and a 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT descriptor into the segment register form KVM takes.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) as u32) | (((entry >> 32) & 0x000f_0000) as u32);
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Entries in the boot GDT.
const BOOT_GDT_ENTRIES: usize = 5;
/// GDTR limit of the boot GDT: its size in bytes minus one.
const BOOT_GDT_LIMIT: u16 = 5 * 8 - 1;
const _: () = assert!(BOOT_GDT_LIMIT as usize == BOOT_GDT_ENTRIES * 8 - 1);

/// The boot GDT for a protocol: null, null, code (64-bit for Linux64, 32-bit for PVH),
/// data, TSS.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; BOOT_GDT_ENTRIES] {
    let code = match protocol {
        // P=1 DPL=0 S=1 type=0xb (execute/read, accessed); L=1, G=1.
        BootProtocol::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        // P=1 DPL=0 S=1 type=0xb; D/B=1 (32-bit), G=1: 4 GiB flat.
        BootProtocol::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        // P=1 S=1 type=3 (read/write, accessed); D/B=1, G=1: 4 GiB flat.
        gdt_entry(0xc093, 0, 0xfffff),
        // P=1 S=0 type=0xb (busy 64-bit/32-bit TSS), 104 bytes.
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Writes the boot GDT and an empty IDT, and returns the segment part of `sregs`.
pub fn setup_segments(
    mem: &GuestMemoryMmap,
    protocol: BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(protocol);
    for (i, entry) in gdt.iter().enumerate() {
        let addr = BOOT_GDT_START + (i as u64) * 8;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|_| RegsError::GuestWrite { what: "GDT", addr })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::GuestWrite {
            what: "IDT",
            addr: BOOT_IDT_START,
        })?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = BOOT_GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[2], 2);
    let data = segment_from_gdt(gdt[3], 3);
    let tss = segment_from_gdt(gdt[4], 4);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Writes identity page tables for the low 4 GiB (2 MiB pages) and returns CR3.
pub fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<u64, RegsError> {
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|_| RegsError::GuestWrite {
                what: "page tables",
                addr,
            })
    };
    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories; each PD maps 1 GiB.
    w(PDPTE_START | 0x03, PML4_START)?;
    for i in 0..4u64 {
        let pd = PDE_START + i * 0x1000;
        w(pd | 0x03, PDPTE_START + i * 8)?;
        for j in 0..512u64 {
            let phys = (i << 30) | (j << 21);
            // Present, writable, page size (2 MiB).
            w(phys | 0x83, pd + j * 8)?;
        }
    }
    Ok(PML4_START)
}

/// Fills `sregs` for `protocol`: flat segments, and for Linux64 long mode with paging on.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    protocol: BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    setup_segments(mem, protocol, sregs)?;
    match protocol {
        BootProtocol::Linux64 => {
            sregs.cr3 = setup_page_tables(mem)?;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |=
                X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            // 32-bit protected mode, paging off (PVH spec): CR0.PE (and ET), CR4 = 0.
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// General registers of the boot CPU at `entry`.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => {
            regs.rbx = PVH_INFO_START;
        }
    }
    regs
}

/// The FPU's reset state with SSE exceptions masked.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

// MSR indices.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_MISC_ENABLE: cinder ORs fast strings into KVM's value (see [`MISC_ENABLE_FAST_STRING`]).
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// Fast string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs every vCPU starts with. `misc_enable` is KVM's current IA32_MISC_ENABLE, whose
/// other bits (BTS/PEBS unavailable, ...) are kept.
pub fn boot_msrs(misc_enable: u64) -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, misc_enable | MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

// The LAPIC register page is an array of C chars; each is reinterpreted as the raw byte it
// holds (`to_ne_bytes` / `from_ne_bytes` on a one-byte integer change no bits).
fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (dst, src) in bytes.iter_mut().zip(&state.regs[off..off + 4]) {
        *dst = src.to_ne_bytes()[0];
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, val: u32) {
    for (dst, byte) in state.regs[off..off + 4].iter_mut().zip(val.to_le_bytes()) {
        *dst = std::ffi::c_char::from_ne_bytes([byte]);
    }
}

/// Sets LINT0 to ExtINT and LINT1 to NMI, as a PC's BIOS does (virtual wire mode).
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ram_regions, MIB};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(64 * MIB)).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = boot_gdt(BootProtocol::Linux64);
        let cs = segment_from_gdt(gdt[2], 2);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.type_, cs.present),
            (BOOT_CS, 1, 0, 0xb, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment_from_gdt(gdt[3], 3);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.s), (BOOT_DS, 1, 3, 1));
        let pvh_cs = segment_from_gdt(boot_gdt(BootProtocol::Pvh)[2], 2);
        assert_eq!((pvh_cs.l, pvh_cs.db), (0, 1));
        let tr = segment_from_gdt(gdt[4], 4);
        assert_eq!(
            (tr.selector, tr.s, tr.type_, tr.limit),
            (BOOT_TSS, 0, 0xb, 0x67)
        );
    }

    #[test]
    fn linux64_sregs_enable_long_mode_with_identity_map() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, BootProtocol::Linux64, &mut s).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // 3 GiB + 2 MiB maps to itself.
        let pde: u64 = m
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 8))
            .unwrap();
        assert_eq!(pde & !0xfff, (3 << 30) | (2 << 20));
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, BootProtocol::Pvh, &mut s).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_eq!(s.efer, 0);
        assert_eq!(s.cs.db, 1);
        let r = boot_regs(BootProtocol::Pvh, 0x100010);
        assert_eq!((r.rbx, r.rip, r.rflags), (PVH_INFO_START, 0x100010, 2));
    }

    #[test]
    fn lint_pins_are_extint_and_nmi() {
        let mut st = kvm_lapic_state::default();
        set_lint(&mut st);
        assert_eq!((lapic_reg(&st, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&st, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
