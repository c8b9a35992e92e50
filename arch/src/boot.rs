//! Writes what the guest finds at entry: the command line, the initrd, and either Linux's
//! `boot_params` (zero page) with its e820 map or PVH's `hvm_start_info` with its memory map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    e820_map, low_ram_end, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::loader::{BootProtocol, LoadedKernel};
use crate::GuestMemoryMmap;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// loadflags: the kernel may use the heap between the setup code and heap_end_ptr.
const CAN_USE_HEAP: u8 = 0x80;
/// Default initrd_addr_max for kernels that do not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;
/// Mask of the low half of a 64-bit value the boot protocol splits in two.
const LOW_32_BITS: u64 = 0xffff_ffff;

/// Errors while writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The command line is too long.
    #[error(
        "kernel command line is {len} bytes; the limit is {max} bytes (including what cinder adds)"
    )]
    CmdlineTooLong {
        /// Its length, NUL included.
        len: usize,
        /// The limit, NUL included.
        max: usize,
    },
    /// The command line has a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The initrd does not fit.
    #[error(
        "initrd of {size} bytes does not fit in guest memory between the kernel's end ({kernel_end:#x}) \
         and {limit:#x}: raise --memory or use a smaller initrd"
    )]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
    /// Writing to guest memory failed (a layout bug; the address is named).
    #[error("cannot write boot data at guest address {0:#x}")]
    GuestWrite(u64),
    /// The PVH memory map has more entries than its 32-bit count can say (a layout bug).
    #[error("the PVH memory map has {0} entries, more than hvm_start_info can count")]
    MemoryMapTooLong(usize),
    /// linux-loader refused the boot parameters.
    #[error("cannot write boot parameters: {0}")]
    Configurator(#[from] linux_loader::configurator::Error),
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The largest command line the kernel accepts, NUL included.
pub fn cmdline_limit(kernel: &LoadedKernel) -> usize {
    match kernel.setup_header {
        // cmdline_size (protocol >= 2.06) excludes the NUL.
        Some(h) if h.version >= 0x0206 && h.cmdline_size > 0 => {
            (h.cmdline_size as usize + 1).min(CMDLINE_MAX_SIZE)
        }
        _ => CMDLINE_MAX_SIZE,
    }
}

/// Checks and writes the command line at [`CMDLINE_START`].
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<usize, BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let max = cmdline_limit(kernel);
    let len = cmdline.len() + 1;
    if len > max {
        return Err(BootError::CmdlineTooLong { len, max });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::GuestWrite(CMDLINE_START))?;
    Ok(len)
}

