//! Builds the probe guest (`resources/probe`, its own Cargo project outside
//! the workspace) with a nested cargo and exports its path to the tests as
//! `CINDER_PROBE_ELF`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// Variables of the outer build that must not leak into the nested one
/// (they would redirect its output, change its flags or wrap its rustc).
const SCRUB: &[&str] = &[
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let repo = manifest
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let probe = repo.join("resources").join("probe");
    let target_dir = repo.join("target").join("probe");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());

    for p in [
        "src",
        "Cargo.toml",
        "build.rs",
        "link.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", probe.join(p).display());
    }

    let mut cmd = Command::new(&cargo);
    // The probe's .cargo/config.toml (target, link flags) applies from its directory.
    cmd.current_dir(&probe)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(probe.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for v in SCRUB {
        cmd.env_remove(v);
    }
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PROFILE_")
            || k.starts_with("CARGO_CFG_")
            || k.starts_with("CARGO_FEATURE_")
        {
            cmd.env_remove(k.as_ref());
        }
    }
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run {cargo} to build the probe: {e}"),
    };
    if !out.status.success() {
        panic!(
            "building the probe failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let elf = target_dir
        .join("x86_64-unknown-linux-gnu")
        .join("release")
        .join("probe");
    assert!(
        elf.exists(),
        "probe build succeeded but {} is missing",
        elf.display()
    );
    println!("cargo:rustc-env=CINDER_PROBE_ELF={}", elf.display());
}
