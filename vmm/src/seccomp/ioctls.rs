//! The ioctl request numbers the seccomp tables name: KVM's (from the kvm-bindings structs'
//! sizes, as `<linux/kvm.h>` defines them), TUN's and the terminal's. Checked against the
//! numbers strace printed for a running cinder (`unit test ioctl_numbers_match_the_kernels`).

use kvm_bindings as kb;
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

const KVMIO: u32 = 0xAE;
const TUNIO: u32 = b'T' as u32;

#[allow(clippy::cast_possible_truncation)]
const fn size<T>() -> u32 {
    std::mem::size_of::<T>() as u32
}

const fn io(ty: u32, nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, ty, nr, 0) as u64
}
const fn iow(ty: u32, nr: u32, sz: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, ty, nr, sz) as u64
}
const fn ior(ty: u32, nr: u32, sz: u32) -> u64 {
    ioctl_expr(_IOC_READ, ty, nr, sz) as u64
}
const fn iowr(ty: u32, nr: u32, sz: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, ty, nr, sz) as u64
}

// /dev/kvm
pub const KVM_GET_API_VERSION: u64 = io(KVMIO, 0x00);
pub const KVM_CREATE_VM: u64 = io(KVMIO, 0x01);
pub const KVM_CHECK_EXTENSION: u64 = io(KVMIO, 0x03);
pub const KVM_GET_VCPU_MMAP_SIZE: u64 = io(KVMIO, 0x04);
pub const KVM_GET_SUPPORTED_CPUID: u64 = iowr(KVMIO, 0x05, size::<kb::kvm_cpuid2>());
pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr(KVMIO, 0x02, size::<kb::kvm_msr_list>());
// the VM fd
pub const KVM_CREATE_VCPU: u64 = io(KVMIO, 0x41);
pub const KVM_SET_USER_MEMORY_REGION: u64 =
    iow(KVMIO, 0x46, size::<kb::kvm_userspace_memory_region>());
