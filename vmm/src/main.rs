//! `cinder`: boot a guest kernel in a KVM microVM, from flags, a config file, or the API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use api::config::{ConfigError, VmConfig};
use api::controller::PreBootController;
use api::handler::api_channel;
use api::model::{
    BootSource, CacheType, Drive, EntropyDevice, IoEngine, MachineConfiguration, NetworkInterface,
    Vsock,
};
use api::paths::PathPolicy;
use api::server::ApiServer;
use arch::loader::ProtocolChoice;
use clap::{Parser, ValueEnum};
use vmm::exit::ExitReason;
use vmm::options::{ConsoleSpec, CpuTemplate, VirtioConsoleHost, VmmOptions};
use vmm::runtime::{ApiState, Runtime, DEFAULT_CMDLINE};
use vmm::seccomp::{SeccompMode, ThreadKind};
use vmm::signal::SignalFd;

mod images_cmd;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BootProtocolArg {
    /// PVH when the ELF has a PVH note, else the Linux 64-bit protocol.
    Auto,
    /// PVH (32-bit entry, hvm_start_info); the ELF must have the note.
    Pvh,
    /// Linux x86_64 64-bit boot protocol (long mode, boot_params).
    Linux64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ConsoleArg {
    /// COM1 (8250) on stdin/stdout.
    Serial,
    /// A virtio-console.
    Virtio,
    /// No console.
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CpuTemplateArg {
    /// The host CPU as KVM supports it, with cinder's topology.
    Host,
    /// Like host, hiding KVM PV features that use hypercalls (PV IPI, sched yield, unhalt).
    NoPvHypercalls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SeccompArg {
    /// Each thread gets its own allow-list; a forbidden system call ends cinder (exit 148).
    On,
    /// No filters (prints a warning).
    Off,
    /// Filters that allow a forbidden system call and have the kernel log it (audit log or
    /// dmesg): for finding what a new feature needs.
    Log,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// `--version`: cinder's own version and the Firecracker API version it implements.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (Firecracker API 1.16.1)");

/// cinder: a KVM microVM monitor. Boots a guest kernel with a serial console on stdin and
/// stdout, from flags (--kernel ...), from a Firecracker-style config file (--config-file),
/// or configured through a Firecracker-compatible API socket (--api-sock). A guest reset ends
/// cinder with exit code 0; Ctrl-A x quits from a terminal.
///
/// Exit codes: 0 guest reset or console quit; 1 bad input or VMM error (before or while
/// running); 2 bad command line; 3 the guest hit a fatal KVM error (registers are printed);
/// 128+N ended by signal N (SIGINT 130, SIGTERM 143); 148 a thread made a system call its
/// seccomp filter forbids (one line on stderr names the thread and the call; see --seccomp).
///
/// `cinder run [OPTIONS] IMAGE [--] CMD [ARGS...]` runs one command in a new microVM, like
/// `docker run`, with its own exit codes: `cinder run --help`.
#[derive(Parser, Debug)]
#[command(name = "cinder", version = VERSION, disable_version_flag = true)]
struct Cli {
    /// Guest kernel: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH", conflicts_with = "config_file")]
    kernel: Option<PathBuf>,

    /// Initial ramdisk, placed as high in low memory as the kernel allows.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,

    /// Kernel command line (at most 2047 bytes, including what cinder appends for devices).
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,

    /// Number of vCPUs (1 to 254, and no more than KVM allows on this host; the same rule as
    /// the API's machine-config).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,

    /// Guest memory in MiB. Above 3072 MiB, RAM continues at 4 GiB past the MMIO gap.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    memory: u64,

    /// Restore the microVM of a snapshot instead of booting one: its state file and memory
    /// file (mapped privately: never written); `resume` runs it at once, otherwise it stays
    /// Paused (resume it with `PATCH /vm`). Its configuration comes from the snapshot, with
    /// the vsock device on a new socket (`vsock=PATH`) and interfaces on new TAPs
    /// (`tap=ID:NAME`, repeatable), as `PUT /snapshot/load`'s overrides, for clones; `track`
    /// tracks dirty pages for a later Diff snapshot (`track_dirty_pages`); `uffd=SOCKET`
    /// instead of `mem=` takes guest memory from a page-fault handler (`mem_backend` Uffd);
    /// `clock_realtime` advances the guest's KVM clock by the wall time since the snapshot.
    #[arg(
        long,
        value_name = "state=PATH,mem=PATH|uffd=SOCKET[,resume][,track][,clock_realtime][,vsock=PATH][,tap=ID:NAME]",
        value_parser = parse_restore_arg,
        conflicts_with_all = ["kernel", "config_file"]
    )]
    restore: Option<vmm::runtime::RestoreSpec>,

    /// On SIGUSR1, pause the VM and write a snapshot (no API needed): its state file, its
    /// memory file, `diff` for a Diff snapshot (needs dirty tracking). The VM then stays Paused.
    #[arg(long, value_name = "state=PATH,mem=PATH[,diff]", value_parser = parse_snapshot_arg)]
    snapshot_on_signal: Option<api::model::SnapshotCreateParams>,

    /// A virtio-blk drive backed by a raw image: path=FILE[,id=NAME][,ro][,root]. Repeatable;
    /// the guest sees them as /dev/vda, /dev/vdb, ... with the root drive first. `root`
    /// appends root=/dev/vda (and ro for a read-only drive) to the command line.
    #[arg(long, value_name = "SPEC", requires = "kernel", value_parser = parse_drive_arg)]
    drive: Vec<DriveArg>,

    /// Let a drive (--drive, the config file's drives, PUT /drives) be a host block device.
    /// Without it only regular files back drives: a block device is refused, with one line.
    #[arg(long)]
    allow_block_devices: bool,

    /// Confine what cinder opens, creates or binds once started (kernel, initrd, drive images,
    /// log and metrics files, vsock sockets) to files beneath DIR, enforced by the kernel
    /// (Landlock); the KVM device and /dev/net/tun stay reachable. A path outside DIR is
    /// refused when it is given. Put the API socket beneath DIR too.
    #[arg(long, value_name = "DIR")]
    confine_paths: Option<PathBuf>,

    /// A virtio-net device on an existing TAP interface: tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,id=NAME].
    /// Repeatable. Without mac= the MAC is derived from the id and tap name (stable). cinder
    /// does not configure the host network.
    #[arg(long, value_name = "SPEC", requires = "kernel", value_parser = parse_net_arg)]
    net: Vec<NetArg>,

    /// A virtio-rng entropy device fed from getrandom(2).
    #[arg(long, requires = "kernel")]
    rng: bool,

    /// A virtio-balloon device: amount_mib=N[,deflate_on_oom][,stats_polling_interval_s=N]
    /// [,free_page_reporting] (as PUT /balloon; the target changes with PATCH /balloon).
    #[arg(long, value_name = "SPEC", requires = "kernel", value_parser = parse_balloon_arg)]
    balloon: Option<api::model::Balloon>,

    /// A virtio-vsock device: cid=N,uds=PATH (CID 3 or more). Host clients connect to PATH
    /// and send `CONNECT <port>`; guest connections to host port P go to PATH_P.
    #[arg(long, value_name = "SPEC", requires = "kernel", value_parser = parse_vsock_arg)]
    vsock: Option<VsockArg>,

    /// The console: serial (COM1 on stdin/stdout), virtio (a virtio-console, hvc0 in Linux;
    /// COM1 is then off unless the virtio-console is redirected), or none.
    #[arg(long, value_enum, value_name = "KIND", default_value = "serial")]
    console: ConsoleArg,

    /// With --console virtio: write the guest's console output to this file (no input).
    #[arg(long, value_name = "PATH", conflicts_with = "console_sock")]
    console_out: Option<PathBuf>,

    /// The most bytes written to the --console-out file (K, M, G suffixes: binary units;
    /// 0: no limit). The guest's first output is kept, then one line says the rest was
    /// dropped.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "64M")]
    console_out_max_size: u64,

    /// The most bytes written to a log file (--log-path or PUT /logger on a regular file;
    /// 0: no limit). Past it one line says so and further lines are dropped and counted
    /// (metrics: logger.missed_log_count). A named pipe has no limit.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "64M")]
    log_max_size: u64,

    /// The most bytes written to a metrics file (0: no limit); past it, lines are dropped
    /// (metrics: metrics.sink_errors). A named pipe has no limit.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, default_value = "64M")]
    metrics_max_size: u64,

    /// With --console virtio: connect the console both ways to this listening Unix socket.
    #[arg(long, value_name = "PATH")]
    console_sock: Option<PathBuf>,

    /// Boot protocol for ELF kernels (a bzImage always uses the 64-bit protocol).
    #[arg(long, value_enum, value_name = "PROTOCOL", default_value = "auto")]
    boot_protocol: BootProtocolArg,

    /// CPU template: what CPUID tells the guest.
    #[arg(long, value_enum, value_name = "TEMPLATE", default_value = "host")]
    cpu_template: CpuTemplateArg,

    /// Log level for cinder's own messages on stderr. When --level is given too, --level
    /// (Firecracker's flag) wins.
    #[arg(long, value_enum, value_name = "LEVEL", default_value = "warn")]
    log_level: LogLevel,

    /// seccomp filters, one allow-list per thread kind (vmm, api, vcpu, devices, console-out),
    /// installed by each thread before it handles guest or client input. A forbidden system
    /// call ends cinder with exit code 148 and one line naming the thread and the call.
    #[arg(long, value_enum, value_name = "MODE", default_value = "on")]
    seccomp: SeccompArg,

    /// KVM device to use.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", hide = true)]
    kvm_device: String,

    // Firecracker v1.16.1's flags, with Firecracker's meaning (a manager that spawns
    // `firecracker` can spawn cinder). Each help line says whether cinder implements it.
    /// [implemented] Serve the Firecracker-compatible API on this Unix socket (before and
    /// after boot).
    #[arg(long, value_name = "PATH", conflicts_with = "no_api", help_heading = FC_FLAGS)]
    api_sock: Option<PathBuf>,

    /// [refused: cinder has no boot-timer device] Firecracker's boot-timer device.
    #[arg(long, help_heading = FC_FLAGS)]
    boot_timer: bool,

    /// [implemented] Boot from a Firecracker JSON config file (boot-source, machine-config,
    /// drives, logger, metrics, ...), at once.
    #[arg(long, value_name = "FILE", help_heading = FC_FLAGS)]
    config_file: Option<PathBuf>,

    /// [implemented] Print a snapshot state file's data format version (after checking it as a
    /// load would: magic, version, size, CRC), then exit.
    #[arg(long, value_name = "PATH", help_heading = FC_FLAGS)]
    describe_snapshot: Option<PathBuf>,

    /// [accepted, no PCI: devices stay on virtio-mmio, with one warning] Firecracker's PCIe
    /// transport.
    #[arg(long, help_heading = FC_FLAGS)]
    enable_pci: bool,

    /// [implemented] Largest API request body, in bytes (cinder's default 65536); a larger
    /// body is a 400.
    #[arg(long, value_name = "BYTES", value_parser = parse_payload_size, help_heading = FC_FLAGS)]
    http_api_max_payload_size: Option<usize>,

    /// [implemented] The instance id, in GET / and in each log line: 1 to 64 alphanumerics
    /// or '-' (default cinder-PID).
    #[arg(long, value_name = "ID", help_heading = FC_FLAGS)]
    id: Option<String>,

    /// [implemented] Logger level, as PUT /logger: Off, Error, Warning (or Warn), Info,
    /// Debug, Trace (any case). Wins over --log-level.
    #[arg(long, value_name = "LEVEL", help_heading = FC_FLAGS)]
    level: Option<String>,

    /// [implemented] Send the log to this file or named pipe, as PUT /logger's log_path.
    #[arg(long, value_name = "PATH", help_heading = FC_FLAGS)]
    log_path: Option<PathBuf>,

    /// [refused: cinder has no MMDS] A JSON file of metadata for the MMDS.
    #[arg(long, value_name = "PATH", help_heading = FC_FLAGS)]
    metadata: Option<PathBuf>,

    /// [implemented] Write metrics lines to this file or named pipe, as PUT /metrics (which
    /// is then refused: the destination is set once).
    #[arg(long, value_name = "PATH", help_heading = FC_FLAGS)]
    metrics_path: Option<PathBuf>,

    /// [refused: cinder has no MMDS] The MMDS data store limit, in bytes.
    #[arg(long, value_name = "BYTES", help_heading = FC_FLAGS)]
    mmds_size_limit: Option<String>,

    /// [implemented] Log only records of this module path, as PUT /logger's module.
    #[arg(long, value_name = "MODULE", help_heading = FC_FLAGS)]
    module: Option<String>,

    /// [implemented] Run without an API socket (needs --config-file or --kernel).
    #[arg(long, help_heading = FC_FLAGS)]
    no_api: bool,

    /// [implemented] Run without seccomp filters: --seccomp off (with a warning).
    #[arg(long, conflicts_with = "seccomp", help_heading = FC_FLAGS)]
    no_seccomp: bool,

    /// [implemented] The parent's CPU time, in microseconds, added to the metrics'
    /// api_server.process_startup_time_cpu_us.
    #[arg(long, value_name = "US", help_heading = FC_FLAGS)]
    parent_cpu_time_us: Option<u64>,

    /// [implemented] Firecracker's compiled seccomp filters (seccompiler-bin output, at most
    /// 100000 bytes) instead of cinder's: its "vmm" filter on the control loop, the device loop
    /// and the console writer, "api" on the API thread, "vcpu" on each vCPU.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["seccomp", "no_seccomp"], help_heading = FC_FLAGS)]
    seccomp_filter: Option<PathBuf>,

    /// [implemented] Show the level in each log line, as PUT /logger's show_level.
    #[arg(long, help_heading = FC_FLAGS)]
    show_level: bool,

    /// [implemented] Show the file and line of each log record, as PUT /logger's
    /// show_log_origin.
    #[arg(long, help_heading = FC_FLAGS)]
    show_log_origin: bool,

    /// [implemented] Print the snapshot format version this cinder writes, then exit.
    #[arg(long, help_heading = FC_FLAGS)]
    snapshot_version: bool,

    /// [implemented] Process start CPU time (CLOCK_PROCESS_CPUTIME_ID, microseconds): the
    /// metrics' api_server.process_startup_time_cpu_us counts from it.
    #[arg(long, value_name = "US", help_heading = FC_FLAGS)]
    start_time_cpu_us: Option<u64>,

    /// [implemented] Process start time (CLOCK_MONOTONIC, microseconds): the metrics'
    /// api_server.process_startup_time_us counts from it to the API socket being ready.
    #[arg(long, value_name = "US", help_heading = FC_FLAGS)]
    start_time_us: Option<u64>,

    /// [implemented] Print cinder's version and the Firecracker API version it implements.
    #[arg(short = 'V', long, action = clap::ArgAction::Version, help_heading = FC_FLAGS)]
    version: Option<bool>,
}

/// The help group of Firecracker's own flags.
const FC_FLAGS: &str = "Firecracker v1.16.1 flags";

/// `--http-api-max-payload-size`: a byte count of at least 1.
fn parse_payload_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1 byte".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a byte count: {e}")),
    }
}

