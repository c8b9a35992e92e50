//! Harness for cinder's integration tests: running the real `cinder` binary (and QEMU as an
//! oracle) against real guests, and reading what the guest reported.

pub mod cinder;
pub mod guest;
pub mod host;
pub mod http;
pub mod jail;
pub mod linux;
pub mod netns;
pub mod probe;
pub mod qemu;
pub mod runner;
pub mod session;
pub mod smaps;
pub mod tmp;
pub mod vsock;
