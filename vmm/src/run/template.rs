//! `cinder run`'s template: a snapshot of a booted VM whose agent is ready, so a run restores
//! it (milliseconds) instead of booting (on emulated hosts ~20-60 s of CPU).
//!
//! The template is keyed by what its guest was booted from and with: the kernel, its command
//! line, the agent initramfs (path, size, mtime), memory, vCPUs, the snapshot format version
//! and this cinder binary (path, size, mtime: a rebuilt cinder may save device state
//! differently). The key's SHA-256 names `<cache>/run-templates/<hex>/` (next to the guest
//! caches), holding `state`, `mem`, the `placeholder` root drive it was booted with and a
//! `ready` marker written last. A `<hex>.lock` (`flock`) makes concurrent first runs build it
//! once, as the image cache and the guest builds do.
//!
//! Building: the VMM boots with a one-page placeholder as the root drive `image` (the agent
//! mounts nothing image-specific before a session's START), `--snapshot-on-signal`; the
//! front-end connects, reads HELLO, sends SIGUSR1 with the connection still open, waits for
//! the VMM's "snapshot written" line and kills it. After a restore the agent's read of that
//! connection fails once the guest has handled the vsock transport reset the restore sends,
//! and only then does it accept a run's connection: one accepted earlier could be reset with
//! it, silently on the host's side. A run then restores with
//! `--restore state=..,mem=..,resume,vsock=<its socket>,drive=image:<rootfs>`: the VMM builds
//! the drive on the image and raises a config-change interrupt; START carries the image's
//! size, and the agent waits until /dev/vda has it before mounting. Memory is mapped
//! `MAP_PRIVATE`, so any number of runs restore one template at once, each with its own
//! writes. A rebuild unlinks the old files first, so runs that still map them are unaffected.
//!
//! Only the root drive has a slot: a run with `-v` volumes or `--net tap=` boots cold (the
//! template has no such devices).
//!
//! `cinder images prune` removes the templates too (`prune`).

use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{guest::Kernel, proto};

/// How long the template's guest may take to boot to its agent.
const BUILD_DEADLINE: Duration = Duration::from_secs(900);
/// How long the VMM may take to write the snapshot after SIGUSR1.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(300);
/// The placeholder root drive's size.
const PLACEHOLDER_BYTES: usize = 4096;

/// What went wrong with a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A host file operation failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The template's VM did not get to a snapshot.
    #[error("building the run template: {0}")]
    Build(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// What a template is booted from and with.
pub struct Spec<'a> {
    /// The kernel and its command line.
    pub kernel: &'a Kernel,
    /// The agent's initramfs.
    pub initrd: &'a Path,
    /// Guest memory, MiB.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
}

/// A file's identity for the key: its path, size and modification time.
fn identity(p: &Path) -> String {
    let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (len, mtime) = std::fs::metadata(&abs)
        .map(|m| {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            (m.len(), t)
        })
        .unwrap_or((0, 0));
    format!("{}\0{len}\0{mtime}", abs.display())
}

/// The templates' directory.
pub fn root() -> PathBuf {
    super::guest::cache_root().join("run-templates")
}

/// The template directory for `spec` (its key's SHA-256, hex).
pub fn dir_for(spec: &Spec, exe: &Path) -> PathBuf {
    let mut h = Sha256::new();
    for part in [
        "cinder-run-template v1".to_string(),
        identity(&spec.kernel.path),
        spec.kernel.cmdline.clone(),
        format!("no_pv_hypercalls={}", spec.kernel.no_pv_hypercalls),
        identity(spec.initrd),
        format!("memory={} vcpus={}", spec.memory, spec.vcpus),
        format!(
            "snapshot={}.{}",
            crate::snapshot::MAJOR,
            crate::snapshot::MINOR
        ),
        identity(exe),
    ] {
        h.update(part.as_bytes());
        h.update([0xffu8]);
    }
    let hex: String = h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    root().join(hex)
}

/// A built template.
#[derive(Clone, Debug)]
pub struct Template {
    /// Its directory.
    pub dir: PathBuf,
}

impl Template {
    /// The state file.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// The memory file.
    pub fn mem(&self) -> PathBuf {
        self.dir.join("mem")
    }
    fn ready(&self) -> PathBuf {
        self.dir.join("ready")
    }
}

/// An exclusive `flock` on `<dir>.lock`, released when dropped.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn take(dir: &Path) -> Result<Lock, TemplateError> {
        let path = dir.with_extension("lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        loop {
            // SAFETY: flock on a descriptor we own, alive for the call; no memory passed.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Lock { _file: f });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(TemplateError::Io {
                    what: "cannot lock",
                    path,
                    source: e,
                });
            }
        }
    }
}

/// Whether `dir` holds a finished template (without building it).
pub fn is_ready(dir: &Path) -> bool {
    dir.join("ready").is_file()
}

