//! `cinder-jailer`: starts one cinder (or any binary) confined, as Firecracker's `jailer` does
//! and with its flags. It knows nothing of KVM.
//!
//! In order: parse and check every flag (nothing is created before all of them are good);
//! close inherited file descriptors; build `<base>/<exec name>/<id>/root` (the binary, its
//! loader and libraries, `--link-file`s, `/dev/kvm`, `/dev/net/tun`, `/dev/userfaultfd`
//! owned by the uid/gid); make the cgroups and write their limits; join the network
//! namespace; enter a new mount namespace and `pivot_root` into the jail; join the cgroups;
//! optionally fork into a new PID namespace; set resource limits; optionally daemonize; drop
//! to the uid/gid with no capabilities and `NO_NEW_PRIVS`; `execve` the binary with an empty
//! environment and `--id <id> --start-time-us <t> --start-time-cpu-us <t>` before the
//! arguments given after `--`. Until the jail is entered, a failure removes what was made.

mod cgroup;
mod chroot;
mod cli;
mod confine;
mod elf;
mod undo;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::process::ExitCode;

use clap::Parser;
use nix::sched::{setns, unshare, CloneFlags};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::{fork, ForkResult};

use crate::cli::Cli;

/// Why the jailer stopped.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    #[error("--exec-file {0}: {1}")]
    ExecFile(std::path::PathBuf, String),
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
    #[error(transparent)]
    Chroot(#[from] chroot::ChrootError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Confine(#[from] confine::ConfineError),
    #[error("--netns {0}: {1}")]
    Netns(std::path::PathBuf, String),
    #[error("cannot open /dev/null: {0}")]
    DevNull(std::io::Error),
    #[error("cannot start a new PID namespace ({0}): {1}")]
    PidNs(&'static str, nix::Error),
    #[error("cannot write the pid file {0}: {1}")]
    PidFile(String, std::io::Error),
}

/// Microseconds on `clock`.
fn micros(clock: ClockId) -> u64 {
    clock_gettime(clock)
        .ok()
        .and_then(|t| {
            let s = u64::try_from(t.tv_sec()).ok()?;
            let ns = u64::try_from(t.tv_nsec()).ok()?;
            Some(s * 1_000_000 + ns / 1000)
        })
        .unwrap_or(0)
}

/// Closes every descriptor above stderr that the jailer inherited.
fn close_inherited_fds() {
    // SAFETY: close_range(2) on descriptors this process owns and does not use (none are open
    // by the Rust runtime at this point besides 0-2); it takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        // Kernels before 5.9: one by one.
        for fd in 3..4096 {
            // SAFETY: as above; closing a descriptor that is not open is EBADF, harmless.
            unsafe { libc::close(fd) };
        }
    }
}

/// A clap error on one line: its message and details without usage and hints.
fn one_line(e: &clap::Error) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
        .map(|l| l.strip_prefix("error: ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> ExitCode {
    let start_us = micros(ClockId::CLOCK_MONOTONIC);
    let start_cpu_us = micros(ClockId::CLOCK_PROCESS_CPUTIME_ID);
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind::{DisplayHelp, DisplayVersion};
            if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            eprintln!("cinder-jailer: {}", one_line(&e));
            return ExitCode::from(2);
        }
    };
    match run(cli, start_us, start_cpu_us) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cinder-jailer: {e}");
            ExitCode::from(1)
        }
    }
}

/// Everything; returns only on failure, or in the parent of a new PID namespace.
fn run(cli: Cli, start_us: u64, start_cpu_us: u64) -> Result<ExitCode, Error> {
    close_inherited_fds();

    // Every check first: nothing exists yet.
    cli::check_id(&cli.id)?;
    match std::fs::metadata(&cli.exec_file) {
        Ok(md) if md.is_file() => {}
        Ok(_) => return Err(Error::ExecFile(cli.exec_file, "not a regular file".into())),
        Err(e) => return Err(Error::ExecFile(cli.exec_file, e.to_string())),
    }
    let exec_name = cli
        .exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| cli::CliError::ExecName(cli.exec_file.clone()))?
        .to_string();
    let version = cli::cgroup_version(&cli.cgroup_version)?;
    let settings = cli
        .cgroups
        .iter()
        .map(|s| cli::cgroup_setting(s))
        .collect::<Result<Vec<_>, _>>()?;
    let parent = cli::parent_cgroup(cli.parent_cgroup.as_deref().unwrap_or(&exec_name))?;
    let limits = cli
        .resource_limits
        .iter()
        .map(|s| cli::resource_limit(s))
        .collect::<Result<Vec<_>, _>>()?;
    chroot::check_base(&cli.chroot_base_dir)?;
    for f in &cli.link_files {
        chroot::check_link_file(f)?;
    }
    let netns: Option<File> = match &cli.netns {
        Some(p) => Some(File::open(p).map_err(|e| Error::Netns(p.clone(), e.to_string()))?),
        None => None,
    };
    let plan = cgroup::plan(version, &settings)?;
    let runtime = elf::runtime_files(&cli.exec_file)?;
    let null: Option<OwnedFd> = if cli.daemonize {
        Some(File::open("/dev/null").map_err(Error::DevNull)?.into())
    } else {
        None
    };

    // Build; undone on failure until the jail is entered.
    let mut undo = undo::Undo::new();
    let root = chroot::root_dir(&cli.chroot_base_dir, &exec_name, &cli.id);
    // An orchestrator may have put the VM's files into the root already: they stay.
    chroot::build(
        &root,
        &chroot::Contents {
            exec: (&cli.exec_file, &exec_name),
            runtime: &runtime,
            links: &cli.link_files,
            uid: cli.uid,
            gid: cli.gid,
        },
        &mut undo,
    )?;
    let mut procs = plan.create(&parent, &cli.id, &mut undo)?;
    if let (Some(f), Some(p)) = (&netns, &cli.netns) {
        setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| Error::Netns(p.clone(), e.to_string()))?;
    }
    drop(netns);
    chroot::enter(&root)?;
    undo.disarm();

    // Inside the jail.
    cgroup::join(&mut procs)?;
    drop(procs);
    let mut args = vec![
        exec_name.clone(),
        "--id".into(),
        cli.id.clone(),
        "--start-time-us".into(),
        start_us.to_string(),
        "--start-time-cpu-us".into(),
        start_cpu_us.to_string(),
    ];
    if cli.new_pid_ns {
        let cpu_us = micros(ClockId::CLOCK_PROCESS_CPUTIME_ID);
        unshare(CloneFlags::CLONE_NEWPID).map_err(|e| Error::PidNs("unshare", e))?;
        // SAFETY: this process has one thread (the jailer starts none), so the child may do
        // anything after fork.
        match unsafe { fork() }.map_err(|e| Error::PidNs("fork", e))? {
            ForkResult::Parent { child } => {
                let path = format!("/{exec_name}.pid");
                std::fs::write(&path, child.to_string()).map_err(|e| Error::PidFile(path, e))?;
                return Ok(ExitCode::SUCCESS);
            }
            ForkResult::Child => {
                args.push("--parent-cpu-time-us".into());
                args.push(cpu_us.to_string());
            }
        }
    }
    confine::rlimits(&limits)?;
    if let Some(n) = &null {
        confine::daemonize(n)?;
    }
    confine::drop_privileges(cli.uid, cli.gid)?;
    args.extend(cli.exec_args);
    match confine::exec(&format!("/{exec_name}"), &args)? {}
}
