//! The last steps before the jailed binary runs: resource limits, an optional new PID
//! namespace and detaching, then a plain uid/gid with no capabilities in any set,
//! `NO_NEW_PRIVS`, and `execve` with an empty environment.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::resource::{setrlimit, Resource as Rlimit};
use nix::unistd::{dup2, execve, setgroups, setresgid, setresuid, setsid, Gid, Uid};

use crate::cli::Resource;

/// `no-file` when `--resource-limit` does not say (Firecracker's jailer's default).
pub const DEFAULT_NO_FILE: u64 = 2048;

/// Why the binary could not be started confined.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// setrlimit refused a value.
    #[error("cannot set resource limit {0}={1}: {2}")]
    Rlimit(&'static str, u64, nix::Error),
    /// A step of detaching failed.
    #[error("cannot daemonize ({0}): {1}")]
    Daemonize(&'static str, nix::Error),
    /// A step of dropping privileges failed.
    #[error("cannot drop privileges ({0}): {1}")]
    Privileges(&'static str, String),
    /// An argument holds a NUL byte.
    #[error("argument {0:?} holds a NUL byte")]
    Nul(String),
    /// execve failed.
    #[error("cannot execute {0}: {1}")]
    Exec(String, nix::Error),
}

/// Sets the limits given, and `no-file` to [`DEFAULT_NO_FILE`] unless given.
pub fn rlimits(limits: &[(Resource, u64)]) -> Result<(), ConfineError> {
    let mut all = limits.to_vec();
    if !all.iter().any(|(r, _)| *r == Resource::NoFile) {
        all.push((Resource::NoFile, DEFAULT_NO_FILE));
    }
    for (r, v) in all {
        let (res, name) = match r {
            Resource::Fsize => (Rlimit::RLIMIT_FSIZE, "fsize"),
            Resource::NoFile => (Rlimit::RLIMIT_NOFILE, "no-file"),
        };
        setrlimit(res, v, v).map_err(|e| ConfineError::Rlimit(name, v, e))?;
    }
    Ok(())
}

/// A new session, and stdin, stdout and stderr on `null` (/dev/null, opened before the jail).
pub fn daemonize(null: &OwnedFd) -> Result<(), ConfineError> {
    setsid().map_err(|e| ConfineError::Daemonize("setsid", e))?;
    for fd in 0..3 {
        dup2(null.as_raw_fd(), fd).map_err(|e| ConfineError::Daemonize("dup2", e))?;
    }
    Ok(())
}

/// Becomes `uid`/`gid` with no supplementary groups and no capabilities (bounding, permitted,
/// effective, inheritable and ambient sets all empty), then sets `NO_NEW_PRIVS`.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), ConfineError> {
    let fail = |what: &'static str| {
        move |e: caps::errors::CapsError| ConfineError::Privileges(what, e.to_string())
    };
    // Dropping from the bounding set needs CAP_SETPCAP: before the uid changes.
    for cap in caps::all() {
        caps::drop(None, caps::CapSet::Bounding, cap).map_err(fail("bounding set"))?;
    }
    let nix_fail =
        |what: &'static str| move |e: nix::Error| ConfineError::Privileges(what, e.to_string());
    setgroups(&[]).map_err(nix_fail("setgroups"))?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(nix_fail("setresgid"))?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(nix_fail("setresuid"))?;
    // A non-zero uid has lost its capabilities already; uid 0 has not.
    for set in [
        caps::CapSet::Ambient,
        caps::CapSet::Inheritable,
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(fail("clear capabilities"))?;
    }
    nix::sys::prctl::set_no_new_privs().map_err(nix_fail("PR_SET_NO_NEW_PRIVS"))?;
    Ok(())
}

/// Executes `path` with `args` (argv[0] first) and an empty environment.
pub fn exec(path: &str, args: &[String]) -> Result<Infallible, ConfineError> {
    let c = |s: &str| CString::new(s).map_err(|_| ConfineError::Nul(s.to_string()));
    let path_c = c(path)?;
    let argv = args.iter().map(|a| c(a)).collect::<Result<Vec<_>, _>>()?;
    let env: [CString; 0] = [];
    execve(&path_c, &argv, &env).map_err(|e| ConfineError::Exec(path.to_string(), e))
}
