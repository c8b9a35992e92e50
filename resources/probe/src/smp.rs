//! Application processors: INIT-SIPI-SIPI through the LAPIC ICR, a real-mode
//! trampoline copied to a free low page, then each AP enters CPL3 on its own
//! stack and TSS and checks in here with its APIC ID and CPUID view.

use crate::acpi::CpuTable;
use crate::bootinfo::{self, E820_RAM};
use crate::cpu::{self, cpuid, peek, poke};
use crate::lapic;
use crate::sync::Global;
use crate::time;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const MAX_CPUS: usize = 64;
const KSTACK_SIZE: u64 = 4096;
const AP_USTACK_SIZE: u64 = 16384;
const TSS_STRIDE: u64 = 128;

pub const ST_EMPTY: u32 = 0;
pub const ST_ONLINE: u32 = 1;
pub const ST_FAULTED: u32 = 2;

/// What each CPU reports about itself (CPUID executed at CPL0).
pub struct CpuSlot {
    pub state: AtomicU32,
    pub lapic_id: AtomicU32,
    pub leaf1_apic: AtomicU32,
    pub x2apic: AtomicU32,
    pub hv: AtomicU32,
    pub checkin_tsc: AtomicU64,
    pub fault_vector: AtomicU64,
    pub fault_rip: AtomicU64,
}

