//! `cinder images` and `cinder images prune`, run as the real binary over a cache filled by
//! `cinder_image::prepare` (an OCI layout made offline by umoci, and a plain rootfs
//! directory). No KVM.

use std::path::Path;
use std::process::Output;

use cinder_tests::cinder::cinder;
use cinder_tests::tmp::TempDir;

fn run(args: &[&str], cache: &Path) -> Output {
    cinder()
        .args(args)
        .env("CINDER_CACHE", cache)
        .output()
        .expect("run cinder")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn umoci(args: &[&str]) {
    let out = std::process::Command::new("umoci")
        .args(args)
        .output()
        .expect("umoci (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "umoci {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn images_lists_then_prune_removes_the_cached_root_filesystems() {
    let t = TempDir::new("images-cli");
    let base = t.join("cinder-cache");
    let cache = base.join("images");
    // An empty (absent) cache lists nothing.
    let o = run(&["images"], &base);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(out.lines().count(), 1, "header only: {out}");
    // An OCI layout made by umoci, and a plain directory.
    let layout = t.join("layout");
    let l = layout.to_str().unwrap();
    let src = t.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello"), vec![b'x'; 300_000]).unwrap();
    umoci(&["init", "--layout", l]);
    umoci(&["new", "--image", &format!("{l}:v1")]);
    umoci(&[
        "insert",
        "--image",
        &format!("{l}:v1"),
        src.to_str().unwrap(),
        "/app",
    ]);
    let a = cinder_image::prepare(&format!("{l}:v1"), &cache).unwrap();
    let b = cinder_image::prepare(src.to_str().unwrap(), &cache).unwrap();
    assert!(a.built && b.built);
    let digest = a.digest.clone().unwrap();
    let o = run(&["images"], &base);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("DIGEST") && lines[0].contains("SIZE") && lines[0].contains("SOURCE"),
        "{out}"
    );
    let row = lines
        .iter()
        .find(|l| l.starts_with(&digest))
        .unwrap_or_else(|| panic!("{digest} not listed: {out}"));
    assert!(row.ends_with(&format!("{l}:v1")), "{row}");
    assert!(row.contains(" MiB"), "a size: {row}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("tree:") && l.ends_with(src.to_str().unwrap())),
        "{out}"
    );
    // The same with --cache-dir and `ls`.
    let o = cinder()
        .args(["images", "--cache-dir", cache.to_str().unwrap(), "ls"])
        .output()
        .unwrap();
    assert_eq!(text(&o).0, out);
    // prune removes both, frees their blocks, and leaves nothing of theirs behind.
    let o = run(&["images", "prune"], &base);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains(&format!("removed {digest}")), "{out}");
    assert!(out.contains("2 image(s) removed"), "{out}");
    assert!(!a.rootfs.exists() && !b.rootfs.exists());
    let left: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let o = run(&["images"], &base);
    assert_eq!(text(&o).0.lines().count(), 1);
    // Built again after the prune.
    assert!(
        cinder_image::prepare(&format!("{l}:v1"), &cache)
            .unwrap()
            .built
    );
}

#[test]
fn images_bad_syntax_is_one_line_and_exit_2() {
    let t = TempDir::new("images-bad");
    let o = run(&["images", "bogus"], t.path());
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("unrecognized subcommand 'bogus'"), "{err}");
    // A cache path that is a file: a one-line error, exit 1.
    let f = t.file("file", b"x");
    let o = cinder()
        .args(["images", "--cache-dir", f.to_str().unwrap()])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("cinder images: "), "{err}");
}