/// A byte count with an optional binary suffix: 4096, 64K, 64M, 1G.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_uppercase()),
        _ => (s, 'B'),
    };
    let shift = match unit {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        other => return Err(format!("unknown unit {other:?}: use K, M or G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("not a byte count: {e}"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

/// Firecracker's rule for an instance id (`--id`): 1 to 64 bytes, each character
/// alphanumeric or '-'; its messages.
fn validate_instance_id(id: &str) -> Result<(), String> {
    const MIN: usize = 1;
    const MAX: usize = 64;
    if id.len() < MIN || id.len() > MAX {
        return Err(format!(
            "Invalid len ({});  the length must be between {MIN} and {MAX}",
            id.len()
        ));
    }
    match id
        .chars()
        .enumerate()
        .find(|(_, c)| !(*c == '-' || c.is_alphanumeric()))
    {
        Some((i, c)) => Err(format!("Invalid char ({c}) at position {i}")),
        None => Ok(()),
    }
}

/// The Firecracker flags cinder does not implement: the first one given, as the one line
/// cinder exits with.
fn refused_flag(cli: &Cli) -> Option<&'static str> {
    [
        (
            cli.metadata.is_some(),
            "--metadata: cinder has no MMDS (microVM metadata service)",
        ),
        (
            cli.mmds_size_limit.is_some(),
            "--mmds-size-limit: cinder has no MMDS (microVM metadata service)",
        ),
        (
            cli.boot_timer,
            "--boot-timer: cinder has no boot-timer device",
        ),
    ]
    .into_iter()
    .find_map(|(given, msg)| given.then_some(msg))
}

/// The logger configuration of Firecracker's logger flags, as `PUT /logger` would take it;
/// `None` when none is given. A bad --level is refused with the API's message.
fn logger_from_flags(cli: &Cli) -> Result<Option<api::model::Logger>, String> {
    let level = match &cli.level {
        None => None,
        Some(l) => Some(api::model::LogLevel::parse(l).ok_or_else(|| {
            format!(
                "--level {l}: unknown log level, expected one of Error, Warning, Info, Debug, \
                 Trace, Off"
            )
        })?),
    };
    let cfg = api::model::Logger {
        level,
        log_path: cli
            .log_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        show_level: cli.show_level.then_some(true),
        show_log_origin: cli.show_log_origin.then_some(true),
        module: cli.module.clone(),
    };
    Ok((cfg != api::model::Logger::default()).then_some(cfg))
}

/// Microseconds on `clock` (0 if it cannot be read).
fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which we own, and reads nothing else.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let micros = u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000;
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

/// Firecracker's process start-up times, from `--start-time-us`, `--start-time-cpu-us` and
/// `--parent-cpu-time-us`, measured now (when the API socket is ready).
fn startup_times(cli: &Cli) -> (Option<u64>, Option<u64>) {
    let wall = cli
        .start_time_us
        .map(|t| clock_us(libc::CLOCK_MONOTONIC).saturating_sub(t));
    let cpu = cli.start_time_cpu_us.map(|t| {
        clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
            .saturating_sub(t)
            .saturating_add(cli.parent_cpu_time_us.unwrap_or(0))
    });
    (wall, cpu)
}

/// `--drive path=FILE[,id=NAME][,ro][,root][,io_engine=sync|async|auto]`, parsed by clap (a
/// malformed spec is a usage error, exit 2). Its values are checked by the same rules as the
/// API's `PUT /drives`.
#[derive(Clone, Debug)]
struct DriveArg {
    path: String,
    id: Option<String>,
    ro: bool,
    root: bool,
    io_engine: IoEngine,
}

/// `--snapshot-on-signal state=PATH,mem=PATH[,diff]`.
fn parse_snapshot_arg(spec: &str) -> Result<api::model::SnapshotCreateParams, String> {
    const FORM: &str = "state=PATH,mem=PATH[,diff]";
    let (mut state, mut mem, mut diff) = (None, None, false);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("state", v)) if !v.is_empty() => state = Some(v.to_string()),
            Some(("mem", v)) if !v.is_empty() => mem = Some(v.to_string()),
            None if part == "diff" => diff = true,
            _ => return Err(format!("unknown or empty part {part:?} (expected {FORM})")),
        }
    }
    Ok(api::model::SnapshotCreateParams {
        snapshot_path: state.ok_or(format!("state=PATH is required ({FORM})"))?,
        mem_file_path: mem.ok_or(format!("mem=PATH is required ({FORM})"))?,
        snapshot_type: Some(if diff {
            api::model::SnapshotType::Diff
        } else {
            api::model::SnapshotType::Full
        }),
    })
}

