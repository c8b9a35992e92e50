//! Reading an image: an OCI image layout directory (`DIR[:TAG]`) or a `docker save` tar
//! (docker-archive), down to its cache key, its config and its layers, every blob checked
//! against its digest.
//!
//! - OCI layout: `index.json` -> the manifest for TAG (`org.opencontainers.image.ref.name`;
//!   without a tag the only manifest, else `latest`), through nested indexes (at most 4 deep)
//!   choosing `linux/amd64`; every blob's size and digest are checked against its descriptor.
//!   The cache key is the manifest's digest.
//! - docker-archive: `manifest.json` -> the entry whose `RepoTags` has TAG (without a tag the
//!   only one); the config is checked against its file name (`<hex>.json` or
//!   `blobs/sha256/<hex>`), and each layer's uncompressed stream against the config's
//!   `rootfs.diff_ids`. It has no manifest digest: the cache key is the config digest (what
//!   Docker calls the image ID).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest, Os};
use serde::Deserialize;

use crate::digest::{Digest, HashingReader};
use crate::layer::{apply_layer, LayerError};
use crate::{ImageConfig, ImageError};

/// The largest JSON document (index, manifest, config) read.
const MAX_JSON: u64 = 8 << 20;
/// Most entries indexed in a docker-archive tar.
const MAX_ARCHIVE_ENTRIES: usize = 1 << 16;
/// The most bytes read from a docker-archive between two members (headers, long names, PAX
/// records, which the tar crate keeps whole in memory; member data is skipped by seeking).
const MAX_ARCHIVE_META: u64 = 1 << 20;

/// A file whose reads are counted against a budget the caller resets before each member.
struct Budgeted {
    f: File,
    left: std::rc::Rc<std::cell::Cell<u64>>,
}

impl Read for Budgeted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.f.read(buf)?;
        let left = self.left.get();
        if n as u64 > left {
            return Err(io::Error::other(format!(
                "a member's headers (long name, PAX records) exceed {MAX_ARCHIVE_META} bytes"
            )));
        }
        self.left.set(left - n as u64);
        Ok(n)
    }
}

impl Seek for Budgeted {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.f.seek(pos)
    }
}