pub const KVM_SET_TSS_ADDR: u64 = io(KVMIO, 0x47);
pub const KVM_SET_IDENTITY_MAP_ADDR: u64 = iow(KVMIO, 0x48, size::<u64>());
pub const KVM_CREATE_IRQCHIP: u64 = io(KVMIO, 0x60);
pub const KVM_IRQ_LINE: u64 = iow(KVMIO, 0x61, size::<kb::kvm_irq_level>());
pub const KVM_IRQFD: u64 = iow(KVMIO, 0x76, size::<kb::kvm_irqfd>());
pub const KVM_CREATE_PIT2: u64 = iow(KVMIO, 0x77, size::<kb::kvm_pit_config>());
pub const KVM_IOEVENTFD: u64 = iow(KVMIO, 0x79, size::<kb::kvm_ioeventfd>());
pub const KVM_GET_DIRTY_LOG: u64 = iow(KVMIO, 0x42, size::<kb::kvm_dirty_log>());
pub const KVM_GET_IRQCHIP: u64 = iowr(KVMIO, 0x62, size::<kb::kvm_irqchip>());
pub const KVM_SET_IRQCHIP: u64 = ior(KVMIO, 0x63, size::<kb::kvm_irqchip>());
pub const KVM_SET_CLOCK: u64 = iow(KVMIO, 0x7b, size::<kb::kvm_clock_data>());
pub const KVM_GET_CLOCK: u64 = ior(KVMIO, 0x7c, size::<kb::kvm_clock_data>());
pub const KVM_GET_PIT2: u64 = ior(KVMIO, 0x9f, size::<kb::kvm_pit_state2>());
pub const KVM_SET_PIT2: u64 = iow(KVMIO, 0xa0, size::<kb::kvm_pit_state2>());
// a vCPU fd
pub const KVM_RUN: u64 = io(KVMIO, 0x80);
pub const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, size::<kb::kvm_regs>());
pub const KVM_SET_REGS: u64 = iow(KVMIO, 0x82, size::<kb::kvm_regs>());
pub const KVM_GET_SREGS: u64 = ior(KVMIO, 0x83, size::<kb::kvm_sregs>());
pub const KVM_SET_SREGS: u64 = iow(KVMIO, 0x84, size::<kb::kvm_sregs>());
pub const KVM_GET_MSRS: u64 = iowr(KVMIO, 0x88, size::<kb::kvm_msrs>());
pub const KVM_SET_MSRS: u64 = iow(KVMIO, 0x89, size::<kb::kvm_msrs>());
pub const KVM_SET_FPU: u64 = iow(KVMIO, 0x8d, size::<kb::kvm_fpu>());
pub const KVM_GET_LAPIC: u64 = ior(KVMIO, 0x8e, size::<kb::kvm_lapic_state>());
pub const KVM_SET_LAPIC: u64 = iow(KVMIO, 0x8f, size::<kb::kvm_lapic_state>());
pub const KVM_SET_CPUID2: u64 = iow(KVMIO, 0x90, size::<kb::kvm_cpuid2>());
pub const KVM_GET_TSC_KHZ: u64 = io(KVMIO, 0xa3);
pub const KVM_SET_TSC_KHZ: u64 = io(KVMIO, 0xa2);
pub const KVM_GET_CPUID2: u64 = iowr(KVMIO, 0x91, size::<kb::kvm_cpuid2>());
pub const KVM_GET_MP_STATE: u64 = ior(KVMIO, 0x98, size::<kb::kvm_mp_state>());
pub const KVM_SET_MP_STATE: u64 = iow(KVMIO, 0x99, size::<kb::kvm_mp_state>());
pub const KVM_GET_VCPU_EVENTS: u64 = ior(KVMIO, 0x9f, size::<kb::kvm_vcpu_events>());
pub const KVM_SET_VCPU_EVENTS: u64 = iow(KVMIO, 0xa0, size::<kb::kvm_vcpu_events>());
pub const KVM_GET_DEBUGREGS: u64 = ior(KVMIO, 0xa1, size::<kb::kvm_debugregs>());
pub const KVM_SET_DEBUGREGS: u64 = iow(KVMIO, 0xa2, size::<kb::kvm_debugregs>());
pub const KVM_GET_XSAVE: u64 = ior(KVMIO, 0xa4, size::<kb::kvm_xsave>());
pub const KVM_SET_XSAVE: u64 = iow(KVMIO, 0xa5, size::<kb::kvm_xsave>());
pub const KVM_GET_XCRS: u64 = ior(KVMIO, 0xa6, size::<kb::kvm_xcrs>());
pub const KVM_SET_XCRS: u64 = iow(KVMIO, 0xa7, size::<kb::kvm_xcrs>());
pub const KVM_KVMCLOCK_CTRL: u64 = io(KVMIO, 0xad);
// a userfaultfd (`snapshot::uffd`): struct uffdio_api is 24 bytes, uffdio_register 32.
pub const UFFDIO_API: u64 = iowr(0xAA, 0x3F, 24);
pub const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, 32);
/// /dev/userfaultfd's USERFAULTFD_IOC_NEW (the userfaultfd crate prefers the device).
pub const USERFAULTFD_IOC_NEW: u64 = io(0xAA, 0x00);
// a TAP fd (`devices::virtio::net::tap`)
pub const TUNSETIFF: u64 = iow(TUNIO, 202, size::<libc::c_int>());
pub const TUNSETOFFLOAD: u64 = iow(TUNIO, 208, size::<libc::c_uint>());
pub const TUNGETIFF: u64 = ior(TUNIO, 210, size::<libc::c_uint>());
pub const TUNSETVNETHDRSZ: u64 = iow(TUNIO, 216, size::<libc::c_int>());
// terminals and sockets
pub const TCGETS: u64 = libc::TCGETS;
pub const TCSETS: u64 = libc::TCSETS;
pub const TIOCGWINSZ: u64 = libc::TIOCGWINSZ;
pub const FIONBIO: u64 = libc::FIONBIO;
pub const FIONREAD: u64 = libc::FIONREAD;
pub const SIOCGIFINDEX: u64 = 0x8933;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernels() {
        // The numbers strace -X raw printed for cinder's own calls (x86_64).
        for (ours, kernel) in [
            (KVM_RUN, 0xae80),
            (KVM_GET_REGS, 0x8090ae81),
            (KVM_GET_SREGS, 0x8138ae83),
            (KVM_SET_SREGS, 0x4138ae84),
            (KVM_SET_REGS, 0x4090ae82),
            (KVM_SET_MSRS, 0x4008ae89),
            (KVM_GET_MSRS, 0xc008ae88),
            (KVM_SET_CPUID2, 0x4008ae90),
            (KVM_SET_USER_MEMORY_REGION, 0x4020ae46),
            (KVM_IRQFD, 0x4020ae76),
            (KVM_CREATE_PIT2, 0x4040ae77),
            (KVM_IOEVENTFD, 0x4040ae79),
            (KVM_SET_FPU, 0x41a0ae8d),
            (KVM_SET_LAPIC, 0x4400ae8f),
            (KVM_GET_LAPIC, 0x8400ae8e),
            (KVM_GET_SUPPORTED_CPUID, 0xc008ae05),
            (KVM_SET_IDENTITY_MAP_ADDR, 0x4008ae48),
            (KVM_GET_TSC_KHZ, 0xaea3),
            (TUNSETIFF, 0x400454ca),
            (TUNSETOFFLOAD, 0x400454d0),
            (TUNGETIFF, 0x800454d2),
            (TUNSETVNETHDRSZ, 0x400454d8),
            (TCGETS, 0x5401),
            // Snapshots (values from <linux/kvm.h> and <linux/userfaultfd.h> on x86_64).
            (KVM_GET_IRQCHIP, 0xc208ae62),
            (KVM_SET_IRQCHIP, 0x8208ae63),
            (KVM_GET_CLOCK, 0x8030ae7c),
            (KVM_SET_CLOCK, 0x4030ae7b),
            (KVM_GET_PIT2, 0x8070ae9f),
            (KVM_SET_PIT2, 0x4070aea0),
            (KVM_GET_MP_STATE, 0x8004ae98),
            (KVM_SET_MP_STATE, 0x4004ae99),
            (KVM_GET_VCPU_EVENTS, 0x8040ae9f),
            (KVM_SET_VCPU_EVENTS, 0x4040aea0),
            (KVM_GET_DEBUGREGS, 0x8080aea1),
            (KVM_SET_DEBUGREGS, 0x4080aea2),
            (KVM_GET_XSAVE, 0x9000aea4),
            (KVM_SET_XSAVE, 0x5000aea5),
            (KVM_GET_XCRS, 0x8188aea6),
            (KVM_SET_XCRS, 0x4188aea7),
            (KVM_KVMCLOCK_CTRL, 0xaead),
            (KVM_SET_TSC_KHZ, 0xaea2),
            (KVM_GET_CPUID2, 0xc008ae91),
            (KVM_GET_DIRTY_LOG, 0x4010ae42),
            (UFFDIO_API, 0xc018aa3f),
            (UFFDIO_REGISTER, 0xc020aa00),
            (USERFAULTFD_IOC_NEW, 0xaa00),
            (FIONBIO, 0x5421),
        ] {
            assert_eq!(ours, kernel, "{ours:#x} != {kernel:#x}");
        }
    }
}
