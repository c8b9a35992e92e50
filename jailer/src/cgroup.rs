//! The VM's cgroup: `<hierarchy>/<parent>/<id>` in each v1 hierarchy a `--cgroup` names (or in
//! the unified v2 hierarchy), its files written, and its `cgroup.procs` opened so the jailer
//! can join it after it has entered the jail.
//!
//! Everything that can be checked without creating anything (the hierarchy is mounted, it has
//! the controller) is checked by [`plan`]; [`Plan::create`] then makes the directories and
//! writes the values, and records each directory it made so a failure removes them.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cli::{CgroupSetting, CgroupVersion};
use crate::undo::Undo;

/// Where the kernel lists mounts.
const MOUNTS: &str = "/proc/mounts";

/// Why the cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// /proc/mounts could not be read.
    #[error("cannot read {MOUNTS}: {0}")]
    Mounts(std::io::Error),
    /// No cgroup v1 hierarchy has this controller.
    #[error("no cgroup v1 hierarchy is mounted with the {0} controller (--cgroup {1})")]
    NoV1Controller(String, String),
    /// No cgroup2 file system is mounted.
    #[error("no cgroup v2 hierarchy is mounted (--cgroup-version 2)")]
    NoV2,
    /// The unified hierarchy lacks this controller.
    #[error("the cgroup v2 hierarchy at {0} has no {1} controller (--cgroup {2}); it has: {3}")]
    NoV2Controller(PathBuf, String, String, String),
    /// The VM's cgroup exists already.
    #[error("cgroup {0} exists already: another VM with this --id, or a leftover to remove")]
    Exists(PathBuf),
    /// A directory could not be made.
    #[error("cannot create cgroup {0}: {1}")]
    Create(PathBuf, std::io::Error),
    /// The controller has no such file.
    #[error("unknown cgroup file {0}: {1} has no such file")]
    UnknownFile(String, PathBuf),
    /// The kernel refused a value.
    #[error("cannot write {1:?} to {0}: {2}")]
    Write(PathBuf, String, std::io::Error),
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The process could not join the cgroup.
    #[error("cannot join cgroup {0}: {1}")]
    Join(PathBuf, std::io::Error),
}

/// One hierarchy to make the VM's cgroup in, and what goes there.
struct Target {
    /// The hierarchy's mount point.
    mount: PathBuf,
    /// Controllers to enable down to the parent (v2 only).
    enable: Vec<String>,
    settings: Vec<CgroupSetting>,
}

/// The checked cgroup settings.
pub struct Plan {
    targets: Vec<Target>,
}

/// The cgroup mounts: (file system type, mount point, options).
fn mounts() -> Result<Vec<(String, PathBuf, Vec<String>)>, CgroupError> {
    let text = std::fs::read_to_string(MOUNTS).map_err(CgroupError::Mounts)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [_, dir, fs @ ("cgroup" | "cgroup2"), opts, ..] => Some((
                    (*fs).to_string(),
                    PathBuf::from(dir),
                    opts.split(',').map(str::to_string).collect(),
                )),
                _ => None,
            }
        })
        .collect())
}

