//! Images to ext4: layouts and docker-archive tars written here with the `tar` crate, and one
//! made by Debian's `umoci`; every check looks inside the built ext4 with `debugfs`.
//! Needs root (owners are kept with lchown) and e2fsprogs; no KVM.

mod common;

use std::path::Path;

use cinder_image::{prepare, prepare_with, ImageError, Options};
use common::*;

fn field<'a>(stat: &'a str, name: &str) -> &'a str {
    let i = stat
        .find(name)
        .unwrap_or_else(|| panic!("no {name} in {stat}"));
    stat[i + name.len()..]
        .split_whitespace()
        .next()
        .unwrap_or("")
}

fn mode(img: &Path, p: &str) -> u32 {
    u32::from_str_radix(field(&stat(img, p), "Mode:"), 8).unwrap()
}

fn require_root() {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests build images with real owners: run as root"
    );
}

/// The layers of the "changes across layers" image: each compression once.
fn change_layers() -> Vec<(Vec<u8>, Comp)> {
    let l1 = layer(&[
        E::Dir("etc", 0o755),
        E::File("etc/conf", b"v1\n"),
        E::File("etc/deleted", b"gone soon\n"),
        E::Dir("opq", 0o755),
        E::File("opq/lower1", b"lower\n"),
        E::Dir("opq/lowersub", 0o755),
        E::File("opq/lowersub/x", b"x\n"),
        E::Dir("d", 0o755),
        E::File("d/child", b"child\n"),
        E::Dir("h", 0o755),
        E::File("h/orig", b"linked content\n"),
        E::Symlink("lnk", "/etc/host-only-target"),
        E::Symlink("rel", "../../../../etc/passwd"),
        E::FileMode("bin/suid", b"#!/bin/true\n", 0o4755, 1234, 5678),
        E::FileMode("bin/sgid", b"#!/bin/true\n", 0o2750, 0, 42),
        E::Dir("tmp", 0o1777),
        E::Char("dev/null", 1, 3),
        E::Fifo("run/fifo"),
    ]);
    let l2 = layer(&[
        E::File("etc/conf", b"v2\n"),
        E::File("etc/.wh.deleted", b""),
        E::File("opq/.wh..wh..opq", b""),
        E::File("opq/upper", b"upper\n"),
        E::File("d", b"now a file\n"),
        E::Hardlink("h/link", "h/orig"),
        E::File("added", b"added in 2\n"),
    ]);
    let l3 = layer(&[
        E::File("etc/conf", b"v3\n"),
        E::File(".wh.added", b""),
        E::File("added3", b"3\n"),
        E::File("nodir/.wh.x", b""),
    ]);
    vec![(l1, Comp::None), (l2, Comp::Gzip), (l3, Comp::Zstd)]
}

