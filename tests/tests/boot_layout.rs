//! What cinder puts in guest memory before the first instruction, for the real default guest
//! kernels, checked without KVM: entry points, the bzImage setup header as the boot protocol
//! asks a loader to fill it, the command line, the initrd, the e820 map, the PVH start info
//! and the MP table. The runs under cinder then prove the guest agrees.

use std::path::{Path, PathBuf};

use api::config::{BootSourceConfig, MachineConfig, VmConfig};
use arch::layout::{CMDLINE_START, MPTABLE_START, PVH_INFO_START, ZERO_PAGE_START};
use arch::loader::{BootProtocol, ProtocolChoice};
use cinder_tests::guest::GuestDir;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress};
use vmm::builder::prepare_guest;
use vmm::cmdline::{user_cmdline, GuestCmdline};

fn config(kernel: PathBuf, initrd: &Path, mib: usize) -> VmConfig {
    VmConfig {
        machine: MachineConfig {
            vcpu_count: 2,
            mem_size_mib: mib,
            ..MachineConfig::default()
        },
        boot_source: Some(BootSourceConfig {
            kernel_image_path: kernel,
            initrd_path: Some(initrd.to_path_buf()),
            boot_args: Some("console=ttyS0 reboot=k panic=1".into()),
        }),
        ..VmConfig::default()
    }
}

/// The command line cinder gives a configuration without virtio devices.
fn cmdline(cfg: &VmConfig) -> String {
    GuestCmdline::new(user_cmdline(cfg))
        .and_then(GuestCmdline::finish)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn initrd_in_memory(mem: &arch::GuestMemoryMmap, addr: u64, file: &Path) {
    let want = std::fs::read(file).unwrap();
    let mut got = vec![0u8; want.len()];
    mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
    assert!(
        got == want,
        "initrd bytes in guest memory differ from the file"
    );
}

#[test]
fn bzimage_setup_header_as_the_boot_protocol_asks() {
    let g = GuestDir::default_guest();
    let rd = g.file("initramfs.cpio");
    for (kernel, mib) in [("bzImage", 256usize), ("bzImage-uncompressed", 5120)] {
        let c = config(g.file(kernel), &rd, mib);
        let line = cmdline(&c);
        let p = prepare_guest(&c, ProtocolChoice::Auto, &line)
            .unwrap_or_else(|e| panic!("{kernel}: {e}"));
        assert_eq!(p.kernel.protocol, BootProtocol::Linux64);
        assert!(p.kernel.is_bzimage);
        let bp: boot_params = p.mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = bp.hdr;
        // The 64-bit entry is 0x200 past the protected-mode kernel, loaded at its
        // preferred address (or code32_start).
        let load = if { hdr.pref_address } >= 0x10_0000 {
            hdr.pref_address
        } else {
            u64::from(hdr.code32_start)
        };
        assert_eq!(p.kernel.entry.0, load + 0x200, "{kernel}");
        assert_eq!({ hdr.header }, 0x5372_6448, "{kernel}: HdrS kept");
        assert_eq!(hdr.type_of_loader, 0xff, "{kernel}");
        assert_ne!(hdr.loadflags & 0x01, 0, "{kernel}: LOADED_HIGH");
        assert_ne!(hdr.loadflags & 0x80, 0, "{kernel}: CAN_USE_HEAP");
        let cmdline_start = u32::try_from(CMDLINE_START).expect("CMDLINE_START is below 4 GiB");
        assert_eq!({ hdr.cmd_line_ptr }, cmdline_start);
        let mut got = vec![0u8; line.len() + 1];
        p.mem
            .read_slice(&mut got, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&got[..got.len() - 1], line.as_bytes());
        assert_eq!(got[got.len() - 1], 0);
        // The initrd sits below initrd_addr_max, above the kernel, page aligned.
        let rd_addr = u64::from(hdr.ramdisk_image);
        let rd_size = u64::from(hdr.ramdisk_size);
        assert_eq!(rd_size, std::fs::metadata(&rd).unwrap().len());
        assert_eq!(rd_addr % 4096, 0);
        assert!(
            rd_addr + rd_size <= u64::from(hdr.initrd_addr_max) + 1,
            "{kernel}"
        );
        assert!(
            rd_addr >= load + u64::from(hdr.init_size),
            "{kernel}: initrd over the kernel"
        );
        initrd_in_memory(&p.mem, rd_addr, &rd);
        // e820: the map cinder documents.
        let n = bp.e820_entries as usize;
        let map = arch::layout::e820_map((mib as u64) << 20);
        assert_eq!(n, map.len());
        for (e, want) in bp.e820_table[..n].iter().zip(&map) {
            assert_eq!(
                ({ e.addr }, { e.size }, { e.r#type }),
                (want.addr, want.size, want.kind)
            );
        }
        // The MP table's floating pointer.
        let mut sig = [0u8; 4];
        p.mem
            .read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}

#[test]
fn vmlinux_pvh_and_linux64_entries() {
    let g = GuestDir::default_guest();
    let rd = g.file("initramfs.cpio");
    // PVH: entered at the note's address with hvm_start_info.
    let c = config(g.file("vmlinux"), &rd, 512);
    let p = prepare_guest(&c, ProtocolChoice::Auto, &cmdline(&c)).unwrap();
    assert_eq!(
        p.kernel.protocol,
        BootProtocol::Pvh,
        "the default vmlinux has the PVH note"
    );
    assert!(
        p.kernel.entry.0 < 0x1_0000_0000,
        "PVH entry is a 32-bit address"
    );
    let info: hvm_start_info = p.mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.cmdline_paddr, CMDLINE_START);
    assert_eq!(info.nr_modules, 1);
    let m: hvm_modlist_entry = p.mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
    assert_eq!(m.size, std::fs::metadata(&rd).unwrap().len());
    initrd_in_memory(&p.mem, m.paddr, &rd);
    // Linux64: entered at e_entry (startup_64's physical address) with boot_params.
    let p = prepare_guest(&c, ProtocolChoice::Linux64, &cmdline(&c)).unwrap();
    assert_eq!(p.kernel.protocol, BootProtocol::Linux64);
    assert_eq!(
        p.kernel.entry.0, 0x100_0000,
        "vmlinux's e_entry (CONFIG_PHYSICAL_START)"
    );
    let bp: boot_params = p.mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    assert_eq!({ bp.hdr.boot_flag }, 0xaa55);
    assert_eq!({ bp.hdr.header }, 0x5372_6448);
    initrd_in_memory(&p.mem, u64::from(bp.hdr.ramdisk_image), &rd);
}
