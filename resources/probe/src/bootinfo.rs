//! Boot information: the entry state saved by `entry.S`, and a private copy
//! of `boot_params` (Linux 64-bit protocol) or `hvm_start_info` (PVH), made
//! before anything may overwrite low memory. Every guest-physical pointer
//! is checked before it is followed.

use crate::cpu::peek;
use crate::sync::Global;

pub const MAX_MEM: usize = 128;
pub const MAX_MODS: usize = 8;
pub const CMDLINE_MAX: usize = 4096;
pub const MAX_RANGES: usize = 16;
/// Until paging.rs extends the map, only the low 4 GiB are mapped.
const LOW_LIMIT: u64 = 1 << 32;

pub const E820_RAM: u32 = 1;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Linux64,
    Pvh,
    Unknown(u64),
}

#[derive(Clone, Copy, Default)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemEntry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// A problem found in the boot information: a reason and the value.
#[derive(Clone, Copy)]
pub struct Problem {
    pub what: &'static str,
    pub value: u64,
}

pub struct BootInfo {
    pub entry: Entry,
    /// RSI (linux64) or EBX (PVH) at entry.
    pub reg: u64,
    pub cs: u64,
    pub rflags: u64,
    pub tsc: u64,
    pub cr0: u64,
    pub cr4: u64,
    pub efer: u64,
    pub mem: [MemEntry; MAX_MEM],
    pub mem_count: usize,
    /// Entries announced by the boot information (may exceed MAX_MEM).
    pub mem_announced: u64,
    pub cmdline: [u8; CMDLINE_MAX],
    pub cmdline_len: usize,
    pub cmdline_ptr: u64,
    pub mods: [(u64, u64); MAX_MODS],
    pub mod_count: usize,
    pub rsdp: u64,
    pub pvh_version: u32,
    pub hdr_magic: bool,
    /// Problems with the boot structure itself (reported by `boot`).
    pub boot_problem: Option<Problem>,
    /// Problems with the command line (reported by `boot`).
    pub cmdline_problem: Option<Problem>,
    /// Problems with the memory map (reported by `mem`).
    pub mem_problem: Option<Problem>,
    /// Ranges holding boot data (not for the AP trampoline).
    pub ranges: [(u64, u64); MAX_RANGES],
    pub range_count: usize,
}

pub static BOOT: Global<BootInfo> = Global::new(BootInfo {
    entry: Entry::Unknown(0),
    reg: 0,
    cs: 0,
    rflags: 0,
    tsc: 0,
    cr0: 0,
    cr4: 0,
    efer: 0,
    mem: [MemEntry {
        addr: 0,
        size: 0,
        kind: 0,
    }; MAX_MEM],
    mem_count: 0,
    mem_announced: 0,
    cmdline: [0; CMDLINE_MAX],
    cmdline_len: 0,
    cmdline_ptr: 0,
    mods: [(0, 0); MAX_MODS],
    mod_count: 0,
    rsdp: 0,
    pvh_version: 0,
    hdr_magic: false,
    boot_problem: None,
    cmdline_problem: None,
    mem_problem: None,
    ranges: [(0, 0); MAX_RANGES],
    range_count: 0,
});

pub fn get() -> &'static BootInfo {
    BOOT.get()
}

impl BootInfo {
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len]
    }

    pub fn mem(&self) -> &[MemEntry] {
        &self.mem[..self.mem_count]
    }

    fn add_range(&mut self, start: u64, len: u64) {
        if self.range_count < MAX_RANGES && len > 0 {
            self.ranges[self.range_count] = (start, start.saturating_add(len));
            self.range_count += 1;
        }
    }

    /// True if `[addr, addr+len)` lies inside one memory-map entry (any type).
    pub fn in_memmap(&self, addr: u64, len: u64) -> bool {
        let end = match addr.checked_add(len) {
            Some(e) => e,
            None => return false,
        };
        self.mem().iter().any(|e| addr >= e.addr && end <= e.end())
    }
}

fn readable(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|e| e <= LOW_LIMIT)
}

/// Copies the entry state and boot structures. Runs once, first thing.
pub fn parse() {
    let bi = BOOT.get_mut();
    let es = crate::sym_addr!(entry_state);
    let kind: u64 = peek(es);
    bi.reg = peek(es + 8);
    bi.cs = peek(es + 16);
    bi.rflags = peek(es + 24);
    bi.tsc = peek(es + 32);
    bi.cr0 = peek(es + 40);
    bi.cr4 = peek(es + 48);
    bi.efer = peek(es + 56);
    bi.entry = match kind {
        1 => Entry::Linux64,
        2 => Entry::Pvh,
        k => Entry::Unknown(k),
    };
    match bi.entry {
        Entry::Linux64 => parse_linux(bi),
        Entry::Pvh => parse_pvh(bi),
        Entry::Unknown(k) => {
            bi.boot_problem = Some(Problem {
                what: "unknown entry kind",
                value: k,
            })
        }
    }
    if bi.mem_count == 0 && bi.mem_problem.is_none() {
        bi.mem_problem = Some(Problem {
            what: "no memory map entries",
            value: 0,
        });
    }
}