/// What every "changes" image must hold, whatever it came from.
fn check_changes(img: &Path) {
    // Overwritten twice (gzip then zstd layer), deleted by a whiteout, added then deleted.
    assert_eq!(cat(img, "/etc/conf"), "v3\n");
    assert!(!exists(img, "/etc/deleted"), "whiteout removed etc/deleted");
    assert!(
        !exists(img, "/added"),
        "a later layer's whiteout removed /added"
    );
    assert_eq!(cat(img, "/added3"), "3\n");
    assert!(
        !exists(img, "/nodir"),
        "a whiteout in a missing directory makes none"
    );
    // Opaque directory: the lower layer's children are gone, the upper's is there.
    assert!(
        !exists(img, "/opq/lower1") && !exists(img, "/opq/lowersub"),
        "opaque dir hid lower entries"
    );
    assert_eq!(cat(img, "/opq/upper"), "upper\n");
    // A directory replaced by a file.
    let d = stat(img, "/d");
    assert!(d.contains("Type: regular"), "{d}");
    assert_eq!(cat(img, "/d"), "now a file\n");
    assert!(!exists(img, "/d/child"));
    // A hard link across layers: one inode, two links.
    let (a, b) = (stat(img, "/h/orig"), stat(img, "/h/link"));
    assert_eq!(
        field(&a, "Inode:"),
        field(&b, "Inode:"),
        "h/link is a hard link to h/orig"
    );
    assert_eq!(field(&a, "Links:"), "2");
    assert_eq!(cat(img, "/h/link"), "linked content\n");
    // Symbolic links kept as links with their targets, never followed.
    let l = stat(img, "/lnk");
    assert!(
        l.contains("Type: symlink") && l.contains("/etc/host-only-target"),
        "{l}"
    );
    let r = stat(img, "/rel");
    assert!(
        r.contains("Type: symlink") && r.contains("../../../../etc/passwd"),
        "{r}"
    );
    // setuid/setgid/sticky bits and owners.
    let s = stat(img, "/bin/suid");
    assert_eq!(mode(img, "/bin/suid"), 0o4755, "{s}");
    assert_eq!(field(&s, "User:"), "1234", "{s}");
    assert_eq!(field(&s, "Group:"), "5678", "{s}");
    assert_eq!(mode(img, "/bin/sgid"), 0o2750);
    assert_eq!(field(&stat(img, "/bin/sgid"), "Group:"), "42");
    assert_eq!(mode(img, "/tmp"), 0o1777);
    // Device nodes and FIFOs.
    let n = stat(img, "/dev/null");
    assert!(n.contains("Type: character special"), "{n}");
    assert!(n.contains("Device major/minor number: 01:03"), "{n}");
    assert!(stat(img, "/run/fifo").contains("Type: FIFO"));
}

#[test]
fn oci_layout_changes_across_gzip_zstd_and_plain_layers() {
    require_root();
    let t = Tmp::new("oci");
    let layout = t.join("layout");
    std::fs::create_dir(&layout).unwrap();
    let desc = oci_layout(&layout, &change_layers());
    let cache = t.join("cache");
    let p = prepare(layout.to_str().unwrap(), &cache).unwrap();
    assert!(p.built);
    assert_eq!(p.digest.as_deref(), desc["digest"].as_str());
    assert_eq!(p.config.entrypoint, ["/bin/app", "--flag"]);
    assert_eq!(p.config.cmd, ["serve"]);
    assert_eq!(p.config.env, ["PATH=/usr/bin:/bin", "GREETING=hello"]);
    assert_eq!(p.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(p.config.user.as_deref(), Some("1000:1000"));
    check_changes(&p.rootfs);
    // Nothing was created on the host through the symbolic links.
    assert!(!Path::new("/etc/host-only-target").exists());
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));
    // The cached file is read-only and fsck-clean.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&p.rootfs).unwrap().permissions().mode() & 0o777,
        0o444
    );
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&p.rootfs)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // Headroom: at least 64 MiB beyond the tree.
    assert!(std::fs::metadata(&p.rootfs).unwrap().len() >= 64 << 20);
}

#[test]
fn docker_archive_changes_and_tag_selection() {
    require_root();
    let t = Tmp::new("docker");
    let tarp = t.join("img.tar");
    let layers: Vec<_> = change_layers()
        .into_iter()
        .map(|(l, c)| (l, if c == Comp::Zstd { Comp::Gzip } else { c }))
        .collect();
    let id = docker_archive(&tarp, "example/app:1.0", &layers);
    let cache = t.join("cache");
    let p = prepare(&format!("{}:example/app:1.0", tarp.display()), &cache).unwrap();
    assert!(p.built);
    assert_eq!(p.digest.as_deref(), Some(id.as_str()));
    assert_eq!(p.config.cmd, ["serve"]);
    check_changes(&p.rootfs);
    // The same archive without a tag (it holds one image) is the same cached image.
    let q = prepare(tarp.to_str().unwrap(), &cache).unwrap();
    assert!(!q.built);
    assert_eq!(q.rootfs, p.rootfs);
    // A tag it does not hold.
    let e = prepare(&format!("{}:other", tarp.display()), &cache).unwrap_err();
    assert!(matches!(e, ImageError::TagNotFound { .. }), "{e}");
    assert!(e.to_string().contains("example/app:1.0"), "{e}");
}

