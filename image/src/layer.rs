//! Applying one image layer (a tar stream, already decompressed) onto a scratch directory,
//! with the OCI whiteout rules, refusing every entry that would reach outside the directory.
//!
//! Entries are hostile input. Each one is unpacked here, never with `Archive::unpack`:
//! - a name that is absolute, has a `..` component, or is longer than `PATH_MAX` (a component
//!   longer than `NAME_MAX`) is refused;
//! - every parent directory on the way is looked at with `lstat`: a symbolic link or a
//!   non-directory there is refused (a missing one is made, `0755 root:root`), so nothing is
//!   ever created through a link, and the last component is created with `O_EXCL` /
//!   `O_NOFOLLOW` semantics (`mkdir`, `symlink`, `mknod`, `link` and `create_new` all fail on
//!   an existing name, which is removed first);
//! - a hard link's target follows the same rules and must already exist in the tree, and not be
//!   a directory; a symbolic link's target is stored as it is and never followed;
//! - the bytes a layer expands to (its tar stream, and the files it writes: a sparse entry can
//!   claim far more than its stream holds) are bounded by a limit, refused past it.
//!
//! Whiteouts (OCI image spec, "Representing Changes"): `.wh.NAME` removes NAME of the lower
//! layers; `.wh..wh..opq` in a directory removes everything the lower layers put in it.
//! Neither touches what the same layer adds. Owners (numeric uid/gid), modes with the
//! setuid/setgid/sticky bits, mtimes, symbolic links, hard links, device nodes, FIFOs and
//! extended attributes (PAX `SCHILY.xattr.*`: file capabilities) are kept; ids too large for
//! the header come from PAX `uid` / `gid`.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tar::EntryType;

/// Longest entry or link name taken (Linux's `PATH_MAX`).
const MAX_PATH: usize = 4096;
/// Longest path component taken (Linux's `NAME_MAX`).
const MAX_NAME: usize = 255;
/// The whiteout prefix, and the opaque-directory marker.
const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The tar stream itself is broken (or could not be read / decompressed).
    #[error("bad tar stream: {0}")]
    Tar(io::Error),
    /// Headers, long names or PAX records between two entries past `MAX_META`.
    #[error("an entry's headers (long name, PAX records) exceed {MAX_META} bytes: refused")]
    MetaTooBig,
    /// More entries than `MAX_ENTRIES`.
    #[error("more than {MAX_ENTRIES} entries: refused")]
    TooManyEntries,
    /// The layer expands past the limit.
    #[error(
        "expands past the limit of {limit} bytes (a decompression bomb or a sparse-file bomb?)"
    )]
    TooBig {
        /// The limit, bytes.
        limit: u64,
    },
    /// An entry's name would reach outside the root.
    #[error("entry {name:?}: {why}: refused")]
    Escape {
        /// The entry's name as in the tar.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An entry's link target is not acceptable.
    #[error("entry {name:?}: link target {target:?}: {why}: refused")]
    BadLink {
        /// The entry's name.
        name: String,
        /// Its link target.
        target: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An entry type that has no place in a root filesystem.
    #[error("entry {name:?}: unsupported tar entry type {kind:?}")]
    Unsupported {
        /// The entry's name.
        name: String,
        /// Its type byte.
        kind: char,
    },
    /// A value in an entry's header is out of range.
    #[error("entry {name:?}: bad header: {why}")]
    BadHeader {
        /// The entry's name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A file system operation in the scratch directory failed.
    #[error("entry {name:?}: cannot {op} {path}: {source}")]
    Fs {
        /// The entry's name.
        name: String,
        /// What was being done.
        op: &'static str,
        /// The scratch path.
        path: String,
        /// The error.
        source: io::Error,
    },
}

/// What a layer did.
#[derive(Debug, Default, Clone, Copy)]
pub struct LayerStats {
    /// Entries applied (whiteouts included).
    pub entries: u64,
    /// Bytes of file data written.
    pub bytes: u64,
}

/// A reader that counts what passes and fails once past `limit`; `over` tells that it did.
struct Bounded<R> {
    inner: R,
    read: u64,
    limit: u64,
    over: Rc<Cell<Over>>,
    /// Bytes still allowed in the current phase: while the tar reader looks for the next
    /// entry, what it reads is headers and the long names / PAX records it keeps in memory
    /// (the tar crate reads those whole, unbounded), so that phase gets `MAX_META`.
    phase_left: Rc<Cell<u64>>,
}

/// Which bound a layer went past.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Over {
    No,
    Total,
    Meta,
}

/// The most bytes read while looking for the next entry (headers, GNU long names and link
/// names, PAX records).
const MAX_META: u64 = 1 << 20;
/// The most entries in one layer (each is an inode and a remembered path).
const MAX_ENTRIES: u64 = 1 << 21;

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read = self.read.saturating_add(n as u64);
        if self.read > self.limit {
            self.over.set(Over::Total);
            return Err(io::Error::other("layer too big"));
        }
        let left = self.phase_left.get();
        if n as u64 > left {
            self.over.set(Over::Meta);
            return Err(io::Error::other("tar metadata too big"));
        }
        self.phase_left.set(left - n as u64);
        Ok(n)
    }
}