/// The members of the tar at `path`, each header read within `MAX_ARCHIVE_META`; `f` sees
/// each one and says whether to go on.
fn each_member(
    path: &Path,
    mut f: impl FnMut(tar::Entry<'_, Budgeted>) -> Result<bool, ImageError>,
) -> Result<(), ImageError> {
    let what = format!("docker-archive {}", path.display());
    let left = std::rc::Rc::new(std::cell::Cell::new(MAX_ARCHIVE_META));
    let file = open_regular(path).map_err(io_err(&what))?;
    let mut ar = tar::Archive::new(Budgeted {
        f: file,
        left: left.clone(),
    });
    let mut entries = ar.entries_with_seek().map_err(io_err(&what))?;
    for _ in 0..MAX_ARCHIVE_ENTRIES {
        left.set(MAX_ARCHIVE_META);
        let Some(e) = entries.next() else {
            return Ok(());
        };
        if !f(e.map_err(io_err(&what))?)? {
            return Ok(());
        }
    }
    Err(bad(
        &what,
        format!("more than {MAX_ARCHIVE_ENTRIES} members"),
    ))
}
/// How deep indexes may nest.
const MAX_INDEX_DEPTH: usize = 4;
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where a layer's bytes are.
#[derive(Debug, Clone)]
pub(crate) enum LayerLoc {
    /// A whole file (an OCI blob).
    File(PathBuf),
    /// A range of a file (a member of a docker-archive tar).
    InTar {
        /// The tar.
        file: PathBuf,
        /// Where the member's data start.
        offset: u64,
    },
}

/// One layer to apply.
#[derive(Debug, Clone)]
pub(crate) struct LayerRef {
    pub loc: LayerLoc,
    /// Bytes at `loc`.
    pub size: u64,
    /// The digest the bytes must have: of the stored (maybe compressed) bytes, or, when
    /// `uncompressed` is set, of the tar stream after decompression (a docker diff_id).
    pub expect: Digest,
    pub uncompressed: bool,
}

/// An image resolved down to its key, config and layers.
#[derive(Debug)]
pub(crate) struct Resolved {
    /// `sha256:<hex>`: the manifest digest (OCI) or the config digest (docker-archive).
    pub key: String,
    pub config: ImageConfig,
    pub layers: Vec<LayerRef>,
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ImageError {
    let what = what.to_string();
    move |source| ImageError::Io { what, source }
}

fn bad(what: impl std::fmt::Display, why: impl std::fmt::Display) -> ImageError {
    ImageError::Invalid {
        what: what.to_string(),
        why: why.to_string(),
    }
}

/// Opens a file of the image for reading: without blocking (a FIFO named as a blob or
/// `index.json` must not hang the build) and only if it is a regular file.
pub(crate) fn open_regular(p: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Reads at most `max` bytes of `r`, refusing more.
fn read_bounded(r: impl Read, max: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let mut v = Vec::new();
    r.take(max + 1).read_to_end(&mut v).map_err(io_err(what))?;
    if v.len() as u64 > max {
        return Err(bad(what, format!("larger than {max} bytes")));
    }
    Ok(v)
}

fn checked_digest(s: &str, what: &str) -> Result<Digest, ImageError> {
    Digest::parse(s).ok_or_else(|| ImageError::UnsupportedDigest {
        what: what.to_string(),
        digest: s.to_string(),
    })
}

fn verify(bytes: &[u8], expect: &Digest, what: &str) -> Result<(), ImageError> {
    let mut h = expect.hasher();
    h.update(bytes);
    let got = h.finish();
    if got != expect.to_string() {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: expect.to_string(),
            actual: got,
        });
    }
    Ok(())
}

/// The part of an image config `docker run` uses.
fn image_config(cfg: &ImageConfiguration) -> ImageConfig {
    let Some(c) = cfg.config() else {
        return ImageConfig::default();
    };
    let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
    ImageConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: nonempty(c.working_dir()),
        user: nonempty(c.user()),
    }
}

fn parse_config(bytes: &[u8], what: &str) -> Result<ImageConfiguration, ImageError> {
    ImageConfiguration::from_reader(bytes).map_err(|e| bad(what, e))
}

// ---------------------------------------------------------------- OCI image layout

struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join(d.alg).join(&d.hex)
    }

    /// A small blob (JSON), size and digest checked against its descriptor.
    fn small_blob(&self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, ImageError> {
        let d = checked_digest(desc.digest().as_ref(), what)?;
        if desc.size() > MAX_JSON {
            return Err(bad(
                what,
                format!("descriptor size {} is over {MAX_JSON} bytes", desc.size()),
            ));
        }
        let p = self.blob_path(&d);
        let f = open_regular(&p).map_err(io_err(format!("{what} {}", p.display())))?;
        let bytes = read_bounded(f, MAX_JSON, what)?;
        if bytes.len() as u64 != desc.size() {
            return Err(ImageError::SizeMismatch {
                what: format!("{what} {d}"),
                expected: desc.size(),
                actual: bytes.len() as u64,
            });
        }
        verify(&bytes, &d, &format!("{what} {}", p.display()))?;
        Ok(bytes)
    }
}

fn is_index(mt: &str) -> bool {
    mt == "application/vnd.oci.image.index.v1+json"
        || mt == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn is_manifest(mt: &str) -> bool {
    mt == "application/vnd.oci.image.manifest.v1+json"
        || mt == "application/vnd.docker.distribution.manifest.v2+json"
}

fn platform_of(d: &Descriptor) -> String {
    match d.platform() {
        Some(p) => format!("{}/{}", p.os(), p.architecture()),
        None => "unspecified".into(),
    }
}

/// Chooses the descriptor for linux/amd64 among `cands`: one with that platform, else the only
/// one without a platform.
fn choose_platform<'a>(cands: &[&'a Descriptor], what: &str) -> Result<&'a Descriptor, ImageError> {
    if let Some(d) = cands.iter().find(|d| {
        d.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == Arch::Amd64)
    }) {
        return Ok(d);
    }
    let unspecified: Vec<_> = cands.iter().filter(|d| d.platform().is_none()).collect();
    if unspecified.len() == 1 {
        return Ok(unspecified[0]);
    }
    let have: Vec<String> = cands.iter().map(|d| platform_of(d)).collect();
    Err(bad(
        what,
        format!("no linux/amd64 image (platforms: {})", have.join(", ")),
    ))
}

