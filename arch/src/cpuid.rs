//! Per-vCPU CPUID: starts from what KVM supports (`KVM_GET_SUPPORTED_CPUID`) and adjusts the
//! topology (APIC IDs, logical processor counts, cache sharing), sets the hypervisor bit and
//! the KVM leaves, and can hide KVM paravirtual features that use hypercalls.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: the package has more than one logical processor.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x80000001 ECX (AMD): core multi-processing legacy mode.
const ECX_CMP_LEGACY: u32 = 1 << 1;
/// KVM's signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM's feature leaf.
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// Timing leaf (as QEMU and VMware define it): EAX = TSC kHz, EBX = local APIC timer kHz.
pub const HV_CPUID_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const KVM_APIC_TIMER_KHZ: u32 = 1_000_000;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// KVM paravirtual features that make the guest issue hypercalls (VMCALL/VMMCALL).
pub mod kvm_features {
    /// PV spinlock kick (KVM_HC_KICK_CPU).
    pub const PV_UNHALT: u32 = 7;
    /// PV IPIs (KVM_HC_SEND_IPI).
    pub const PV_SEND_IPI: u32 = 11;
    /// PV sched yield (KVM_HC_SCHED_YIELD).
    pub const PV_SCHED_YIELD: u32 = 13;
}

/// What to adjust besides the topology.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidOptions {
    /// Hide the KVM paravirtual features that are driven by hypercalls.
    pub hide_kvm_hypercalls: bool,
    /// The guest TSC frequency, published in leaf 0x40000010 when known.
    pub tsc_khz: Option<u32>,
}

/// The CPU vendor, from leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD (or HygonGenuine).
    Amd,
    /// Anything else.
    Other,
}

