//! The jail's root: `<base>/<exec name>/<id>/root` with the binary, its loader and libraries,
//! the files the VM needs, and the device nodes; then a new mount namespace whose root it is
//! (`pivot_root`, the old root detached).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::{major, makedev, minor, mknod, Mode, SFlag};
use nix::unistd::{chdir, chown, pivot_root, Gid, Uid};

use crate::undo::Undo;

/// Device nodes made in the jail when the host has them (path inside the jail = host path).
pub const DEVICES: &[&str] = &["/dev/kvm", "/dev/net/tun", "/dev/userfaultfd"];

/// Why the jail could not be built or entered.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    /// The base is relative.
    #[error("--chroot-base-dir {0} is not an absolute path")]
    BaseRelative(PathBuf),
    /// The base, or a directory above it, is a symlink.
    #[error("--chroot-base-dir {0}: {1} is a symlink; give the real path")]
    BaseSymlink(PathBuf, PathBuf),
    /// The base is not a directory.
    #[error("--chroot-base-dir {0}: {1} is not a directory")]
    BaseNotDir(PathBuf, PathBuf),
    /// A directory could not be made.
    #[error("cannot create {0}: {1}")]
    Mkdir(PathBuf, std::io::Error),
    /// A file could not be put into the jail.
    #[error("cannot copy {0} to {1}: {2}")]
    Copy(PathBuf, PathBuf, std::io::Error),
    /// A file to link into the jail is missing or not a regular file.
    #[error("--link-file {0}: {1}")]
    LinkFile(PathBuf, String),
    /// A device node could not be made.
    #[error("cannot create device node {0}: {1}")]
    Mknod(PathBuf, nix::Error),
    /// Ownership could not be changed.
    #[error("cannot chown {0}: {1}")]
    Chown(PathBuf, nix::Error),
    /// A step of entering the jail failed.
    #[error("cannot enter the jail ({0}): {1}")]
    Enter(&'static str, nix::Error),
}

/// `<base>/<exec name>/<id>/root`.
pub fn root_dir(base: &Path, exec_name: &str, id: &str) -> PathBuf {
    base.join(exec_name).join(id).join("root")
}

/// Checks the base: absolute, no symlink in it, a directory where it exists.
pub fn check_base(base: &Path) -> Result<(), ChrootError> {
    if !base.is_absolute() {
        return Err(ChrootError::BaseRelative(base.to_path_buf()));
    }
    let mut p = PathBuf::new();
    for c in base.components() {
        match c {
            Component::ParentDir | Component::CurDir => {
                return Err(ChrootError::BaseSymlink(base.to_path_buf(), p))
            }
            c => p.push(c),
        }
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(ChrootError::BaseSymlink(base.to_path_buf(), p))
            }
            Ok(md) if !md.is_dir() => return Err(ChrootError::BaseNotDir(base.to_path_buf(), p)),
            Ok(_) => {}
            // Made later.
            Err(_) => break,
        }
    }
    Ok(())
}

/// Checks a `--link-file`.
pub fn check_link_file(p: &Path) -> Result<(), ChrootError> {
    match std::fs::metadata(p) {
        Ok(md) if md.is_file() => {}
        Ok(_) => return Err(ChrootError::LinkFile(p.into(), "not a regular file".into())),
        Err(e) => return Err(ChrootError::LinkFile(p.into(), e.to_string())),
    }
    if p.file_name().is_none() {
        return Err(ChrootError::LinkFile(p.into(), "no file name".into()));
    }
    Ok(())
}

/// Creates `dir` and the directories above it that are missing, recording the topmost one
/// it made.
pub fn mkdirs(dir: &Path, undo: &mut Undo) -> Result<(), ChrootError> {
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.exists() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    while let Some(d) = missing.pop() {
        std::fs::create_dir(&d).map_err(|e| ChrootError::Mkdir(d.clone(), e))?;
        undo.path(d);
    }
    Ok(())
}

