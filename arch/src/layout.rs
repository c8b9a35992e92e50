//! Guest physical memory layout (x86_64).
//!
//! ```text
//! 0x0000_0500  boot GDT              0x0000_9000  PML4
//! 0x0000_0540  boot IDT (empty)      0x0000_a000  PDPT
//! 0x0000_6000  PVH hvm_start_info    0x0000_b000  4 page directories (identity map of 4 GiB)
//! 0x0000_6040  PVH module list       0x0002_0000  kernel command line
//! 0x0000_7000  boot_params (zero page) or PVH memory map
//! 0x0000_8ff0  boot stack top        0x0009_fc00  EBDA (reserved in e820)
//! 0x000f_0000  MP table              0x0010_0000  HIMEM: kernels load here or above
//! 0xc000_0000  32-bit MMIO gap up to 4 GiB: virtio-mmio at 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (one empty entry; the guest installs its own before enabling interrupts). After
/// the five GDT entries (0x500..0x528).
pub const BOOT_IDT_START: u64 = 0x540;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// Linux `boot_params` (the zero page), or the PVH memory map (only one protocol is used).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// PVH memory map, shares the zero page's place.
pub const PVH_MEMMAP_START: u64 = ZERO_PAGE_START;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages identity-mapping 0..4 GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line cinder passes (Linux x86's COMMAND_LINE_SIZE, NUL included).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; [EBDA_START, 1 MiB) is not RAM for the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer and configuration table, in the BIOS area scanned by Linux.
pub const MPTABLE_START: u64 = 0xf0000;
/// Size of the area the MP table may use.
pub const MPTABLE_MAX_SIZE: u64 = 0x10000;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap: guest RAM never lies in [MMIO_GAP_START, 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Where cinder places virtio-mmio devices.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) lives just below the IOAPIC, inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page (one page) just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// First legacy IRQ free for virtio devices (0-4 are PIT, keyboard, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// Last IOAPIC pin.
pub const IRQ_MAX: u32 = 23;

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The guest RAM regions for `mem_size` bytes of RAM: one region below the MMIO gap and,
/// when the RAM does not fit there, one more starting at 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), region_len(mem_size))]
    } else {
        vec![
            (GuestAddress(0), region_len(MMIO_GAP_START)),
            (
                GuestAddress(MMIO_GAP_END),
                region_len(mem_size - MMIO_GAP_START),
            ),
        ]
    }
}

/// A region length as `usize`: lossless on 64-bit hosts; on a narrower host a length that does
/// not fit saturates, so mapping it fails instead of silently mapping less.
fn region_len(len: u64) -> usize {
    usize::try_from(len).unwrap_or(usize::MAX)
}

/// One e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The memory map the guest is given for `mem_size` bytes of RAM: low RAM up to the EBDA,
/// the EBDA reserved, then RAM from 1 MiB (with the 32-bit MMIO gap cut out). The documented
/// hole is [EBDA_START, HIMEM_START): RAM the guest does not get to use.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// The end of RAM below 4 GiB.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// The highest guest physical address plus one.
pub fn ram_top(mem_size: u64) -> u64 {
    if mem_size <= MMIO_GAP_START {
        mem_size
    } else {
        MMIO_GAP_END + (mem_size - MMIO_GAP_START)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(128 * MIB), vec![(GuestAddress(0), 128 << 20)]);
        let map = e820_map(128 * MIB);
        let usable: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(usable, 128 * MIB - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let mem = 5120 * MIB;
        let regions = ram_regions(mem);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(regions[0].1 as u64 + regions[1].1 as u64, mem);
        let map = e820_map(mem);
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
        let usable: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(usable, mem - (HIMEM_START - EBDA_START));
        assert_eq!(ram_top(mem), MMIO_GAP_END + 2048 * MIB);
    }

    #[test]
    fn exactly_the_gap_start_is_one_region() {
        assert_eq!(ram_regions(MMIO_GAP_START).len(), 1);
        assert_eq!(e820_map(MMIO_GAP_START).len(), 3);
    }
}
