//! The command line: Firecracker's jailer flags (v1.16.1) with their meaning, and the checks on
//! their values that need no file system.

use std::path::PathBuf;

use clap::Parser;

/// `cinder-jailer`'s flags. The names are Firecracker's jailer's, so an engine that jails
/// `firecracker` can jail cinder by pointing `--exec-file` at it.
#[derive(Parser, Debug)]
#[command(
    name = "cinder-jailer",
    version,
    about = "Starts one cinder process confined: its own chroot (pivot_root in a new mount \
             namespace), only the device nodes it needs, an optional network and PID \
             namespace, cgroup limits (v1 or v2), resource limits, then a plain uid/gid with \
             no capabilities and NO_NEW_PRIVS.",
    after_help = "The jail is <chroot-base-dir>/<exec file name>/<id>/root. Arguments after \
                  `--` go to the jailed binary, after `--id <id> --start-time-us <t> \
                  --start-time-cpu-us <t>`. Files the VM needs (kernel, drives) go into the \
                  jail by --link-file or by the orchestrator before the VM is configured; \
                  paths given to cinder are then relative to the jail's root."
)]
pub struct Cli {
    /// The VM's id: 1 to 64 letters, digits or `-`; names the jail and the cgroup.
    #[arg(long)]
    pub id: String,
    /// The binary to jail (cinder): hard-linked (copied across file systems) into the jail,
    /// with its ELF interpreter and shared libraries when it is dynamically linked.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The user id the jailed binary runs as.
    #[arg(long)]
    pub uid: u32,
    /// The group id the jailed binary runs as.
    #[arg(long)]
    pub gid: u32,
    /// Where jails are made (an absolute path without symlinks).
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A cgroup file and the value to write to it, e.g. `memory.limit_in_bytes=268435456`,
    /// `cpu.cfs_quota_us=50000`, `pids.max=64` (v1), `memory.max=...` (v2). Repeatable.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// The cgroup hierarchy to use: 1 (one hierarchy per controller) or 2 (unified).
    #[arg(long, value_name = "1|2", default_value = "1")]
    pub cgroup_version: String,
    /// The cgroup the VM's cgroup is made in, relative to each hierarchy's root [default:
    /// the exec file's name].
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// A network namespace to join (a path such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Run in a new PID namespace: the jailer forks, the child (PID 1 there) becomes the
    /// jailed binary, the jailer writes its host pid to `<jail>/<exec file name>.pid` and
    /// exits.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Detach: a new session, stdin/stdout/stderr to /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// A resource limit for the jailed binary: `fsize=BYTES` or `no-file=N` [default:
    /// no-file=2048]. Repeatable.
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE")]
    pub resource_limits: Vec<String>,
    /// cinder's own: hard-link (copy across file systems) a file the VM needs, such as a
    /// kernel or a drive, into the jail's root under its file name. Repeatable.
    #[arg(long = "link-file", value_name = "PATH")]
    pub link_files: Vec<PathBuf>,
    /// Arguments for the jailed binary.
    #[arg(last = true, value_name = "ARGS")]
    pub exec_args: Vec<String>,
}

/// A bad flag value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// `--id` breaks the rule.
    #[error("invalid --id {0:?}: use 1 to 64 letters, digits or '-'")]
    Id(String),
    /// `--cgroup-version` is neither 1 nor 2.
    #[error("invalid --cgroup-version {0:?}: use 1 or 2")]
    CgroupVersion(String),
    /// `--cgroup` is not `FILE=VALUE` with a controller's file name.
    #[error(
        "invalid --cgroup {0:?}: use FILE=VALUE with a controller's file, e.g. \
         memory.limit_in_bytes=268435456"
    )]
    Cgroup(String),
    /// `--parent-cgroup` is not a relative path inside the hierarchy.
    #[error("invalid --parent-cgroup {0:?}: use a relative path without '..' or '.'")]
    ParentCgroup(String),
    /// `--resource-limit` is malformed.
    #[error("invalid --resource-limit {0:?}: use fsize=BYTES or no-file=N")]
    ResourceLimit(String),
    /// The exec file's name cannot name a jail.
    #[error("invalid --exec-file {0:?}: its file name must be UTF-8 (it names the jail)")]
    ExecName(PathBuf),
}

/// Firecracker's id rule: 1 to 64 ASCII letters, digits or hyphens.
pub fn check_id(id: &str) -> Result<(), CliError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CliError::Id(id.to_string()))
    }
}

