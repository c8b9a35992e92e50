//! The image cache: `<cache>/<alg>-<hex>.ext4` (mode 0444) and its `.json` (source, config,
//! creation time), built under the key's `flock` (`<key>.lock`) in a private scratch directory
//! (`<key>.build-<pid>/`, 0700) and a temporary image (`<key>.ext4.tmp-<pid>`) renamed into
//! place last; so an image is either absent or complete, and concurrent prepares of one image
//! build it once. `list` and `prune` (which skips a key whose lock is held: being built).

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{ImageConfig, ImageError, Options};

/// A cached root filesystem.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedImage {
    /// Its key: the manifest digest (`sha256:...`), Docker's image ID for a docker-archive, or
    /// `tree:<hex>` for a root filesystem directory.
    pub digest: String,
    /// IMAGE as it was named when built.
    pub source: String,
    /// The ext4 file.
    #[serde(skip)]
    pub path: PathBuf,
    /// Its apparent size, bytes.
    #[serde(skip)]
    pub size: u64,
    /// The bytes it takes on disk (it is sparse).
    #[serde(skip)]
    pub disk_bytes: u64,
    /// When it was built (Unix seconds).
    pub created: u64,
    /// The image's config.
    pub config: ImageConfig,
}

/// What `prune` did.
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Keys of the images removed.
    pub removed: Vec<String>,
    /// Keys skipped because a build of them is under way.
    pub busy: Vec<String>,
    /// Disk bytes freed.
    pub freed_bytes: u64,
}

/// `${CINDER_CACHE:-$HOME/.cache/cinder}/images`; none without either variable.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("CINDER_CACHE").filter(|v| !v.is_empty()) {
        Some(c) => PathBuf::from(c),
        None => {
            PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache/cinder")
        }
    };
    Some(base.join("images"))
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.to_string();
    move |source| ImageError::Io { what, source }
}

/// An exclusive `flock` on a lock file, released on drop (with the file).
struct Lock(#[allow(dead_code)] File);

impl Lock {
    /// Takes the lock, waiting for it or (`wait` false) returning `None` when it is held.
    fn take(path: &Path, wait: bool) -> Result<Option<Lock>, ImageError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err(path.display()))?;
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        loop {
            // SAFETY: flock on a file descriptor we own, alive for the call; no memory passed.
            if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
                return Ok(Some(Lock(f)));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ => {
                    return Err(ImageError::Io {
                        what: format!("lock {}", path.display()),
                        source: e,
                    })
                }
            }
        }
    }
}

/// Removes its paths on drop (a build that failed or finished leaves no scratch behind).
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            match fs::symlink_metadata(p) {
                Ok(md) if md.is_dir() => {
                    let _ = fs::remove_dir_all(p);
                }
                Ok(_) => {
                    let _ = fs::remove_file(p);
                }
                Err(_) => {}
            }
        }
    }
}

/// A key's file-name stem: `sha256:<hex>` -> `sha256-<hex>`.
fn stem(key: &str) -> String {
    key.replace(':', "-")
}

