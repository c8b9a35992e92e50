//! A test-only stand-in for one cinder thread: installs cinder's own seccomp filter for a
//! thread kind (`vmm::seccomp`, the same tables, handler and exit code as the `cinder`
//! binary), on a thread named as cinder names that kind's threads, and has it make one system
//! call. The hook lives here so that the shipped binary has none (tests/tests/seccomp.rs).
//!
//! `seccomp_hook on|log KIND CALL`: prints `survived CALL rc=N` and exits 0 when the call is
//! allowed; a forbidden call ends the process as in cinder (SIGSYS: one line, exit 148).
//! `seccomp_hook dump FILE`: writes cinder's vmm, api and vcpu filters as a Firecracker
//! `--seccomp-filter` file (seccompiler-bin's format).

use std::process::ExitCode;

use vmm::seccomp::{compile, init, install, SeccompMode, ThreadKind};

/// The calls this hook can make, by name.
fn call(name: &str) -> Option<i64> {
    // SAFETY: each call gets valid arguments or ones the kernel rejects with an error (a bad
    // fd); none touches memory this program uses (execve of /bin/true replaces the process).
    let rc = unsafe {
        match name {
            "getpid" => i64::from(libc::getpid()),
            "execve" => {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                i64::from(libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()))
            }
            "socket-inet" => i64::from(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0)),
            "socket-unix" => i64::from(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)),
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            // A child that exits at once (if the filter let the fork through).
            "fork" => match libc::fork() {
                0 => libc::_exit(0),
                pid => i64::from(pid),
            },
            // What main does at InstanceStart: a thread (clone3 answered ENOSYS, then clone
            // with CLONE_THREAD).
            "spawn-thread" => match std::thread::Builder::new().spawn(|| 7).map(|t| t.join()) {
                Ok(Ok(7)) => 0,
                _ => -1,
            },
            // KVM_RUN and KVM_CREATE_VM on a bad fd: the filter looks at the request only.
            "ioctl-kvm-run" => i64::from(libc::ioctl(-1, 0xae80)),
            "ioctl-kvm-create-vm" => i64::from(libc::ioctl(-1, 0xae01)),
            "mmap-rw" | "mmap-exec" => {
                let prot = if name == "mmap-rw" {
                    libc::PROT_READ | libc::PROT_WRITE
                } else {
                    libc::PROT_READ | libc::PROT_EXEC
                };
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                i64::from(p == libc::MAP_FAILED)
            }
            _ => return None,
        }
    };
    Some(rc)
}

/// cinder's name for a thread of `kind` (what the SIGSYS line shows).
fn thread_name(kind: ThreadKind) -> &'static str {
    match kind {
        ThreadKind::Vmm => "main",
        ThreadKind::Vcpu => "vcpu0",
        k => k.name(),
    }
}

/// Writes a Firecracker `--seccomp-filter` file: a bincode map (fixed-size little-endian
/// integers) of thread category to BPF program.
fn dump(path: &str) -> Result<(), String> {
    let mut out = Vec::new();
    let kinds = [ThreadKind::Vmm, ThreadKind::Api, ThreadKind::Vcpu];
    out.extend((kinds.len() as u64).to_le_bytes());
    for kind in kinds {
        let prog = compile(kind, SeccompMode::On)
            .map_err(|e| e.to_string())?
            .ok_or("no filter")?;
        out.extend((kind.name().len() as u64).to_le_bytes());
        out.extend(kind.name().as_bytes());
        out.extend((prog.len() as u64).to_le_bytes());
        for i in prog {
            out.extend(i.code.to_le_bytes());
            out.extend([i.jt, i.jf]);
            out.extend(i.k.to_le_bytes());
        }
    }
    std::fs::write(path, out).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [cmd, path] = args.as_slice() {
        if cmd == "dump" {
            return match dump(path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("seccomp_hook: {e}");
                    ExitCode::from(1)
                }
            };
        }
    }
    let [mode, kind, name] = args.as_slice() else {
        eprintln!("usage: seccomp_hook on|log KIND CALL | seccomp_hook dump FILE");
        return ExitCode::from(2);
    };
    let mode = match mode.as_str() {
        "on" => SeccompMode::On,
        "log" => SeccompMode::Log,
        m => {
            eprintln!("seccomp_hook: unknown mode {m}");
            return ExitCode::from(2);
        }
    };
    let Some(kind) = ThreadKind::ALL.into_iter().find(|k| k.name() == kind) else {
        eprintln!("seccomp_hook: unknown thread kind {kind}");
        return ExitCode::from(2);
    };
    if !call_known(name) {
        eprintln!("seccomp_hook: unknown call {name}");
        return ExitCode::from(2);
    }
    if let Err(e) = init(mode) {
        eprintln!("seccomp_hook: {e}");
        return ExitCode::from(1);
    }
    let name = name.clone();
    let t = std::thread::Builder::new()
        .name(thread_name(kind).into())
        .spawn(move || {
            install(kind).map_err(|e| e.to_string())?;
            let rc = call(&name).ok_or("unknown call")?;
            println!("survived {name} rc={rc}");
            Ok::<(), String>(())
        });
    match t.map(|t| t.join()) {
        Ok(Ok(Ok(()))) => ExitCode::SUCCESS,
        Ok(Ok(Err(e))) => {
            eprintln!("seccomp_hook: {e}");
            ExitCode::from(1)
        }
        _ => ExitCode::from(1),
    }
}

/// Whether `name` is a call this hook knows (checked before any filter is on).
fn call_known(name: &str) -> bool {
    [
        "getpid",
        "execve",
        "socket-inet",
        "socket-unix",
        "ptrace",
        "fork",
        "spawn-thread",
        "ioctl-kvm-run",
        "ioctl-kvm-create-vm",
        "mmap-rw",
        "mmap-exec",
    ]
    .contains(&name)
}
