//! The kernel loader on hostile ELF and bzImage files, and what follows a successful load
//! (command line, initrd placement and boot data, which read the image's setup header).
//!
//! Input: byte 0 picks the protocol (Auto, Linux64, PVH) and the memory size (8, 16 or
//! 3.5 GiB+ with the MMIO gap), byte 1 an initrd size, the rest is the kernel file.

use arch::boot::{place_initrd, write_boot_info, write_cmdline};
use arch::layout::{low_ram_end, ram_regions};
use arch::loader::{load_kernel, ProtocolChoice};
use arch::GuestMemoryMmap;

use crate::host::tmpfile;

/// Runs one input.
pub fn run(data: &[u8]) {
    let sel = data.first().copied().unwrap_or(0);
    let initrd_sel = data.get(1).copied().unwrap_or(0);
    let file = data.get(2..).unwrap_or(&[]);
    let choice = match sel % 3 {
        0 => ProtocolChoice::Auto,
        1 => ProtocolChoice::Linux64,
        _ => ProtocolChoice::Pvh,
    };
    let mem_size: u64 = match (sel / 3) % 3 {
        0 => 8 << 20,
        1 => 16 << 20,
        // Past the MMIO gap: two regions, mapped lazily.
        _ => 4 << 30,
    };
    let Ok(mem) = GuestMemoryMmap::from_ranges(&ram_regions(mem_size)) else {
        return;
    };
    let tmp = tmpfile("kernel", file);
    let path = tmp.0.clone();
    let Ok(kernel) = load_kernel(&mem, &path, low_ram_end(mem_size), choice) else {
        return;
    };
    let Ok(cmdline_len) = write_cmdline(&mem, &kernel, "console=ttyS0 reboot=k panic=1") else {
        return;
    };
    let initrd = if initrd_sel == 0 {
        None
    } else {
        place_initrd(mem_size, &kernel, u64::from(initrd_sel) << 16).ok()
    };
    if let Some(i) = initrd {
        assert!(
            i.addr.saturating_add(i.size) <= low_ram_end(mem_size),
            "initrd {:#x}+{:#x} placed past low RAM",
            i.addr,
            i.size
        );
    }
    let _ = write_boot_info(&mem, mem_size, &kernel, cmdline_len, initrd);
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;

/// A minimal x86_64 ELF: one PT_LOAD of 16 bytes at `paddr`, and a PVH note if asked.
pub fn elf(paddr: u64, memsz: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    let mut v = vec![0u8; 0x200];
    v[0..4].copy_from_slice(&[0x7f, b'E', b'L', b'F']);
    v[4] = 2;
    v[5] = 1;
    v[6] = 1;
    v[16..18].copy_from_slice(&2u16.to_le_bytes());
    v[18..20].copy_from_slice(&62u16.to_le_bytes());
    v[20..24].copy_from_slice(&1u32.to_le_bytes());
    v[24..32].copy_from_slice(&paddr.to_le_bytes());
    v[32..40].copy_from_slice(&64u64.to_le_bytes());
    v[52..54].copy_from_slice(&64u16.to_le_bytes());
    v[54..56].copy_from_slice(&56u16.to_le_bytes());
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    v[56..58].copy_from_slice(&phnum.to_le_bytes());
    let ph = 64;
    v[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
    v[ph + 8..ph + 16].copy_from_slice(&0x180u64.to_le_bytes());
    v[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    v[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    v[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
    v[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    if let Some(entry) = pvh_entry {
        // A PT_NOTE at 0x1c0: Xen's XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen".
        let ph = 64 + 56;
        v[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        v[ph + 8..ph + 16].copy_from_slice(&0x1c0u64.to_le_bytes());
        v[ph + 32..ph + 40].copy_from_slice(&20u64.to_le_bytes());
        let n = 0x1c0;
        v[n..n + 4].copy_from_slice(&4u32.to_le_bytes());
        v[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes());
        v[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes());
        v[n + 12..n + 16].copy_from_slice(b"Xen\0");
        v[n + 16..n + 20].copy_from_slice(&entry.to_le_bytes());
    }
    v
}

/// A minimal bzImage: setup header (protocol 2.15, 64-bit entry), one setup sector, and a
/// small protected-mode part.
pub fn bzimage(version: u16, pref_address: u64, init_size: u32) -> Vec<u8> {
    let mut v = vec![0u8; 0x400 + 0x400];
    v[0x1f1] = 1; // setup_sects
    v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    v[0x202..0x206].copy_from_slice(b"HdrS");
    v[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    v[0x211] = 1; // loadflags: LOADED_HIGH
    v[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    v[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    v[0x236..0x238].copy_from_slice(&3u16.to_le_bytes()); // xloadflags
    v[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    v[0x258..0x260].copy_from_slice(&pref_address.to_le_bytes());
    v[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    v
}

/// Seeds: ELF with and without a PVH note under each protocol; bzImages (good, old protocol,
/// too big, preferred address below 1 MiB).
pub fn seeds() -> Vec<Vec<u8>> {
    let with = |sel: u8, initrd: u8, file: Vec<u8>| {
        let mut v = vec![sel, initrd];
        v.extend(file);
        v
    };
    vec![
        with(0, 0, elf(0x10_0000, 0x1000, None)),
        with(3, 16, elf(0x10_0000, 0x1000, Some(0x10_0000))),
        with(2, 0, elf(0x10_0000, 0x1000, None)),
        with(5, 1, elf(0x20_0000, 0x8000_0000, Some(0x20_0000))),
        with(1, 8, bzimage(0x020f, 0x20_0000, 0x10_0000)),
        with(4, 255, bzimage(0x020f, 0x100_0000, 0x40_0000)),
        with(6, 0, bzimage(0x0208, 0, 0x1000)),
        with(0, 2, bzimage(0x020f, 0x8000, 0x10_0000)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The good seeds load, so mutations start from kernels the loader takes.
    #[test]
    fn good_seeds_load() {
        let mem = GuestMemoryMmap::from_ranges(&ram_regions(16 << 20)).unwrap();
        for (i, file) in [
            elf(0x10_0000, 0x1000, None),
            elf(0x10_0000, 0x1000, Some(0x10_0000)),
            bzimage(0x020f, 0x20_0000, 0x10_0000),
        ]
        .iter()
        .enumerate()
        {
            let tmp = tmpfile("seed", file);
            let path = tmp.0.clone();
            let k = load_kernel(&mem, &path, 16 << 20, ProtocolChoice::Auto);
            assert!(k.is_ok(), "seed {i}: {:?}", k.err());
        }
    }
}
