//! Extends the static identity map of `entry.S` (0-4 GiB in 2 MiB pages,
//! 3-4 GiB uncached) from CPL3: RAM in 3-4 GiB becomes write-back, RAM
//! above 4 GiB and virtio-mmio windows above 4 GiB get mapped, the stack
//! region is remapped in 4 KiB pages without its guard pages, then CPL0
//! reloads CR3. The tables are ordinary user-accessible memory.

use crate::bootinfo::{self, E820_RAM};
use crate::cmdline;
use crate::cpu::{load_cr3, peek, poke};
use core::sync::atomic::{AtomicU64, Ordering};

const PAGE_2M: u64 = 2 << 20;
const GIB: u64 = 1 << 30;
const PDE_WB: u64 = 0x87; // present, writable, user, 2 MiB
const PDE_UC: u64 = 0x9f; // + PWT + PCD
const POOL_PAGES: u64 = 60;

static MAPPED_LIMIT: AtomicU64 = AtomicU64::new(4 * GIB);
/// Highest end of any memory-map entry (even if not mapped).
static WANTED_LIMIT: AtomicU64 = AtomicU64::new(4 * GIB);

/// Everything below this address is identity mapped.
pub fn mapped_limit() -> u64 {
    MAPPED_LIMIT.load(Ordering::Relaxed)
}

/// How far the memory map reaches (may exceed what could be mapped).
pub fn wanted_limit() -> u64 {
    WANTED_LIMIT.load(Ordering::Relaxed)
}

fn is_ram(start: u64, end: u64) -> bool {
    bootinfo::get()
        .mem()
        .iter()
        .any(|e| e.kind == E820_RAM && start >= e.addr && end <= e.end())
}

fn pde_addr(addr: u64) -> Option<u64> {
    let gib = addr / GIB;
    let idx = (addr % GIB) / PAGE_2M;
    if gib < 4 {
        Some(crate::sym_addr!(pd_low) + gib * 4096 + idx * 8)
    } else if gib < 4 + POOL_PAGES {
        Some(crate::sym_addr!(pd_pool) + (gib - 4) * 4096 + idx * 8)
    } else {
        None
    }
}

/// The stack region (entry.S, 2 MiB aligned by link.ld) in 4 KiB pages,
/// each guard page left unmapped: a stack that overflows takes a page fault
/// there instead of writing over what lies below it.
fn guard_stacks() {
    const PTE: u64 = 0x7; // present, writable, user
    let region = crate::sym_addr!(stacks_region);
    let guards = [
        crate::sym_addr!(stack_guard0),
        crate::sym_addr!(stack_guard1),
        crate::sym_addr!(stack_guard2),
        crate::sym_addr!(stack_guard3),
    ];
    let pt = crate::sym_addr!(stacks_pt);
    if region % PAGE_2M != 0 || crate::sym_addr!(stacks_region_end) > region + PAGE_2M {
        return; // link.ld keeps it one aligned 2 MiB page; never map half of it
    }
    for i in 0..512u64 {
        let page = region + i * 4096;
        let e = if guards.contains(&page) {
            0
        } else {
            page | PTE
        };
        poke(pt + i * 8, e);
    }
    if let Some(p) = pde_addr(region) {
        poke(p, pt | PTE);
    }
}

pub fn setup() {
    let bi = bootinfo::get();
    let top = bi.mem().iter().map(|e| e.end()).max().unwrap_or(0);
    let wanted = top.max(4 * GIB).div_ceil(GIB).saturating_mul(GIB);
    WANTED_LIMIT.store(wanted, Ordering::Relaxed);
    let limit = wanted.min((4 + POOL_PAGES) * GIB);

    // 3-4 GiB: RAM write-back, the rest stays uncached (MMIO).
    let mut a = 3 * GIB;
    while a < 4 * GIB {
        if is_ram(a, a + PAGE_2M) {
            if let Some(p) = pde_addr(a) {
                poke(p, a | PDE_WB);
            }
        }
        a += PAGE_2M;
    }
    // Above 4 GiB: one page directory per GiB from the pool.
    let pdpt = crate::sym_addr!(pdpt);
    let pool = crate::sym_addr!(pd_pool);
    let mut g = 4;
    while g * GIB < limit {
        let pd = pool + (g - 4) * 4096;
        for i in 0..512u64 {
            let addr = g * GIB + i * PAGE_2M;
            poke(pd + i * 8, addr | PDE_WB);
        }
        poke(pdpt + g * 8, pd | 0x7);
        g += 1;
    }
    // virtio-mmio windows: uncached (never the first 2 MiB, the image).
    for d in cmdline::mmio_devices(bi.cmdline()).flatten() {
        let mut a = d.addr & !(PAGE_2M - 1);
        while a < d.addr.saturating_add(d.size) && a < limit {
            if a >= PAGE_2M {
                if let Some(p) = pde_addr(a) {
                    poke(p, a | PDE_UC);
                }
            }
            a += PAGE_2M;
        }
    }
    guard_stacks();
    MAPPED_LIMIT.store(limit, Ordering::Relaxed);
    load_cr3(crate::sym_addr!(pml4));
    // Read one entry back so the compiler keeps the writes before CR3 use.
    let _: u64 = peek(pdpt);
}
