//! What the jailer made on the host before the jail was entered, removed again if it fails:
//! a failed start leaves no half-built chroot and no cgroup directory behind.

use std::path::PathBuf;

enum Made {
    /// A file, or a directory removed with everything in it.
    Path(PathBuf),
    /// A cgroup directory (rmdir: its files are not removable).
    Cgroup(PathBuf),
}

/// The list of things made, undone in reverse order on drop unless [`Undo::disarm`]ed.
#[derive(Default)]
pub struct Undo {
    made: Vec<Made>,
    armed: bool,
}

impl Undo {
    /// An empty, armed list.
    pub fn new() -> Undo {
        Undo {
            made: Vec::new(),
            armed: true,
        }
    }

    /// Records a file or directory the jailer created.
    pub fn path(&mut self, p: PathBuf) {
        self.made.push(Made::Path(p));
    }

    /// Records a cgroup directory the jailer created.
    pub fn cgroup(&mut self, p: PathBuf) {
        self.made.push(Made::Cgroup(p));
    }

    /// Keeps everything: the jail is entered (or the binary runs in it).
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        while let Some(m) = self.made.pop() {
            // Best effort: the failure being reported is the one that matters.
            match m {
                Made::Path(p) => {
                    let r = match std::fs::symlink_metadata(&p) {
                        Ok(md) if md.is_dir() => std::fs::remove_dir_all(&p),
                        Ok(_) => std::fs::remove_file(&p),
                        Err(_) => Ok(()),
                    };
                    if let Err(e) = r {
                        eprintln!("cinder-jailer: cannot remove {}: {e}", p.display());
                    }
                }
                Made::Cgroup(p) => {
                    if let Err(e) = std::fs::remove_dir(&p) {
                        eprintln!("cinder-jailer: cannot remove {}: {e}", p.display());
                    }
                }
            }
        }
    }
}
