//! The cinder VMM: KVM VM and vCPUs, the PIO/MMIO bus, the event loop and the lifecycle.

pub mod bus;
pub mod console;
pub mod exit;
pub mod kvm;
pub mod logger;
pub mod metrics;
pub mod runtime;
pub mod vcpu;
pub mod vm;
