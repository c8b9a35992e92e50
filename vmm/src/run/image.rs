//! Image resolution for `cinder run`: what becomes the guest's /dev/vda and the image's
//! configuration. One function, [`resolve_image`], so that the image crate
//! (`cinder_image::prepare`, OCI and docker archives) replaces it at merge time.

use std::io::Read;
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

/// The ext4 superblock magic (at byte 1080 of the file system).
const EXT4_MAGIC_OFFSET: usize = 1080;

/// Whether `path` starts like an ext2/3/4 file system.
fn is_ext4(path: &Path) -> Result<bool, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut head = vec![0u8; EXT4_MAGIC_OFFSET + 2];
    let mut got = 0;
    while got < head.len() {
        match f.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(got == head.len() && head[EXT4_MAGIC_OFFSET..] == [0x53, 0xef])
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

/// The image `arg` names, as a read-only ext4 file for /dev/vda and its configuration:
/// a plain ext4 image file (no configuration), or a root filesystem directory (made into an
/// ext4 file in `scratch`). The lead swaps in `cinder_image::prepare(arg, cache)` here.
pub fn resolve_image(arg: &str, scratch: &Path) -> Result<(PathBuf, ImageConfig), String> {
    let path = PathBuf::from(arg);
    let meta = std::fs::metadata(&path).map_err(|e| format!("image {arg}: {e}"))?;
    if meta.is_dir() {
        let out = scratch.join("rootfs.ext4");
        ext4_from_dir(&path, &out).map_err(|e| format!("image {arg}: {e}"))?;
        return Ok((out, ImageConfig::default()));
    }
    if !meta.is_file() {
        return Err(format!(
            "image {arg}: neither an ext4 image file nor a directory"
        ));
    }
    if !is_ext4(&path)? {
        return Err(format!(
            "image {arg}: not an ext4 file system image (no ext4 superblock magic at byte 1080)"
        ));
    }
    Ok((path, ImageConfig::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ext4_files_and_missing_paths_are_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("cinder-run-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.img");
        std::fs::write(&junk, vec![7u8; 4096]).unwrap();
        let e = resolve_image(junk.to_str().unwrap(), &dir).unwrap_err();
        assert!(e.contains("not an ext4 file system image"), "{e}");
        let e = resolve_image("/nonexistent/cinder-image", &dir).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
        let mut fake = vec![0u8; 2048];
        fake[1080] = 0x53;
        fake[1081] = 0xef;
        std::fs::write(&junk, &fake).unwrap();
        let (p, cfg) = resolve_image(junk.to_str().unwrap(), &dir).unwrap();
        assert_eq!((p, cfg), (junk, ImageConfig::default()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