pub(crate) fn resolve_layout(dir: &Path, tag: Option<&str>) -> Result<Resolved, ImageError> {
    let what = format!("OCI layout {}", dir.display());
    let layout_file = dir.join("oci-layout");
    let hdr = read_bounded(
        open_regular(&layout_file).map_err(io_err(layout_file.display()))?,
        4096,
        "oci-layout",
    )?;
    let hdr: serde_json::Value =
        serde_json::from_slice(&hdr).map_err(|e| bad(layout_file.display(), e))?;
    if hdr.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(bad(
            layout_file.display(),
            "imageLayoutVersion is not \"1.0.0\"",
        ));
    }
    let index_path = dir.join("index.json");
    let bytes = read_bounded(
        open_regular(&index_path).map_err(io_err(index_path.display()))?,
        MAX_JSON,
        "index.json",
    )?;
    let index = ImageIndex::from_reader(&bytes[..]).map_err(|e| bad(index_path.display(), e))?;
    let layout = Layout {
        dir: dir.to_path_buf(),
    };

    // The top level: the tag's descriptors.
    let tags: Vec<String> = index
        .manifests()
        .iter()
        .filter_map(|d| d.annotations().as_ref()?.get(REF_NAME).cloned())
        .collect();
    let tagged = |t: &str| -> Vec<&Descriptor> {
        index
            .manifests()
            .iter()
            .filter(|d| {
                d.annotations()
                    .as_ref()
                    .and_then(|a| a.get(REF_NAME))
                    .map(String::as_str)
                    == Some(t)
            })
            .collect()
    };
    let cands: Vec<&Descriptor> = match tag {
        Some(t) => tagged(t),
        None if index.manifests().len() == 1 => index.manifests().iter().collect(),
        None => tagged("latest"),
    };
    if cands.is_empty() {
        return Err(ImageError::TagNotFound {
            image: what,
            tag: tag.unwrap_or("latest").to_string(),
            available: if tags.is_empty() {
                "none".into()
            } else {
                tags.join(", ")
            },
        });
    }
    let mut desc: Descriptor = choose_platform(&cands, &what)?.clone();
    // Down through nested indexes to a manifest.
    let mut depth = 0;
    while is_index(desc.media_type().as_ref()) {
        depth += 1;
        if depth > MAX_INDEX_DEPTH {
            return Err(bad(
                &what,
                format!("indexes nested more than {MAX_INDEX_DEPTH} deep"),
            ));
        }
        let bytes = layout.small_blob(&desc, "image index")?;
        let sub = ImageIndex::from_reader(&bytes[..])
            .map_err(|e| bad(format!("image index {}", desc.digest()), e))?;
        let cands: Vec<&Descriptor> = sub.manifests().iter().collect();
        desc = choose_platform(&cands, &what)?.clone();
    }
    if !is_manifest(desc.media_type().as_ref()) {
        return Err(bad(
            &what,
            format!(
                "{} has media type {}: not an image manifest",
                desc.digest(),
                desc.media_type()
            ),
        ));
    }
    let bytes = layout.small_blob(&desc, "image manifest")?;
    let manifest = ImageManifest::from_reader(&bytes[..])
        .map_err(|e| bad(format!("image manifest {}", desc.digest()), e))?;
    let cfg_bytes = layout.small_blob(manifest.config(), "image config")?;
    let cfg = parse_config(&cfg_bytes, "image config")?;
    let mut layers = Vec::new();
    for (i, l) in manifest.layers().iter().enumerate() {
        let d = checked_digest(l.digest().as_ref(), &format!("layer {i}"))?;
        layers.push(LayerRef {
            loc: LayerLoc::File(layout.blob_path(&d)),
            size: l.size(),
            expect: d,
            uncompressed: false,
        });
    }
    let key = checked_digest(desc.digest().as_ref(), "image manifest")?;
    Ok(Resolved {
        key: key.to_string(),
        config: image_config(&cfg),
        layers,
    })
}

