//! Running cinder under `cinder-jailer` (jailer/): a unique id, chroot base and parent cgroup
//! per jail, the command line, and what the jailed process looks like from the host
//! (`/proc/<pid>/...`). Dropping a [`Jail`] removes its chroot base and every cgroup directory
//! it may have made (`<hierarchy>/<parent>/<id>` and `<hierarchy>/<parent>`, in each v1
//! hierarchy and the unified one): drop it after the jailed process is gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::tmp::TempDir;

/// The uid and gid the tests jail cinder as (`nobody`/`nogroup`).
pub const NOBODY: u32 = 65534;

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The `cinder-jailer` binary: `$CINDER_JAILER_BIN`, else the one next to cinder (`cargo build`
/// builds both).
pub fn jailer_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CINDER_JAILER_BIN") {
        return PathBuf::from(p);
    }
    let bin = crate::cinder::cinder_bin().with_file_name("cinder-jailer");
    assert!(
        bin.exists(),
        "cinder-jailer not found at {}: build it first (cargo build) or set CINDER_JAILER_BIN",
        bin.display()
    );
    bin
}

/// One jail: `<base>/cinder/<id>/root`, cgroups under `<parent>/<id>`.
pub struct Jail {
    /// The chroot base directory (a fresh scratch directory).
    pub base: TempDir,
    /// The VM's id (`--id`).
    pub id: String,
    /// The parent cgroup (`--parent-cgroup`), unique to this jail.
    pub parent: String,
}

impl Jail {
    /// A fresh jail for a test called `tag` (letters, digits and `-`).
    pub fn new(tag: &str) -> Jail {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        Jail {
            base: TempDir::new(&format!("jail-{tag}")),
            id: format!("{tag}-{pid}-{n}"),
            parent: format!("cinder-test-{pid}-{n}"),
        }
    }

    /// The jail's root as the host sees it.
    pub fn root(&self) -> PathBuf {
        self.base.join("cinder").join(&self.id).join("root")
    }

    /// A path inside the jail (`/x` in the jail), as the host sees it.
    pub fn host_path(&self, p: &str) -> PathBuf {
        self.root().join(p.trim_start_matches('/'))
    }

    /// `cinder-jailer --id .. --exec-file <cinder> --uid 65534 --gid 65534 --chroot-base-dir
    /// .. --parent-cgroup .. <jailer> -- <cinder>`, stdin from /dev/null.
    pub fn command(&self, jailer: &[&str], cinder: &[&str]) -> Command {
        let mut c = Command::new(jailer_bin());
        c.stdin(Stdio::null())
            .arg("--id")
            .arg(&self.id)
            .arg("--exec-file")
            .arg(crate::cinder::cinder_bin())
            .args(["--uid", &NOBODY.to_string(), "--gid", &NOBODY.to_string()])
            .arg("--chroot-base-dir")
            .arg(self.base.path())
            .arg("--parent-cgroup")
            .arg(&self.parent)
            .args(jailer)
            .arg("--")
            .args(cinder);
        c
    }

    /// This jail's cgroup directory in the hierarchy mounted at `<CGROUP_ROOT>/<hierarchy>`.
    pub fn cgroup_dir(&self, hierarchy: &str) -> PathBuf {
        Path::new(CGROUP_ROOT)
            .join(hierarchy)
            .join(&self.parent)
            .join(&self.id)
    }

    /// The cgroup directories of this jail that exist, in any hierarchy (parent or leaf).
    pub fn leftover_cgroups(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for h in hierarchies() {
            let p = h.join(&self.parent);
            if p.exists() {
                v.push(p);
            }
        }
        v
    }
}

/// The cgroup hierarchies' mount points under [`CGROUP_ROOT`].
fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir(CGROUP_ROOT)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Jail {
    fn drop(&mut self) {
        for h in hierarchies() {
            let parent = h.join(&self.parent);
            if !parent.exists() {
                continue;
            }
            // The jailed process may take a moment to leave its cgroup after it was reaped.
            let until = Instant::now() + Duration::from_secs(5);
            let leaf = parent.join(&self.id);
            while leaf.exists() && std::fs::remove_dir(&leaf).is_err() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// A `Key:\tvalue` line of `/proc/<pid>/status`.
pub fn status_field(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{text}"))
}

/// Every path under `dir` (relative, sorted), not following symlinks; at most 10 000.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for e in rd.flatten() {
            let r = rel.join(e.file_name());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(r.clone());
            }
            out.push(r.to_string_lossy().into_owned());
            assert!(out.len() < 10_000, "{} holds too much", dir.display());
        }
    }
    out.sort();
    out
}