/// Which cgroup hierarchy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller, at /sys/fs/cgroup/<controller>.
    V1,
    /// The unified hierarchy.
    V2,
}

/// Parses `--cgroup-version`.
pub fn cgroup_version(s: &str) -> Result<CgroupVersion, CliError> {
    match s {
        "1" => Ok(CgroupVersion::V1),
        "2" => Ok(CgroupVersion::V2),
        _ => Err(CliError::CgroupVersion(s.to_string())),
    }
}

/// One `--cgroup FILE=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The controller (the file name up to its first '.').
    pub controller: String,
    /// The file name.
    pub file: String,
    /// What is written to it.
    pub value: String,
}

/// Parses a `--cgroup FILE=VALUE`.
pub fn cgroup_setting(s: &str) -> Result<CgroupSetting, CliError> {
    let bad = || CliError::Cgroup(s.to_string());
    let (file, value) = s.split_once('=').ok_or_else(bad)?;
    let (controller, rest) = file.split_once('.').ok_or_else(bad)?;
    let name_ok = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    if !name_ok(controller)
        || controller.contains('.')
        || !name_ok(rest)
        || value.is_empty()
        || value.contains('\n')
    {
        return Err(bad());
    }
    Ok(CgroupSetting {
        controller: controller.to_string(),
        file: file.to_string(),
        value: value.to_string(),
    })
}

/// Checks `--parent-cgroup`: relative, its components plain names.
pub fn parent_cgroup(s: &str) -> Result<String, CliError> {
    let ok = !s.is_empty()
        && !s.starts_with('/')
        && s.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\n'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(CliError::ParentCgroup(s.to_string()))
    }
}

/// A resource the jailer can limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// RLIMIT_FSIZE: the largest file the binary may write, in bytes.
    Fsize,
    /// RLIMIT_NOFILE: the number of open files.
    NoFile,
}

/// Parses a `--resource-limit RESOURCE=VALUE`.
pub fn resource_limit(s: &str) -> Result<(Resource, u64), CliError> {
    let bad = || CliError::ResourceLimit(s.to_string());
    let (name, value) = s.split_once('=').ok_or_else(bad)?;
    let resource = match name {
        "fsize" => Resource::Fsize,
        "no-file" => Resource::NoFile,
        _ => return Err(bad()),
    };
    let value = value.parse::<u64>().map_err(|_| bad())?;
    Ok((resource, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(check_id("a").is_ok());
        assert!(check_id("vm-1-A").is_ok());
        assert!(check_id(&"x".repeat(64)).is_ok());
        assert!(check_id(&"x".repeat(65)).is_err());
        assert!(check_id("").is_err());
        assert!(check_id("a_b").is_err());
        assert!(check_id("../x").is_err());
        assert!(check_id("a b").is_err());
    }

    #[test]
    fn cgroup_settings() {
        let s = cgroup_setting("memory.limit_in_bytes=1024").expect("valid");
        assert_eq!(s.controller, "memory");
        assert_eq!(s.file, "memory.limit_in_bytes");
        assert_eq!(s.value, "1024");
        assert_eq!(
            cgroup_setting("cpu.cfs_quota_us=-1").map(|s| s.value),
            Ok("-1".into())
        );
        for bad in [
            "memory",
            "memory=1",
            "memory.=1",
            ".x=1",
            "memory.max=",
            "../memory.max=1",
            "memory.max/x=1",
            "memory.max=1\n2",
        ] {
            assert!(cgroup_setting(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_parents_limits() {
        assert_eq!(cgroup_version("1"), Ok(CgroupVersion::V1));
        assert_eq!(cgroup_version("2"), Ok(CgroupVersion::V2));
        assert!(cgroup_version("3").is_err());
        assert!(parent_cgroup("a/b").is_ok());
        for bad in ["", "/a", "a/../b", "a//b", "."] {
            assert!(parent_cgroup(bad).is_err(), "{bad}");
        }
        assert_eq!(resource_limit("fsize=10"), Ok((Resource::Fsize, 10)));
        assert_eq!(resource_limit("no-file=5"), Ok((Resource::NoFile, 5)));
        for bad in ["fsize", "fsize=x", "nofile=3", "no-file=-1"] {
            assert!(resource_limit(bad).is_err(), "{bad}");
        }
    }
}
