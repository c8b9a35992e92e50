//! Test images written from Rust: layers (tar, any entry the tests need, hostile ones too),
//! OCI layouts and docker-archive tars; and `debugfs` to look inside a built ext4.

#![allow(dead_code, missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use sha2::{Digest, Sha256};

pub struct Tmp(pub PathBuf);

impl Tmp {
    pub fn new(tag: &str) -> Tmp {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "cinder-img-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// One tar entry to write; the name is written raw into the header (so `..` and absolute
/// names can be made).
pub enum E {
    Dir(&'static str, u32),
    File(&'static str, &'static [u8]),
    FileOwned(String, Vec<u8>, u32, u64, u64),
    FileMode(&'static str, &'static [u8], u32, u64, u64),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    Char(&'static str, u32, u32),
    Fifo(&'static str),
}

fn raw_header(
    name: &[u8],
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    {
        let g = h.as_gnu_mut().unwrap();
        assert!(name.len() < 100, "test names are short");
        g.name[..name.len()].copy_from_slice(name);
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// A layer's uncompressed tar.
pub fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (h, data): (tar::Header, Vec<u8>) = match e {
            E::Dir(n, mode) => (
                raw_header(n.as_bytes(), tar::EntryType::Directory, *mode, 0, 0, 0),
                vec![],
            ),
            E::File(n, d) => (
                raw_header(
                    n.as_bytes(),
                    tar::EntryType::Regular,
                    0o644,
                    0,
                    0,
                    d.len() as u64,
                ),
                d.to_vec(),
            ),
            E::FileOwned(n, d, mode, uid, gid) => (
                raw_header(
                    n.as_bytes(),
                    tar::EntryType::Regular,
                    *mode,
                    *uid,
                    *gid,
                    d.len() as u64,
                ),
                d.clone(),
            ),
            E::FileMode(n, d, mode, uid, gid) => (
                raw_header(
                    n.as_bytes(),
                    tar::EntryType::Regular,
                    *mode,
                    *uid,
                    *gid,
                    d.len() as u64,
                ),
                d.to_vec(),
            ),
            E::Symlink(n, t) | E::Hardlink(n, t) => {
                let kind = if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = raw_header(n.as_bytes(), kind, 0o777, 0, 0, 0);
                let g = h.as_gnu_mut().unwrap();
                g.linkname[..t.len()].copy_from_slice(t.as_bytes());
                (h, vec![])
            }
            E::Char(n, ma, mi) => {
                let mut h = raw_header(n.as_bytes(), tar::EntryType::Char, 0o666, 0, 0, 0);
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
                (h, vec![])
            }
            E::Fifo(n) => (
                raw_header(n.as_bytes(), tar::EntryType::Fifo, 0o644, 0, 0, 0),
                vec![],
            ),
        };
        let mut h = h;
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

#[derive(Clone, Copy, PartialEq)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub fn compress(tar: &[u8], c: Comp) -> (Vec<u8>, &'static str) {
    match c {
        Comp::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (
                e.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Comp::Zstd => (
            zstd::encode_all(tar, 3).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    }
}

pub fn config_json(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/app", "--flag"],
            "Cmd": ["serve"],
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
            "WorkingDir": "/srv",
            "User": "1000:1000"
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": []
    }))
    .unwrap()
}

/// Writes a blob into an OCI layout; returns its descriptor.
pub fn put_blob(dir: &Path, media: &str, bytes: &[u8]) -> serde_json::Value {
    let hex = sha256_hex(bytes);
    let b = dir.join("blobs/sha256");
    std::fs::create_dir_all(&b).unwrap();
    std::fs::write(b.join(&hex), bytes).unwrap();
    serde_json::json!({ "mediaType": media, "digest": format!("sha256:{hex}"), "size": bytes.len() })
}

/// An image manifest (with config) for these layers in `dir`; returns its descriptor.
pub fn put_image(dir: &Path, layers: &[(Vec<u8>, Comp)]) -> serde_json::Value {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, c) in layers {
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        let (bytes, media) = compress(tar, *c);
        descs.push(put_blob(dir, media, &bytes));
    }
    let cfg = put_blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &config_json(&diff_ids),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg,
        "layers": descs,
    });
    put_blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    )
}

/// Writes `oci-layout` and `index.json` naming these descriptors (each with its tag).
pub fn write_index(dir: &Path, tagged: &[(serde_json::Value, &str)]) {
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let manifests: Vec<_> = tagged
        .iter()
        .map(|(d, t)| {
            let mut d = d.clone();
            d["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": t });
            d
        })
        .collect();
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": manifests });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// An OCI layout with one image of these layers, tagged `latest`.
pub fn oci_layout(dir: &Path, layers: &[(Vec<u8>, Comp)]) -> serde_json::Value {
    let d = put_image(dir, layers);
    write_index(dir, &[(d.clone(), "latest")]);
    d
}

/// A `docker save` tar: `manifest.json`, `<hex>.json`, `<n>/layer.tar` per layer.
pub fn docker_archive(path: &Path, repo_tag: &str, layers: &[(Vec<u8>, Comp)]) -> String {
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    let mut diff_ids = Vec::new();
    let mut names = Vec::new();
    for (i, (tar, c)) in layers.iter().enumerate() {
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        let (bytes, _) = compress(tar, *c);
        let name = format!("l{i}/layer.tar");
        add(&mut b, &name, &bytes);
        names.push(name);
    }
    let cfg = config_json(&diff_ids);
    let cfg_hex = sha256_hex(&cfg);
    add(&mut b, &format!("{cfg_hex}.json"), &cfg);
    let manifest = serde_json::json!([{ "Config": format!("{cfg_hex}.json"), "RepoTags": [repo_tag], "Layers": names }]);
    add(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    std::fs::write(path, b.into_inner().unwrap()).unwrap();
    format!("sha256:{cfg_hex}")
}

/// `debugfs -R CMD img`: its stdout.
pub fn debugfs(img: &Path, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(img)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The contents of a file in the image.
pub fn cat(img: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a path exists in the image.
pub fn exists(img: &Path, path: &str) -> bool {
    debugfs(img, &format!("stat {path}")).contains("Inode:")
}

/// The `stat` line fields of interest: (type, mode, uid, gid, links, inode).
pub fn stat(img: &Path, path: &str) -> String {
    debugfs(img, &format!("stat {path}"))
}

/// Files left in the cache directory other than the finished images and their metadata
/// (scratch trees, temporary images).
pub fn leftovers(cache: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(cache) else {
        return vec![];
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".build-") || n.contains(".tmp-"))
        .collect()
}

pub fn cached_images(cache: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(cache) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
        .count()
}