/// The template at `dir`, built first unless ready. `fresh`: rebuild it even when ready (it
/// did not restore). Returns it and whether it was built now.
pub fn ensure(
    dir: &Path,
    spec: &Spec,
    exe: &Path,
    fresh: bool,
) -> Result<(Template, bool), TemplateError> {
    std::fs::create_dir_all(root()).map_err(io("cannot create", &root()))?;
    let t = Template {
        dir: dir.to_path_buf(),
    };
    let _lock = Lock::take(dir)?;
    if t.ready().is_file() && !fresh {
        return Ok((t, false));
    }
    // Unlink (never truncate) what is there: runs restoring from it keep their mappings.
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    build(&t, spec, exe)?;
    std::fs::write(t.ready(), b"").map_err(io("cannot write", &t.ready()))?;
    Ok((t, true))
}

/// Kills and reaps a child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build(t: &Template, spec: &Spec, exe: &Path) -> Result<(), TemplateError> {
    let placeholder = t.dir.join("placeholder");
    std::fs::write(&placeholder, vec![0u8; PLACEHOLDER_BYTES])
        .map_err(io("cannot write", &placeholder))?;
    let uds = t.dir.join("vsock.build");
    let log = t.dir.join("build.log");
    let console = t.dir.join("build-console.log");
    let mut cmd = Command::new(exe);
    cmd.arg("--kernel")
        .arg(&spec.kernel.path)
        .arg("--initrd")
        .arg(spec.initrd)
        .args(["--cmdline", &spec.kernel.cmdline])
        .args(["--memory", &spec.memory.to_string()])
        .args(["--vcpus", &spec.vcpus.to_string()])
        .arg("--vsock")
        .arg(format!("cid={},uds={}", super::GUEST_CID, uds.display()))
        .arg("--drive")
        .arg(format!("path={},id=image,ro", placeholder.display()))
        .arg("--snapshot-on-signal")
        .arg(format!(
            "state={},mem={}",
            t.state().display(),
            t.mem().display()
        ));
    if spec.kernel.no_pv_hypercalls {
        cmd.args(["--cpu-template", "no-pv-hypercalls"]);
    }
    let out = std::fs::File::create(&console).map_err(io("cannot create", &console))?;
    let err = std::fs::File::create(&log).map_err(io("cannot create", &log))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure only makes one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = Reaped(
        cmd.spawn()
            .map_err(|e| TemplateError::Build(format!("cannot start the VMM: {e}")))?,
    );
    let last_line = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string()
    };
    let ended = |c: &mut Reaped| -> Option<String> {
        c.0.try_wait().ok().flatten().map(|s| {
            format!(
                "the VM ended ({s}): {} / {}",
                last_line(&log),
                last_line(&console)
            )
        })
    };
    // The agent's HELLO: it booted and listens. The guest is our kernel and agent with no
    // user code yet, so the frame is read before the front-end's seccomp filter.
    let deadline = Instant::now() + BUILD_DEADLINE;
    let mut stream = loop {
        if let Some(why) = ended(&mut child) {
            return Err(TemplateError::Build(why));
        }
        if Instant::now() >= deadline {
            return Err(TemplateError::Build(format!(
                "the agent did not answer within {} s",
                BUILD_DEADLINE.as_secs()
            )));
        }
        if let Some(s) = super::handshake(&uds) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    match proto::read_frame(&mut stream) {
        Ok(Some((proto::HELLO, p))) if proto::Dec(&p).u32() == Ok(proto::VERSION) => {}
        other => {
            return Err(TemplateError::Build(format!(
                "expected HELLO version {} from the agent, got {other:?}",
                proto::VERSION
            )))
        }
    }
    // The connection stays open into the snapshot: after a restore the agent's read of it
    // fails once the guest has handled the vsock transport reset, and only then does it
    // accept again, so no run's connection is made before that reset and lost to it.
    let pid = libc::pid_t::try_from(child.0.id())
        .map_err(|_| TemplateError::Build("the VMM's pid does not fit pid_t".into()))?;
    // SAFETY: a signal to our own child, still unreaped (so its pid is its own).
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    let until = Instant::now() + SNAPSHOT_DEADLINE;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("snapshot written (SIGUSR1)") {
            break;
        }
        if text.contains("snapshot on SIGUSR1 failed") {
            return Err(TemplateError::Build(last_line(&log)));
        }
        if let Some(why) = ended(&mut child) {
            return Err(TemplateError::Build(why));
        }
        if Instant::now() >= until {
            return Err(TemplateError::Build(format!(
                "no snapshot within {} s of SIGUSR1",
                SNAPSHOT_DEADLINE.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    drop(stream);
    let _ = std::fs::remove_file(&uds);
    Ok(())
}

/// `cinder images prune`'s part: removes every template not being built (its lock free).
/// Returns how many were removed.
pub fn prune() -> Result<usize, TemplateError> {
    let root = root();
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(TemplateError::Io {
                what: "cannot read",
                path: root,
                source: e,
            })
        }
    };
    let mut n = 0;
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        if !p.is_dir() {
            continue;
        }
        let lock = p.with_extension("lock");
        let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
        else {
            continue;
        };
        // SAFETY: flock on a descriptor we own, alive for the call; no memory passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        if std::fs::remove_dir_all(&p).is_ok() {
            n += 1;
        }
        let _ = std::fs::remove_file(&lock);
    }
    Ok(n)
}