/// Chooses where the initrd goes: as high as possible below both the end of low RAM and the
/// kernel's `initrd_addr_max`, page aligned, above the kernel.
pub fn place_initrd(
    mem_size: u64,
    kernel: &LoadedKernel,
    size: u64,
) -> Result<InitrdPlacement, BootError> {
    let addr_max = match kernel.setup_header {
        Some(h) if h.version >= 0x0203 => u64::from(h.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let limit = low_ram_end(mem_size).min(addr_max.saturating_add(1));
    let kernel_end = kernel.kernel_end.max(HIMEM_START);
    let too_big = BootError::InitrdTooBig {
        size,
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or(too_big)?;
    let start = start & !(PAGE_SIZE - 1);
    if start < kernel_end.next_multiple_of(PAGE_SIZE) {
        return Err(BootError::InitrdTooBig {
            size,
            kernel_end,
            limit,
        });
    }
    Ok(InitrdPlacement { addr: start, size })
}

/// Writes the boot information for `kernel`'s protocol. `cmdline_len` includes the NUL.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    match kernel.protocol {
        BootProtocol::Linux64 => write_zero_page(mem, mem_size, kernel, cmdline_len, initrd),
        BootProtocol::Pvh => write_pvh_info(mem, mem_size, initrd),
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        // A bzImage: start from its own setup header, as the boot protocol asks.
        params.hdr = hdr;
        params.hdr.loadflags |= CAN_USE_HEAP;
        // heap_end_ptr is relative to the real-mode code; nothing runs there, any sane value.
        params.hdr.heap_end_ptr = 0xfe00;
    } else {
        params.hdr = setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
            ..Default::default()
        };
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    // The boot protocol splits 64-bit addresses and sizes into a low half in the setup header
    // and a high half in the zero page's ext_* fields.
    params.hdr.cmd_line_ptr = (CMDLINE_START & LOW_32_BITS) as u32;
    params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    // cmdline_size excludes the NUL.
    params.hdr.cmdline_size =
        u32::try_from(cmdline_len.saturating_sub(1)).map_err(|_| BootError::CmdlineTooLong {
            len: cmdline_len,
            max: CMDLINE_MAX_SIZE,
        })?;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = (rd.addr & LOW_32_BITS) as u32;
        params.hdr.ramdisk_size = (rd.size & LOW_32_BITS) as u32;
        params.ext_ramdisk_image = (rd.addr >> 32) as u32;
        params.ext_ramdisk_size = (rd.size >> 32) as u32;
    }
    let map = e820_map(mem_size);
    params.e820_entries = 0;
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
        // At most the table's 128 slots: no overflow.
        params.e820_entries += 1;
    }
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)?;
    Ok(())
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(memmap.len())
            .map_err(|_| BootError::MemoryMapTooLong(memmap.len()))?,
        ..Default::default()
    };
    let mut bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
    if let Some(rd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        bp.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(PVH_MODLIST_START));
    }
    bp.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ram_regions, E820_RAM, EBDA_START, MIB};

    fn elf_kernel(protocol: BootProtocol) -> LoadedKernel {
        LoadedKernel {
            entry: GuestAddress(0x100000),
            protocol,
            setup_header: None,
            kernel_end: 0x200000,
            is_bzimage: false,
        }
    }

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    #[test]
    fn zero_page_has_e820_cmdline_and_initrd() {
        let size = 128 * MIB;
        let m = mem(size);
        let k = elf_kernel(BootProtocol::Linux64);
        let len = write_cmdline(&m, &k, "console=ttyS0").unwrap();
        let rd = place_initrd(size, &k, 10000).unwrap();
        assert_eq!(rd.addr % 4096, 0);
        assert!(rd.addr + rd.size <= size);
        write_boot_info(&m, size, &k, len, Some(rd)).unwrap();
        let bp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ bp.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!(u64::from(bp.hdr.cmd_line_ptr), CMDLINE_START);
        assert_eq!({ bp.ext_cmd_line_ptr }, 0);
        assert_eq!(u64::from(bp.hdr.ramdisk_image), rd.addr);
        assert_eq!({ bp.ext_ramdisk_image }, 0);
        assert_eq!({ bp.hdr.ramdisk_size }, 10000);
        assert_eq!(bp.e820_entries, 3);
        let ram: u64 = bp.e820_table[..3]
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn pvh_start_info_has_memmap_and_module() {
        let size = 5120 * MIB;
        let m = mem(size);
        let k = elf_kernel(BootProtocol::Pvh);
        let len = write_cmdline(&m, &k, "a").unwrap();
        let rd = place_initrd(size, &k, 1 << 20).unwrap();
        assert!(rd.addr + rd.size <= DEFAULT_INITRD_ADDR_MAX + 1);
        write_boot_info(&m, size, &k, len, Some(rd)).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 4);
        assert_eq!(info.nr_modules, 1);
        let last: hvm_memmap_table_entry =
            m.read_obj(GuestAddress(PVH_MEMMAP_START + 3 * 24)).unwrap();
        assert_eq!(last.addr, 1 << 32);
        assert_eq!(last.size, size - (3 << 30));
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(module.paddr, rd.addr);
    }

    #[test]
    fn cmdline_limits() {
        let m = mem(16 * MIB);
        let k = elf_kernel(BootProtocol::Linux64);
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            write_cmdline(&m, &k, &long),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(write_cmdline(&m, &k, &long[..CMDLINE_MAX_SIZE - 1]).is_ok());
        assert!(matches!(
            write_cmdline(&m, &k, "a\0b"),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn initrd_too_big_is_refused() {
        let k = elf_kernel(BootProtocol::Linux64);
        let e = place_initrd(16 * MIB, &k, 15 * MIB).unwrap_err();
        assert!(matches!(e, BootError::InitrdTooBig { .. }), "{e}");
        assert!(place_initrd(16 * MIB, &k, 13 * MIB).is_ok());
    }
}