#[test]
fn docker_archive_layer_not_matching_its_diff_id_is_refused() {
    require_root();
    let t = Tmp::new("dockerbad");
    let tarp = t.join("img.tar");
    let good = layer(&[E::File("a", b"good\n")]);
    let id = docker_archive(&tarp, "x:latest", &[(good, Comp::None)]);
    // Same length, different content: the tar still parses, the diff_id does not match.
    let mut bytes = std::fs::read(&tarp).unwrap();
    let pos = bytes.windows(5).position(|w| w == b"good\n").unwrap();
    bytes[pos..pos + 5].copy_from_slice(b"evil\n");
    std::fs::write(&tarp, bytes).unwrap();
    let cache = t.join("cache");
    let e = prepare(tarp.to_str().unwrap(), &cache).unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains("refused"), "{e}");
    assert_eq!(cached_images(&cache), 0);
    assert!(leftovers(&cache).is_empty());
    let _ = id;
}

#[test]
fn wrong_layer_digest_is_refused_and_nothing_is_cached() {
    require_root();
    let t = Tmp::new("digest");
    let layout = t.join("layout");
    std::fs::create_dir(&layout).unwrap();
    let l = layer(&[E::File("a", b"good\n")]);
    let desc = oci_layout(&layout, &[(l, Comp::None)]);
    // Tamper with the layer blob, keeping its size.
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(&desc["digest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(&m["layers"][0]["digest"].as_str().unwrap()[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    let pos = bytes.windows(5).position(|w| w == b"good\n").unwrap();
    bytes[pos..pos + 5].copy_from_slice(b"evil\n");
    std::fs::write(&blob, &bytes).unwrap();
    let cache = t.join("cache");
    let e = prepare(layout.to_str().unwrap(), &cache).unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
    assert_eq!(cached_images(&cache), 0);
    assert!(leftovers(&cache).is_empty(), "{:?}", leftovers(&cache));
    // A manifest whose bytes do not match the index's digest.
    let mpath = layout
        .join("blobs/sha256")
        .join(&desc["digest"].as_str().unwrap()[7..]);
    let mut mb = std::fs::read(&mpath).unwrap();
    let last = mb.len() - 1;
    mb[last] = b' ';
    std::fs::write(&mpath, mb).unwrap();
    let e = prepare(layout.to_str().unwrap(), &cache).unwrap_err();
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
}

/// Each hostile layer is refused, nothing appears outside the scratch directory, and the
/// cache holds no image and no leftover.
#[test]
fn escaping_entries_are_refused_with_nothing_written_outside() {
    require_root();
    let t = Tmp::new("escape");
    let outside = t.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let out_s: &'static str = Box::leak(outside.display().to_string().into_boxed_str());
    let abs_file: &'static str = Box::leak(format!("{out_s}/abs").into_boxed_str());
    let cases: Vec<(&str, Vec<E>, &str)> = vec![
        (
            "dotdot",
            vec![E::File("a/../../../../../../outside/dotdot", b"x")],
            "'..' component",
        ),
        ("absolute", vec![E::File(abs_file, b"x")], "absolute name"),
        (
            "symlink-parent",
            vec![E::Symlink("esc", out_s), E::File("esc/via-link", b"x")],
            "a parent is a symbolic link",
        ),
        (
            "symlink-dir-then-file",
            vec![E::Symlink("esc2", out_s), E::Dir("esc2/sub", 0o755)],
            "a parent is a symbolic link",
        ),
        (
            "hardlink-dotdot",
            vec![E::Hardlink("hl", "../../../../etc/passwd")],
            "'..' component",
        ),
        (
            "hardlink-absolute",
            vec![E::Hardlink("hl", "/etc/passwd")],
            "absolute name",
        ),
        (
            "hardlink-through-symlink",
            vec![E::Symlink("etcl", "/etc"), E::Hardlink("hl", "etcl/passwd")],
            "a parent is a symbolic link",
        ),
        (
            "whiteout-dotdot",
            vec![E::File("x/../.wh.outside", b"")],
            "'..' component",
        ),
    ];
    for (name, entries, why) in cases {
        let layout = t.join(&format!("layout-{name}"));
        std::fs::create_dir(&layout).unwrap();
        // A harmless lower layer first, so a refusal mid-image also leaves nothing behind.
        let lower = layer(&[E::File("ok", b"ok\n")]);
        oci_layout(
            &layout,
            &[(lower, Comp::Gzip), (layer(&entries), Comp::None)],
        );
        let cache = t.join(&format!("cache-{name}"));
        let e = prepare(layout.to_str().unwrap(), &cache).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, ImageError::Layer { .. }), "{name}: {msg}");
        assert!(
            msg.contains(why) && msg.contains("refused"),
            "{name}: {msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
        let left: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{name}: written outside: {left:?}");
        assert_eq!(cached_images(&cache), 0, "{name}");
        assert!(
            leftovers(&cache).is_empty(),
            "{name}: {:?}",
            leftovers(&cache)
        );
    }
    assert!(std::fs::metadata("/etc/passwd").unwrap().len() > 0);
}

#[test]
fn a_layer_expanding_past_the_limit_is_refused() {
    require_root();
    let t = Tmp::new("bomb");
    let layout = t.join("layout");
    std::fs::create_dir(&layout).unwrap();
    // 4 MiB of zeros: a few KiB gzipped.
    let big = layer(&[E::FileOwned(
        "zeros".into(),
        vec![0u8; 4 << 20],
        0o644,
        0,
        0,
    )]);
    oci_layout(&layout, &[(big, Comp::Gzip)]);
    let cache = t.join("cache");
    let opts = Options {
        max_layer_bytes: 1 << 20,
        ..Options::default()
    };
    let e = prepare_with(layout.to_str().unwrap(), &cache, &opts).unwrap_err();
    assert!(
        e.to_string()
            .contains("expands past the limit of 1048576 bytes"),
        "{e}"
    );
    assert_eq!(cached_images(&cache), 0);
    assert!(leftovers(&cache).is_empty());
}

#[test]
fn platform_is_chosen_through_a_nested_index_and_tags_select() {
    require_root();
    let t = Tmp::new("platform");
    let layout = t.join("layout");
    std::fs::create_dir(&layout).unwrap();
    let arm = put_image(
        &layout,
        &[(layer(&[E::File("arch", b"arm64\n")]), Comp::Gzip)],
    );
    let amd = put_image(
        &layout,
        &[(layer(&[E::File("arch", b"amd64\n")]), Comp::Gzip)],
    );
    let mut arm_d = arm.clone();
    arm_d["platform"] = serde_json::json!({"os": "linux", "architecture": "arm64"});
    let mut amd_d = amd.clone();
    amd_d["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let nested = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [arm_d, amd_d]});
    let idx = put_blob(
        &layout,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&nested).unwrap(),
    );
    let other = put_image(
        &layout,
        &[(layer(&[E::File("arch", b"other\n")]), Comp::None)],
    );
    write_index(&layout, &[(idx, "v1"), (other, "latest")]);
    let cache = t.join("cache");
    let p = prepare(&format!("{}:v1", layout.display()), &cache).unwrap();
    assert_eq!(cat(&p.rootfs, "/arch"), "amd64\n");
    assert_eq!(
        p.digest.as_deref(),
        amd["digest"].as_str(),
        "the key is the chosen manifest's digest"
    );
    let q = prepare(layout.to_str().unwrap(), &cache).unwrap();
    assert_eq!(cat(&q.rootfs, "/arch"), "other\n", "no tag: latest");
    let e = prepare(&format!("{}:v9", layout.display()), &cache).unwrap_err();
    assert!(
        e.to_string()
            .contains("no image tagged \"v9\" (tags: v1, latest)"),
        "{e}"
    );
}

#[test]
fn the_same_image_twice_builds_once_even_concurrently() {
    require_root();
    let t = Tmp::new("twice");
    let layout = t.join("layout");
    std::fs::create_dir(&layout).unwrap();
    oci_layout(&layout, &[(layer(&[E::File("f", b"1\n")]), Comp::Zstd)]);
    let cache = t.join("cache");
    let img = layout.to_str().unwrap().to_string();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (img, cache) = (img.clone(), cache.clone());
            std::thread::spawn(move || prepare(&img, &cache).unwrap())
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|p| p.built).count(),
        1,
        "exactly one of three concurrent prepares built"
    );
    assert!(results.iter().all(|p| p.rootfs == results[0].rootfs));
    let before = std::fs::metadata(&results[0].rootfs).unwrap();
    let again = prepare(&img, &cache).unwrap();
    assert!(!again.built);
    let after = std::fs::metadata(&again.rootfs).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (before.ino(), before.mtime()),
        (after.ino(), after.mtime()),
        "not rebuilt"
    );
    assert_eq!(cached_images(&cache), 1);
    assert!(leftovers(&cache).is_empty());
    let list = cinder_image::list(&cache).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(Some(list[0].digest.clone()), again.digest);
    let pr = cinder_image::prune(&cache).unwrap();
    assert_eq!(pr.removed, vec![list[0].digest.clone()]);
    assert!(pr.freed_bytes > 0);
    assert!(cinder_image::list(&cache).unwrap().is_empty());
    assert!(
        prepare(&img, &cache).unwrap().built,
        "built again after a prune"
    );
}

