//! vCPUs: creation, initial state, and the run loop that dispatches exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arch::cpuid::{normalize, CpuidOptions};
use arch::loader::LoadedKernel;
use arch::GuestMemoryMmap;
use kvm_bindings::{CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Not all MSRs were accepted.
    #[error("vCPU {index}: KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        /// vCPU index.
        index: u8,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        wanted: usize,
    },
    /// Building vCPU state failed.
    #[error("vCPU {index}: {source}")]
    Regs {
        /// vCPU index.
        index: u8,
        /// The error.
        source: arch::regs::RegsError,
    },
    /// The CPUID table could not be built.
    #[error("vCPU {index}: cannot build the CPUID table: {why}")]
    Cpuid {
        /// vCPU index.
        index: u8,
        /// Why.
        why: String,
    },
}

/// One vCPU, ready to run.
pub struct Vcpu {
    /// Index (= APIC ID).
    pub index: u8,
    fd: VcpuFd,
}

fn kvm_err(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm {
        index,
        what,
        source,
    }
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and gives it CPUID, MSRs, LAPIC LINT pins and, for the
    /// boot CPU, the registers to enter `kernel`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kvm: &Kvm,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        index: u8,
        count: u8,
        kernel: &LoadedKernel,
        supported_cpuid: &CpuId,
        cpuid_opts: CpuidOptions,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err(index, "KVM_CREATE_VCPU"))?;
        let mut entries = supported_cpuid.as_slice().to_vec();
        let opts = CpuidOptions {
            tsc_khz: fd.get_tsc_khz().ok(),
            ..cpuid_opts
        };
        normalize(&mut entries, index, count, opts);
        let cpuid = CpuId::from_entries(&entries).map_err(|e| VcpuError::Cpuid {
            index,
            why: format!("{e:?}"),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;
        let msr_entries = arch::regs::boot_msrs();
        let msrs = Msrs::from_entries(&msr_entries).map_err(|e| VcpuError::Cpuid {
            index,
            why: format!("MSR list: {e:?}"),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err(index, "KVM_SET_MSRS"))?;
        if set != msr_entries.len() {
            return Err(VcpuError::Msrs {
                index,
                set,
                wanted: msr_entries.len(),
            });
        }
        let mut lapic = fd.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?;
        arch::regs::set_lint(&mut lapic);
        fd.set_lapic(&lapic)
            .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
        let _ = kvm;
        if index == 0 {
            let mut sregs = fd.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?;
            arch::regs::setup_sregs(mem, kernel.protocol, &mut sregs)
                .map_err(|source| VcpuError::Regs { index, source })?;
            fd.set_sregs(&sregs)
                .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
            fd.set_fpu(&arch::regs::boot_fpu())
                .map_err(kvm_err(index, "KVM_SET_FPU"))?;
            fd.set_regs(&arch::regs::boot_regs(kernel.protocol, kernel.entry.0))
                .map_err(kvm_err(index, "KVM_SET_REGS"))?;
        }
        Ok(Vcpu { index, fd })
    }

    /// Runs until the VM is stopped or something ends it. Dispatches PIO/MMIO exits to the
    /// buses; a reset or fatal exit is reported through `exit`.
    pub fn run(
        mut self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        stop: Arc<AtomicBool>,
        exit: Arc<ExitSignal>,
    ) {
        let mut unhandled_pio = 0u32;
        let mut unhandled_mmio = 0u32;
        while !stop.load(Ordering::Acquire) {
            let result = self.fd.run();
            match result {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !pio.write(u64::from(port), data) {
                        unhandled_pio =
                            note_unhandled(unhandled_pio, "port write", u64::from(port));
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        // Nothing there: the bus floats high.
                        data.fill(0xff);
                        unhandled_pio = note_unhandled(unhandled_pio, "port read", u64::from(port));
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        data.fill(0xff);
                        unhandled_mmio = note_unhandled(unhandled_mmio, "MMIO read", addr);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        unhandled_mmio = note_unhandled(unhandled_mmio, "MMIO write", addr);
                    }
                }
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel irqchip HLT does not exit; if it does, yield.
                    std::thread::yield_now();
                }
                Ok(VcpuExit::Shutdown) => {
                    log::info!("vCPU {}: shutdown exit (triple fault or reset)", self.index);
                    exit.request(ExitReason::Reset);
                    break;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                        | kvm_bindings::KVM_SYSTEM_EVENT_RESET => exit.request(ExitReason::Reset),
                        _ => exit.request(ExitReason::GuestFatal(format!(
                            "vCPU {}: system event {kind}\n{}",
                            self.index,
                            self.dump()
                        ))),
                    }
                    break;
                }
                Ok(VcpuExit::InternalError) => {
                    let sub = {
                        let run = self.fd.get_kvm_run();
                        // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal`
                        // member of the exit union; reading a u32 from it is always valid.
                        unsafe { run.__bindgen_anon_1.internal.suberror }
                    };
                    let what = match sub {
                        1 => "emulation failure",
                        2 => "simultaneous exceptions",
                        3 => "delivery event",
                        _ => "internal error",
                    };
                    exit.request(ExitReason::GuestFatal(format!(
                        "vCPU {}: KVM internal error (suberror {sub}: {what})\n{}",
                        self.index,
                        self.dump()
                    )));
                    break;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    exit.request(ExitReason::GuestFatal(format!(
                        "vCPU {}: KVM entry failed (hardware reason {reason:#x}, host cpu {cpu})\n{}",
                        self.index,
                        self.dump()
                    )));
                    break;
                }
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    let name = format!("{other:?}");
                    exit.request(ExitReason::GuestFatal(format!(
                        "vCPU {}: unexpected exit {name}\n{}",
                        self.index,
                        self.dump()
                    )));
                    break;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => {
                    exit.request(ExitReason::GuestFatal(format!(
                        "vCPU {}: KVM_RUN failed: {e}\n{}",
                        self.index,
                        self.dump()
                    )));
                    break;
                }
            }
        }
    }

    /// The registers, for a fatal exit's report.
    fn dump(&self) -> String {
        let mut s = String::new();
        match self.fd.get_regs() {
            Ok(r) => s.push_str(&format!(
                "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
            )),
            Err(e) => s.push_str(&format!("  (registers unavailable: {e})\n")),
        }
        match self.fd.get_sregs() {
            Ok(r) => s.push_str(&format!(
                "  cs={:#06x} (l={} db={} dpl={}) cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.cs.selector, r.cs.l, r.cs.db, r.cs.dpl, r.cr0, r.cr2, r.cr3, r.cr4, r.efer
            )),
            Err(e) => s.push_str(&format!("  (system registers unavailable: {e})")),
        }
        s
    }
}

/// Logs an access nobody answers, rate-limited to the first few and then every 1000th.
fn note_unhandled(count: u32, what: &str, addr: u64) -> u32 {
    if count < 8 || count.is_multiple_of(1000) {
        log::debug!("unhandled {what} at {addr:#x} (seen {} so far)", count + 1);
    }
    count.saturating_add(1)
}

/// The largest CPUID table cinder asks KVM for.
pub const CPUID_ENTRIES: usize = KVM_MAX_CPUID_ENTRIES;
