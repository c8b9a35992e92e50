//! Host paths a client names (kernel, initrd, drive images): what cinder agrees to open.
//!
//! A client-named path is opened without blocking (`O_NONBLOCK`: a FIFO opens at once instead
//! of waiting for a writer), its type is taken from the opened file (`fstat`, so a path swapped
//! between a check and the open cannot slip through), and only a regular file is taken; a
//! block device only as a drive and only when the operator allows it
//! (`--allow-block-devices`). Kernel and initrd are opened with `O_NOFOLLOW` too: a symbolic
//! link there is refused, not followed.
//!
//! [`VmConfig`](crate::VmConfig)'s setters run these checks when a path is given (`PUT`, the
//! config file, the command line), so a missing or wrong file is refused there, with the same
//! message on all three; the VMM opens the files again, the same way, when it boots.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The flag that lets a drive be a block device.
pub const ALLOW_BLOCK_DEVICES_FLAG: &str = "--allow-block-devices";

/// What the host-path checks of a [`VmConfig`](crate::VmConfig) do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPolicy {
    /// Open each client-named path when it is given (the default). Off only for unit tests of
    /// the configuration rules, which use paths that do not exist.
    pub check_host: bool,
    /// Let a drive be a block device (`--allow-block-devices`).
    pub allow_block_devices: bool,
    /// `--confine-paths`: the directory (absolute, canonical) every client-named path must be
    /// beneath, as written (no `..`; the kernel enforces the rest with Landlock).
    pub confined_to: Option<PathBuf>,
}

impl Default for PathPolicy {
    fn default() -> Self {
        PathPolicy {
            check_host: true,
            allow_block_devices: false,
            confined_to: None,
        }
    }
}

impl PathPolicy {
    /// No host checks: for tests of the configuration rules alone.
    pub const UNCHECKED: PathPolicy = PathPolicy {
        check_host: false,
        allow_block_devices: false,
        confined_to: None,
    };

    /// With `--confine-paths`, `path` (a `what`) must be written as an absolute path beneath
    /// that directory, without `..`.
    pub fn check_beneath(&self, what: &'static str, path: &Path) -> Result<(), PathError> {
        let Some(root) = &self.confined_to else {
            return Ok(());
        };
        let inside = path.is_absolute()
            && !path
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            && path.starts_with(root);
        if inside {
            Ok(())
        } else {
            Err(PathError::Outside {
                what,
                path: path.to_path_buf(),
                root: root.clone(),
            })
        }
    }
}

/// Why a client-named host file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// Nothing at that path.
    #[error("{what} {} does not exist: check the path", path.display())]
    NotFound {
        /// "kernel image", "initrd", "block image".
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// No permission to open it as asked.
    #[error(
        "{what} {}: no permission to open it for {mode} (Permission denied): fix its permissions{hint}",
        path.display()
    )]
    PermissionDenied {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// "reading" or "reading and writing".
        mode: &'static str,
        /// Extra advice.
        hint: &'static str,
    },
    /// The OS refused the open (any other reason).
    #[error("cannot read {what} {}: {source}", path.display())]
    Open {
        /// "kernel image", "initrd", "block image".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The last component is a symbolic link, where cinder does not follow links.
    #[error("{what} {} is a symbolic link: give the path of the file itself", path.display())]
    Symlink {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// Not a regular file (a FIFO, a socket, a directory, a device).
    #[error("{what} {} is a {kind}, not a regular file", path.display())]
    NotRegular {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Outside the `--confine-paths` directory.
    #[error(
        "{what} {} is not beneath {}: cinder was started with --confine-paths {}, give a path beneath it",
        path.display(), root.display(), root.display()
    )]
    Outside {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The directory.
        root: PathBuf,
    },
    /// A block device as a drive, without the operator's leave.
    #[error(
        "{what} {} is a block device: cinder attaches host block devices only when started with {ALLOW_BLOCK_DEVICES_FLAG}",
        path.display()
    )]
    BlockDevice {
        /// What the file is for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
}

/// The name of a file type, for messages.
pub fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "regular file"
    }
}