/// Reads the vendor from leaf 0 of a CPUID table.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    match entries.iter().find(|e| e.function == 0) {
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e) => {
            Vendor::Intel
        }
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163) => Vendor::Amd,
        Some(e) if (e.ebx, e.edx, e.ecx) == (0x6f67_7948, 0x6e65_476e, 0x656e_6975) => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `entries` for vCPU `cpu_index` of `cpu_count` (one socket, one thread per core,
/// APIC ID = index). Leaves that KVM did not report are not added, except KVM's signature
/// leaf if missing.
pub fn normalize(
    entries: &mut Vec<kvm_cpuid_entry2>,
    cpu_index: u8,
    cpu_count: u8,
    opts: CpuidOptions,
) {
    let apic_id = u32::from(cpu_index);
    let n = u32::from(cpu_count.max(1));
    let vendor = vendor(entries);
    let core_bits = id_bits(n);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((n.min(255)) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0x4 if vendor == Vendor::Intel => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing the cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((n - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if n > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                // ECX[7:0]: cores - 1; ECX[15:12]: APIC ID bits for the core.
                e.ecx = (e.ecx & !0xf0ff) | ((n - 1) & 0xff) | (core_bits << 12);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | (apic_id & 0xff);
                e.ecx &= !0xff;
            }
            KVM_CPUID_SIGNATURE => {
                e.eax = if opts.tsc_khz.is_some() {
                    HV_CPUID_TIMING
                } else {
                    KVM_CPUID_FEATURES
                };
                e.ebx = KVM_SIGNATURE[0];
                e.ecx = KVM_SIGNATURE[1];
                e.edx = KVM_SIGNATURE[2];
            }
            KVM_CPUID_FEATURES if opts.hide_kvm_hypercalls => {
                e.eax &= !((1 << kvm_features::PV_UNHALT)
                    | (1 << kvm_features::PV_SEND_IPI)
                    | (1 << kvm_features::PV_SCHED_YIELD));
            }
            _ => {}
        }
    }
    // Extended topology (0xB, and 0x1F where KVM reports it): rebuilt whole, because KVM
    // (since Linux 6.1) reports only subleaf 0 with zeroed registers. Level 0 is SMT (one
    // thread per core), level 1 the cores of the single package, level 2 ends the list.
    for leaf in [0xb_u32, 0x1f] {
        if !entries.iter().any(|e| e.function == leaf) {
            continue;
        }
        entries.retain(|e| e.function != leaf);
        for (index, eax, ebx, kind) in [(0u32, 0, 1, 1u32), (1, core_bits, n, 2), (2, 0, 0, 0)] {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax,
                ebx,
                ecx: (kind << 8) | index,
                edx: apic_id,
                ..Default::default()
            });
        }
    }
    entries.retain(|e| e.function != HV_CPUID_TIMING);
    if let Some(khz) = opts.tsc_khz {
        entries.push(kvm_cpuid_entry2 {
            function: HV_CPUID_TIMING,
            eax: khz,
            ebx: KVM_APIC_TIMER_KHZ,
            ..Default::default()
        });
    }
    if !entries.iter().any(|e| e.function == KVM_CPUID_SIGNATURE) {
        entries.push(kvm_cpuid_entry2 {
            function: KVM_CPUID_SIGNATURE,
            eax: if opts.tsc_khz.is_some() {
                HV_CPUID_TIMING
            } else {
                KVM_CPUID_FEATURES
            },
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn intel_table() -> Vec<kvm_cpuid_entry2> {
        let mut leaf0 = entry(0, 0);
        leaf0.eax = 0x1f;
        leaf0.ebx = 0x756e_6547;
        leaf0.edx = 0x4965_6e69;
        leaf0.ecx = 0x6c65_746e;
        let mut leaf4_l3 = entry(4, 3);
        leaf4_l3.eax = 3 << 5 | 3;
        let mut kvm = entry(KVM_CPUID_FEATURES, 0);
        kvm.eax = 0xffff_ffff;
        vec![
            leaf0,
            entry(1, 0),
            leaf4_l3,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            kvm,
        ]
    }

    #[test]
    fn topology_and_hypervisor_bit_per_cpu() {
        let mut t = intel_table();
        normalize(&mut t, 2, 4, CpuidOptions::default());
        let leaf1 = t.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        let core = t
            .iter()
            .find(|e| e.function == 0xb && e.index == 1)
            .unwrap();
        assert_eq!((core.eax, core.ebx, core.edx, core.ecx >> 8), (2, 4, 2, 2));
        let l3 = t.iter().find(|e| e.function == 4).unwrap();
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        let sig = t
            .iter()
            .find(|e| e.function == KVM_CPUID_SIGNATURE)
            .unwrap();
        assert_eq!(sig.ebx, 0x4b4d_564b);
    }

    #[test]
    fn hypercall_features_hidden_on_request() {
        let mut t = intel_table();
        normalize(
            &mut t,
            0,
            1,
            CpuidOptions {
                hide_kvm_hypercalls: true,
                tsc_khz: Some(2_000_000),
            },
        );
        let timing = t.iter().find(|e| e.function == HV_CPUID_TIMING).unwrap();
        assert_eq!((timing.eax, timing.ebx), (2_000_000, KVM_APIC_TIMER_KHZ));
        let sig = t
            .iter()
            .find(|e| e.function == KVM_CPUID_SIGNATURE)
            .unwrap();
        assert_eq!(sig.eax, HV_CPUID_TIMING);
        let f = t.iter().find(|e| e.function == KVM_CPUID_FEATURES).unwrap();
        assert_eq!(f.eax & (1 << kvm_features::PV_SEND_IPI), 0);
        assert_eq!(f.eax & (1 << kvm_features::PV_SCHED_YIELD), 0);
        assert_ne!(f.eax & 1, 0, "other features stay");
        let mut t = intel_table();
        normalize(&mut t, 0, 1, CpuidOptions::default());
        let f = t.iter().find(|e| e.function == KVM_CPUID_FEATURES).unwrap();
        assert_ne!(f.eax & (1 << kvm_features::PV_SEND_IPI), 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [id_bits(1), id_bits(2), id_bits(3), id_bits(4), id_bits(5)],
            [0, 1, 2, 2, 3]
        );
    }
}