/// `--restore state=PATH,mem=PATH[,resume][,track][,clock_realtime][,vsock=PATH][,tap=ID:NAME]
/// [,drive=ID:PATH]...`.
fn parse_restore_arg(spec: &str) -> Result<vmm::runtime::RestoreSpec, String> {
    const FORM: &str =
        "state=PATH,mem=PATH|uffd=SOCKET[,resume][,track][,clock_realtime][,vsock=PATH][,tap=ID:NAME][,drive=ID:PATH]";
    let (mut state, mut mem, mut resume, mut vsock) = (None, None, false, None);
    let (mut track, mut uffd, mut clock_realtime) = (false, false, false);
    let (mut taps, mut drives) = (Vec::new(), Vec::new());
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("state", v)) if !v.is_empty() => state = Some(PathBuf::from(v)),
            Some(("mem", v)) if !v.is_empty() => mem = Some(PathBuf::from(v)),
            Some(("uffd", v)) if !v.is_empty() => {
                mem = Some(PathBuf::from(v));
                uffd = true;
            }
            Some(("vsock", v)) if !v.is_empty() => vsock = Some(PathBuf::from(v)),
            Some(("tap", v)) => match v.split_once(':') {
                Some((id, name)) if !id.is_empty() && !name.is_empty() => {
                    taps.push((id.to_string(), name.to_string()))
                }
                _ => return Err(format!("tap={v:?}: expected tap=ID:NAME ({FORM})")),
            },
            Some(("drive", v)) => match v.split_once(':') {
                Some((id, path)) if !id.is_empty() && !path.is_empty() => {
                    drives.push((id.to_string(), PathBuf::from(path)))
                }
                _ => return Err(format!("drive={v:?}: expected drive=ID:PATH ({FORM})")),
            },
            None if part == "resume" => resume = true,
            None if part == "track" => track = true,
            None if part == "clock_realtime" => clock_realtime = true,
            _ => return Err(format!("unknown or empty part {part:?} (expected {FORM})")),
        }
    }
    Ok(vmm::runtime::RestoreSpec {
        state: state.ok_or(format!("state=PATH is required ({FORM})"))?,
        mem: mem.ok_or(format!("mem=PATH or uffd=SOCKET is required ({FORM})"))?,
        resume,
        vsock_uds: vsock,
        net_overrides: taps,
        drive_overrides: drives,
        track_dirty: track,
        uffd,
        clock_realtime,
    })
}