// ---------------------------------------------------------------- docker-archive

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// A tar's members: data offset and size of each regular file, target of each symbolic link.
struct TarIndex {
    file: PathBuf,
    files: HashMap<String, (u64, u64)>,
    links: HashMap<String, String>,
}

fn norm(name: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join("/")
}

impl TarIndex {
    fn new(path: &Path) -> Result<TarIndex, ImageError> {
        let mut idx = TarIndex {
            file: path.to_path_buf(),
            files: HashMap::new(),
            links: HashMap::new(),
        };
        each_member(path, |e| {
            let name = norm(&String::from_utf8_lossy(&e.path_bytes()));
            match e.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    idx.files.insert(name, (e.raw_file_position(), e.size()));
                }
                tar::EntryType::Symlink => {
                    let t = e
                        .link_name_bytes()
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    let base = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    let target = if t.starts_with('/') {
                        norm(&t)
                    } else {
                        norm(&format!("{base}/{t}"))
                    };
                    idx.links.insert(name, target);
                }
                _ => {}
            }
            Ok(true)
        })?;
        Ok(idx)
    }

    /// A member (following symbolic links, `docker save`'s way of sharing a layer): offset and
    /// size.
    fn member(&self, name: &str) -> Result<(u64, u64), ImageError> {
        let mut n = norm(name);
        for _ in 0..8 {
            if let Some(m) = self.files.get(&n) {
                return Ok(*m);
            }
            match self.links.get(&n) {
                Some(t) => n = t.clone(),
                None => break,
            }
        }
        Err(bad(
            format!("docker-archive {}", self.file.display()),
            format!("no member {name:?}"),
        ))
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let (off, size) = self.member(name)?;
        if size > MAX_JSON {
            return Err(bad(name, format!("larger than {MAX_JSON} bytes")));
        }
        let mut f = open_regular(&self.file).map_err(io_err(self.file.display()))?;
        f.seek(SeekFrom::Start(off))
            .map_err(io_err(self.file.display()))?;
        read_bounded(f.take(size), MAX_JSON, name)
    }
}

/// Whether `path` is a docker-archive: a tar with `manifest.json`.
pub(crate) fn looks_like_docker_archive(path: &Path) -> bool {
    let mut found = false;
    let _ = each_member(path, |e| {
        found = norm(&String::from_utf8_lossy(&e.path_bytes())) == "manifest.json";
        Ok(!found)
    });
    found
}

