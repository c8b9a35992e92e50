//! `cinder`: boot a guest kernel in a KVM microVM.

use std::path::PathBuf;
use std::process::ExitCode;

use arch::loader::ProtocolChoice;
use clap::{Parser, ValueEnum};
use vmm::exit::ExitReason;
use vmm::vm::{CpuTemplate, VmSpec, Vmm};

/// The command line a guest gets when `--cmdline` is not given.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BootProtocolArg {
    /// PVH when the ELF has a PVH note, else the Linux 64-bit protocol.
    Auto,
    /// PVH (32-bit entry, hvm_start_info); the ELF must have the note.
    Pvh,
    /// Linux x86_64 64-bit boot protocol (long mode, boot_params).
    Linux64,
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

/// cinder: a KVM microVM monitor. Boots a guest kernel with a serial console on stdin and
/// stdout. A guest reset ends cinder with exit code 0; Ctrl-A x quits from a terminal.
///
/// Exit codes: 0 guest reset or console quit; 1 bad input or VMM error (before or while
/// running); 2 bad command line; 3 the guest hit a fatal KVM error (registers are printed);
/// 128+N ended by signal N (SIGINT 130, SIGTERM 143).
#[derive(Parser, Debug)]
#[command(name = "cinder", version)]
struct Cli {
    /// Guest kernel: an ELF vmlinux (PVH note or 64-bit entry) or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,

    /// Initial ramdisk, placed as high in low memory as the kernel allows.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line (at most 2047 bytes).
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,

    /// Number of vCPUs (1 to 254, and no more than KVM allows on this host).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u8,

    /// Guest memory in MiB. Above 3072 MiB, RAM continues at 4 GiB past the MMIO gap.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    memory: u64,

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmm::logger::init(match cli.log_level {
        LogLevel::Off => log::LevelFilter::Off,
        LogLevel::Error => log::LevelFilter::Error,
        LogLevel::Warn => log::LevelFilter::Warn,
        LogLevel::Info => log::LevelFilter::Info,
        LogLevel::Debug => log::LevelFilter::Debug,
        LogLevel::Trace => log::LevelFilter::Trace,
    });
    let spec = VmSpec {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        vcpus: cli.vcpus,
        memory_mib: cli.memory,
        boot_protocol: match cli.boot_protocol {
            BootProtocolArg::Auto => ProtocolChoice::Auto,
            BootProtocolArg::Pvh => ProtocolChoice::Pvh,
            BootProtocolArg::Linux64 => ProtocolChoice::Linux64,
        },
        cpu_template: match cli.cpu_template {
            CpuTemplateArg::Host => CpuTemplate::Host,
            CpuTemplateArg::NoPvHypercalls => CpuTemplate::NoPvHypercalls,
        },
        kvm_path: cli.kvm_device,
    };
    let vmm = match Vmm::build(&spec, Box::new(std::io::stdout())) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("cinder: error: {e}");
            return ExitCode::from(1);
        }
    };
    let reason = vmm.run();
    match &reason {
        ExitReason::Reset => log::info!("guest reset: exiting"),
        ExitReason::Escape => eprintln!("\r\ncinder: quit from the console (Ctrl-A x)"),
        ExitReason::Signal(s) => log::info!("ended by signal {s}"),
        ExitReason::GuestFatal(why) => eprintln!("cinder: guest failed: {why}"),
        ExitReason::VmmError(why) => eprintln!("cinder: error: {why}"),
    }
    ExitCode::from(reason.exit_code() as u8)
}