#[test]
fn plain_ext4_is_used_as_is_and_a_directory_is_cached_by_its_tree() {
    require_root();
    let t = Tmp::new("plain");
    let dir = t.join("rootfs");
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/hostname"), "plain\n").unwrap();
    let cache = t.join("cache");
    let p = prepare(dir.to_str().unwrap(), &cache).unwrap();
    assert!(p.built && p.digest.is_none());
    assert_eq!(cat(&p.rootfs, "/etc/hostname"), "plain\n");
    let q = prepare(dir.to_str().unwrap(), &cache).unwrap();
    assert!(!q.built, "an unchanged tree comes from the cache");
    std::fs::write(dir.join("etc/hostname"), "changed\n").unwrap();
    let r = prepare(dir.to_str().unwrap(), &cache).unwrap();
    assert!(r.built, "a changed tree is built again");
    assert_eq!(cat(&r.rootfs, "/etc/hostname"), "changed\n");
    // The built ext4, named directly, is used in place.
    let copy = t.join("copy.ext4");
    std::fs::copy(&r.rootfs, &copy).unwrap();
    let s = prepare(copy.to_str().unwrap(), &cache).unwrap();
    assert!(!s.built && s.digest.is_none());
    assert_eq!(s.rootfs, std::fs::canonicalize(&copy).unwrap());
    assert_eq!(s.config, Default::default());
    // Errors.
    let e = prepare(&format!("{}:tag", copy.display()), &cache).unwrap_err();
    assert!(matches!(e, ImageError::TagOnPlain(_)), "{e}");
    let e = prepare(t.join("nope").to_str().unwrap(), &cache).unwrap_err();
    assert!(matches!(e, ImageError::NotFound(_)), "{e}");
    let junk = t.join("junk.bin");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let e = prepare(junk.to_str().unwrap(), &cache).unwrap_err();
    assert!(matches!(e, ImageError::Unrecognized(_)), "{e}");
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

/// A layout made by another tool: Debian's umoci (init, new, insert, config), offline.
#[test]
fn umoci_built_layout() {
    require_root();
    let t = Tmp::new("umoci");
    let layout = t.join("layout");
    let l = layout.to_str().unwrap();
    let src = t.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/hello"), "from umoci\n").unwrap();
    std::os::unix::fs::symlink("sub/hello", src.join("link")).unwrap();
    std::fs::write(src.join("suid"), "s\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(src.join("suid"), Some(321), Some(654)).unwrap();
    std::fs::set_permissions(src.join("suid"), std::fs::Permissions::from_mode(0o4711)).unwrap();
    umoci(&["init", "--layout", l]);
    umoci(&["new", "--image", &format!("{l}:app")]);
    umoci(&[
        "insert",
        "--image",
        &format!("{l}:app"),
        src.to_str().unwrap(),
        "/opt/app",
    ]);
    umoci(&[
        "insert",
        "--image",
        &format!("{l}:app"),
        "--whiteout",
        "/opt/app/suid",
    ]);
    umoci(&[
        "config",
        "--image",
        &format!("{l}:app"),
        "--config.entrypoint",
        "/opt/app/run",
        "--config.workingdir",
        "/opt/app",
        "--config.env",
        "A=1",
    ]);
    umoci(&[
        "insert",
        "--image",
        &format!("{l}:app"),
        src.join("suid").to_str().unwrap(),
        "/bin/suid",
    ]);
    let cache = t.join("cache");
    let p = prepare(&format!("{l}:app"), &cache).unwrap();
    assert!(p.built);
    assert_eq!(cat(&p.rootfs, "/opt/app/sub/hello"), "from umoci\n");
    assert!(stat(&p.rootfs, "/opt/app/link").contains("Type: symlink"));
    assert!(
        !exists(&p.rootfs, "/opt/app/suid"),
        "umoci's whiteout applied"
    );
    assert_eq!(mode(&p.rootfs, "/bin/suid"), 0o4711);
    let s = stat(&p.rootfs, "/bin/suid");
    assert_eq!(
        (field(&s, "User:"), field(&s, "Group:")),
        ("321", "654"),
        "{s}"
    );
    assert_eq!(p.config.entrypoint, ["/opt/app/run"]);
    assert_eq!(p.config.working_dir.as_deref(), Some("/opt/app"));
    assert!(
        p.config.env.contains(&"A=1".to_string()),
        "{:?}",
        p.config.env
    );
    assert!(!prepare(&format!("{l}:app"), &cache).unwrap().built);
}

/// File capabilities and other extended attributes (PAX `SCHILY.xattr.*`) and ids too large
/// for the header (PAX `uid`/`gid`) reach the ext4.
#[test]
fn xattrs_and_large_ids_from_pax_records_are_kept() {
    require_root();
    let t = Tmp::new("xattr");
    // vfs_cap_data v2, effective, permitted CAP_NET_RAW (13).
    let mut cap = Vec::new();
    for w in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        cap.extend_from_slice(&w.to_le_bytes());
    }
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("SCHILY.xattr.security.capability", &cap[..]),
        ("SCHILY.xattr.user.note", &b"hello"[..]),
        ("uid", &b"3000000"[..]),
        ("gid", &b"3000001"[..]),
    ])
    .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    b.append_data(&mut h, "bin/ping", &b"pi\n"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let layout = t.join("layout");
    std::fs::create_dir(&layout).unwrap();
    oci_layout(&layout, &[(tar, Comp::Gzip)]);
    let p = prepare(layout.to_str().unwrap(), &t.join("cache")).unwrap();
    let ea = debugfs(&p.rootfs, "ea_list /bin/ping");
    assert!(ea.contains("user.note") && ea.contains("hello"), "{ea}");
    assert!(ea.contains("security.capability"), "{ea}");
    let s = stat(&p.rootfs, "/bin/ping");
    assert_eq!(
        (field(&s, "User:"), field(&s, "Group:")),
        ("3000000", "3000001"),
        "{s}"
    );
    assert_eq!(mode(&p.rootfs, "/bin/ping"), 0o755);
}

