//! x86_64 boot support for cinder: the guest physical memory layout, the e820 map,
//! `boot_params` and PVH `hvm_start_info`, the boot GDT, identity page tables, the
//! initial register state, CPUID, MSRs, the local APIC and the MP table.
//!
//! Everything here is a pure function over guest memory and kvm-bindings structs, so it
//! is unit-testable without `/dev/kvm`.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod regs;

pub use vm_memory;

/// The guest memory type used across cinder.
/// Guest memory, with a dirty bitmap that records every write cinder itself makes through
/// vm-memory (diff snapshots OR it with KVM's dirty log, which sees only the guest's).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
