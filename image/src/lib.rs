//! Container images to cached ext4 root filesystems, for `cinder run`; no KVM in here.
//!
//! `prepare(IMAGE, cache_dir)` takes IMAGE as the command line names it:
//! - an OCI image layout directory, `DIR[:TAG]` (`source.rs`);
//! - a `docker save` tar (docker-archive), `FILE[:TAG]` (`source.rs`);
//! - an ext4 image file: used as it is, in place (not copied into the cache), empty config;
//! - a root filesystem directory: built with `mkfs.ext4 -d` and cached by a hash of the tree's
//!   metadata (names, types, modes, owners, sizes, mtimes, link targets, device numbers: not the
//!   file contents, as `make` would), so an unchanged tree is not built again and a changed
//!   one (an edit moves the mtime) is.
//!
//! Layers are applied in order into a scratch directory (`layer.rs`: whiteouts, escapes
//! refused, owners/modes/links/devices kept), then `mkfs.ext4 -d` makes the image, sized from
//! the tree with headroom for the guest's writes (25% + 64 MiB by default,
//! `Options::extra_percent` / `extra_bytes`). The cache (`cache.rs`) is keyed by the
//! manifest digest; a build holds that key's `flock` and renames its finished image into
//! place, so two concurrent prepares of one image build it once and never expose a partial
//! one.

mod cache;
pub mod digest;
pub mod layer;
mod source;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cache::{default_cache_dir, list, prune, CachedImage, PruneReport};

/// What the image's config says to run, as `docker run` uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    pub cmd: Vec<String>,
    /// `Env` (`NAME=value`).
    pub env: Vec<String>,
    /// `WorkingDir` (none when empty).
    pub working_dir: Option<String>,
    /// `User` (none when empty).
    pub user: Option<String>,
}

/// A root filesystem ready for a VM.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// The ext4 file: in the cache (mode 0444, shared by every VM of this image: attach it
    /// read-only, never let a VM write it), or the user's own file for a plain ext4 image.
    pub rootfs: PathBuf,
    /// The image's config (empty for a plain rootfs image or directory).
    pub config: ImageConfig,
    /// The manifest digest (OCI layout) or the config digest, Docker's image ID
    /// (docker-archive); none for a plain rootfs image or directory.
    pub digest: Option<String>,
    /// Whether this call built the image (false: it came from the cache, or was used as is).
    pub built: bool,
}

/// Knobs for `prepare_with`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The most bytes one layer may expand to (its tar stream, and the file data it writes).
    pub max_layer_bytes: u64,
    /// Free space left in the ext4 beyond the tree, percent of the tree's size ...
    pub extra_percent: u64,
    /// ... plus this many bytes.
    pub extra_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_layer_bytes: 16 << 30,
            extra_percent: 25,
            extra_bytes: 64 << 20,
        }
    }
}

/// Why an image could not be prepared (one line each: `cinder run` prints it and exits 125).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// IMAGE names nothing.
    #[error("image {0:?}: no such file or directory (IMAGE is an OCI layout DIR[:TAG], a docker-archive tar FILE[:TAG], an ext4 image or a root filesystem directory)")]
    NotFound(String),
    /// IMAGE is a file of no kind we take.
    #[error("image {0}: not an OCI layout, a docker-archive tar or an ext4 image")]
    Unrecognized(String),
    /// A tag given for something that has none.
    #[error("image {0}: a :TAG is only for an OCI layout or a docker-archive tar")]
    TagOnPlain(String),
    /// No manifest with that tag.
    #[error("{image}: no image tagged {tag:?} (tags: {available})")]
    TagNotFound {
        /// The image.
        image: String,
        /// The tag asked for.
        tag: String,
        /// The tags there are.
        available: String,
    },
    /// Reading or writing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A document or structure is invalid.
    #[error("{what}: {why}")]
    Invalid {
        /// Which.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// A digest we cannot check (an algorithm other than sha256/sha512, bad hex).
    #[error("{what}: unsupported or malformed digest {digest:?}")]
    UnsupportedDigest {
        /// Whose digest.
        what: String,
        /// The digest.
        digest: String,
    },
    /// A blob's content does not match its digest.
    #[error("{what}: digest mismatch: expected {expected}, content has {actual}: refused")]
    DigestMismatch {
        /// Which blob.
        what: String,
        /// The digest named.
        expected: String,
        /// The content's.
        actual: String,
    },
    /// A blob's size does not match its descriptor.
    #[error("{what}: size mismatch: descriptor says {expected} bytes, blob has {actual}: refused")]
    SizeMismatch {
        /// Which blob.
        what: String,
        /// The size named.
        expected: u64,
        /// The blob's.
        actual: u64,
    },
    /// A layer could not be applied.
    #[error("{what}: {source}")]
    Layer {
        /// Which layer.
        what: String,
        /// Why.
        source: layer::LayerError,
    },
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 failed: {0}")]
    Mkfs(String),
}