/// Ends a stream that stops right after an entry's data (no padding to 512 bytes, no
/// end-of-archive blocks) as if those were there: Debian's umoci 0.4.7 `insert` writes such
/// layers (GNU tar says "Unexpected EOF in archive" on them) and umoci reads them back.
/// `complete_at` is where the last entry read in full ended; an end anywhere else stays an
/// end (a truncated entry is still refused by the tar reader).
struct Pad<R> {
    inner: R,
    pos: u64,
    complete_at: Rc<Cell<u64>>,
    /// Zeros still to give after the end (`None`: the inner stream has not ended).
    zeros: Option<u64>,
}

impl<R: Read> Read for Pad<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(left) = self.zeros {
            let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            buf[..n].fill(0);
            self.zeros = Some(left - n as u64);
            return Ok(n);
        }
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let at = self.complete_at.get();
            if at != 0 && self.pos == at {
                self.zeros = Some(self.pos.next_multiple_of(512) - self.pos + 1024);
                return self.read(buf);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// An entry's name, made relative and checked: its components (none for the root itself).
fn clean(raw: &[u8]) -> Result<Vec<OsString>, &'static str> {
    if raw.len() > MAX_PATH {
        return Err("name longer than 4096 bytes");
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute name");
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("'..' component"),
            c if c.len() > MAX_NAME => return Err("component longer than 255 bytes"),
            c => out.push(OsStr::from_bytes(c).to_owned()),
        }
    }
    Ok(out)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// Removes whatever is at `p` (lstat'd: a link is removed, never followed).
fn remove(p: &Path, md: &fs::Metadata) -> io::Result<()> {
    if md.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
}

/// Applies a layer's entries to one scratch root.
struct Applier<'a> {
    root: &'a Path,
    /// Paths (relative) this layer created: whiteouts never remove them.
    created: HashSet<PathBuf>,
    limit: u64,
    stats: LayerStats,
}

