//! cinder probe guest: a freestanding x86_64 program that boots through the
//! Linux 64-bit boot protocol or PVH, keeps its CPL0 part to a few hundred
//! instructions of assembly (`entry.S`) and runs every check at CPL3.
//! See README.md for the output format and the command-line keys.

#![no_std]
#![no_main]

mod acpi;
mod blk_bench;
mod bootinfo;
mod checks;
mod cmdline;
mod cpu;
mod idle;
mod kbd;
mod lapic;
mod mem;
mod net_bench;
mod paging;
mod rt;
mod serial;
mod smp;
mod snapmem;
mod sync;
mod time;
mod virtio;
mod virtio_balloon;
mod virtio_balloon_snap;
mod virtio_blk;
mod virtio_blk_discard;
mod virtio_blk_hostile;
mod virtio_console;
mod virtio_net;
mod virtio_rng;
mod virtio_vsock;

core::arch::global_asm!(include_str!("entry.S"), options(att_syntax));

/// First Rust code on the boot CPU, entered at CPL3 by `entry.S`.
#[no_mangle]
pub extern "C" fn probe_main(_cpu: u64) -> ! {
    checks::init_and_run()
}

/// First Rust code on an application processor, entered at CPL3.
#[no_mangle]
pub extern "C" fn ap_main(cpu: u64) -> ! {
    smp::ap_main(cpu as usize)
}

/// Entered (by the CPL0 exception path rewriting the iret frame) after an
/// exception at CPL3, on CPU `cpu`'s fault stack.
#[no_mangle]
pub extern "C" fn user_fault(vector: u64, error: u64, rip: u64, cr2: u64, cpu: u64) -> ! {
    checks::on_fault(vector, error, rip, cr2, cpu as usize)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    checks::on_panic(info)
}
