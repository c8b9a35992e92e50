//! CPU discovery: ACPI MADT (RSDP from the boot information or a scan of
//! the EBDA and 0xE0000-0xFFFFF), or else the MP table. Read-only; every
//! table is bounds- and checksum-checked.

use crate::cpu::peek;
use crate::paging::mapped_limit;

pub const MAX_IDS: usize = 64;

#[derive(Clone, Copy)]
pub struct CpuTable {
    pub ids: [u32; MAX_IDS],
    pub count: usize,
    /// Enabled CPUs listed in the table (may exceed MAX_IDS).
    pub listed: usize,
    pub source: &'static str,
    pub table_addr: u64,
}

impl CpuTable {
    pub const fn empty() -> Self {
        Self {
            ids: [0; MAX_IDS],
            count: 0,
            listed: 0,
            source: "none",
            table_addr: 0,
        }
    }

    fn push(&mut self, id: u32) {
        self.listed += 1;
        if self.count < MAX_IDS {
            self.ids[self.count] = id;
            self.count += 1;
        }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.count]
    }
}

fn ok_range(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|e| e <= mapped_limit())
}

fn sum(addr: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |s, i| s.wrapping_add(peek::<u8>(addr + i)))
}

fn sig(addr: u64, s: &[u8]) -> bool {
    s.iter()
        .enumerate()
        .all(|(i, &b)| peek::<u8>(addr + i as u64) == b)
}

fn ebda() -> u64 {
    (peek::<u16>(0x40e) as u64) << 4
}

/// Finds the CPUs. Err(reason) if no usable table exists.
pub fn discover(rsdp_hint: u64) -> Result<CpuTable, &'static str> {
    match madt(rsdp_hint) {
        Ok(t) => Ok(t),
        Err(acpi_err) => match mptable() {
            Some(t) => Ok(t),
            None => Err(acpi_err),
        },
    }
}

fn find_rsdp(hint: u64) -> Option<u64> {
    let valid = |a: u64| ok_range(a, 36) && sig(a, b"RSD PTR ") && sum(a, 20) == 0;
    if hint != 0 && valid(hint) {
        return Some(hint);
    }
    let e = ebda();
    let areas = [(e, e + 1024), (0xe0000, 0x100000)];
    for (start, end) in areas {
        if start < 0x400 || end > 0x100000 {
            continue;
        }
        let mut a = start & !15;
        while a + 36 <= end {
            if valid(a) {
                return Some(a);
            }
            a += 16;
        }
    }
    None
}

fn table_ok(addr: u64, signature: &[u8]) -> Option<u32> {
    if !ok_range(addr, 36) || !sig(addr, signature) {
        return None;
    }
    let len: u32 = peek(addr + 4);
    if !(36..=1 << 20).contains(&len) || !ok_range(addr, len as u64) {
        return None;
    }
    (sum(addr, len as u64) == 0).then_some(len)
}

fn madt(hint: u64) -> Result<CpuTable, &'static str> {
    let rsdp = find_rsdp(hint).ok_or("no ACPI RSDP and no MP table")?;
    let rev: u8 = peek(rsdp + 15);
    let (root, entry_size, root_sig): (u64, u64, &[u8]) = if rev >= 2 && peek::<u64>(rsdp + 24) != 0
    {
        (peek(rsdp + 24), 8, b"XSDT")
    } else {
        (peek::<u32>(rsdp + 16) as u64, 4, b"RSDT")
    };
    let root_len = table_ok(root, root_sig).ok_or("RSDT/XSDT missing or bad checksum")?;
    let n = (root_len as u64 - 36) / entry_size;
    for i in 0..n {
        let p = root + 36 + i * entry_size;
        let t = if entry_size == 8 {
            peek::<u64>(p)
        } else {
            peek::<u32>(p) as u64
        };
        if !ok_range(t, 4) || !sig(t, b"APIC") {
            continue;
        }
        let len = table_ok(t, b"APIC").ok_or("MADT bad checksum or length")? as u64;
        let mut out = CpuTable::empty();
        out.source = "madt";
        out.table_addr = t;
        let mut off = 44;
        while off + 2 <= len {
            let ty: u8 = peek(t + off);
            let l = peek::<u8>(t + off + 1) as u64;
            if l < 2 || off + l > len {
                return Err("MADT entry length invalid");
            }
            match ty {
                0 if l >= 8 => {
                    let id = peek::<u8>(t + off + 3) as u32;
                    if peek::<u32>(t + off + 4) & 1 != 0 {
                        out.push(id);
                    }
                }
                9 if l >= 16 => {
                    let id: u32 = peek(t + off + 4);
                    if peek::<u32>(t + off + 8) & 1 != 0 {
                        out.push(id);
                    }
                }
                _ => {}
            }
            off += l;
        }
        return Ok(out);
    }
    Err("no MADT in RSDT/XSDT")
}

fn mptable() -> Option<CpuTable> {
    let e = ebda();
    let areas = [(e, e + 1024), (0x9fc00, 0xa0000), (0xf0000, 0x100000)];
    for (start, end) in areas {
        if start < 0x400 || end > 0x100000 {
            continue;
        }
        let mut a = start & !15;
        while a + 16 <= end {
            if sig(a, b"_MP_") {
                let len = peek::<u8>(a + 8) as u64 * 16;
                if len >= 16 && sum(a, len) == 0 {
                    if let Some(t) = mp_config(peek::<u32>(a + 4) as u64) {
                        return Some(t);
                    }
                }
            }
            a += 16;
        }
    }
    None
}

fn mp_config(cfg: u64) -> Option<CpuTable> {
    if !ok_range(cfg, 44) || !sig(cfg, b"PCMP") {
        return None;
    }
    let len = peek::<u16>(cfg + 4) as u64;
    if len < 44 || !ok_range(cfg, len) || sum(cfg, len) != 0 {
        return None;
    }
    // Walk by the base table length, like Linux does: some firmware
    // (qboot) leaves the entry count at 0.
    let mut out = CpuTable::empty();
    out.source = "mptable";
    out.table_addr = cfg;
    let mut off = 44;
    while off < len {
        let ty: u8 = peek(cfg + off);
        let l = match ty {
            0 => 20,
            1..=4 => 8,
            _ => break,
        };
        if off + l > len {
            break;
        }
        if ty == 0 && peek::<u8>(cfg + off + 3) & 1 != 0 {
            out.push(peek::<u8>(cfg + off + 1) as u32);
        }
        off += l;
    }
    Some(out)
}
