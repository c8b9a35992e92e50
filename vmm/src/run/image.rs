//! Image resolution for `cinder run`: what becomes the guest's /dev/vda and the image's
//! configuration. One function, [`resolve_image`], so that the image crate
//! (`cinder_image::prepare`, OCI and docker archives) replaces it at merge time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What an image says about how to run it (Docker's Entrypoint, Cmd, Env, WorkingDir, User).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// Entrypoint: prepended to the command.
    pub entrypoint: Vec<String>,
    /// Cmd: the command when none is given.
    pub cmd: Vec<String>,
    /// KEY=VALUE.
    pub env: Vec<String>,
    /// The working directory.
    pub working_dir: Option<String>,
    /// The user (`uid[:gid]` or `name[:group]`).
    pub user: Option<String>,
}

/// Bytes used by a directory tree (`du -sb`).
fn tree_bytes(dir: &Path) -> Result<u64, String> {
    let out = Command::new("du")
        .arg("-sb")
        .arg(dir)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("du: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{}: cannot measure the directory", dir.display()))
}

/// An ext4 image of `dir` (mkfs.ext4 -d), with room to spare, at `out`.
pub fn ext4_from_dir(dir: &Path, out: &Path) -> Result<(), String> {
    let mib = tree_bytes(dir)? * 3 / 2 / (1 << 20) + 32;
    let r = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            "-d",
        ])
        .arg(dir)
        .arg(out)
        .arg(format!("{mib}M"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("mkfs.ext4 (e2fsprogs) cannot run: {e}"))?;
    if !r.status.success() {
        let err = String::from_utf8_lossy(&r.stderr);
        return Err(format!(
            "mkfs.ext4 -d {} failed: {}",
            dir.display(),
            err.lines().last().unwrap_or("no message")
        ));
    }
    Ok(())
}

/// The image `arg` names, as a read-only ext4 file for /dev/vda and its configuration, from
/// the image crate (`cinder_image::prepare`: an OCI layout DIR[:TAG], a docker-archive tar
/// FILE[:TAG], a plain ext4 image used in place, or a root filesystem directory), built once
/// into the image cache (`cinder images`). The error is one line: `cinder run` exits 125.
pub fn resolve_image(arg: &str) -> Result<(PathBuf, ImageConfig), String> {
    let cache = cinder_image::default_cache_dir()
        .ok_or("the image cache: neither CINDER_CACHE nor HOME is set")?;
    let p = cinder_image::prepare(arg, &cache).map_err(|e| e.to_string())?;
    Ok((
        p.rootfs,
        ImageConfig {
            entrypoint: p.config.entrypoint,
            cmd: p.config.cmd,
            env: p.config.env,
            working_dir: p.config.working_dir,
            user: p.config.user,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_images_and_missing_paths_are_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("cinder-run-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.img");
        std::fs::write(&junk, vec![7u8; 4096]).unwrap();
        let e = resolve_image(junk.to_str().unwrap()).unwrap_err();
        assert!(e.contains("not an OCI layout"), "{e}");
        let e = resolve_image("/nonexistent/cinder-image").unwrap_err();
        assert!(e.contains("no such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