/// A FIFO where a blob or `index.json` should be is refused at once, never waited on.
#[test]
fn a_fifo_as_a_blob_or_index_is_refused_without_blocking() {
    require_root();
    let t = Tmp::new("fifo");
    let layout = t.join("layout");
    std::fs::create_dir(&layout).unwrap();
    let desc = oci_layout(&layout, &[(layer(&[E::File("a", b"a\n")]), Comp::None)]);
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(&desc["digest"].as_str().unwrap()[7..]),
        )
        .unwrap(),
    )
    .unwrap();
    let blob = layout
        .join("blobs/sha256")
        .join(&m["layers"][0]["digest"].as_str().unwrap()[7..]);
    let mkfifo = |p: &Path| {
        std::fs::remove_file(p).unwrap();
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path alive for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    };
    mkfifo(&blob);
    let (tx, rx) = std::sync::mpsc::channel();
    let (l, cache) = (layout.clone(), t.join("cache"));
    std::thread::spawn(move || {
        let r = prepare(l.to_str().unwrap(), &cache)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
        mkfifo(&l.join("index.json"));
        let r = prepare(l.to_str().unwrap(), &cache)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    for what in ["layer blob", "index.json"] {
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{what}: prepare blocked on a FIFO"));
        let e = r.unwrap_err();
        assert!(e.contains("not a regular file"), "{what}: {e}");
    }
}

/// Docker 25's `docker save` layout (config and layers under `blobs/sha256/`) and older
/// Docker's shared layers (a `layer.tar` that is a symbolic link to another).
#[test]
fn docker_archive_with_blobs_and_symlinked_layers() {
    require_root();
    let t = Tmp::new("docker25");
    let l0 = layer(&[E::File("base", b"base\n"), E::File("gone", b"x\n")]);
    let l1 = layer(&[E::File("top", b"top\n"), E::File(".wh.gone", b"")]);
    let (l1gz, _) = compress(&l1, Comp::Gzip);
    let (h0, h1) = (sha256_hex(&l0), sha256_hex(&l1gz));
    let cfg = config_json(&[
        format!("sha256:{h0}"),
        format!("sha256:{}", sha256_hex(&l1)),
    ]);
    let hc = sha256_hex(&cfg);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data).unwrap();
    };
    add(&format!("blobs/sha256/{h0}"), &l0);
    add(&format!("blobs/sha256/{h1}"), &l1gz);
    add(&format!("blobs/sha256/{hc}"), &cfg);
    let manifest = serde_json::json!([{ "Config": format!("blobs/sha256/{hc}"), "RepoTags": ["app:2"],
        "Layers": ["old/layer.tar", format!("blobs/sha256/{h1}")] }]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "old/layer.tar", format!("../blobs/sha256/{h0}"))
        .unwrap();
    let path = t.join("app.tar");
    std::fs::write(&path, b.into_inner().unwrap()).unwrap();
    let p = prepare(&format!("{}:app:2", path.display()), &t.join("cache")).unwrap();
    assert_eq!(p.digest, Some(format!("sha256:{hc}")));
    assert_eq!(cat(&p.rootfs, "/base"), "base\n");
    assert_eq!(cat(&p.rootfs, "/top"), "top\n");
    assert!(!exists(&p.rootfs, "/gone"));
}

/// A docker-archive member with a 2 MiB long name (the tar crate would keep it whole in
/// memory; a hostile one could claim gigabytes) is refused.
#[test]
fn docker_archive_with_a_huge_long_name_is_refused() {
    let t = Tmp::new("dockerlong");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(2);
    b.append_data(&mut h, "manifest.json", &b"[]"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(2 << 20);
    h.set_cksum();
    b.append(&h, &vec![b'a'; 2 << 20][..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    b.append_data(&mut h, "x", &b"x"[..]).unwrap();
    let path = t.join("long.tar");
    std::fs::write(&path, b.into_inner().unwrap()).unwrap();
    let e = prepare(path.to_str().unwrap(), &t.join("cache")).unwrap_err();
    assert!(e.to_string().contains("exceed 1048576 bytes"), "{e}");
}
