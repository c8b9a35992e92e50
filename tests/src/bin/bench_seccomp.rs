//! seccomp benchmark: what the filters add to one system call, per thread kind. For each kind,
//! a thread with no filter and a thread with that kind's filters as cinder stacks them (main's
//! two first for the threads main spawns: vcpu, devices, console-out) each time `--calls`
//! `gettid` calls (on every table) and `--calls` `read`s of an empty non-blocking eventfd (the
//! event loops' most frequent call); prints the nanoseconds per call and the difference.
//! Reports, never asserts. Needs no KVM.
//!
//! ```text
//! cargo run --release -p cinder-tests --bin bench_seccomp -- [--calls N] [--runs N]
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use vmm::seccomp::{init, install, SeccompMode, ThreadKind};

/// Nanoseconds per call of `f`, over `calls` calls (the best of `runs`).
fn time(calls: u32, runs: u32, f: &dyn Fn()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..runs {
        let t0 = Instant::now();
        for _ in 0..calls {
            f();
        }
        best = best.min(t0.elapsed().as_nanos() as f64 / f64::from(calls));
    }
    best
}

/// (gettid, eventfd read) ns per call on a new thread with `kinds`' filters installed.
fn measure(kinds: &'static [ThreadKind], calls: u32, runs: u32) -> (f64, f64) {
    std::thread::spawn(move || {
        // SAFETY: eventfd returns a new fd or -1 (checked); nothing else owns it.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        for k in kinds {
            install(*k).expect("install the filter");
        }
        let gettid = time(calls, runs, &|| {
            // SAFETY: gettid takes no arguments.
            unsafe { libc::syscall(libc::SYS_gettid) };
        });
        let read = time(calls, runs, &|| {
            let mut v = 0u64;
            // SAFETY: reads at most 8 bytes into `v` (EAGAIN: the eventfd is empty).
            unsafe { libc::read(raw, (&mut v as *mut u64).cast(), 8) };
        });
        (gettid, read)
    })
    .join()
    .expect("the measuring thread")
}

fn main() {
    let mut calls = 200_000u32;
    let mut runs = 5u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--calls", Some(n)) => calls = n,
            ("--runs", Some(n)) => runs = n,
            _ => {
                eprintln!("usage: bench_seccomp [--calls N] [--runs N]");
                std::process::exit(2);
            }
        }
    }
    let calls = calls.max(1);
    let runs = runs.max(1);
    init(SeccompMode::On).expect("compile cinder's filters");
    println!(
        "seccomp benchmark: ns per system call without and with cinder's filters (best of {runs} \
         runs of {calls} calls)"
    );
    let (base_tid, base_read) = measure(&[], calls, runs);
    println!(
        "{:<34} gettid {base_tid:8.1} ns   eventfd read {base_read:8.1} ns",
        "no filter"
    );
    let stacks: [(&str, &'static [ThreadKind]); 5] = [
        ("vmm (main: 2 filters)", &[ThreadKind::Vmm]),
        ("api (1 filter)", &[ThreadKind::Api]),
        (
            "vcpu (main's 2 + its own)",
            &[ThreadKind::Vmm, ThreadKind::Vcpu],
        ),
        (
            "devices (main's 2 + its own)",
            &[ThreadKind::Vmm, ThreadKind::Devices],
        ),
        (
            "console-out (main's 2 + its own)",
            &[ThreadKind::Vmm, ThreadKind::ConsoleOut],
        ),
    ];
    for (name, kinds) in stacks {
        let (tid, read) = measure(kinds, calls, runs);
        println!(
            "{name:<34} gettid {tid:8.1} ns ({:+6.1})   eventfd read {read:8.1} ns ({:+6.1})",
            tid - base_tid,
            read - base_read
        );
    }
}