/// Opens `path` for reading (and writing when `write`) without blocking and checks what it
/// is: a regular file, or a block device when `block_device` allows it. `follow` says whether
/// a symbolic link as the last component is followed (`O_NOFOLLOW` when not).
pub fn open_checked(
    what: &'static str,
    path: &Path,
    write: bool,
    follow: bool,
    block_device: bool,
) -> Result<File, PathError> {
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) if !follow => PathError::Symlink {
                what,
                path: path.to_path_buf(),
            },
            Some(libc::ENOENT) => PathError::NotFound {
                what,
                path: path.to_path_buf(),
            },
            Some(libc::EACCES) | Some(libc::EPERM) => PathError::PermissionDenied {
                what,
                path: path.to_path_buf(),
                mode: if write {
                    "reading and writing"
                } else {
                    "reading"
                },
                hint: if write { " or attach it read-only" } else { "" },
            },
            Some(libc::EISDIR) => PathError::NotRegular {
                what,
                path: path.to_path_buf(),
                kind: "directory",
            },
            _ => PathError::Open {
                what,
                path: path.to_path_buf(),
                source,
            },
        })?;
    let t = file
        .metadata()
        .map_err(|source| PathError::Open {
            what,
            path: path.to_path_buf(),
            source,
        })?
        .file_type();
    if t.is_file() {
        return Ok(file);
    }
    if t.is_block_device() {
        if block_device {
            return Ok(file);
        }
        return Err(PathError::BlockDevice {
            what,
            path: path.to_path_buf(),
        });
    }
    Err(PathError::NotRegular {
        what,
        path: path.to_path_buf(),
        kind: kind_of(t),
    })
}

/// Opens a kernel image or initrd (`what`): read-only, `O_NOFOLLOW`, regular files only.
pub fn open_boot_file(what: &'static str, path: &Path) -> Result<File, PathError> {
    open_checked(what, path, false, false, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cinder-paths-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mkfifo(p: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path and touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let d = scratch("fifo");
        let fifo = d.join("k");
        mkfifo(&fifo);
        let e = open_boot_file("kernel image", &fifo).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "kernel image {} is a FIFO, not a regular file",
                fifo.display()
            )
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn boot_files_do_not_follow_links_and_drives_do() {
        let d = scratch("link");
        let f = d.join("file");
        std::fs::write(&f, b"x").unwrap();
        let l = d.join("link");
        std::os::unix::fs::symlink(&f, &l).unwrap();
        let e = open_boot_file("initrd", &l).unwrap_err();
        assert!(matches!(e, PathError::Symlink { .. }), "{e}");
        assert!(open_checked("block image", &l, false, true, false).is_ok());
        assert!(open_boot_file("initrd", &f).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn devices_and_directories_are_named() {
        let e =
            open_checked("block image", Path::new("/dev/null"), false, true, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "block image /dev/null is a character device, not a regular file"
        );
        let e = open_boot_file("kernel image", Path::new("/")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel image / is a directory, not a regular file"
        );
        let e = open_boot_file("kernel image", Path::new("/nonexistent/k")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel image /nonexistent/k does not exist: check the path"
        );
    }

    #[test]
    fn confined_paths_must_be_written_beneath_the_root() {
        let p = PathPolicy {
            confined_to: Some("/srv/vm".into()),
            ..PathPolicy::default()
        };
        assert!(p
            .check_beneath("initrd", Path::new("/srv/vm/initrd"))
            .is_ok());
        for bad in [
            "/srv/vm/../etc/passwd",
            "/srv/vmx/k",
            "srv/vm/k",
            "/etc/passwd",
        ] {
            let e = p.check_beneath("initrd", Path::new(bad)).unwrap_err();
            assert!(matches!(e, PathError::Outside { .. }), "{bad}: {e}");
        }
        let e = p
            .check_beneath("initrd", Path::new("/etc/passwd"))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "initrd /etc/passwd is not beneath /srv/vm: cinder was started with --confine-paths /srv/vm, give a path beneath it"
        );
        assert!(PathPolicy::default()
            .check_beneath("initrd", Path::new("/etc/passwd"))
            .is_ok());
    }
}
