//! The cinder VMM: KVM VM and vCPUs, the PIO/MMIO bus, the event loop and the lifecycle.

pub mod actions;
pub mod builder;
pub mod bus;
pub mod cmdline;
pub mod confine;
pub mod console;
pub mod device_loop;
pub mod error;
pub mod exit;
pub mod kvm;
pub mod logger;
pub mod metrics;
pub mod options;
pub mod run;
pub mod runtime;
pub mod seccomp;
pub mod signal;
pub mod snapshot;
pub mod trim;
pub mod vcpu;
pub mod vm;