impl Applier<'_> {
    /// The directory for `comps` (an entry's parents): every component must be a real
    /// directory; a missing one is made.
    /// With `create` false, a missing one gives `None` (a whiteout or a hard link names a
    /// path: it never makes directories).
    fn parent_dir(
        &self,
        name: &str,
        comps: &[OsString],
        create: bool,
    ) -> Result<Option<PathBuf>, LayerError> {
        let mut p = self.root.to_path_buf();
        for c in comps {
            p.push(c);
            match fs::symlink_metadata(&p) {
                Ok(md) if md.is_dir() => {}
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(LayerError::Escape {
                        name: name.into(),
                        why: "a parent is a symbolic link",
                    })
                }
                Ok(_) => {
                    return Err(LayerError::Escape {
                        name: name.into(),
                        why: "a parent is not a directory",
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&p).map_err(|e| self.fs_err(name, "create directory", &p, e))?;
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                        .map_err(|e| self.fs_err(name, "chmod", &p, e))?;
                }
                Err(e) => return Err(self.fs_err(name, "stat", &p, e)),
            }
        }
        Ok(Some(p))
    }

    fn fs_err(&self, name: &str, op: &'static str, p: &Path, source: io::Error) -> LayerError {
        LayerError::Fs {
            name: name.into(),
            op,
            path: p.display().to_string(),
            source,
        }
    }

    /// `.wh..wh..opq` in `dir`: removes every child the lower layers put there.
    fn opaque(&mut self, name: &str, rel_dir: &Path, dir: &Path) -> Result<(), LayerError> {
        let rd = fs::read_dir(dir).map_err(|e| self.fs_err(name, "list", dir, e))?;
        for child in rd {
            let child = child.map_err(|e| self.fs_err(name, "list", dir, e))?;
            if self.created.contains(&rel_dir.join(child.file_name())) {
                continue;
            }
            let p = child.path();
            let md = fs::symlink_metadata(&p).map_err(|e| self.fs_err(name, "stat", &p, e))?;
            remove(&p, &md).map_err(|e| self.fs_err(name, "remove", &p, e))?;
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), LayerError> {
        self.stats.entries += 1;
        let raw = e.path_bytes().into_owned();
        let name = lossy(&raw);
        let comps = clean(&raw).map_err(|why| LayerError::Escape {
            name: name.clone(),
            why,
        })?;
        let kind = e.header().entry_type();
        let Some((last, parents)) = comps.split_last() else {
            // The root itself ("./"): its metadata is the scratch root's own, left as is.
            return Ok(());
        };
        let rel: PathBuf = comps.iter().collect();
        let rel_dir: PathBuf = parents.iter().collect();
        let last_b = last.as_bytes();
        let is_whiteout = last_b.starts_with(WHITEOUT) && last_b != OPAQUE;
        let Some(dir) = self.parent_dir(&name, parents, !is_whiteout)? else {
            // A whiteout in a directory that is not there: nothing to hide.
            return Ok(());
        };
        if last_b == OPAQUE {
            return self.opaque(&name, &rel_dir, &dir);
        }
        if let Some(hidden) = last_b.strip_prefix(WHITEOUT) {
            if hidden.starts_with(WHITEOUT) {
                // Other `.wh..wh.` names (aufs bookkeeping): nothing to do.
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(LayerError::Escape {
                    name,
                    why: "whiteout of no name",
                });
            }
            let target = dir.join(OsStr::from_bytes(hidden));
            if self
                .created
                .contains(&rel_dir.join(OsStr::from_bytes(hidden)))
            {
                return Ok(());
            }
            if let Ok(md) = fs::symlink_metadata(&target) {
                remove(&target, &md).map_err(|e| self.fs_err(&name, "remove", &target, e))?;
            }
            return Ok(());
        }
        let path = dir.join(last);
        // What is there already: kept only when a directory meets a directory.
        if let Ok(md) = fs::symlink_metadata(&path) {
            if !(md.is_dir() && kind == EntryType::Directory) {
                remove(&path, &md).map_err(|err| self.fs_err(&name, "remove", &path, err))?;
            }
        }
        let h = e.header().clone();
        let pax = self.pax(&name, e)?;
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|err| self.fs_err(&name, "create", &path, err))?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match e.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(err) => return Err(LayerError::Tar(err)),
                    };
                    self.stats.bytes = self.stats.bytes.saturating_add(n as u64);
                    if self.stats.bytes > self.limit {
                        return Err(LayerError::TooBig { limit: self.limit });
                    }
                    f.write_all(&buf[..n])
                        .map_err(|err| self.fs_err(&name, "write", &path, err))?;
                }
            }
            EntryType::Directory => {
                if fs::symlink_metadata(&path).is_err() {
                    fs::create_dir(&path)
                        .map_err(|err| self.fs_err(&name, "create directory", &path, err))?;
                }
            }
            EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                if target.is_empty() || target.len() > MAX_PATH || target.contains(&0) {
                    return Err(LayerError::BadLink {
                        name,
                        target: lossy(&target),
                        why: "empty or longer than 4096 bytes",
                    });
                }
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(|err| self.fs_err(&name, "create symbolic link", &path, err))?;
            }
            EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .unwrap_or_default();
                let bad = |why| LayerError::BadLink {
                    name: name.clone(),
                    target: lossy(&target),
                    why,
                };
                let tcomps = clean(&target).map_err(bad)?;
                let Some((tlast, tparents)) = tcomps.split_last() else {
                    return Err(bad("the root"));
                };
                let Some(tdir) = self.parent_dir(&name, tparents, false)? else {
                    return Err(bad("no such file in the image"));
                };
                let src = tdir.join(tlast);
                match fs::symlink_metadata(&src) {
                    Ok(md) if md.is_dir() => return Err(bad("a directory")),
                    Ok(_) => {}
                    Err(_) => return Err(bad("no such file in the image")),
                }
                // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symbolic link links the
                // link itself.
                fs::hard_link(&src, &path)
                    .map_err(|err| self.fs_err(&name, "create hard link", &path, err))?;
                // A hard link shares its inode's owner, mode and times: nothing more to set.
                self.created.insert(rel);
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let hdr_err = |why: String| LayerError::BadHeader {
                    name: name.clone(),
                    why,
                };
                let (major, minor) = if kind == EntryType::Fifo {
                    (0, 0)
                } else {
                    (
                        h.device_major()
                            .map_err(|x| hdr_err(x.to_string()))?
                            .unwrap_or(0),
                        h.device_minor()
                            .map_err(|x| hdr_err(x.to_string()))?
                            .unwrap_or(0),
                    )
                };
                let fmt = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let c = cpath(&path).map_err(|err| self.fs_err(&name, "mknod", &path, err))?;
                // SAFETY: `c` is a NUL-terminated path that outlives the call; mknod reads it
                // and touches no memory of ours.
                let rc =
                    unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, libc::makedev(major, minor)) };
                if rc != 0 {
                    return Err(self.fs_err(&name, "mknod", &path, io::Error::last_os_error()));
                }
            }
            other => {
                return Err(LayerError::Unsupported {
                    name,
                    kind: char::from(other.as_byte()),
                });
            }
        }
        self.created.insert(rel);
        self.set_meta(&name, &path, &h, &pax, kind == EntryType::Symlink)
    }

    /// Owner, then mode (a chown clears setuid), then mtime; a symbolic link gets its owner
    /// and time only.
    fn set_meta(
        &self,
        name: &str,
        path: &Path,
        h: &tar::Header,
        pax: &Pax,
        is_link: bool,
    ) -> Result<(), LayerError> {
        let hdr_err = |why: String| LayerError::BadHeader {
            name: name.into(),
            why,
        };
        let old = h.as_old();
        let uid = match pax.uid {
            Some(u) => u,
            None => blank_is_zero(h.uid(), &old.uid).map_err(|x| hdr_err(x.to_string()))?,
        };
        let gid = match pax.gid {
            Some(g) => g,
            None => blank_is_zero(h.gid(), &old.gid).map_err(|x| hdr_err(x.to_string()))?,
        };
        let uid = u32::try_from(uid).map_err(|_| hdr_err(format!("uid {uid} out of range")))?;
        let gid = u32::try_from(gid).map_err(|_| hdr_err(format!("gid {gid} out of range")))?;
        let mode = blank_is_zero(h.mode().map(u64::from), &old.mode)
            .map_err(|x| hdr_err(x.to_string()))?;
        let mode = u32::try_from(mode & 0o7777).unwrap_or(0);
        let mtime = blank_is_zero(h.mtime(), &old.mtime).map_err(|x| hdr_err(x.to_string()))?;
        let c = cpath(path).map_err(|e| self.fs_err(name, "chown", path, e))?;
        // SAFETY: `c` is a NUL-terminated path valid for the call; lchown does not follow a
        // final symbolic link and reads nothing else of ours.
        if unsafe { libc::lchown(c.as_ptr(), uid, gid) } != 0 {
            return Err(self.fs_err(
                name,
                "chown (building an image needs root)",
                path,
                io::Error::last_os_error(),
            ));
        }
        if !is_link {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .map_err(|e| self.fs_err(name, "chmod", path, e))?;
        }
        let secs = libc::time_t::try_from(mtime).unwrap_or(libc::time_t::MAX);
        let ts = [
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: secs,
                tv_nsec: 0,
            },
        ];
        // SAFETY: `c` is a valid NUL-terminated path and `ts` two timespecs, both alive for the
        // call; AT_SYMLINK_NOFOLLOW stamps a link itself.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(self.fs_err(name, "set the time of", path, io::Error::last_os_error()));
        }
        // Extended attributes last: a chown clears security.capability.
        for (k, v) in &pax.xattrs {
            // SAFETY: `c` and `k` are NUL-terminated strings and `v` a buffer of `v.len()`
            // bytes, all alive for the call; lsetxattr does not follow a final link.
            let rc =
                unsafe { libc::lsetxattr(c.as_ptr(), k.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
            if rc != 0 {
                let err = io::Error::last_os_error();
                let key = k.to_string_lossy();
                return Err(LayerError::BadHeader {
                    name: name.into(),
                    why: format!("cannot set extended attribute {key}: {err}"),
                });
            }
        }
        Ok(())
    }

    /// An entry's PAX records cinder uses: `uid`, `gid` (ids too large for the header) and
    /// `SCHILY.xattr.NAME` (extended attributes, file capabilities among them).
    fn pax<R: Read>(&self, name: &str, e: &mut tar::Entry<'_, R>) -> Result<Pax, LayerError> {
        let mut out = Pax::default();
        let bad = |why: String| LayerError::BadHeader {
            name: name.into(),
            why,
        };
        let Some(exts) = e.pax_extensions().map_err(|x| bad(x.to_string()))? else {
            return Ok(out);
        };
        for ext in exts {
            let ext = ext.map_err(|x| bad(x.to_string()))?;
            let Ok(key) = ext.key() else { continue };
            let num = || -> Result<u64, LayerError> {
                ext.value()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad(format!("PAX {key} is not a number")))
            };
            match key {
                "uid" => out.uid = Some(num()?),
                "gid" => out.gid = Some(num()?),
                k => {
                    if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                        let k = CString::new(x).map_err(|_| bad(format!("xattr name {x:?}")))?;
                        out.xattrs.push((k, ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// What an entry's PAX records add to its header.
#[derive(Default)]
struct Pax {
    uid: Option<u64>,
    gid: Option<u64>,
    xattrs: Vec<(CString, Vec<u8>)>,
}

/// A numeric header field that is all NULs or spaces reads as 0, as Go's archive/tar and
/// Python's tarfile read it (the tar crate refuses it); anything else unparsable stays an error.
fn blank_is_zero(v: io::Result<u64>, raw: &[u8]) -> io::Result<u64> {
    match v {
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        v => v,
    }
}

/// Applies the tar stream `stream` (decompressed) onto `root`, which must be a directory this
/// process owns alone. At most `limit` bytes of stream and of file data are taken.
pub fn apply_layer<R: Read>(root: &Path, stream: R, limit: u64) -> Result<LayerStats, LayerError> {
    let over = Rc::new(Cell::new(Over::No));
    let phase_left = Rc::new(Cell::new(MAX_META));
    let complete_at = Rc::new(Cell::new(0));
    let pad = Pad {
        inner: stream,
        pos: 0,
        complete_at: complete_at.clone(),
        zeros: None,
    };
    let bounded = Bounded {
        inner: pad,
        read: 0,
        limit,
        over: over.clone(),
        phase_left: phase_left.clone(),
    };
    let mut archive = tar::Archive::new(bounded);
    let mut ap = Applier {
        root,
        created: HashSet::new(),
        limit,
        stats: LayerStats::default(),
    };
    let why = |e: io::Error| match over.get() {
        Over::Total => LayerError::TooBig { limit },
        Over::Meta => LayerError::MetaTooBig,
        Over::No => LayerError::Tar(e),
    };
    let mut entries = archive.entries().map_err(why)?;
    loop {
        phase_left.set(MAX_META);
        let Some(e) = entries.next() else { break };
        phase_left.set(u64::MAX);
        let mut e = e.map_err(why)?;
        if ap.stats.entries >= MAX_ENTRIES {
            return Err(LayerError::TooManyEntries);
        }
        let end = e
            .raw_file_position()
            .saturating_add(e.header().entry_size().unwrap_or(u64::MAX));
        let r = ap.entry(&mut e).and_then(|()| {
            // What the entry did not use (a directory or link claiming data): read here,
            // not by the tar reader's skip, which would count as the next entry's headers.
            io::copy(&mut e, &mut io::sink())
                .map(drop)
                .map_err(LayerError::Tar)
        });
        match r {
            Err(LayerError::Tar(e)) => return Err(why(e)),
            r => r?,
        }
        complete_at.set(end);
    }
    Ok(ap.stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;

    #[test]
    fn clean_refuses_escapes() {
        assert_eq!(clean(b"/etc/passwd"), Err("absolute name"));
        assert_eq!(clean(b"a/../../x"), Err("'..' component"));
        assert_eq!(
            clean(b"a/./b/"),
            Ok(vec![OsString::from("a"), OsString::from("b")])
        );
        assert_eq!(clean(b"./"), Ok(vec![]));
        assert!(clean(&[b'a'; 300]).is_err());
        assert!(clean(&vec![b'a'; 5000]).is_err());
    }

    #[test]
    fn into_vec_roundtrip() {
        // OsString from bytes keeps non-UTF-8 names.
        let v = clean(b"\xff\xfe").unwrap_or_default();
        assert_eq!(v[0].clone().into_vec(), b"\xff\xfe".to_vec());
    }

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cinder-layer-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// A one-file tar: the bytes, and where the file's data end.
    fn one_file(data: &[u8], blank_ids: bool) -> (Vec<u8>, usize) {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o640);
        if !blank_ids {
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1);
        }
        b.append_data(&mut h, "f", data).unwrap();
        (b.into_inner().unwrap(), 512 + data.len())
    }

    // Found with bench_image: the tar crate's Header::new_gnu leaves uid/gid/mtime blank and
    // the tar crate refuses to parse them; Go and Python read 0.
    #[test]
    fn blank_numeric_fields_read_as_zero() {
        let root = scratch("blank");
        let (t, _) = one_file(b"data", true);
        apply_layer(&root, &t[..], 1 << 20).unwrap();
        let md = fs::metadata(root.join("f")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o640);
        let _ = fs::remove_dir_all(&root);
    }

    // Found with Debian's umoci 0.4.7: `umoci insert` layers end right after the last file's
    // data. Taken; a stream cut inside an entry's data is still refused.
    #[test]
    fn stream_ending_right_after_the_last_entrys_data_is_taken() {
        let root = scratch("pad");
        let (t, end) = one_file(b"hello", false);
        apply_layer(&root, &t[..end], 1 << 20).unwrap();
        assert_eq!(fs::read(root.join("f")).unwrap(), b"hello");
        let root2 = scratch("cut");
        let e = apply_layer(&root2, &t[..end - 2], 1 << 20).unwrap_err();
        assert!(matches!(e, LayerError::Tar(_)), "{e}");
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_dir_all(&root2);
    }

    /// The tar crate reads a GNU long name or a PAX header whole into memory: one of 2 MiB is
    /// refused before it is read whole (hostile layers could claim gigabytes).
    #[test]
    fn huge_long_name_or_pax_header_is_refused() {
        for kind in [tar::EntryType::XHeader, tar::EntryType::GNULongName] {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(2 << 20);
            h.set_cksum();
            b.append(&h, &vec![b'a'; 2 << 20][..]).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            b.append_data(&mut h, "f", &b"x"[..]).unwrap();
            let t = b.into_inner().unwrap();
            let root = scratch("meta");
            let e = apply_layer(&root, &t[..], 1 << 30).unwrap_err();
            assert!(matches!(e, LayerError::MetaTooBig), "{kind:?}: {e}");
            let _ = fs::remove_dir_all(&root);
        }
    }

    /// Data attached to a directory entry is read past, not counted as headers.
    #[test]
    fn data_on_a_directory_entry_is_skipped() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(3 << 20);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_path("d").unwrap();
        h.set_cksum();
        b.append(&h, &vec![0u8; 3 << 20][..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        b.append_data(&mut h, "d/f", &b"x"[..]).unwrap();
        let t = b.into_inner().unwrap();
        let root = scratch("dirdata");
        apply_layer(&root, &t[..], 1 << 30).unwrap();
        assert_eq!(fs::read(root.join("d/f")).unwrap(), b"x");
        let _ = fs::remove_dir_all(&root);
    }
}
