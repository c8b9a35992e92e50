//! `--confine-paths DIR`: after start-up, cinder opens, creates or binds files only beneath
//! `DIR` (plus the KVM device and `/dev/net/tun`), enforced by the kernel with Landlock.
//!
//! Why Landlock rather than `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` at each open:
//! one rule set covers every way a client-named path is reached (kernel, initrd, drive images
//! and their `PATCH`, log and metrics files, the vsock sockets cinder binds and connects to),
//! including code that calls `open`/`bind` itself, and a symbolic link or `..` cannot lead out
//! because the check is on the file reached, not on the string. It needs no change at the open
//! sites. It applies to the calling thread and the threads it starts afterwards, so [`apply`]
//! runs before cinder starts any thread. A kernel without Landlock makes the flag an error,
//! never a silent no-op.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

/// The Landlock ABI whose file-system rights cinder handles (Linux 6.12+); an older kernel
/// enforces what it knows (best effort), but at least one right must be enforced.
const LANDLOCK_ABI: ABI = ABI::V5;

/// Why the confinement could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The directory is not one.
    #[error("--confine-paths {}: {why}", dir.display())]
    Dir {
        /// The directory given.
        dir: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A device cinder needs cannot be named in the rules.
    #[error("--confine-paths: cannot allow {}: {why}", path.display())]
    Device {
        /// The device.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The kernel refused the rule set.
    #[error("--confine-paths: Landlock: {0}")]
    Landlock(String),
    /// The kernel does not enforce Landlock.
    #[error("--confine-paths: this kernel does not enforce Landlock (Linux 5.13 or later with Landlock enabled is needed)")]
    NotEnforced,
}

/// The directory `dir` made absolute and free of symbolic links, checked to be a directory.
pub fn root(dir: &Path) -> Result<PathBuf, ConfineError> {
    let bad = |why: String| ConfineError::Dir {
        dir: dir.to_path_buf(),
        why,
    };
    let canon = std::fs::canonicalize(dir).map_err(|e| bad(e.to_string()))?;
    let meta = std::fs::metadata(&canon).map_err(|e| bad(e.to_string()))?;
    if !meta.is_dir() {
        return Err(bad("not a directory".into()));
    }
    Ok(canon)
}

/// Confines this thread and the threads it starts from now on: every right on files beneath
/// `dir`, read and write (with device ioctls) on each of `devices` that exists, nothing else.
/// Descriptors already open (the API socket, stdio, the signalfd) are not affected.
pub fn apply(dir: &Path, devices: &[&Path]) -> Result<(), ConfineError> {
    let ll = |e: landlock::RulesetError| ConfineError::Landlock(e.to_string());
    let dir_fd = PathFd::new(dir).map_err(|e| ConfineError::Dir {
        dir: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    let mut rules = Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))
        .map_err(ll)?
        .create()
        .map_err(ll)?
        .add_rule(PathBeneath::new(dir_fd, AccessFs::from_all(LANDLOCK_ABI)))
        .map_err(ll)?;
    for dev in devices.iter().filter(|d| d.exists()) {
        let fd = PathFd::new(dev).map_err(|e| ConfineError::Device {
            path: dev.to_path_buf(),
            why: e.to_string(),
        })?;
        rules = rules
            .add_rule(PathBeneath::new(fd, AccessFs::from_file(LANDLOCK_ABI)))
            .map_err(ll)?;
    }
    let status = rules.restrict_self().map_err(ll)?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(ConfineError::NotEnforced);
    }
    log::info!(
        "confined to {} ({:?} by Landlock)",
        dir.display(),
        status.ruleset
    );
    Ok(())
}
