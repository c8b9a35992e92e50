//! Fuzz targets for every guest-facing parser of cinder, one module each, each a plain
//! `pub fn run(data: &[u8])` that decodes the bytes into a hostile setup and drives the real
//! device code through its public entry points.
//!
//! * On stable, `tests/fuzz.rs` replays the committed corpus under `fuzz/corpus/<target>/`
//!   and then a bounded number of seeded mutations per target (`CINDER_FUZZ_ITERS`), so CI
//!   runs every target on every test run.
//! * For long runs, `fuzz/cargo-fuzz/` wraps the same functions in `fuzz_target!` (nightly).
//!
//! A target asserts only what must hold for any input: no panic, no hang, and the
//! invariants each module states (e.g. a used length never exceeds what the chain allows).

// Truncation is what this crate does on purpose, everywhere: it decodes random bytes into
// narrower fields, splits 64-bit addresses into the transport's 32-bit register halves, and
// builds seeds from small constants. Checked conversions would only add noise here.
#![allow(clippy::cast_possible_truncation)]

pub mod api;
pub mod blk;
pub mod console;
pub mod host;
pub mod i8042;
pub mod input;
pub mod loader;
pub mod mmio;
pub mod mutate;
pub mod net;
pub mod rng;
pub mod serial;
pub mod virtio;
pub mod vsock;

/// One fuzz target: its name (the corpus directory), its entry point and its seeds.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Name, also the corpus directory under `fuzz/corpus/`.
    pub name: &'static str,
    /// Runs one input.
    pub run: fn(&[u8]),
    /// The generated seeds (written to the corpus by `gen-corpus`).
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Mutations per test run by default (each target takes a few seconds in debug).
    pub default_iters: u64,
    /// Writes a random plausible input (a quarter of the runs use it instead of mutating
    /// the corpus), for targets that have one.
    pub generate: Option<fn(&mut mutate::Rng) -> Vec<u8>>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "virtio_blk",
        run: blk::run,
        seeds: blk::seeds,
        default_iters: 9000,
        generate: Some(blk::generate),
    },
    Target {
        name: "virtio_net",
        run: net::run,
        seeds: net::seeds,
        default_iters: 4500,
        generate: Some(net::generate),
    },
    Target {
        name: "virtio_vsock",
        run: vsock::run,
        seeds: vsock::seeds,
        default_iters: 3000,
        generate: Some(vsock::generate),
    },
    Target {
        name: "virtio_console",
        run: console::run,
        seeds: console::seeds,
        default_iters: 9000,
        generate: Some(console::generate),
    },
    Target {
        name: "virtio_rng",
        run: rng::run,
        seeds: rng::seeds,
        default_iters: 12000,
        generate: Some(rng::generate),
    },
    Target {
        name: "virtio_mmio",
        run: mmio::run,
        seeds: mmio::seeds,
        default_iters: 12000,
        generate: Some(rng::generate),
    },
    Target {
        name: "i8042",
        run: i8042::run,
        seeds: i8042::seeds,
        default_iters: 100000,
        generate: None,
    },
    Target {
        name: "serial",
        run: serial::run,
        seeds: serial::seeds,
        default_iters: 100000,
        generate: None,
    },
    Target {
        name: "kernel_loader",
        run: loader::run,
        seeds: loader::seeds,
        default_iters: 60000,
        generate: None,
    },
    Target {
        name: "api_http",
        run: api::http,
        seeds: api::http_seeds,
        default_iters: 100000,
        generate: None,
    },
    Target {
        name: "api_config_file",
        run: api::config_file,
        seeds: api::config_seeds,
        default_iters: 100000,
        generate: None,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