impl CpuSlot {
    const fn new() -> Self {
        Self {
            state: AtomicU32::new(ST_EMPTY),
            lapic_id: AtomicU32::new(0),
            leaf1_apic: AtomicU32::new(0),
            x2apic: AtomicU32::new(u32::MAX),
            hv: AtomicU32::new(0),
            checkin_tsc: AtomicU64::new(0),
            fault_vector: AtomicU64::new(0),
            fault_rip: AtomicU64::new(0),
        }
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const SLOT: CpuSlot = CpuSlot::new();
pub static SLOTS: [CpuSlot; MAX_CPUS] = [SLOT; MAX_CPUS];
pub static BSP_APIC: AtomicU32 = AtomicU32::new(0);

pub struct SmpState {
    pub started: bool,
    pub table: Option<CpuTable>,
    pub table_error: Option<&'static str>,
    pub tramp: u64,
    /// APIC IDs that did not come up.
    pub missing: [u32; MAX_CPUS],
    pub missing_count: usize,
    pub start_error: Option<&'static str>,
}

pub static SMP: Global<SmpState> = Global::new(SmpState {
    started: false,
    table: None,
    table_error: None,
    tramp: 0,
    missing: [0; MAX_CPUS],
    missing_count: 0,
    start_error: None,
});

/// Fills a slot with this CPU's view of itself.
pub fn record_self(cpu: usize) {
    let slot = &SLOTS[cpu];
    slot.lapic_id.store(lapic::id(), Ordering::Relaxed);
    slot.leaf1_apic
        .store(cpuid(1, 0)[1] >> 24, Ordering::Relaxed);
    slot.hv.store(cpuid(1, 0)[2] >> 31, Ordering::Relaxed);
    if cpuid(0, 0)[0] >= 0xb {
        slot.x2apic.store(cpuid(0xb, 0)[3], Ordering::Relaxed);
    }
    slot.checkin_tsc.store(cpu::rdtsc(), Ordering::Relaxed);
    slot.state.store(ST_ONLINE, Ordering::Release);
}

/// Per AP: how many milliseconds it has counted (`probe.snapmem_ap=1`).
pub static AP_TICKS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

pub fn ap_main(cpu: usize) -> ! {
    if cpu < MAX_CPUS {
        record_self(cpu);
        // `snapmem` with running APs: each counts at CPL3 instead of halting, so a snapshot
        // catches every vCPU mid-work.
        let spin = crate::cmdline::get(bootinfo::get().cmdline(), b"probe.snapmem_ap")
            .is_some_and(|v| v == b"1");
        if spin {
            loop {
                AP_TICKS[cpu].fetch_add(1, Ordering::Relaxed);
                time::delay_us(1000);
            }
        }
    }
    park()
}

/// Parks this CPU: halted at CPL0 between interrupts, forever.
pub fn park() -> ! {
    loop {
        cpu::wait_irq();
    }
}

/// A usable page below 1 MiB holding no boot data.
fn trampoline_page() -> Option<u64> {
    let bi = bootinfo::get();
    let mut p = 0x1000;
    while p < 0x9f000 {
        let end = p + 0x1000;
        let usable = bi
            .mem()
            .iter()
            .any(|e| e.kind == E820_RAM && p >= e.addr && end <= e.end());
        let busy = bi.ranges[..bi.range_count]
            .iter()
            .any(|&(s, e)| s < end && p < e)
            || bi.mods[..bi.mod_count]
                .iter()
                .any(|&(s, l)| s < end && p < s.saturating_add(l));
        if usable && !busy {
            return Some(p);
        }
        p += 0x1000;
    }
    None
}

fn setup_cpu_structs(cpu: usize) -> (u64, u64, u64) {
    let kstack = crate::sym_addr!(kstacks) + (cpu as u64 + 1) * KSTACK_SIZE;
    let ustack = crate::sym_addr!(ap_ustacks) + (cpu as u64 + 1) * AP_USTACK_SIZE - 8;
    let tss = crate::sym_addr!(tss_array) + cpu as u64 * TSS_STRIDE;
    poke::<u64>(tss + 4, kstack); // RSP0
    poke::<u16>(tss + 102, 104); // no I/O bitmap
    let sel = 0x38 + 16 * cpu as u64;
    let low = 103 | (tss & 0xff_ffff) << 16 | 0x89 << 40 | ((tss >> 24) & 0xff) << 56;
    let gdt = crate::sym_addr!(gdt);
    poke::<u64>(gdt + sel, low);
    poke::<u64>(gdt + sel + 8, tss >> 32);
    (kstack, ustack, sel)
}

/// Starts every AP listed in the table (once). Returns the table used.
pub fn start_aps() {
    let st = SMP.get_mut();
    if st.started {
        return;
    }
    st.started = true;
    let table = match st.table {
        Some(t) => t,
        None => return,
    };
    if let Err(e) = lapic::check_mode() {
        st.start_error = Some(e);
        return;
    }
    let bsp = BSP_APIC.load(Ordering::Relaxed);
    if table.ids().iter().all(|&id| id == bsp) {
        return;
    }
    let tramp = match trampoline_page() {
        Some(p) => p,
        None => {
            st.start_error = Some("no free usable page below 1 MiB for the AP trampoline");
            return;
        }
    };
    st.tramp = tramp;
    let src = crate::sym_addr!(ap_tramp_start);
    let len = crate::sym_addr!(ap_tramp_end) - src;
    for i in 0..len {
        poke::<u8>(tramp + i, peek::<u8>(src + i));
    }
    lapic::enable();
    let vector = (tramp >> 12) as u32;
    let ap_boot = crate::sym_addr!(ap_boot);
    let mut cpu = 1usize;
    for &id in table.ids() {
        if id == bsp {
            continue;
        }
        if cpu >= MAX_CPUS || id > 0xff {
            st.missing[st.missing_count] = id;
            st.missing_count += 1;
            continue;
        }
        let (kstack, ustack, sel) = setup_cpu_structs(cpu);
        poke::<u64>(ap_boot, cpu as u64);
        poke::<u64>(ap_boot + 8, kstack);
        poke::<u64>(ap_boot + 16, ustack);
        poke::<u64>(ap_boot + 24, sel);
        core::sync::atomic::fence(Ordering::SeqCst);
        let slot = &SLOTS[cpu];
        lapic::send_ipi(id, 0x4500); // INIT, assert
        time::delay_us(10_000);
        lapic::send_ipi(id, 0x4600 | vector); // STARTUP
        let dl = time::deadline(200);
        while !time::passed(dl) && slot.state.load(Ordering::Acquire) == ST_EMPTY {
            core::hint::spin_loop();
        }
        if slot.state.load(Ordering::Acquire) == ST_EMPTY {
            lapic::send_ipi(id, 0x4600 | vector); // second STARTUP
        }
        let dl = time::deadline(1_000_000);
        while !time::passed(dl) && slot.state.load(Ordering::Acquire) == ST_EMPTY {
            core::hint::spin_loop();
        }
        if slot.state.load(Ordering::Acquire) == ST_EMPTY {
            st.missing[st.missing_count] = id;
            st.missing_count += 1;
        }
        cpu += 1;
    }
}

/// Online CPUs (slot index, slot).
pub fn online() -> impl Iterator<Item = (usize, &'static CpuSlot)> {
    SLOTS
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state.load(Ordering::Acquire) == ST_ONLINE)
}
