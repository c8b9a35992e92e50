//! Every fuzz target on stable: the committed corpus, then `CINDER_FUZZ_ITERS` seeded
//! mutations (default: each target's own count, a few seconds in debug). An input that
//! panics is written to `target/fuzz-failures/<target>/` and named in the failure; one that
//! runs for more than `CINDER_FUZZ_HANG_SECS` (default 60) aborts the test process with its
//! name and bytes, since a hang cannot be caught.
//!
//! Reproduce: `CINDER_FUZZ_ONLY=<n> cargo test -p cinder-fuzz --test fuzz <target>` runs just
//! mutation number n (`CINDER_FUZZ_NO_CORPUS=1`: without replaying the corpus first);
//! `CINDER_FUZZ_INPUT=<file>` runs one file.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cinder_fuzz::{mutate, target};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    entries
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.display().to_string(), data)
        })
        .collect()
}

/// Watches the current input: aborts the process when one runs too long.
struct Watchdog {
    current: Arc<Mutex<(String, Vec<u8>, Instant)>>,
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(name: &'static str, limit: Duration) -> Self {
        let current = Arc::new(Mutex::new((String::new(), Vec::new(), Instant::now())));
        let done = Arc::new(AtomicBool::new(false));
        let (c, d) = (current.clone(), done.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let guard = c.lock().unwrap_or_else(|p| p.into_inner());
                if guard.2.elapsed() > limit {
                    let file = save_failure(name, &guard.0, &guard.1);
                    // Straight to stderr: the test harness's capture dies with the process.
                    let _ = writeln!(
                        std::io::stderr(),
                        "HANG: {name}: input {} ran for more than {limit:?}; saved as {}",
                        guard.0,
                        file.display()
                    );
                    std::process::abort();
                }
            }
        });
        Watchdog { current, done }
    }

    fn set(&self, label: &str, data: &[u8]) {
        let mut g = self.current.lock().unwrap_or_else(|p| p.into_inner());
        *g = (label.to_string(), data.to_vec(), Instant::now());
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

fn save_failure(name: &str, label: &str, data: &[u8]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/fuzz-failures")
        .join(name);
    let _ = std::fs::create_dir_all(&dir);
    let base = label.rsplit('/').next().unwrap_or(label);
    let file = dir.join(base.replace(' ', "_"));
    let _ = std::fs::write(&file, data);
    file
}

fn fuzz(name: &str) {
    let t = target(name).unwrap_or_else(|| panic!("no target {name}"));
    let hang = Duration::from_secs(env_u64("CINDER_FUZZ_HANG_SECS").unwrap_or(60));
    let dog = Watchdog::start(t.name, hang);
    let slowest = std::cell::RefCell::new((Duration::ZERO, String::new()));
    let run_one = |label: &str, data: &[u8]| {
        dog.set(label, data);
        let began = Instant::now();
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| (t.run)(data))) {
            let file = save_failure(name, label, data);
            eprintln!("{name}: input {label} failed; saved as {}", file.display());
            std::panic::resume_unwind(e);
        }
        let took = began.elapsed();
        let mut s = slowest.borrow_mut();
        if took > s.0 {
            *s = (took, label.to_string());
        }
    };
    if let Ok(path) = std::env::var("CINDER_FUZZ_INPUT") {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        run_one(&path, &data);
        return;
    }
    let start = Instant::now();
    let entries = corpus(name);
    assert!(!entries.is_empty(), "{name}: empty corpus");
    if std::env::var_os("CINDER_FUZZ_NO_CORPUS").is_none() {
        for (label, data) in &entries {
            run_one(label, data);
        }
    }
    let seeds: Vec<Vec<u8>> = entries.into_iter().map(|(_, d)| d).collect();
    let iters = env_u64("CINDER_FUZZ_ITERS").unwrap_or(t.default_iters);
    let range = match env_u64("CINDER_FUZZ_ONLY") {
        Some(n) => n..n + 1,
        None => 0..iters,
    };
    let mut count = 0u64;
    for n in range {
        // A quarter of the runs (for targets that have a generator) write a fresh random
        // program instead of mutating the corpus; both are fixed by (target, n).
        let data = match t.generate {
            Some(generate) if n % 4 == 3 => generate(&mut mutate::Rng::new(
                mutate::hash(name) ^ n.rotate_left(32),
            )),
            _ => mutate::mutant(name, n, &seeds),
        };
        run_one(&format!("mutation-{n}"), &data);
        count += 1;
    }
    let (took, label) = slowest.into_inner();
    eprintln!(
        "{name}: {} corpus inputs and {count} mutated or generated inputs in {:.1?} (slowest: {label}, {took:.1?})",
        seeds.len(),
        start.elapsed()
    );
}

#[test]
fn virtio_blk() {
    fuzz("virtio_blk");
}

#[test]
fn virtio_net() {
    fuzz("virtio_net");
}

#[test]
fn virtio_vsock() {
    fuzz("virtio_vsock");
}

#[test]
fn virtio_console() {
    fuzz("virtio_console");
}

#[test]
fn virtio_rng() {
    fuzz("virtio_rng");
}

#[test]
fn virtio_mmio() {
    fuzz("virtio_mmio");
}

#[test]
fn i8042() {
    fuzz("i8042");
}

#[test]
fn serial() {
    fuzz("serial");
}

#[test]
fn kernel_loader() {
    fuzz("kernel_loader");
}

#[test]
fn api_http() {
    fuzz("api_http");
}

#[test]
fn api_config_file() {
    fuzz("api_config_file");
}

/// The committed seeds are what the generators make (run `cargo run -p cinder-fuzz --bin
/// gen-corpus` after changing one).
#[test]
fn corpus_has_the_generated_seeds() {
    for t in cinder_fuzz::TARGETS {
        let entries = corpus(t.name);
        for (i, seed) in (t.seeds)().iter().enumerate() {
            let found = entries.iter().any(|(_, d)| d == seed);
            assert!(
                found,
                "{}: seed {i} is not in the corpus; run gen-corpus",
                t.name
            );
        }
    }
}