/// Puts `src` at `dst` (replacing what is there): a hard link if `link` and the file system
/// allows, else a copy.
fn place(src: &Path, dst: &Path, link: bool, undo: &mut Undo) -> Result<(), ChrootError> {
    if let Some(parent) = dst.parent() {
        mkdirs(parent, undo)?;
    }
    if std::fs::symlink_metadata(dst).is_ok() {
        std::fs::remove_file(dst).map_err(|e| ChrootError::Copy(src.into(), dst.into(), e))?;
    }
    undo.path(dst.to_path_buf());
    if link && std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)
        .map(|_| ())
        .map_err(|e| ChrootError::Copy(src.into(), dst.into(), e))
}

/// `/a/b` inside the jail at `root`.
fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// What goes into the jail.
pub struct Contents<'a> {
    /// The binary, and its name in the jail's root.
    pub exec: (&'a Path, &'a str),
    /// Its loader and libraries (host paths, placed at the same paths).
    pub runtime: &'a [PathBuf],
    /// `--link-file`s, placed in the root under their names.
    pub links: &'a [PathBuf],
    /// Owner of the root directory and the device nodes.
    pub uid: u32,
    /// Their group.
    pub gid: u32,
}

/// Creates the root and fills it.
pub fn build(root: &Path, c: &Contents, undo: &mut Undo) -> Result<(), ChrootError> {
    mkdirs(root, undo)?;
    let (uid, gid) = (Uid::from_raw(c.uid), Gid::from_raw(c.gid));
    // The jailed binary makes its sockets here.
    chown(root, Some(uid), Some(gid)).map_err(|e| ChrootError::Chown(root.into(), e))?;
    place(c.exec.0, &root.join(c.exec.1), true, undo)?;
    for lib in c.runtime {
        place(lib, &inside(root, lib), false, undo)?;
    }
    for f in c.links {
        let name = f.file_name().unwrap_or_default();
        place(f, &root.join(name), true, undo)?;
    }
    for dev in DEVICES {
        let Ok(md) = std::fs::metadata(dev) else {
            continue;
        };
        if !md.file_type().is_char_device() {
            continue;
        }
        let dst = inside(root, Path::new(dev));
        if let Some(parent) = dst.parent() {
            mkdirs(parent, undo)?;
        }
        if std::fs::symlink_metadata(&dst).is_ok() {
            std::fs::remove_file(&dst)
                .map_err(|e| ChrootError::Copy(PathBuf::from(dev), dst.clone(), e))?;
        }
        let rdev = md.rdev();
        mknod(
            &dst,
            SFlag::S_IFCHR,
            Mode::S_IRUSR | Mode::S_IWUSR,
            makedev(major(rdev), minor(rdev)),
        )
        .map_err(|e| ChrootError::Mknod(dst.clone(), e))?;
        undo.path(dst.clone());
        chown(&dst, Some(uid), Some(gid)).map_err(|e| ChrootError::Chown(dst.clone(), e))?;
    }
    Ok(())
}

/// A new mount namespace whose root is `root`; the host's file systems are detached.
pub fn enter(root: &Path) -> Result<(), ChrootError> {
    let step = |what: &'static str| move |e| ChrootError::Enter(what, e);
    unshare(CloneFlags::CLONE_NEWNS).map_err(step("unshare a mount namespace"))?;
    // Nothing done in here propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step("make / a slave mount"))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step("bind-mount the root"))?;
    chdir(root).map_err(step("chdir to the root"))?;
    let old = "old_root";
    nix::unistd::mkdir(old, Mode::S_IRWXU).map_err(step("mkdir old_root"))?;
    pivot_root(".", old).map_err(step("pivot_root"))?;
    chdir("/").map_err(step("chdir /"))?;
    umount2(old, MntFlags::MNT_DETACH).map_err(step("detach the old root"))?;
    std::fs::remove_dir(old).map_err(|e| {
        ChrootError::Enter(
            "rmdir old_root",
            nix::Error::from_raw(e.raw_os_error().unwrap_or(0)),
        )
    })?;
    Ok(())
}