fn parse_drive_arg(spec: &str) -> Result<DriveArg, String> {
    let mut path = None;
    let mut id = None;
    let (mut ro, mut root) = (false, false);
    let mut io_engine = IoEngine::Sync;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("path", v)) if !v.is_empty() => path = Some(v.to_string()),
            Some(("io_engine", "sync")) => io_engine = IoEngine::Sync,
            Some(("io_engine", "async")) => io_engine = IoEngine::Async,
            Some(("io_engine", "auto")) => io_engine = IoEngine::Auto,
            Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
            None if part == "ro" => ro = true,
            None if part == "root" => root = true,
            _ => {
                return Err(format!(
                    "unknown or empty part {part:?} (expected \
                     path=FILE[,id=NAME][,ro][,root][,io_engine=sync|async|auto])"
                ))
            }
        }
    }
    let path = path.ok_or(
        "path=FILE is required (path=FILE[,id=NAME][,ro][,root][,io_engine=sync|async|auto])",
    )?;
    Ok(DriveArg {
        path,
        id,
        ro,
        root,
        io_engine,
    })
}

/// `--net tap=NAME[,mac=..][,id=NAME]`, parsed by clap; values checked as `PUT
/// /network-interfaces` checks them.
#[derive(Clone, Debug)]
struct NetArg {
    tap: String,
    mac: Option<String>,
    id: Option<String>,
}

fn parse_net_arg(spec: &str) -> Result<NetArg, String> {
    let mut tap = None;
    let mut mac = None;
    let mut id = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
            Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
            Some(("mac", v)) if !v.is_empty() => mac = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "unknown or empty part {part:?} (expected tap=NAME[,mac=..][,id=NAME])"
                ))
            }
        }
    }
    let tap = tap.ok_or("tap=NAME is required (tap=NAME[,mac=..][,id=NAME])")?;
    Ok(NetArg { tap, mac, id })
}

