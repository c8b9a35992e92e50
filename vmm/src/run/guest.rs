//! The guest `cinder run` boots: the kernel `scripts/run.sh` would boot on this host, and the
//! agent's initramfs, each from its flag, its environment variable, the source tree's build
//! script (builds on first use, cached) or the cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The kernel, its command line and whether it needs `--cpu-template no-pv-hypercalls`.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// vmlinux.
    pub path: PathBuf,
    /// Base command line (the agent's initramfs supplies /init).
    pub cmdline: String,
    /// kvm-pvm host: hide the KVM PV features.
    pub no_pv_hypercalls: bool,
}

/// The default guest's command line (as scripts/run.sh boots it).
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Whether this host's KVM is kvm-pvm (guest kernel mode emulated): scripts/kvm-lane.sh's test.
pub fn is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

pub(crate) fn cache_root() -> PathBuf {
    if let Some(c) = std::env::var_os("CINDER_CACHE") {
        return PathBuf::from(c);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/cinder")
}

/// The source tree this cinder was built from, when it is still there.
fn source_tree() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    root.join("resources/guest").is_dir().then_some(root)
}

/// Runs a build script of the source tree; its last stdout line is the output directory.
fn build(script: &str, args: &[&str], envs: &[(&str, &str)]) -> Result<PathBuf, String> {
    let root = source_tree().ok_or("no source tree to build it from")?;
    let path = root.join(script);
    let out = Command::new("bash")
        .arg(&path)
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", path.display(), out.status));
    }
    let dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    Ok(PathBuf::from(dir))
}

/// The newest `<prefix>*` directory of the guest cache that holds `file`.
fn newest_in_cache(prefix: &str, file: &str) -> Option<PathBuf> {
    let dir = cache_root().join("guest");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| p.join(file).is_file() && !p.to_string_lossy().contains(".tmp."))
        .max_by_key(|p| p.join(file).metadata().and_then(|m| m.modified()).ok())
}

/// The guest kernel: `--kernel` (with the default command line for this host), else the
/// guest directory `scripts/run.sh` would use.
pub fn kernel(flag: Option<&Path>) -> Result<Kernel, String> {
    let pvm = is_kvm_pvm();
    let (env, prefix, args) = if pvm {
        ("CINDER_TEST_GUEST_DIR", "test-", "test")
    } else {
        ("CINDER_GUEST_DIR", "default-", "default")
    };
    let dir = if flag.is_some() {
        None
    } else if let Some(d) = std::env::var_os(env) {
        Some(PathBuf::from(d))
    } else {
        match build(
            "resources/guest/build.sh",
            &[args],
            &[("CINDER_TEST_KVM_PV_PATCH", "0")],
        ) {
            Ok(d) => Some(d),
            Err(e) => Some(newest_in_cache(prefix, "vmlinux").ok_or_else(|| {
                format!(
                    "no guest kernel: give --kernel ({e}; none in {})",
                    cache_root().display()
                )
            })?),
        }
    };
    let cmdline = match (&dir, pvm) {
        (Some(d), true) => std::fs::read_to_string(d.join("cmdline"))
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("{}: {e}", d.join("cmdline").display()))?,
        (None, true) => test_profile_cmdline().to_string(),
        _ => DEFAULT_CMDLINE.to_string(),
    };
    let path = match (flag, dir) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(d)) => d.join("vmlinux"),
        (None, None) => return Err("no guest kernel".into()),
    };
    Ok(Kernel {
        path,
        cmdline,
        no_pv_hypercalls: pvm,
    })
}

/// The test profile's command line (resources/guest/test-profile.cmdline) for a `--kernel`
/// on a kvm-pvm host.
fn test_profile_cmdline() -> &'static str {
    "console=ttyS0 reboot=k panic=-1 noxsave clearcpuid=popcnt,smap,erms,fsrm pci=off acpi=off \
     mitigations=off rodata=off 8250.nr_uarts=1 quiet"
}

/// The agent's initramfs: `--agent-initrd`, `$CINDER_AGENT_INITRD`, the build script, or the
/// newest in the cache.
pub fn agent_initrd(flag: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(f) = flag {
        return Ok(f.to_path_buf());
    }
    if let Some(f) = std::env::var_os("CINDER_AGENT_INITRD") {
        return Ok(PathBuf::from(f));
    }
    match build("resources/guest/build-agent-initrd.sh", &[], &[]) {
        Ok(d) => Ok(d.join("initrd.cpio")),
        Err(e) => newest_in_cache("agent-initrd-", "initrd.cpio")
            .map(|d| d.join("initrd.cpio"))
            .ok_or_else(|| format!("no agent initramfs: give --agent-initrd ({e})")),
    }
}