/// Where IMAGE points.
enum Source {
    Layout(PathBuf, Option<String>),
    Archive(PathBuf, Option<String>),
    Ext4(PathBuf),
    Dir(PathBuf),
}

fn is_ext4(p: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = source::open_regular(p) else {
        return false;
    };
    let mut magic = [0u8; 2];
    f.seek(SeekFrom::Start(1024 + 56)).is_ok()
        && f.read_exact(&mut magic).is_ok()
        && magic == [0x53, 0xef]
}

fn classify(path: &Path, tag: Option<String>, image: &str) -> Result<Source, ImageError> {
    let md = std::fs::metadata(path).map_err(|source| ImageError::Io {
        what: image.to_string(),
        source,
    })?;
    if md.is_dir() {
        if path.join("oci-layout").exists() {
            return Ok(Source::Layout(path.to_path_buf(), tag));
        }
        if tag.is_some() {
            return Err(ImageError::TagOnPlain(image.to_string()));
        }
        return Ok(Source::Dir(path.to_path_buf()));
    }
    if md.is_file() {
        if is_ext4(path) {
            if tag.is_some() {
                return Err(ImageError::TagOnPlain(image.to_string()));
            }
            return Ok(Source::Ext4(path.to_path_buf()));
        }
        if source::looks_like_docker_archive(path) {
            return Ok(Source::Archive(path.to_path_buf(), tag));
        }
    }
    Err(ImageError::Unrecognized(image.to_string()))
}

/// IMAGE as a path, or a path and a tag: the first `:` whose left side exists splits them.
fn parse_source(image: &str) -> Result<Source, ImageError> {
    if Path::new(image).exists() {
        return classify(Path::new(image), None, image);
    }
    for (i, _) in image.match_indices(':') {
        let (p, t) = (&image[..i], &image[i + 1..]);
        if !p.is_empty() && Path::new(p).exists() {
            if t.is_empty() {
                return Err(ImageError::NotFound(image.to_string()));
            }
            return classify(Path::new(p), Some(t.to_string()), image);
        }
    }
    Err(ImageError::NotFound(image.to_string()))
}

/// Prepares IMAGE's root filesystem in `cache_dir` with the default options.
pub fn prepare(image: &str, cache_dir: &Path) -> Result<PreparedImage, ImageError> {
    prepare_with(image, cache_dir, &Options::default())
}

/// Prepares IMAGE's root filesystem in `cache_dir`.
pub fn prepare_with(
    image: &str,
    cache_dir: &Path,
    opts: &Options,
) -> Result<PreparedImage, ImageError> {
    match parse_source(image)? {
        Source::Ext4(p) => Ok(PreparedImage {
            rootfs: std::fs::canonicalize(&p).unwrap_or(p),
            config: ImageConfig::default(),
            digest: None,
            built: false,
        }),
        Source::Dir(dir) => {
            let key = cache::tree_key(&dir)?;
            // mkfs.ext4 -d reads the directory itself: no scratch copy.
            let (rootfs, built) = cache::get_or_build(
                cache_dir,
                &key,
                image,
                &ImageConfig::default(),
                opts,
                |_| Ok(dir.clone()),
            )?;
            Ok(PreparedImage {
                rootfs,
                config: ImageConfig::default(),
                digest: None,
                built,
            })
        }
        Source::Layout(dir, tag) => build(
            source::resolve_layout(&dir, tag.as_deref())?,
            image,
            cache_dir,
            opts,
        ),
        Source::Archive(file, tag) => build(
            source::resolve_docker_archive(&file, tag.as_deref())?,
            image,
            cache_dir,
            opts,
        ),
    }
}

fn build(
    r: source::Resolved,
    image: &str,
    cache_dir: &Path,
    opts: &Options,
) -> Result<PreparedImage, ImageError> {
    let (rootfs, built) =
        cache::get_or_build(cache_dir, &r.key, image, &r.config, opts, |scratch| {
            for (i, l) in r.layers.iter().enumerate() {
                source::apply(l, i, scratch, opts.max_layer_bytes)?;
            }
            Ok(scratch.to_path_buf())
        })?;
    Ok(PreparedImage {
        rootfs,
        config: r.config,
        digest: Some(r.key),
        built,
    })
}