/// `--balloon amount_mib=N[,deflate_on_oom][,stats_polling_interval_s=N][,free_page_reporting]`,
/// parsed by clap; the values are checked as `PUT /balloon` checks them.
fn parse_balloon_arg(spec: &str) -> Result<api::model::Balloon, String> {
    const FORM: &str =
        "amount_mib=N[,deflate_on_oom][,stats_polling_interval_s=N][,free_page_reporting]";
    let mut b = api::model::Balloon::default();
    let mut amount = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("amount_mib", v)) => {
                amount = Some(
                    v.parse::<u32>()
                        .map_err(|_| format!("amount_mib {v:?} is not a number ({FORM})"))?,
                )
            }
            Some(("stats_polling_interval_s", v)) => {
                b.stats_polling_interval_s = v.parse::<u16>().map_err(|_| {
                    format!("stats_polling_interval_s {v:?} is not a number 0-65535 ({FORM})")
                })?
            }
            None if part == "deflate_on_oom" => b.deflate_on_oom = true,
            None if part == "free_page_reporting" => b.free_page_reporting = true,
            _ => return Err(format!("unknown or empty part {part:?} (expected {FORM})")),
        }
    }
    b.amount_mib = amount.ok_or_else(|| format!("amount_mib=N is required ({FORM})"))?;
    Ok(b)
}

/// `--vsock cid=N,uds=PATH`, parsed by clap; values checked as `PUT /vsock` checks them.
#[derive(Clone, Debug)]
struct VsockArg {
    cid: u32,
    uds: String,
}

fn parse_vsock_arg(spec: &str) -> Result<VsockArg, String> {
    let mut cid = None;
    let mut uds = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("cid", v)) => {
                cid = Some(
                    v.parse::<u32>()
                        .map_err(|_| format!("cid {v:?} is not a number (cid=N,uds=PATH)"))?,
                )
            }
            Some(("uds", v)) if !v.is_empty() => uds = Some(v.to_string()),
            _ => {
                return Err(format!(
                    "unknown or empty part {part:?} (expected cid=N,uds=PATH)"
                ))
            }
        }
    }
    Ok(VsockArg {
        cid: cid.ok_or("cid=N is required (cid=N,uds=PATH)")?,
        uds: uds.ok_or("uds=PATH is required (cid=N,uds=PATH)")?,
    })
}

/// The console from flags.
fn console_from_flags(cli: &Cli) -> Result<ConsoleSpec, String> {
    if cli.console != ConsoleArg::Virtio
        && (cli.console_out.is_some() || cli.console_sock.is_some())
    {
        return Err("--console-out and --console-sock need --console virtio".into());
    }
    Ok(match cli.console {
        ConsoleArg::Serial => ConsoleSpec::Serial,
        ConsoleArg::None => ConsoleSpec::None,
        ConsoleArg::Virtio => ConsoleSpec::Virtio(match (&cli.console_out, &cli.console_sock) {
            (Some(p), _) => VirtioConsoleHost::File(p.clone()),
            (None, Some(p)) => VirtioConsoleHost::Socket(p.clone()),
            (None, None) => VirtioConsoleHost::Stdio,
        }),
    })
}

/// How the configuration checks the host paths it is given (`--allow-block-devices`).
fn path_policy(cli: &Cli, confined_to: Option<&std::path::Path>) -> PathPolicy {
    PathPolicy {
        allow_block_devices: cli.allow_block_devices,
        confined_to: confined_to.map(std::path::Path::to_path_buf),
        ..PathPolicy::default()
    }
}