/// Whether a file-name stem is one of ours (so `prune` never touches anything else).
fn is_stem(s: &str) -> bool {
    let Some((alg, hex)) = s.split_once('-') else {
        return false;
    };
    matches!(alg, "sha256" | "sha512" | "tree")
        && !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Walks `root` without following links: each path (relative) with its metadata, sorted.
fn walk(root: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>, ImageError> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(io_err(dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(dir.display()))?;
        names.sort();
        for n in names {
            let r = rel.join(&n);
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p).map_err(io_err(p.display()))?;
            if md.is_dir() {
                stack.push(r.clone());
            }
            out.push((r, md));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// `tree:<hex>`: a hash of a directory tree's metadata (not its contents).
pub(crate) fn tree_key(root: &Path) -> Result<String, ImageError> {
    use std::os::unix::ffi::OsStrExt;
    let mut h = crate::digest::Digest {
        alg: "sha256",
        hex: String::new(),
    }
    .hasher();
    let rmd = fs::metadata(root).map_err(io_err(root.display()))?;
    h.update(format!("{:o} {} {}\n", rmd.mode(), rmd.uid(), rmd.gid()).as_bytes());
    for (rel, md) in walk(root)? {
        h.update(rel.as_os_str().as_bytes());
        let link = if md.file_type().is_symlink() {
            fs::read_link(root.join(&rel))
                .map(|t| t.into_os_string())
                .unwrap_or_default()
        } else {
            Default::default()
        };
        h.update(
            format!(
                "\0{:o} {} {} {} {}.{} {} {}\0",
                md.mode(),
                md.uid(),
                md.gid(),
                md.size(),
                md.mtime(),
                md.mtime_nsec(),
                md.rdev(),
                md.nlink()
            )
            .as_bytes(),
        );
        h.update(link.as_bytes());
        h.update(b"\n");
    }
    let d = h.finish();
    Ok(format!("tree:{}", d.trim_start_matches("sha256:")))
}

/// Bytes and inodes a tree needs on ext4 (4 KiB blocks; a hard-linked file counted once).
fn tree_usage(root: &Path) -> Result<(u64, u64), ImageError> {
    let round = |n: u64| n.div_ceil(4096) * 4096;
    let mut seen = HashSet::new();
    let (mut bytes, mut inodes) = (4096u64, 1u64);
    for (_, md) in walk(root)? {
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        inodes += 1;
        bytes += if md.is_dir() {
            4096
        } else if md.file_type().is_symlink() {
            if md.size() > 59 {
                4096
            } else {
                0
            }
        } else {
            round(md.size())
        };
    }
    Ok((bytes, inodes))
}

fn mkfs_path() -> PathBuf {
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(d).join("mkfs.ext4");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("mkfs.ext4")
}

/// `mkfs.ext4 -d tree` into `out` (a new file of `size` bytes) with at least `inodes` inodes.
fn mkfs(tree: &Path, out: &Path, size: u64, inodes: u64) -> Result<(), ImageError> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io_err(out.display()))?;
    f.set_len(size).map_err(io_err(out.display()))?;
    drop(f);
    let res = Command::new(mkfs_path())
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-N"])
        .arg(inodes.to_string())
        .arg("-d")
        .arg(tree)
        .arg(out)
        .output()
        .map_err(|e| ImageError::Mkfs(format!("cannot run mkfs.ext4 (install e2fsprogs): {e}")))?;
    if !res.status.success() {
        let err = String::from_utf8_lossy(&res.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(ImageError::Mkfs(format!("{}: {last}", res.status)));
    }
    Ok(())
}

fn write_atomic(p: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = p.with_extension(format!("json.tmp-{}", std::process::id()));
    let _c = Cleanup(vec![tmp.clone()]);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_err(tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(tmp.display()))?;
    fs::rename(&tmp, p).map_err(io_err(p.display()))
}

/// The cached image for `key`, or a new one built from the tree `populate` makes (it gets an
/// empty scratch root and returns the directory to build from).
pub(crate) fn get_or_build(
    cache_dir: &Path,
    key: &str,
    source: &str,
    config: &ImageConfig,
    opts: &Options,
    populate: impl FnOnce(&Path) -> Result<PathBuf, ImageError>,
) -> Result<(PathBuf, bool), ImageError> {
    fs::create_dir_all(cache_dir)
        .map_err(io_err(format!("image cache {}", cache_dir.display())))?;
    let stem = stem(key);
    let img = cache_dir.join(format!("{stem}.ext4"));
    let meta = cache_dir.join(format!("{stem}.json"));
    let _lock = Lock::take(&cache_dir.join(format!("{stem}.lock")), true)?;
    if img.is_file() && meta.is_file() {
        return Ok((img, false));
    }
    remove_leftovers(cache_dir, &stem)?;
    let pid = std::process::id();
    let build = cache_dir.join(format!("{stem}.build-{pid}"));
    let tmp = cache_dir.join(format!("{stem}.ext4.tmp-{pid}"));
    let _cleanup = Cleanup(vec![build.clone(), tmp.clone()]);
    fs::create_dir(&build).map_err(io_err(build.display()))?;
    fs::set_permissions(&build, fs::Permissions::from_mode(0o700))
        .map_err(io_err(build.display()))?;
    let scratch = build.join("root");
    fs::create_dir(&scratch).map_err(io_err(scratch.display()))?;
    fs::set_permissions(&scratch, fs::Permissions::from_mode(0o755))
        .map_err(io_err(scratch.display()))?;
    let tree = populate(&scratch)?;
    let (bytes, inodes) = tree_usage(&tree)?;
    let extra = bytes.saturating_mul(opts.extra_percent) / 100 + opts.extra_bytes;
    // Inode tables (256 bytes each, for the inodes asked) and ~3% of block-group metadata.
    let ninodes = inodes + inodes / 4 + 1024;
    let size = (bytes + extra + ninodes * 256 + bytes / 32 + (8 << 20)).div_ceil(1 << 20) << 20;
    mkfs(&tree, &tmp, size, ninodes)?;
    let entry = CachedImage {
        digest: key.to_string(),
        source: source.to_string(),
        path: img.clone(),
        size,
        disk_bytes: 0,
        created: now(),
        config: config.clone(),
    };
    let json = serde_json::to_vec_pretty(&entry).map_err(|e| ImageError::Io {
        what: meta.display().to_string(),
        source: io::Error::other(e),
    })?;
    write_atomic(&meta, &json)?;
    let f = File::open(&tmp).map_err(io_err(tmp.display()))?;
    f.sync_all().map_err(io_err(tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).map_err(io_err(tmp.display()))?;
    fs::rename(&tmp, &img).map_err(io_err(img.display()))?;
    if let Ok(d) = File::open(cache_dir) {
        let _ = d.sync_all();
    }
    Ok((img, true))
}

/// Removes a key's build leftovers (scratch trees, temporary images) of builds that died;
/// called with the key's lock held.
fn remove_leftovers(cache_dir: &Path, stem: &str) -> Result<u64, ImageError> {
    let mut freed = 0;
    let rd = fs::read_dir(cache_dir).map_err(io_err(cache_dir.display()))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(stem) else {
            continue;
        };
        if rest.starts_with(".build-")
            || rest.starts_with(".ext4.tmp-")
            || rest.starts_with(".json.tmp-")
        {
            let p = e.path();
            if let Ok(md) = fs::symlink_metadata(&p) {
                freed += md.blocks() * 512;
                let _ = if md.is_dir() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
            }
        }
    }
    Ok(freed)
}

/// The cached images, oldest first.
pub fn list(cache_dir: &Path) -> Result<Vec<CachedImage>, ImageError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(cache_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => {
            return Err(ImageError::Io {
                what: cache_dir.display().to_string(),
                source: e,
            })
        }
    };
    for e in rd {
        let e = e.map_err(io_err(cache_dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".ext4") else {
            continue;
        };
        if !is_stem(stem) {
            continue;
        }
        let meta = cache_dir.join(format!("{stem}.json"));
        let Ok(bytes) = fs::read(&meta) else { continue };
        let Ok(mut c) = serde_json::from_slice::<CachedImage>(&bytes) else {
            continue;
        };
        let md = fs::metadata(e.path()).map_err(io_err(e.path().display()))?;
        c.path = e.path();
        c.size = md.len();
        c.disk_bytes = md.blocks() * 512;
        out.push(c);
    }
    out.sort_by(|a, b| a.created.cmp(&b.created).then(a.digest.cmp(&b.digest)));
    Ok(out)
}

/// Removes every cached image and build leftover whose lock is free (a VM that has its image
/// open keeps its copy until it closes it). A key being built is skipped and reported.
pub fn prune(cache_dir: &Path) -> Result<PruneReport, ImageError> {
    let mut report = PruneReport::default();
    let rd = match fs::read_dir(cache_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(report),
        Err(e) => {
            return Err(ImageError::Io {
                what: cache_dir.display().to_string(),
                source: e,
            })
        }
    };
    let mut stems = BTreeSet::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some((s, _)) = name.split_once('.') {
            if is_stem(s) {
                stems.insert(s.to_string());
            }
        }
    }
    for s in stems {
        let key = s.replacen('-', ":", 1);
        let lock_path = cache_dir.join(format!("{s}.lock"));
        let Some(lock) = Lock::take(&lock_path, false)? else {
            report.busy.push(key);
            continue;
        };
        report.freed_bytes += remove_leftovers(cache_dir, &s)?;
        let img = cache_dir.join(format!("{s}.ext4"));
        if let Ok(md) = fs::symlink_metadata(&img) {
            fs::remove_file(&img).map_err(io_err(img.display()))?;
            report.freed_bytes += md.blocks() * 512;
            report.removed.push(key);
        }
        let _ = fs::remove_file(cache_dir.join(format!("{s}.json")));
        let _ = fs::remove_file(&lock_path);
        drop(lock);
    }
    Ok(report)
}
