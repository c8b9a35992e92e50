//! Boot benchmark: cinder and QEMU microvm side by side, booting the same probe guest.
//!
//! For each VMM and each run: time from exec to the first byte on the guest's serial console,
//! time from exec to the probe's exit (i8042 reset ends the VMM), and the VMM process's peak
//! RSS (from wait4's rusage). Prints median / min / max per figure. cinder runs with its
//! seccomp filters (the default) and with `--seccomp off`, alternately, in rows side by side
//! (reported, never asserted).
//!
//! ```text
//! cargo run --release -p cinder-tests --bin bench_boot -- [--runs N] [--memory MIB] [--vcpus N]
//!     [--checks LIST]
//! ```
//! `--checks` is the probe's `probe.run` list (default `boot`; `default` is the probe's own
//! default list, `boot,mem,smp,cpuid,irq,tsc`).
//! QEMU uses KVM when /dev/kvm opens, else TCG (then its figures are not comparable, and the
//! report says so). cinder needs /dev/kvm; without it its rows say why they are missing.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cinder_tests::cinder::cinder_bin;
use cinder_tests::qemu::Accel;

struct Sample {
    first_byte: Duration,
    exit: Duration,
    max_rss_kib: i64,
    ok: bool,
}

fn probe_elf() -> PathBuf {
    cinder_tests::probe::elf_path()
}

/// Spawns `cmd`, times the first stdout byte and the exit, and reads the peak RSS.
fn measure(mut cmd: Command, timeout: Duration) -> Result<Sample, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        let _ = child.kill();
        return Err(format!("pid {} does not fit pid_t", child.id()));
    };
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut first = None;
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            first.get_or_insert_with(|| start.elapsed());
            all.extend_from_slice(&buf[..n]);
        }
        (first, all)
    });
    // Bounded wait: poll wait4 with WNOHANG until the timeout.
    let mut status = 0;
    // SAFETY: rusage is plain data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let exit_time = loop {
        // SAFETY: pid is our child; status and usage are valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break start.elapsed();
        }
        if r < 0 {
            return Err(format!("wait4: {}", std::io::Error::last_os_error()));
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            // SAFETY: as above; reaps the killed child.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            return Err(format!("timed out after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let (first, all) = reader.join().map_err(|_| "reader thread")?;
    let text = String::from_utf8_lossy(&all);
    let ok = text.contains("PROBE DONE") && std::process::ExitStatus::from_raw(status).success();
    Ok(Sample {
        first_byte: first.unwrap_or(exit_time),
        exit: exit_time,
        max_rss_kib: usage.ru_maxrss,
        ok,
    })
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (med, v[0], v[v.len() - 1])
}

fn report(name: &str, samples: &[Sample]) {
    if samples.is_empty() {
        return;
    }
    let bad = samples.iter().filter(|s| !s.ok).count();
    let mut first: Vec<f64> = samples
        .iter()
        .map(|s| s.first_byte.as_secs_f64() * 1e3)
        .collect();
    let mut exit: Vec<f64> = samples.iter().map(|s| s.exit.as_secs_f64() * 1e3).collect();
    let mut rss: Vec<f64> = samples
        .iter()
        .map(|s| s.max_rss_kib as f64 / 1024.0)
        .collect();
    for (label, v, unit) in [
        ("exec -> first serial byte", &mut first, "ms"),
        ("exec -> probe exit", &mut exit, "ms"),
        ("peak RSS", &mut rss, "MiB"),
    ] {
        let (med, min, max) = stats(v);
        println!("{name:<22} {label:<27} median {med:9.2} {unit:<3}  min {min:9.2}  max {max:9.2}");
    }
    if bad > 0 {
        println!(
            "{name:<22} WARNING: {bad} of {} runs did not end with PROBE DONE and exit 0",
            samples.len()
        );
    }
}

fn main() {
    let mut runs = 10usize;
    let mut memory = 128u64;
    let mut vcpus = 1u8;
    let mut checks = "boot".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        match a.as_str() {
            "--runs" => runs = val("--runs").parse().expect("--runs N"),
            "--memory" => memory = val("--memory").parse().expect("--memory MIB"),
            "--vcpus" => vcpus = val("--vcpus").parse().expect("--vcpus N"),
            "--checks" => checks = val("--checks"),
            other => {
                eprintln!("unknown argument {other}; usage: bench_boot [--runs N] [--memory MIB] [--vcpus N] [--checks LIST]");
                std::process::exit(2);
            }
        }
    }
    let probe = probe_elf();
    if checks == "default" {
        checks = "boot,mem,smp,cpuid,irq,tsc".to_string();
    }
    let cmdline = &format!("probe.run={checks}");
    let host = cinder_tests::host::kind();
    let accel = Accel::detect();
    let kvm = accel == Accel::Kvm;
    println!(
        "boot benchmark: probe {} ({runs} runs, {vcpus} vCPU, {memory} MiB, cmdline {cmdline:?}, host kind {})",
        probe.display(),
        host.name()
    );

    let mut cinder_samples = Vec::new();
    let mut cinder_off_samples = Vec::new();
    if kvm {
        for (_, seccomp) in (0..runs).flat_map(|i| [(i, "on"), (i, "off")]) {
            let mut c = Command::new(cinder_bin());
            c.args(["--seccomp", seccomp]);
            c.arg("--kernel").arg(&probe).args([
                "--memory",
                &memory.to_string(),
                "--vcpus",
                &vcpus.to_string(),
                "--cmdline",
                cmdline,
            ]);
            match measure(c, Duration::from_secs(60)) {
                Ok(s) if seccomp == "on" => cinder_samples.push(s),
                Ok(s) => cinder_off_samples.push(s),
                Err(e) => println!("cinder (seccomp {seccomp}) run failed: {e}"),
            }
        }
    }

    let mut qemu_samples = Vec::new();
    for _ in 0..runs {
        let mut c = Command::new("qemu-system-x86_64");
        c.args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,isa-serial=on",
            "-bios",
            "/usr/share/qemu/qboot.rom",
        ])
        .args(accel.args())
        .args(["-m", &memory.to_string(), "-smp", &vcpus.to_string()])
        .args([
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(&probe)
        .args(["-append", cmdline]);
        match measure(c, Duration::from_secs(120)) {
            Ok(s) => qemu_samples.push(s),
            Err(e) => println!("qemu run failed: {e}"),
        }
    }

    println!();
    if kvm {
        report("cinder (seccomp on)", &cinder_samples);
        report("cinder (seccomp off)", &cinder_off_samples);
    } else {
        println!("cinder                 not measured: /dev/kvm cannot be opened on this host");
    }
    report(&format!("qemu microvm ({accel:?})"), &qemu_samples);
    if !kvm {
        println!("note: QEMU ran under TCG (software emulation); its figures are not comparable to a KVM VMM's");
    }
}