/// The configuration from flags: the same `VmConfig` the config file and the API build,
/// through the same validating setters (so the same values are refused with the same
/// messages, prefixed with the flag).
fn config_from_flags(cli: &Cli, kernel: PathBuf, paths: PathPolicy) -> Result<VmConfig, String> {
    let mut cfg = VmConfig::with_paths(paths);
    let mem_size_mib =
        usize::try_from(cli.memory).map_err(|_| format!("--memory {}: too large", cli.memory))?;
    cfg.set_machine_config(&MachineConfiguration {
        vcpu_count: cli.vcpus,
        mem_size_mib,
        ..MachineConfiguration::default()
    })
    .map_err(|e| match e {
        ConfigError::MemSizeZero
        | ConfigError::MemSizeTooLarge(_)
        | ConfigError::HugePagesMemSize(_) => {
            format!("--memory {}: {e}", cli.memory)
        }
        _ => format!("--vcpus {}: {e}", cli.vcpus),
    })?;
    cfg.set_boot_source(&BootSource {
        kernel_image_path: kernel.to_string_lossy().into_owned(),
        initrd_path: cli
            .initrd
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
        boot_args: Some(cli.cmdline.clone()),
    })
    .map_err(|e| format!("--kernel/--initrd: {e}"))?;
    for (i, d) in cli.drive.iter().enumerate() {
        let drive = Drive {
            drive_id: d.id.clone().unwrap_or_else(|| format!("drive{i}")),
            is_root_device: d.root,
            is_read_only: Some(d.ro),
            path_on_host: Some(d.path.clone()),
            // cinder's block device advertises and honours FLUSH.
            cache_type: CacheType::Writeback,
            io_engine: d.io_engine,
            ..Drive::default()
        };
        cfg.add_drive(&drive)
            .map_err(|e| format!("--drive {}: {e}", d.path))?;
    }
    for (i, n) in cli.net.iter().enumerate() {
        let iface = NetworkInterface {
            iface_id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
            host_dev_name: n.tap.clone(),
            guest_mac: n.mac.clone(),
            ..NetworkInterface::default()
        };
        cfg.add_net(&iface)
            .map_err(|e| format!("--net tap={}: {e}", n.tap))?;
    }
    if cli.rng {
        cfg.set_entropy(&EntropyDevice::default())
            .map_err(|e| format!("--rng: {e}"))?;
    }
    if let Some(b) = &cli.balloon {
        cfg.set_balloon(b).map_err(|e| format!("--balloon: {e}"))?;
    }
    if let Some(v) = &cli.vsock {
        cfg.set_vsock(&Vsock {
            guest_cid: v.cid,
            uds_path: v.uds.clone(),
            vsock_id: None,
        })
        .map_err(|e| format!("--vsock: {e}"))?;
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// The API server thread; dropping this stops it and waits for it (bounded by the server's
/// own shutdown, which removes the socket file).
#[derive(Default)]
struct ApiThread {
    shutdown: Option<api::server::ShutdownHandle>,
    thread: Option<std::thread::JoinHandle<Result<(), api::server::ApiError>>>,
}

impl Drop for ApiThread {
    fn drop(&mut self) {
        if let Some(h) = self.shutdown.take() {
            let _ = h.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long cinder waits at exit for its last log lines to be written (stderr or the log
/// file may be a pipe nobody drains: then they are lost, but cinder still exits).
const EXIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// File descriptors cinder may hold at once, by subsystem (issue 18 item 3): the base (KVM,
/// the VM, vCPUs, each virtio device's eventfds, irqfds and ioeventfds, disk images, taps,
/// the log, metrics and console files, signalfd, timers, epolls), the vsock device
/// (1024 connections and 64 pending), and the API server ([`api::server::fd_budget`]).
const FD_BUDGET_BASE: u64 = 256;
/// The vsock device's share of [`FD_BUDGET_BASE`]'s budget.
const FD_BUDGET_VSOCK: u64 = 1024 + 64;

/// Raises the soft open-files limit to the hard limit (the usual soft limit, 1024, is below
/// what cinder may need), and warns when even that is below the budget: then a subsystem
/// that runs out refuses new connections (accept backs off) rather than failing whole.
fn raise_fd_limit(api_fds: u64) {
    let budget = (FD_BUDGET_BASE + FD_BUDGET_VSOCK).saturating_add(api_fds);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from a struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    if lim.rlim_cur < budget {
        log::warn!(
            "the open-files limit (RLIMIT_NOFILE) is {}, below the {budget} cinder may need \
             ({FD_BUDGET_BASE} for the VM and its devices, {FD_BUDGET_VSOCK} for vsock, \
             {api_fds} for the API): connections beyond it wait; raise the hard limit \
             (ulimit -Hn) to lift this",
            lim.rlim_cur
        );
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    vmm::logger::print_stderr(&format!("cinder: error: {msg}"));
    vmm::logger::flush(EXIT_FLUSH_TIMEOUT);
    ExitCode::from(1)
}

fn main() -> ExitCode {
    // One malloc arena for the whole process: glibc gives each thread that allocates its own
    // (64 MiB of address space, a few touched pages each), which cost every VM 16-30 KiB of
    // private memory with 6+ threads; cinder's threads hardly allocate on their hot paths
    // (issue 17 item 5). Before any other thread exists.
    // SAFETY: mallopt only changes a malloc tunable; no other thread runs yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // `cinder images ...`: the image cache, apart from the VMM's flags (images_cmd.rs).
    if std::env::args_os().nth(1).is_some_and(|a| a == "images") {
        return images_cmd::main(std::env::args_os().skip(2));
    }
    // `cinder run IMAGE -- CMD`: a subcommand with its own options and exit codes
    // (vmm/src/run); every other command line is the plain VMM's.
    let mut argv = std::env::args_os();
    if argv.nth(1).is_some_and(|a| a == "run") {
        return vmm::run::main(argv.collect());
    }
    // Where the main thread's stack lies, for giving back what building the VM touched
    // (vmm::trim); it reads /proc/self/maps, so before the seccomp filters.
    vmm::trim::note_main_stack();
    let (rt, api_guard) = match start() {
        Started::Run(rt, api_guard) => (rt, api_guard),
        Started::Exit(code) => return code,
    };
    let reason = rt.run();
    drop(api_guard);
    match &reason {
        ExitReason::Reset => log::info!("guest reset: exiting"),
        ExitReason::Escape => {
            vmm::logger::print_stderr("\r\ncinder: quit from the console (Ctrl-A x)")
        }
        ExitReason::Signal(s) => log::info!("ended by signal {s}"),
        ExitReason::GuestFatal(why) => {
            vmm::logger::print_stderr(&format!("cinder: guest failed: {why}"))
        }
        ExitReason::VmmError(why) => vmm::logger::print_stderr(&format!("cinder: error: {why}")),
    }
    vmm::logger::flush(EXIT_FLUSH_TIMEOUT);
    // Exit codes are 0..=3 and 128 + a signal number: all fit in a u8.
    ExitCode::from(u8::try_from(reason.exit_code()).unwrap_or(1))
}

/// How [`start`] ended: a runtime to run, or the process's exit code.
// Returned once, by value: boxing the runtime would keep it on the heap instead.
#[allow(clippy::large_enum_variant)]
enum Started {
    Run(Runtime, ApiThread),
    Exit(ExitCode),
}

/// Everything from the command line to a running VM (or an API waiting for one). Apart from
/// `main` and never inlined: its frame (8 KiB and more in a release build, every page of it
/// touched by the stack probes) is gone before the control loop runs, whose stack is what an
/// idle VM keeps (issue 17 item 5).
#[inline(never)]
fn start() -> Started {
    /// [`crate::fail`], as this function returns it.
    fn fail(msg: impl std::fmt::Display) -> Started {
        Started::Exit(crate::fail(msg))
    }
    let cli = Cli::parse();
    // Firecracker's flags cinder does not implement: refused before anything happens.
    if let Some(msg) = refused_flag(&cli) {
        return fail(msg);
    }
    if cli.snapshot_version {
        println!("{}", vmm::snapshot::format_version());
        return Started::Exit(ExitCode::SUCCESS);
    }
    if let Some(path) = &cli.describe_snapshot {
        return match vmm::snapshot::describe(path) {
            Ok(v) => {
                println!("{v}");
                Started::Exit(ExitCode::SUCCESS)
            }
            Err(e) => fail(format!("--describe-snapshot: {e}")),
        };
    }
    if let Some(id) = &cli.id {
        if let Err(e) = validate_instance_id(id) {
            return fail(format!("--id {id:?}: invalid instance id: {e}"));
        }
    }
    // `--confine-paths`: the directory, made canonical once (the rules and the checks use it).
    let confine_root = match cli.confine_paths.as_deref().map(vmm::confine::root) {
        None => None,
        Some(Ok(root)) => Some(root),
        Some(Err(e)) => return fail(e),
    };
    let paths = path_policy(&cli, confine_root.as_deref());
    let flag_logger = match logger_from_flags(&cli) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let flag_metrics = cli.metrics_path.as_ref().map(|p| api::model::Metrics {
        metrics_path: p.to_string_lossy().into_owned(),
    });
    // Before any thread exists: SIGINT/SIGTERM are blocked everywhere and read from a signalfd.
    // A panic (abort in release builds) must not leave the user's terminal raw.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        vmm::console::restore_terminal();
        default_hook(info);
    }));
    // The seccomp filters, compiled before any thread exists; each thread installs its own.
    let seccomp_mode = if cli.no_seccomp {
        SeccompMode::Off
    } else {
        match cli.seccomp {
            SeccompArg::On => SeccompMode::On,
            SeccompArg::Off => SeccompMode::Off,
            SeccompArg::Log => SeccompMode::Log,
        }
    };
    let seccomp_ready = match &cli.seccomp_filter {
        Some(path) => vmm::seccomp::init_from_file(path),
        None => vmm::seccomp::init(seccomp_mode),
    };
    if let Err(e) = seccomp_ready {
        return fail(e);
    }
    if vmm::seccomp::mode() == SeccompMode::Off {
        eprintln!(
            "cinder: warning: seccomp is off: no thread is confined to the system calls it needs"
        );
    }
    let mut watched = vec![libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
    if cli.snapshot_on_signal.is_some() {
        watched.push(libc::SIGUSR1);
    }
    let signals = match SignalFd::new(&watched) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot watch signals: {e}")),
    };
    vmm::logger::init(match cli.log_level {
        LogLevel::Off => log::LevelFilter::Off,
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    });
    if let Some(id) = &cli.id {
        vmm::logger::set_instance_id(id);
    }
    vmm::logger::set_max_file_bytes(cli.log_max_size);
    vmm::metrics::set_max_file_bytes(cli.metrics_max_size);
    vmm::console::set_console_out_max_bytes(cli.console_out_max_size);
    raise_fd_limit(if cli.api_sock.is_some() {
        u64::try_from(api::server::fd_budget(&api::server::ServerConfig::default()))
            .unwrap_or(u64::MAX)
    } else {
        0
    });
    // Firecracker's logger flags, applied as `PUT /logger` applies its body (so --level wins
    // over --log-level); a config file's logger comes after, as in Firecracker.
    if let Some(l) = &flag_logger {
        if let Err(e) = vmm::logger::apply(l) {
            return fail(format!("--log-path: {e}"));
        }
    }
    let opts = VmmOptions {
        boot_protocol: match cli.boot_protocol {
            BootProtocolArg::Auto => ProtocolChoice::Auto,
            BootProtocolArg::Pvh => ProtocolChoice::Pvh,
            BootProtocolArg::Linux64 => ProtocolChoice::Linux64,
        },
        cpu_template: match cli.cpu_template {
            CpuTemplateArg::Host => CpuTemplate::Host,
            CpuTemplateArg::NoPvHypercalls => CpuTemplate::NoPvHypercalls,
        },
        kvm_path: cli.kvm_device.clone(),
        console: match console_from_flags(&cli) {
            Ok(c) => c,
            Err(e) => return fail(e),
        },
    };

    // What to boot at once, if anything.
    let mut boot_now: Option<VmConfig> = if let Some(path) = &cli.config_file {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => return fail(format!("cannot read config file {}: {e}", path.display())),
        };
        match VmConfig::from_config_file_with(&text, paths.clone()) {
            Ok(c) => Some(c),
            Err(e) => return fail(format!("config file {}: {e}", path.display())),
        }
    } else if let Some(k) = &cli.kernel {
        match config_from_flags(&cli, k.clone(), paths.clone()) {
            Ok(c) => Some(c),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    if cli.restore.as_ref().is_some_and(|r| !r.resume) && cli.api_sock.is_none() {
        return fail(
            "--restore without resume leaves the VM Paused: add resume, or --api-sock to resume it with PATCH /vm",
        );
    }
    if boot_now.is_none() && cli.api_sock.is_none() && cli.restore.is_none() {
        return fail("nothing to boot: give --kernel, --config-file, or --api-sock to configure through the API");
    }
    // `--metrics-path`: the metrics destination, as `PUT /metrics` sets it (once).
    if let Some(m) = &flag_metrics {
        if boot_now.as_ref().is_some_and(|c| c.metrics.is_some()) {
            return fail(
                "--metrics-path: the config file sets metrics too; the metrics destination can be set only once",
            );
        }
        if let Err(e) = vmm::metrics::open_sink(std::path::Path::new(&m.metrics_path)) {
            return fail(format!(
                "--metrics-path: cannot open {}: {e}",
                m.metrics_path
            ));
        }
        if let Some(c) = boot_now.as_mut() {
            if let Err(e) = c.set_metrics(m) {
                return fail(format!("--metrics-path: {e}"));
            }
        }
    }
    // The config file's metrics destination: opened now, as `PUT /metrics` and
    // `--metrics-path` are, so a path that cannot be opened fails here, not at the first flush.
    if let (Some(path), Some(m)) = (
        &cli.config_file,
        boot_now.as_ref().and_then(|c| c.metrics.as_ref()),
    ) {
        if let Err(e) = vmm::metrics::open_sink(std::path::Path::new(&m.metrics_path)) {
            return fail(format!(
                "config file {}: metrics.metrics_path: cannot open {}: {e}",
                path.display(),
                m.metrics_path
            ));
        }
    }
    if let Some(l) = boot_now.as_ref().and_then(|c| c.logger.as_ref()) {
        if let Err(e) = vmm::logger::apply(l) {
            return fail(e);
        }
    }

    // The API socket, bound before anything else so that a client can connect as soon as
    // cinder runs.
    // Stops the API thread (which removes its socket file) on every way out of main.
    let mut api_guard = ApiThread::default();
    let api_state = match &cli.api_sock {
        None => None,
        Some(path) => {
            let mut server_cfg = api::server::ServerConfig::default();
            if let Some(n) = cli.http_api_max_payload_size {
                server_cfg.max_body_bytes = n;
            }
            let server = match ApiServer::bind_with_config(path, server_cfg) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            let (handler, endpoint) = match api_channel() {
                Ok(c) => c,
                Err(e) => return fail(format!("cannot create the API channel: {e}")),
            };
            api_guard.shutdown = server.shutdown_handle().ok();
            match std::thread::Builder::new()
                .name("api".into())
                .spawn(move || {
                    // Its own filter first, before any client is accepted (vmm/src/seccomp).
                    if let Err(e) = vmm::seccomp::install(ThreadKind::Api) {
                        eprintln!("cinder: error: {e}");
                        std::process::exit(1);
                    }
                    server.run(handler)
                }) {
                Ok(h) => api_guard.thread = Some(h),
                Err(e) => return fail(format!("cannot start the API thread: {e}")),
            }
            let cfg = match (&boot_now, &flag_metrics) {
                (Some(c), _) => c.clone(),
                (None, Some(m)) => {
                    let mut c = VmConfig::with_paths(paths.clone());
                    if let Err(e) = c.set_metrics(m) {
                        return fail(format!("--metrics-path: {e}"));
                    }
                    c
                }
                (None, None) => VmConfig::with_paths(paths.clone()),
            };
            Some(ApiState {
                endpoint,
                controller: PreBootController::new(
                    cfg,
                    cli.id
                        .clone()
                        .unwrap_or_else(|| format!("cinder-{}", std::process::id())),
                    env!("CARGO_PKG_VERSION"),
                ),
            })
        }
    };

    // `--confine-paths`: from here on, this thread and every thread it starts (vCPUs, the
    // device loop, the console writer) reach files only beneath DIR and the devices named.
    // The API thread, started above, opens no path (its socket is bound already) and removes
    // its socket file at exit.
    if let Some(dir) = &confine_root {
        let kvm = PathBuf::from(&opts.kvm_path);
        let devices = [kvm.as_path(), std::path::Path::new("/dev/net/tun")];
        if let Err(e) = vmm::confine::apply(dir, &devices) {
            return fail(e);
        }
    }

    // Measured once the API socket is ready, as Firecracker measures them.
    let (startup_us, startup_cpu_us) = startup_times(&cli);
    let metrics_path = boot_now
        .as_ref()
        .and_then(|c| c.metrics.as_ref())
        .or(flag_metrics.as_ref())
        .map(|m| PathBuf::from(&m.metrics_path));
    if cli.enable_pci {
        vmm::logger::print_stderr(
            "cinder: warning: --enable-pci: cinder has no PCI; devices stay on virtio-mmio",
        );
    }
    let mut rt = match Runtime::new(
        signals,
        opts,
        Box::new(std::io::stdout()),
        api_state,
        metrics_path,
    ) {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    // The control loop's filter: after everything that needs more (the API socket, log and
    // metrics files), before it serves the API or builds the VM (which its table allows).
    if let Err(e) = vmm::seccomp::install(ThreadKind::Vmm) {
        drop(rt);
        return fail(e);
    }
    // Filters of threads this process never starts: their programs go (issue 17 item 5).
    vmm::seccomp::forget(ThreadKind::Run);
    if cli.api_sock.is_none() {
        vmm::seccomp::forget(ThreadKind::Api);
    }
    if let Some(p) = &cli.snapshot_on_signal {
        rt.set_snapshot_on_signal(p.clone());
    }
    if let Some(us) = startup_us {
        rt.metrics().api.process_startup_time_us.set(us);
    }
    if let Some(us) = startup_cpu_us {
        rt.metrics().api.process_startup_time_cpu_us.set(us);
    }
    if let Some(cfg) = &boot_now {
        if let Err(e) = rt.start_vm(cfg) {
            drop(rt);
            return fail(e);
        }
        rt.mark_api_started();
    } else if let Some(spec) = &cli.restore {
        if let Err(e) = rt.restore_vm(spec) {
            drop(rt);
            return fail(e);
        }
    }
    Started::Run(rt, api_guard)
}

#[cfg(test)]
mod tests {
    #[test]
    fn restore_takes_drive_overrides() {
        let r = super::parse_restore_arg("state=/s,mem=/m,resume,drive=image:/a:b.ext4").unwrap();
        assert_eq!(
            r.drive_overrides,
            [("image".to_string(), std::path::PathBuf::from("/a:b.ext4"))]
        );
        for bad in [
            "state=/s,mem=/m,drive=image",
            "state=/s,mem=/m,drive=:/x",
            "state=/s,mem=/m,drive=a:",
        ] {
            let e = super::parse_restore_arg(bad).unwrap_err();
            assert!(e.contains("drive=ID:PATH"), "{e}");
        }
    }

    #[test]
    fn version_names_the_firecracker_api_it_implements() {
        assert!(super::VERSION.contains(api::model::FIRECRACKER_API_VERSION));
        assert!(super::VERSION.starts_with(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn sizes_take_binary_suffixes() {
        use super::parse_size as p;
        assert_eq!(p("4096"), Ok(4096));
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("64K"), Ok(64 << 10));
        assert_eq!(p("64m"), Ok(64 << 20));
        assert_eq!(p("1G"), Ok(1 << 30));
        assert!(p("1T").is_err());
        assert!(p("").is_err());
        assert!(p("M").is_err());
        assert!(p("99999999999999G").is_err());
    }

    #[test]
    fn instance_ids_follow_firecrackers_rule() {
        use super::validate_instance_id as v;
        assert!(v("12-3aa").is_ok());
        assert!(v(&"a".repeat(64)).is_ok());
        assert_eq!(
            v("").unwrap_err(),
            "Invalid len (0);  the length must be between 1 and 64"
        );
        assert_eq!(v("12_3aa").unwrap_err(), "Invalid char (_) at position 2");
        assert!(v(&"a".repeat(65)).is_err());
    }
}
