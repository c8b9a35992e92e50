//! Image build benchmark (`scripts/bench.sh run`): an OCI layout of `--files` files holding
//! `--mib` MiB in all (default 10,000 files, 100 MiB, in 100 directories; half the bytes
//! compressible text, half pseudo-random) as one gzip layer, then
//! - a cold `prepare` (digests, layer applied into the scratch tree, `mkfs.ext4 -d`),
//! - a warm `prepare` (the same image again: from the cache),
//! - a cold `prepare` of the same tree as a plain directory (`mkfs.ext4 -d` alone),
//!
//! and prints their times and the image's apparent and on-disk size. Reports, never asserts.
//! Needs root (owners are kept) and e2fsprogs; no KVM.
//!
//! ```text
//! cargo run --release -p cinder-image --bin bench_image -- [--files N] [--mib N] [--dir DIR]
//! ```

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cinder_image::digest::sha256;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let d = sha256(bytes);
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).expect("blobs dir");
    std::fs::write(dir.join(&d[7..]), bytes).expect("write blob");
    (d, bytes.len())
}

/// Writes the layout; returns the tree's directory as well (the same files, unpacked).
fn make_layout(base: &Path, files: u64, total: u64) -> (PathBuf, PathBuf) {
    let layout = base.join("layout");
    let tree = base.join("tree");
    std::fs::create_dir_all(&layout).expect("layout dir");
    let per = total / files.max(1);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut b = tar::Builder::new(Vec::with_capacity(
        usize::try_from(total + files * 1024).unwrap_or(0),
    ));
    for i in 0..files {
        let name = format!("data/d{:03}/f{i:05}", i % 100);
        let mut data = Vec::with_capacity(usize::try_from(per).unwrap_or(0));
        while (data.len() as u64) < per / 2 {
            data.extend_from_slice(format!("line {i} of a text file, compressible\n").as_bytes());
        }
        while (data.len() as u64) < per {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            data.extend_from_slice(&state.to_le_bytes());
        }
        data.truncate(usize::try_from(per).unwrap_or(0));
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, &name, &data[..]).expect("tar");
        let p = tree.join(&name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("tree dir");
        std::fs::write(&p, &data).expect("tree file");
    }
    let tar = b.into_inner().expect("tar");
    let diff_id = sha256(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let (ld, ls) = blob(&layout, &gz);
    let cfg = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}});
    let (cd, cs) = blob(&layout, &serde_json::to_vec(&cfg).expect("json"));
    let m = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]});
    let (md, ms) = blob(&layout, &serde_json::to_vec(&m).expect("json"));
    let idx = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&idx).expect("json"),
    )
    .expect("index");
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    println!(
        "layout: {files} files, {:.1} MiB of data, layer {:.1} MiB tar / {:.1} MiB gzip",
        (per * files) as f64 / 1048576.0,
        tar.len() as f64 / 1048576.0,
        ls as f64 / 1048576.0
    );
    (layout, tree)
}

fn mib(n: u64) -> f64 {
    n as f64 / 1048576.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let files = arg(&args, "--files", 10_000);
    let total = arg(&args, "--mib", 100) << 20;
    let base = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("cinder-bench-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("bench dir");
    let t0 = Instant::now();
    let (layout, tree) = make_layout(&base, files, total);
    println!("  (written in {:.2} s)", t0.elapsed().as_secs_f64());
    let cache = base.join("cache");
    let report = |what: &str, image: &str| {
        let t = Instant::now();
        match cinder_image::prepare(image, &cache) {
            Ok(p) => {
                let el = t.elapsed().as_secs_f64();
                let md = std::fs::metadata(&p.rootfs).expect("rootfs");
                println!(
                    "{what:<34} {el:>7.3} s   built={:<5}  image {:.0} MiB apparent, {:.1} MiB on disk",
                    p.built,
                    mib(md.len()),
                    mib(md.blocks() * 512)
                );
            }
            Err(e) => println!("{what:<34} failed: {e}"),
        }
    };
    let l = layout.display().to_string();
    report("OCI layout, gzip layer, cold", &l);
    report("OCI layout, same image again", &l);
    report(
        "plain directory (mkfs.ext4 -d only)",
        &tree.display().to_string(),
    );
    let _ = std::fs::remove_dir_all(&base);
}