/// Checks the settings against the mounted hierarchies.
pub fn plan(version: CgroupVersion, settings: &[CgroupSetting]) -> Result<Plan, CgroupError> {
    if settings.is_empty() {
        return Ok(Plan {
            targets: Vec::new(),
        });
    }
    let mounts = mounts()?;
    let flag = |s: &CgroupSetting| format!("{}={}", s.file, s.value);
    match version {
        CgroupVersion::V1 => {
            let mut by_mount: BTreeMap<PathBuf, Vec<CgroupSetting>> = BTreeMap::new();
            for s in settings {
                let m = mounts
                    .iter()
                    .find(|(fs, _, opts)| fs == "cgroup" && opts.contains(&s.controller))
                    .ok_or_else(|| CgroupError::NoV1Controller(s.controller.clone(), flag(s)))?;
                by_mount.entry(m.1.clone()).or_default().push(s.clone());
            }
            Ok(Plan {
                targets: by_mount
                    .into_iter()
                    .map(|(mount, settings)| Target {
                        mount,
                        enable: Vec::new(),
                        settings,
                    })
                    .collect(),
            })
        }
        CgroupVersion::V2 => {
            let mount = mounts
                .iter()
                .find(|(fs, _, _)| fs == "cgroup2")
                .map(|m| m.1.clone())
                .ok_or(CgroupError::NoV2)?;
            let path = mount.join("cgroup.controllers");
            let have = std::fs::read_to_string(&path).map_err(|e| CgroupError::Read(path, e))?;
            let have: Vec<&str> = have.split_whitespace().collect();
            let mut enable: Vec<String> = Vec::new();
            for s in settings {
                if s.controller == "cgroup" || enable.contains(&s.controller) {
                    continue;
                }
                if !have.contains(&s.controller.as_str()) {
                    return Err(CgroupError::NoV2Controller(
                        mount,
                        s.controller.clone(),
                        flag(s),
                        if have.is_empty() {
                            "none".into()
                        } else {
                            have.join(" ")
                        },
                    ));
                }
                enable.push(s.controller.clone());
            }
            Ok(Plan {
                targets: vec![Target {
                    mount,
                    enable,
                    settings: settings.to_vec(),
                }],
            })
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| CgroupError::Write(path.to_path_buf(), value.into(), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| CgroupError::Write(path.to_path_buf(), value.into(), e))
}

/// A v1 cpuset cgroup starts with no CPUs and no memory nodes: it takes its parent's.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mine = dir.join(file);
        let cur = std::fs::read_to_string(&mine).map_err(|e| CgroupError::Read(mine.clone(), e))?;
        if cur.trim().is_empty() {
            let p = parent.join(file);
            let v = std::fs::read_to_string(&p).map_err(|e| CgroupError::Read(p, e))?;
            write(&mine, v.trim())?;
        }
    }
    Ok(())
}

impl Plan {
    /// Makes `<mount>/<parent>/<id>` in each hierarchy, writes the settings, and returns each
    /// cgroup's `cgroup.procs`, open for [`join`].
    pub fn create(
        &self,
        parent: &str,
        id: &str,
        undo: &mut Undo,
    ) -> Result<Vec<File>, CgroupError> {
        let mut procs = Vec::new();
        for t in &self.targets {
            let is_cpuset = t.settings.iter().any(|s| s.controller == "cpuset");
            let mut dir = t.mount.clone();
            let parts: Vec<&str> = parent.split('/').chain(std::iter::once(id)).collect();
            for (i, part) in parts.iter().enumerate() {
                if !t.enable.is_empty() {
                    let line: Vec<String> = t.enable.iter().map(|c| format!("+{c}")).collect();
                    write(&dir.join("cgroup.subtree_control"), &line.join(" "))?;
                }
                dir.push(part);
                let leaf = i + 1 == parts.len();
                if dir.exists() {
                    if leaf {
                        return Err(CgroupError::Exists(dir));
                    }
                    continue;
                }
                std::fs::create_dir(&dir).map_err(|e| CgroupError::Create(dir.clone(), e))?;
                undo.cgroup(dir.clone());
                if is_cpuset {
                    inherit_cpuset(&dir)?;
                }
            }
            for s in &t.settings {
                let f = dir.join(&s.file);
                if !f.is_file() {
                    return Err(CgroupError::UnknownFile(s.file.clone(), dir));
                }
                write(&f, &s.value)?;
            }
            let p = dir.join("cgroup.procs");
            procs.push(
                OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|e| CgroupError::Join(p, e))?,
            );
        }
        Ok(procs)
    }
}

/// Moves this process into each cgroup (through the `cgroup.procs` files [`Plan::create`]
/// opened: this works after the jail is entered).
pub fn join(procs: &mut [File]) -> Result<(), CgroupError> {
    let pid = std::process::id().to_string();
    for f in procs {
        f.write_all(pid.as_bytes())
            .map_err(|e| CgroupError::Join(PathBuf::from("cgroup.procs"), e))?;
    }
    Ok(())
}
