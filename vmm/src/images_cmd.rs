//! `cinder images [--cache-dir DIR] [ls|prune]`: the root filesystems `cinder run` cached
//! (crate `cinder-image`). Dispatched from `main` before the VMM's own flags are parsed, and
//! before any thread or seccomp filter exists: it only reads and removes files of the cache.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// List (the default) or prune the cached root filesystems built from container images.
/// The cache is `${CINDER_CACHE:-$HOME/.cache/cinder}/images`.
#[derive(Parser, Debug)]
#[command(name = "cinder images")]
struct ImagesCli {
    /// The image cache directory (default: ${CINDER_CACHE:-$HOME/.cache/cinder}/images).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the cached root filesystems: digest, size, disk use, creation time, source.
    Ls,
    /// Remove every cached root filesystem (one being built is skipped). A running VM keeps
    /// the file it has open until it exits.
    Prune,
}

/// Sizes as `docker images` shows them.
fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC (the civil-from-days algorithm).
fn utc(secs: u64) -> String {
    let days = i64::try_from(secs / 86400).unwrap_or(0);
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Runs `cinder images ARGS` (`args` without the program name and `images`).
pub fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let cli = match ImagesCli::try_parse_from(
        std::iter::once(OsString::from("cinder images")).chain(args),
    ) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let Some(dir) = cli.cache_dir.or_else(cinder_image::default_cache_dir) else {
        eprintln!(
            "cinder images: no cache directory: set CINDER_CACHE or HOME, or pass --cache-dir"
        );
        return ExitCode::from(1);
    };
    match cli.cmd.unwrap_or(Cmd::Ls) {
        Cmd::Ls => match cinder_image::list(&dir) {
            Ok(images) => {
                println!(
                    "{:<71}  {:>10}  {:>10}  {:<19}  SOURCE",
                    "DIGEST", "SIZE", "ON DISK", "CREATED (UTC)"
                );
                for i in images {
                    println!(
                        "{:<71}  {:>10}  {:>10}  {:<19}  {}",
                        i.digest,
                        human(i.size),
                        human(i.disk_bytes),
                        utc(i.created),
                        i.source
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cinder images: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Prune => match cinder_image::prune(&dir) {
            Ok(r) => {
                for d in &r.removed {
                    println!("removed {d}");
                }
                for d in &r.busy {
                    println!("skipped {d} (being built)");
                }
                println!(
                    "{} image(s) removed, {} freed",
                    r.removed.len(),
                    human(r.freed_bytes)
                );
                // `cinder run`'s templates (snapshots of a booted agent) go too.
                match vmm::run::template::prune() {
                    Ok(n) => println!("{n} run template(s) removed"),
                    Err(e) => {
                        eprintln!("cinder images prune: {e}");
                        return ExitCode::from(1);
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cinder images prune: {e}");
                ExitCode::from(1)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_sizes() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