fn parse_linux(bi: &mut BootInfo) {
    let bp = bi.reg;
    if !readable(bp, 4096) {
        bi.boot_problem = Some(Problem {
            what: "boot_params pointer (rsi) invalid",
            value: bp,
        });
        bi.mem_problem = Some(Problem {
            what: "no boot_params",
            value: bp,
        });
        bi.cmdline_problem = Some(Problem {
            what: "no boot_params",
            value: bp,
        });
        return;
    }
    bi.add_range(bp, 4096);
    bi.hdr_magic = peek::<u32>(bp + 0x202) == 0x5372_6448;
    let count = peek::<u8>(bp + 0x1e8) as usize;
    bi.mem_announced = count as u64;
    if count > MAX_MEM {
        bi.mem_problem = Some(Problem {
            what: "e820_entries too large",
            value: count as u64,
        });
    }
    for i in 0..count.min(MAX_MEM) {
        let e = bp + 0x2d0 + 20 * i as u64;
        bi.mem[i] = MemEntry {
            addr: peek(e),
            size: peek(e + 8),
            kind: peek(e + 16),
        };
    }
    bi.mem_count = count.min(MAX_MEM);

    let ptr = peek::<u32>(bp + 0x228) as u64 | (peek::<u32>(bp + 0xc8) as u64) << 32;
    let size = peek::<u32>(bp + 0x238) as u64;
    let max = if size == 0 || size >= CMDLINE_MAX as u64 {
        CMDLINE_MAX as u64 - 1
    } else {
        size
    };
    read_cmdline(bi, ptr, max);

    let rd = peek::<u32>(bp + 0x218) as u64 | (peek::<u32>(bp + 0xc0) as u64) << 32;
    let rs = peek::<u32>(bp + 0x21c) as u64 | (peek::<u32>(bp + 0xc4) as u64) << 32;
    if rd != 0 && rs != 0 {
        bi.mods[0] = (rd, rs);
        bi.mod_count = 1;
    }
    bi.rsdp = peek::<u64>(bp + 0x070); // acpi_rsdp_addr (0 if unset)
}

fn parse_pvh(bi: &mut BootInfo) {
    let si = bi.reg;
    if !readable(si, 56) {
        bi.boot_problem = Some(Problem {
            what: "hvm_start_info pointer (ebx) invalid",
            value: si,
        });
        bi.mem_problem = Some(Problem {
            what: "no hvm_start_info",
            value: si,
        });
        bi.cmdline_problem = Some(Problem {
            what: "no hvm_start_info",
            value: si,
        });
        return;
    }
    bi.add_range(si, 56);
    let magic: u32 = peek(si);
    if magic != 0x336e_c578 {
        bi.boot_problem = Some(Problem {
            what: "hvm_start_info magic wrong",
            value: magic as u64,
        });
        bi.mem_problem = Some(Problem {
            what: "no valid hvm_start_info",
            value: si,
        });
        bi.cmdline_problem = Some(Problem {
            what: "no valid hvm_start_info",
            value: si,
        });
        return;
    }
    bi.pvh_version = peek(si + 4);
    let nr_modules: u32 = peek(si + 12);
    let modlist: u64 = peek(si + 16);
    let cmdline: u64 = peek(si + 24);
    bi.rsdp = peek(si + 32);
    if bi.pvh_version >= 1 {
        let map: u64 = peek(si + 40);
        let n: u32 = peek(si + 48);
        bi.mem_announced = n as u64;
        if n as usize > MAX_MEM {
            bi.mem_problem = Some(Problem {
                what: "memmap_entries too large",
                value: n as u64,
            });
        } else if n > 0 && !readable(map, 24 * n as u64) {
            bi.mem_problem = Some(Problem {
                what: "memmap_paddr invalid",
                value: map,
            });
        } else {
            bi.add_range(map, 24 * n as u64);
            for i in 0..n as usize {
                let e = map + 24 * i as u64;
                bi.mem[i] = MemEntry {
                    addr: peek(e),
                    size: peek(e + 8),
                    kind: peek(e + 16),
                };
            }
            bi.mem_count = n as usize;
        }
    } else {
        bi.mem_problem = Some(Problem {
            what: "PVH start_info version 0 has no memmap",
            value: 0,
        });
    }
    read_cmdline(bi, cmdline, CMDLINE_MAX as u64 - 1);
    if nr_modules > 0 {
        if !readable(modlist, 32 * nr_modules as u64) {
            bi.boot_problem = Some(Problem {
                what: "modlist_paddr invalid",
                value: modlist,
            });
        } else {
            bi.add_range(modlist, 32 * nr_modules as u64);
            for i in 0..(nr_modules as usize).min(MAX_MODS) {
                let e = modlist + 32 * i as u64;
                bi.mods[i] = (peek(e), peek(e + 8));
            }
            bi.mod_count = (nr_modules as usize).min(MAX_MODS);
        }
    }
}

fn read_cmdline(bi: &mut BootInfo, ptr: u64, max: u64) {
    bi.cmdline_ptr = ptr;
    if ptr == 0 {
        bi.cmdline_problem = Some(Problem {
            what: "no command line (pointer 0)",
            value: 0,
        });
        return;
    }
    // The pointer must be inside the memory map (when there is one) and
    // inside the part of the address space the probe maps at this point.
    let in_map = bi.mem_count == 0 || bi.in_memmap(ptr, 1);
    if !in_map || !readable(ptr, 1) {
        bi.cmdline_problem = Some(Problem {
            what: "command line pointer outside RAM",
            value: ptr,
        });
        return;
    }
    let mut n = 0usize;
    while (n as u64) < max && readable(ptr + n as u64, 1) {
        let b: u8 = peek(ptr + n as u64);
        if b == 0 {
            break;
        }
        bi.cmdline[n] = b;
        n += 1;
    }
    bi.cmdline_len = n;
    bi.add_range(ptr, n as u64 + 1);
}
