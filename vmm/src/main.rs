//! `cinder`: boot a guest kernel in a KVM microVM, from flags, a config file, or the API.

use std::path::PathBuf;
use std::process::ExitCode;

use api::config::{ConfigError, VmConfig};
use api::controller::PreBootController;
use api::handler::api_channel;
use api::model::{
    BootSource, CacheType, Drive, EntropyDevice, MachineConfiguration, NetworkInterface, Vsock,
};
use api::server::ApiServer;
use arch::loader::ProtocolChoice;
use clap::{Parser, ValueEnum};
use vmm::exit::ExitReason;
use vmm::options::{ConsoleSpec, CpuTemplate, VirtioConsoleHost, VmmOptions};
use vmm::runtime::{ApiState, Runtime, DEFAULT_CMDLINE};
use vmm::signal::SignalFd;

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
/// 128+N ended by signal N (SIGINT 130, SIGTERM 143).
#[derive(Parser, Debug)]
#[command(name = "cinder", version = VERSION)]
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

    /// A virtio-blk drive backed by a raw image: path=FILE[,id=NAME][,ro][,root]. Repeatable;
    /// the guest sees them as /dev/vda, /dev/vdb, ... with the root drive first. `root`
    /// appends root=/dev/vda (and ro for a read-only drive) to the command line.
    #[arg(long, value_name = "SPEC", requires = "kernel", value_parser = parse_drive_arg)]
    drive: Vec<DriveArg>,

    /// A virtio-net device on an existing TAP interface: tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,id=NAME].
    /// Repeatable. Without mac= the MAC is derived from the id and tap name (stable). cinder
    /// does not configure the host network.
    #[arg(long, value_name = "SPEC", requires = "kernel", value_parser = parse_net_arg)]
    net: Vec<NetArg>,

    /// A virtio-rng entropy device fed from getrandom(2).
    #[arg(long, requires = "kernel")]
    rng: bool,

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

    /// With --console virtio: connect the console both ways to this listening Unix socket.
    #[arg(long, value_name = "PATH")]
    console_sock: Option<PathBuf>,

    /// Boot from a Firecracker-style JSON config file (boot-source, machine-config, drives,
    /// logger, metrics, ...), at once.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,

    /// Serve the Firecracker-compatible API on this Unix socket (before and after boot).
    #[arg(long, value_name = "PATH", conflicts_with = "no_api")]
    api_sock: Option<PathBuf>,

    /// Run without an API socket (needs --config-file or --kernel).
    #[arg(long)]
    no_api: bool,

    /// Boot protocol for ELF kernels (a bzImage always uses the 64-bit protocol).
    #[arg(long, value_enum, value_name = "PROTOCOL", default_value = "auto")]
    boot_protocol: BootProtocolArg,

    /// CPU template: what CPUID tells the guest.
    #[arg(long, value_enum, value_name = "TEMPLATE", default_value = "host")]
    cpu_template: CpuTemplateArg,

    /// Log level for cinder's own messages on stderr.
    #[arg(long, value_enum, value_name = "LEVEL", default_value = "warn")]
    log_level: LogLevel,

    /// KVM device to use.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm", hide = true)]
    kvm_device: String,
}

/// `--drive path=FILE[,id=NAME][,ro][,root]`, parsed by clap (a malformed spec is a usage
/// error, exit 2). Its values are checked by the same rules as the API's `PUT /drives`.
#[derive(Clone, Debug)]
struct DriveArg {
    path: String,
    id: Option<String>,
    ro: bool,
    root: bool,
}

fn parse_drive_arg(spec: &str) -> Result<DriveArg, String> {
    let mut path = None;
    let mut id = None;
    let (mut ro, mut root) = (false, false);
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("path", v)) if !v.is_empty() => path = Some(v.to_string()),
            Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
            None if part == "ro" => ro = true,
            None if part == "root" => root = true,
            _ => {
                return Err(format!(
                    "unknown or empty part {part:?} (expected path=FILE[,id=NAME][,ro][,root])"
                ))
            }
        }
    }
    let path = path.ok_or("path=FILE is required (path=FILE[,id=NAME][,ro][,root])")?;
    Ok(DriveArg { path, id, ro, root })
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

/// The configuration from flags: the same `VmConfig` the config file and the API build,
/// through the same validating setters (so the same values are refused with the same
/// messages, prefixed with the flag).
fn config_from_flags(cli: &Cli, kernel: PathBuf) -> Result<VmConfig, String> {
    let mut cfg = VmConfig::default();
    let mem_size_mib =
        usize::try_from(cli.memory).map_err(|_| format!("--memory {}: too large", cli.memory))?;
    cfg.set_machine_config(&MachineConfiguration {
        vcpu_count: cli.vcpus,
        mem_size_mib,
        ..MachineConfiguration::default()
    })
    .map_err(|e| match e {
        ConfigError::MemSizeZero | ConfigError::HugePagesMemSize(_) => {
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
        cfg.set_entropy(&EntropyDevice::default());
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

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("cinder: error: {msg}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: SIGINT/SIGTERM are blocked everywhere and read from a signalfd.
    // A panic (abort in release builds) must not leave the user's terminal raw.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        vmm::console::restore_terminal();
        default_hook(info);
    }));
    let signals = match SignalFd::new(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]) {
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
    let boot_now: Option<VmConfig> = if let Some(path) = &cli.config_file {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => return fail(format!("cannot read config file {}: {e}", path.display())),
        };
        match VmConfig::from_config_file(&text) {
            Ok(c) => Some(c),
            Err(e) => return fail(format!("config file {}: {e}", path.display())),
        }
    } else if let Some(k) = &cli.kernel {
        match config_from_flags(&cli, k.clone()) {
            Ok(c) => Some(c),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    if boot_now.is_none() && cli.api_sock.is_none() {
        return fail("nothing to boot: give --kernel, --config-file, or --api-sock to configure through the API");
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
            let server = match ApiServer::bind(path) {
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
                .spawn(move || server.run(handler))
            {
                Ok(h) => api_guard.thread = Some(h),
                Err(e) => return fail(format!("cannot start the API thread: {e}")),
            }
            let cfg = boot_now.clone().unwrap_or_default();
            Some(ApiState {
                endpoint,
                controller: PreBootController::new(
                    cfg,
                    format!("cinder-{}", std::process::id()),
                    env!("CARGO_PKG_VERSION"),
                ),
            })
        }
    };

    let metrics_path = boot_now
        .as_ref()
        .and_then(|c| c.metrics.as_ref())
        .map(|m| PathBuf::from(&m.metrics_path));
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
    if let Some(cfg) = &boot_now {
        if let Err(e) = rt.start_vm(cfg) {
            drop(rt);
            return fail(e);
        }
        rt.mark_api_started();
    }
    let reason = rt.run();
    drop(api_guard);
    match &reason {
        ExitReason::Reset => log::info!("guest reset: exiting"),
        ExitReason::Escape => eprintln!("\r\ncinder: quit from the console (Ctrl-A x)"),
        ExitReason::Signal(s) => log::info!("ended by signal {s}"),
        ExitReason::GuestFatal(why) => eprintln!("cinder: guest failed: {why}"),
        ExitReason::VmmError(why) => eprintln!("cinder: error: {why}"),
    }
    // Exit codes are 0..=3 and 128 + a signal number: all fit in a u8.
    ExitCode::from(u8::try_from(reason.exit_code()).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_names_the_firecracker_api_it_implements() {
        assert!(super::VERSION.contains(api::model::FIRECRACKER_API_VERSION));
        assert!(super::VERSION.starts_with(env!("CARGO_PKG_VERSION")));
    }
}
