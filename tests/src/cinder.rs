//! Finding and starting the real `cinder` binary, and the KVM precondition.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The `cinder` binary: `$CINDER_BIN`, else the one cargo built next to this test binary
/// (`cargo build -p vmm` before `cargo test`, as `scripts/test.sh` does).
pub fn cinder_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CINDER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // Tests live in target/<profile>/deps/, benchmark binaries in target/<profile>/.
    let here = exe.parent().expect("the test binary has a directory");
    let candidates = [here.join("cinder"), here.join("../cinder")];
    let bin = candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| candidates[1].clone());
    assert!(
        bin.exists(),
        "cinder binary not found at {}: build it first (cargo build -p vmm) or set CINDER_BIN",
        bin.display()
    );
    bin
}

/// A `Command` for cinder with stdin from /dev/null.
pub fn cinder() -> Command {
    let mut c = Command::new(cinder_bin());
    c.stdin(Stdio::null());
    c
}

/// Fails the test loudly when `/dev/kvm` cannot be opened: tests that boot guests under
/// cinder never skip.
pub fn require_kvm() {
    crate::host::kind(); // printed once per test executable
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "this test boots a guest under cinder and needs /dev/kvm, which cannot be opened: {e}. \
             It does not skip: run it on a host with KVM."
        );
    }
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Starts cinder serving its API on `sock`, with `extra` flags (nothing boots unless they say
/// so), and waits (at most 10 s) for the socket to take connections.
pub fn start_api(sock: &Path, extra: &[&str]) -> crate::session::Session {
    let mut c = cinder();
    c.arg("--api-sock").arg(sock).args(extra);
    let s = crate::session::Session::start(c);
    crate::http::wait_for_socket(sock, std::time::Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    s
}
