//! Memory test: an address-derived pattern in the first and last quadword
//! of every 4 KiB page of usable RAM that the probe does not use, written
//! in one pass and verified in a second (so aliasing shows up).

use crate::bootinfo::{self, E820_RAM};
use crate::cpu::{peek, poke};
use crate::paging::mapped_limit;

const PAGE: u64 = 4096;
/// Low memory (real-mode area, boot data, trampoline) is not tested.
const LOW_SKIP: u64 = 1 << 20;

pub struct MemResult {
    pub pages: u64,
    pub bad_addr: Option<(u64, u64, u64)>,
    pub unmapped_bytes: u64,
}

fn pattern(addr: u64) -> u64 {
    addr ^ 0x5a5a_a5a5_c3c3_3c3c
}

/// Visits every testable page.
pub fn for_each_page(mut f: impl FnMut(u64) -> bool) -> u64 {
    let bi = bootinfo::get();
    let img = (
        crate::sym_addr!(__image_start),
        crate::sym_addr!(__image_end),
    );
    let limit = mapped_limit();
    let mut unmapped = 0;
    for e in bi.mem().iter().filter(|e| e.kind == E820_RAM) {
        let start = e.addr.max(LOW_SKIP).div_ceil(PAGE) * PAGE;
        let end = e.end() & !(PAGE - 1);
        let mut p = start;
        while p < end {
            if p >= limit {
                unmapped += end - p;
                break;
            }
            let busy = (p < img.1 && img.0 < p + PAGE)
                || bi.mods[..bi.mod_count]
                    .iter()
                    .any(|&(s, l)| p < s.saturating_add(l) && s < p + PAGE);
            if !busy && !f(p) {
                return unmapped;
            }
            p += PAGE;
        }
    }
    unmapped
}

pub fn test() -> MemResult {
    let mut pages = 0;
    let unmapped = for_each_page(|p| {
        poke(p, pattern(p));
        poke(p + PAGE - 8, !pattern(p));
        pages += 1;
        true
    });
    let mut bad = None;
    for_each_page(|p| {
        let a: u64 = peek(p);
        let b: u64 = peek(p + PAGE - 8);
        if a != pattern(p) {
            bad = Some((p, pattern(p), a));
            return false;
        }
        if b != !pattern(p) {
            bad = Some((p + PAGE - 8, !pattern(p), b));
            return false;
        }
        true
    });
    MemResult {
        pages,
        bad_addr: bad,
        unmapped_bytes: unmapped,
    }
}
