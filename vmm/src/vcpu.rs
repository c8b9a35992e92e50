//! vCPUs: creation, initial state, and the run loop that dispatches exits to the buses.

use std::sync::Arc;

use arch::cpuid::{normalize, CpuidOptions};
use arch::loader::LoadedKernel;
use arch::GuestMemoryMmap;
use kvm_bindings::{CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use std::cell::Cell;
use std::sync::{Condvar, Mutex};

use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::metrics::Metrics;

thread_local! {
    /// This vCPU thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: makes the interrupted (or next) KVM_RUN of this thread return.
pub extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|p| p.get());
    if !p.is_null() {
        // SAFETY: the pointer was set by this very thread to its own kvm_run mapping, which
        // lives until the thread clears the pointer; a volatile byte store is signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

#[derive(Default)]
struct RunState {
    paused: bool,
    stop: bool,
    parked: usize,
    exited: usize,
    /// A snapshot asked the parked vCPUs for their state.
    save_pending: bool,
    /// The MSRs to save.
    save_msrs: Arc<Vec<u32>>,
    /// Each vCPU's answer, by index.
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// The timeout for parked vCPUs to hand over their state.
const SAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Pause, resume and stop for the vCPU threads.
#[derive(Default)]
pub struct VcpuControl {
    state: Mutex<RunState>,
    cv: Condvar,
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, RunState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Called by a vCPU before each KVM_RUN: parks while paused; false once stopped. While
    /// parked it answers a snapshot's request for its state with `save`.
    pub fn wait_runnable(
        &self,
        index: u8,
        save: &mut dyn FnMut(&[u32]) -> Result<VcpuState, String>,
    ) -> bool {
        let i = usize::from(index);
        let mut g = self.lock();
        if g.paused && !g.stop {
            g.parked += 1;
            self.cv.notify_all();
            while g.paused && !g.stop {
                if g.save_pending && matches!(g.saved.get(i), Some(None)) {
                    let msrs = g.save_msrs.clone();
                    drop(g);
                    self.hand_over(i, &msrs, save);
                    g = self.lock();
                    continue;
                }
                g = match self.cv.wait(g) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
            g.parked -= 1;
        }
        !g.stop
    }

    /// Saves this vCPU's state and hands it to [`VcpuControl::save_all`]. Apart and never
    /// inlined: the state (6 KiB and more with its copies) would otherwise make the frame of
    /// [`VcpuControl::wait_runnable`], which runs before every KVM_RUN, that large, and its
    /// stack probes touch every page of it: 16 KiB more of every vCPU thread's stack
    /// resident (issue 17 item 5).
    #[cold]
    #[inline(never)]
    fn hand_over(
        &self,
        i: usize,
        msrs: &[u32],
        save: &mut dyn FnMut(&[u32]) -> Result<VcpuState, String>,
    ) {
        let r = save(msrs);
        let mut g = self.lock();
        if let Some(slot) = g.saved.get_mut(i) {
            *slot = Some(r);
        }
        self.cv.notify_all();
    }

    /// Whether a pause was asked for (and not lifted).
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Asks the `n` parked vCPUs for their state (with the MSRs in `msrs`) and waits for all
    /// of them (at most 5 s).
    pub fn save_all(&self, n: usize, msrs: Arc<Vec<u32>>) -> Result<Vec<VcpuState>, String> {
        let deadline = std::time::Instant::now() + SAVE_TIMEOUT;
        let mut g = self.lock();
        if !g.paused {
            return Err("the vCPUs are not paused".into());
        }
        g.saved = (0..n).map(|_| None).collect();
        g.save_msrs = msrs;
        g.save_pending = true;
        self.cv.notify_all();
        while g.saved.iter().any(Option::is_none) {
            let now = std::time::Instant::now();
            if now >= deadline || g.stop || g.exited > 0 {
                g.save_pending = false;
                return Err(format!(
                    "{} of {n} vCPUs did not hand over their state within {SAVE_TIMEOUT:?}",
                    g.saved.iter().filter(|s| s.is_none()).count()
                ));
            }
            g = match self.cv.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        g.save_pending = false;
        std::mem::take(&mut g.saved)
            .into_iter()
            .flatten()
            .collect::<Result<Vec<_>, _>>()
    }

    fn vcpu_exited(&self) {
        let mut g = self.lock();
        g.exited += 1;
        self.cv.notify_all();
    }

    /// Asks every vCPU to park.
    pub fn request_pause(&self) {
        self.lock().paused = true;
    }

    /// Whether `n` vCPUs are parked (or gone).
    pub fn all_parked(&self, n: usize) -> bool {
        let g = self.lock();
        g.parked + g.exited >= n
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.cv.notify_all();
    }

    /// Asks every vCPU to leave its loop.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.cv.notify_all();
    }
}

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
        let mut misc = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: arch::regs::MSR_IA32_MISC_ENABLE,
            ..Default::default()
        }])
        .map_err(|e| VcpuError::Cpuid {
            index,
            why: format!("MSR list: {e:?}"),
        })?;
        let misc_enable = match fd.get_msrs(&mut misc) {
            Ok(1) => misc.as_slice()[0].data,
            _ => 0,
        };
        let msr_entries = arch::regs::boot_msrs(misc_enable);
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
    /// buses; parks while the VM is paused; a reset or fatal exit is reported through `exit`.
    pub fn run(
        mut self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        control: Arc<VcpuControl>,
        exit: Arc<ExitSignal>,
        metrics: Arc<Metrics>,
    ) {
        // The kick handler sets immediate_exit through this thread's pointer, so a kick that
        // lands just before KVM_RUN still makes it return at once.
        let kvm_run: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // SAFETY: `kvm_run` points at this vCPU's kvm_run mapping, alive as long as `self`.
        let run_ptr: *mut u8 = unsafe { std::ptr::addr_of_mut!((*kvm_run).immediate_exit) };
        IMMEDIATE_EXIT.with(|p| p.set(run_ptr));
        let mut unhandled = 0u32;
        while control.wait_runnable(self.index, &mut |msrs| self.save_state(msrs)) {
            let result = self.fd.run();
            match result {
                Ok(VcpuExit::IoOut(port, data)) => {
                    metrics.vcpu.exit_io_out.inc();
                    for chunk in data.chunks(io_size(kvm_run)) {
                        if !pio.write(u64::from(port), chunk) {
                            metrics.vcpu.unhandled.inc();
                            unhandled = note_unhandled(unhandled, "port write", u64::from(port));
                        }
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    metrics.vcpu.exit_io_in.inc();
                    for chunk in data.chunks_mut(io_size(kvm_run)) {
                        if !pio.read(u64::from(port), chunk) {
                            // Nothing there: the bus floats high.
                            chunk.fill(0xff);
                            metrics.vcpu.unhandled.inc();
                            unhandled = note_unhandled(unhandled, "port read", u64::from(port));
                        }
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    metrics.vcpu.exit_mmio_read.inc();
                    if !mmio.read(addr, data) {
                        data.fill(0xff);
                        metrics.vcpu.unhandled.inc();
                        unhandled = note_unhandled(unhandled, "MMIO read", addr);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    metrics.vcpu.exit_mmio_write.inc();
                    if !mmio.write(addr, data) {
                        metrics.vcpu.unhandled.inc();
                        unhandled = note_unhandled(unhandled, "MMIO write", addr);
                    }
                }
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel irqchip HLT does not exit; if it does, yield.
                    std::thread::yield_now();
                }
                Ok(VcpuExit::Shutdown) => {
                    // A reset through the triple fault path: normal for `reboot=t` guests, and
                    // the only sign of a guest that crashed early, so its registers are logged.
                    log::warn!(
                        "vCPU {}: shutdown exit (triple fault or reset); registers:\n{}",
                        self.index,
                        self.dump()
                    );
                    exit.request(ExitReason::Reset);
                    break;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                        | kvm_bindings::KVM_SYSTEM_EVENT_RESET => exit.request(ExitReason::Reset),
                        _ => {
                            metrics.vcpu.failures.inc();
                            exit.request(ExitReason::GuestFatal(format!(
                                "vCPU {}: system event {kind}\n{}",
                                self.index,
                                self.dump()
                            )))
                        }
                    }
                    break;
                }
                Ok(VcpuExit::InternalError) => {
                    metrics.vcpu.failures.inc();
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
                    // On kvm-pvm an emulation failure is nearly always the host's emulator
                    // meeting an instruction it lacks: say so in one more line.
                    let hint = if sub == 1 && crate::kvm::host_is_kvm_pvm() {
                        "\nthis host's KVM is kvm-pvm: it emulates guest kernel mode and could not \
                         run this kernel (a stock Linux kernel cannot run there; the test-profile \
                         guest can, see \"The Linux test profile\" in TESTING.md)"
                    } else {
                        ""
                    };
                    exit.request(ExitReason::GuestFatal(format!(
                        "vCPU {}: KVM internal error (suberror {sub}: {what}){hint}\n{}",
                        self.index,
                        self.dump()
                    )));
                    break;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    metrics.vcpu.failures.inc();
                    exit.request(ExitReason::GuestFatal(format!(
                        "vCPU {}: KVM entry failed (hardware reason {reason:#x}, host cpu {cpu})\n{}",
                        self.index,
                        self.dump()
                    )));
                    break;
                }
                Ok(VcpuExit::Intr) => self.fd.set_kvm_immediate_exit(0),
                Ok(other) => {
                    metrics.vcpu.failures.inc();
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
                    metrics.vcpu.failures.inc();
                    exit.request(ExitReason::GuestFatal(format!(
                        "vCPU {}: KVM_RUN failed: {e}\n{}",
                        self.index,
                        self.dump()
                    )));
                    break;
                }
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        control.vcpu_exited();
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

/// One vCPU's state in a snapshot: everything KVM keeps for it.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// The CPUID table it was given.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// MSRs, in the order they are restored (TSC before TSC_DEADLINE).
    pub msrs: Vec<kvm_bindings::kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_bindings::kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_bindings::kvm_sregs,
    /// FPU, SSE and AVX state (the 4 KiB KVM_GET_XSAVE area).
    pub xsave: kvm_bindings::kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_bindings::kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_bindings::kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_bindings::kvm_lapic_state,
    /// Runnable, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_bindings::kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_bindings::kvm_vcpu_events,
    /// The guest TSC's frequency (kHz), when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// MSR_IA32_TSC_DEADLINE: restored after MSR_IA32_TSC, which would otherwise move its meaning.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Orders an MSR list for restore: TSC_DEADLINE last.
pub fn order_msrs(list: &mut Vec<u32>) {
    if let Some(p) = list.iter().position(|&m| m == MSR_IA32_TSC_DEADLINE) {
        list.remove(p);
        list.push(MSR_IA32_TSC_DEADLINE);
    }
}

impl Vcpu {
    /// This (parked) vCPU's state, with the MSRs in `msr_list` that KVM lets it read.
    pub fn save_state(&self, msr_list: &[u32]) -> Result<VcpuState, String> {
        let i = self.index;
        let e =
            |what: &'static str| move |err: kvm_ioctls::Error| format!("vCPU {i}: {what}: {err}");
        // KVM's events first: reading the other state does not change them.
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(e("KVM_GET_VCPU_EVENTS"))?;
        let mp_state = self.fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(e("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
        let xsave = self.fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
        let debugregs = self.fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(e("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let msrs = read_msrs(&self.fd, msr_list).map_err(|w| format!("vCPU {i}: {w}"))?;
        Ok(VcpuState {
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            events,
            tsc_khz,
        })
    }

    /// Creates vCPU `index` with a snapshot's `state`, in the order KVM needs: TSC frequency
    /// and CPUID first; MP state; registers; sregs (which set the APIC base) before the LAPIC;
    /// MSRs (TSC before TSC_DEADLINE); the pending events last, since setting the rest can
    /// change them; then KVMCLOCK_CTRL tells a kvmclock guest it was stopped (no soft lockup).
    pub fn restore(vm: &VmFd, index: u8, state: &VcpuState) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(kvm_err(index, "KVM_CREATE_VCPU"))?;
        if let Some(khz) = state.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(kvm_err(
                    index,
                    "KVM_SET_TSC_KHZ (the snapshot's TSC frequency)",
                ))?;
            }
        }
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|e| VcpuError::Cpuid {
            index,
            why: format!("{e:?}"),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(index, "KVM_SET_CPUID2"))?;
        fd.set_mp_state(state.mp_state)
            .map_err(kvm_err(index, "KVM_SET_MP_STATE"))?;
        fd.set_regs(&state.regs)
            .map_err(kvm_err(index, "KVM_SET_REGS"))?;
        fd.set_sregs(&state.sregs)
            .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
        // SAFETY: `state.xsave` is a whole `kvm_xsave` (4 KiB), the size KVM_SET_XSAVE reads
        // for a guest whose CPUID enables no dynamic (AMX) state, which cinder's table never
        // does; the kernel checks the area's header itself.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm_err(index, "KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs)
            .map_err(kvm_err(index, "KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(kvm_err(index, "KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&state.lapic)
            .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(|e| VcpuError::Cpuid {
            index,
            why: format!("MSR list: {e:?}"),
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err(index, "KVM_SET_MSRS"))?;
        if set != state.msrs.len() {
            return Err(VcpuError::Msrs {
                index,
                set,
                wanted: state.msrs.len(),
            });
        }
        fd.set_vcpu_events(&state.events)
            .map_err(kvm_err(index, "KVM_SET_VCPU_EVENTS"))?;
        if let Err(e) = fd.kvmclock_ctrl() {
            // EINVAL: the guest has no kvmclock (the probe): nothing to tell it.
            log::debug!("vCPU {index}: KVM_KVMCLOCK_CTRL: {e}");
        }
        Ok(Vcpu { index, fd })
    }
}

/// The MSRs of `list` KVM lets this vCPU read, in `list`'s order. KVM_GET_MSRS stops at the
/// first it refuses: that one is left out and the rest read again (at most one pass per MSR).
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_bindings::kvm_msr_entry>, String> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest: &[u32] = list;
    while !rest.is_empty() {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| format!("KVM_GET_MSRS: {e}"))?;
        let n = n.min(rest.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < rest.len() {
            log::debug!("MSR {:#x} cannot be read; not saved", rest[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &[];
        }
    }
    Ok(out)
}

/// The element size of the KVM_EXIT_IO being handled (1, 2 or 4; string I/O repeats it, and
/// the exit's data holds size * count bytes).
fn io_size(kvm_run: *const kvm_bindings::kvm_run) -> usize {
    // SAFETY: `kvm_run` points at this vCPU's kvm_run mapping, which lives as long as the vCPU;
    // during a KVM_EXIT_IO the kernel has filled the `io` member. The field is read by value
    // through the raw pointer (no reference is made), and it lies in the kvm_run header, apart
    // from the data buffer the exit's slice covers.
    let size = unsafe { std::ptr::addr_of!((*kvm_run).__bindgen_anon_1.io.size).read() } as usize;
    if matches!(size, 1 | 2 | 4) {
        size
    } else {
        1
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