pub(crate) fn resolve_docker_archive(
    path: &Path,
    tag: Option<&str>,
) -> Result<Resolved, ImageError> {
    let what = format!("docker-archive {}", path.display());
    let idx = TarIndex::new(path)?;
    let mbytes = idx.read_small("manifest.json")?;
    let entries: Vec<DockerEntry> =
        serde_json::from_slice(&mbytes).map_err(|e| bad(format!("{what}: manifest.json"), e))?;
    let all_tags: Vec<String> = entries
        .iter()
        .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
        .collect();
    let entry = match tag {
        None if entries.len() == 1 => &entries[0],
        None => {
            return Err(bad(
                &what,
                format!(
                    "holds {} images: name one as FILE:TAG (tags: {})",
                    entries.len(),
                    all_tags.join(", ")
                ),
            ))
        }
        Some(t) => entries
            .iter()
            .find(|e| {
                e.repo_tags.iter().flatten().any(|rt| {
                    rt == t
                        || rt.rsplit_once(':').map(|(_, x)| x) == Some(t)
                        || rt == &format!("{t}:latest")
                })
            })
            .ok_or_else(|| ImageError::TagNotFound {
                image: what.clone(),
                tag: t.to_string(),
                available: if all_tags.is_empty() {
                    "none".into()
                } else {
                    all_tags.join(", ")
                },
            })?,
    };
    // The config's name is its digest: `<hex>.json` (docker < 25) or `blobs/sha256/<hex>`.
    let cfg_name = norm(&entry.config);
    let hex = cfg_name
        .strip_prefix("blobs/sha256/")
        .or_else(|| cfg_name.strip_suffix(".json"))
        .unwrap_or(&cfg_name);
    let cfg_digest = checked_digest(&format!("sha256:{hex}"), "docker-archive config name")?;
    let cfg_bytes = idx.read_small(&cfg_name)?;
    verify(
        &cfg_bytes,
        &cfg_digest,
        &format!("{what}: config {cfg_name}"),
    )?;
    let cfg = parse_config(&cfg_bytes, "image config")?;
    let diff_ids = cfg.rootfs().diff_ids();
    if diff_ids.len() != entry.layers.len() {
        return Err(bad(
            &what,
            format!(
                "{} layers but {} diff_ids in the config",
                entry.layers.len(),
                diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (i, (l, id)) in entry.layers.iter().zip(diff_ids).enumerate() {
        let (offset, size) = idx.member(l)?;
        layers.push(LayerRef {
            loc: LayerLoc::InTar {
                file: path.to_path_buf(),
                offset,
            },
            size,
            expect: checked_digest(id, &format!("layer {i} diff_id"))?,
            uncompressed: true,
        });
    }
    Ok(Resolved {
        key: cfg_digest.to_string(),
        config: image_config(&cfg),
        layers,
    })
}

// ---------------------------------------------------------------- applying a layer

/// The decompressed stream, by its magic bytes: gzip, zstd, or a plain tar.
fn decompress<'a, R: Read + 'a>(r: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(64 * 1024, r);
    let head = br.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(br))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(br)?)
    } else {
        Box::new(br)
    })
}

/// Applies layer `i` onto `root`, its digest checked over every byte (the bytes after the tar's
/// end too). A mismatch is found only at the end: the caller throws the scratch tree away.
pub(crate) fn apply(l: &LayerRef, i: usize, root: &Path, limit: u64) -> Result<(), ImageError> {
    let what = format!("layer {i} ({})", l.expect);
    let layer_err = |source: LayerError| ImageError::Layer {
        what: what.clone(),
        source,
    };
    let (file, offset) = match &l.loc {
        LayerLoc::File(p) => (p.clone(), 0),
        LayerLoc::InTar { file, offset } => (file.clone(), *offset),
    };
    let mut f = open_regular(&file).map_err(io_err(format!("{what}: {}", file.display())))?;
    if let LayerLoc::File(_) = l.loc {
        let len = f.metadata().map_err(io_err(&what))?.len();
        if len != l.size {
            return Err(ImageError::SizeMismatch {
                what,
                expected: l.size,
                actual: len,
            });
        }
    }
    f.seek(SeekFrom::Start(offset)).map_err(io_err(&what))?;
    let raw = f.take(l.size);
    let (got, n) = if l.uncompressed {
        let dec = decompress(raw).map_err(io_err(&what))?;
        let mut hr = HashingReader::new(dec.take(limit.saturating_add(1)), l.expect.hasher());
        apply_layer(root, &mut hr, limit).map_err(layer_err)?;
        let (got, n) = hr.finish().map_err(io_err(&what))?;
        if n > limit {
            return Err(layer_err(LayerError::TooBig { limit }));
        }
        (got, None)
    } else {
        let mut hr = HashingReader::new(raw, l.expect.hasher());
        {
            let dec = decompress(&mut hr).map_err(io_err(&what))?;
            apply_layer(root, dec, limit).map_err(layer_err)?;
        }
        let (got, n) = hr.finish().map_err(io_err(&what))?;
        (got, Some(n))
    };
    if let Some(n) = n {
        if n != l.size {
            return Err(ImageError::SizeMismatch {
                what,
                expected: l.size,
                actual: n,
            });
        }
    }
    if got != l.expect.to_string() {
        return Err(ImageError::DigestMismatch {
            what,
            expected: l.expect.to_string(),
            actual: got,
        });
    }
    Ok(())
}
