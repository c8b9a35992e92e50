//! [`VmConfig`]: the one internal configuration of a microVM. The command
//! line, the `--config-file` and the HTTP API all produce it, through the
//! validating setters below, so a rule lives in exactly one place.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::model::{
    Balloon, BootSource, CacheType, CpuTemplate, Drive, EntropyDevice, FullVmConfiguration,
    HugePages, IoEngine, Logger, MachineConfiguration, MachineConfigurationUpdate, Metrics,
    NetworkInterface, PartialDrive, PartialNetworkInterface, RateLimiter, TokenBucket, Vsock,
};
use crate::paths::{open_boot_file, open_checked, PathError, PathPolicy};

/// Largest vCPU count: what cinder's MP table can describe (APIC IDs 0..=253; see
/// `arch::mptable::MAX_CPUS`). The host's KVM may allow fewer; that is checked when the VM is
/// built. One ceiling for the command line, the config file and the API.
pub const MAX_VCPUS: u8 = 254;

/// Largest guest memory in MiB (1 TiB): far above any microVM, and low enough that every
/// guest physical address, MMIO gap included, fits in 41 bits and the layout's arithmetic
/// cannot overflow (`--memory 17592186044415` used to wrap it). One ceiling for the command
/// line, the config file and the API; the host may still refuse less when memory is mapped.
pub const MAX_MEM_SIZE_MIB: usize = 1 << 20;
/// vCPU count before any machine configuration.
pub const DEFAULT_VCPUS: u8 = 1;
/// Memory size in MiB before any machine configuration.
pub const DEFAULT_MEM_SIZE_MIB: usize = 128;
/// Longest drive or interface id.
pub const MAX_ID_LEN: usize = 64;
/// Longest host network device name (IFNAMSIZ - 1).
pub const MAX_HOST_DEV_NAME_LEN: usize = 15;
/// Smallest and largest MTU advertised to the guest.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

/// Why a configuration was refused. Each message names the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The config file is not valid JSON or does not match the schema.
    #[error("invalid config file: {0}")]
    Json(String),
    /// A key cinder knows but does not implement.
    #[error("{0}: not supported by cinder yet")]
    Unsupported(&'static str),
    /// The config file has no boot source.
    #[error("boot-source: missing; the config file must name at least kernel_image_path")]
    MissingBootSource,
    /// vCPU count out of range.
    #[error("machine-config.vcpu_count: {0} is out of range; it must be 1..={MAX_VCPUS}")]
    VcpuCount(u8),
    /// Odd vCPU count with SMT.
    #[error("machine-config.vcpu_count: {0} is odd; with smt enabled it must be 1 or even")]
    SmtVcpuCount(u8),
    /// A balloon larger than the guest's memory.
    #[error("Balloon config error: Amount of pages requested is too large. (balloon.amount_mib {amount_mib} is above machine-config.mem_size_mib {mem_size_mib})")]
    BalloonTooLarge {
        /// The balloon's target.
        amount_mib: u32,
        /// The guest's memory.
        mem_size_mib: usize,
    },
    /// The guest's memory made smaller than the balloon.
    #[error("Machine config error: The memory size (MiB) is smaller than the previously set balloon device target size. (machine-config.mem_size_mib {mem_size_mib}, balloon.amount_mib {amount_mib})")]
    MemSizeBelowBalloon {
        /// The balloon's target.
        amount_mib: u32,
        /// The new memory size.
        mem_size_mib: usize,
    },
    /// No balloon device is configured.
    #[error("Balloon config error: No balloon device found.")]
    NoBalloon,
    /// Statistics turned on or off after they were set up.
    #[error(
        "Balloon update error: Balloon: Statistics cannot be enabled/disabled after activation."
    )]
    BalloonStatsChange,
    /// Zero memory.
    #[error("machine-config.mem_size_mib: must be greater than 0")]
    MemSizeZero,
    /// More memory than cinder lays out.
    #[error("machine-config.mem_size_mib: {0} is above the largest, {MAX_MEM_SIZE_MIB} (1 TiB)")]
    MemSizeTooLarge(usize),
    /// Memory not a multiple of the huge page size.
    #[error("machine-config.mem_size_mib: {0} must be a multiple of 2 with huge_pages \"2M\"")]
    HugePagesMemSize(usize),
    /// A setting cinder parses but does not enforce: refused rather than accepted and
    /// ignored (issue 16 item 1).
    #[error("{key}: {what} is not implemented by cinder yet; {instead}")]
    NotImplemented {
        /// The field, with the drive or interface it belongs to.
        key: String,
        /// The value refused.
        what: &'static str,
        /// What to give instead.
        instead: &'static str,
    },
    /// A token bucket's refill time beyond the limiter's range.
    #[error("{0}: refill_time must be at most 18446744073709 ms")]
    RefillTime(String),
    /// A required path is empty.
    #[error("{0}: must not be empty")]
    EmptyPath(String),
    /// A malformed id.
    #[error("{key}: `{id}` is not a valid id: use 1 to {MAX_ID_LEN} ASCII letters, digits or '_'")]
    InvalidId {
        /// Key of the id.
        key: &'static str,
        /// The id.
        id: String,
    },
    /// The same id twice in a config file.
    #[error("{key}: `{id}` appears more than once")]
    DuplicateId {
        /// Key of the id.
        key: &'static str,
        /// The id.
        id: String,
    },
    /// A drive without a backing file.
    #[error("drives[{0}].path_on_host: missing; a drive needs a backing file")]
    DrivePathMissing(String),
    /// vhost-user-block requested.
    #[error("drives[{0}].socket: vhost-user-block is not supported by cinder yet")]
    DriveVhostUser(String),
    /// Second root device.
    #[error("drives[{id}].is_root_device: drive `{existing}` is already the root device; only one is allowed")]
    DuplicateRootDevice {
        /// The new drive.
        id: String,
        /// The current root drive.
        existing: String,
    },
    /// PATCH of an unknown drive or interface.
    #[error("{key}: `{id}` is not configured")]
    NotFound {
        /// `drive_id` or `iface_id`.
        key: &'static str,
        /// The id.
        id: String,
    },
    /// Bad MAC address.
    #[error(
        "network-interfaces[{id}].guest_mac: `{mac}` is not a MAC address like 06:00:ac:10:00:02"
    )]
    InvalidMac {
        /// Interface id.
        id: String,
        /// The value given.
        mac: String,
    },
    /// Two interfaces with one MAC.
    #[error("network-interfaces[{id}].guest_mac: {mac} is already used by interface `{other}`")]
    DuplicateMac {
        /// Interface id.
        id: String,
        /// The MAC.
        mac: String,
        /// The interface already using it.
        other: String,
    },
    /// Bad host device name.
    #[error("network-interfaces[{id}].host_dev_name: `{name}` must be 1 to {MAX_HOST_DEV_NAME_LEN} bytes without '/' or whitespace")]
    InvalidHostDevName {
        /// Interface id.
        id: String,
        /// The value given.
        name: String,
    },
    /// Two interfaces on one TAP.
    #[error(
        "network-interfaces[{id}].host_dev_name: `{name}` is already used by interface `{other}`"
    )]
    DuplicateHostDevName {
        /// Interface id.
        id: String,
        /// The TAP name.
        name: String,
        /// The interface already using it.
        other: String,
    },
    /// MTU out of range.
    #[error("network-interfaces[{id}].mtu: {mtu} is out of range; it must be 68..=65535")]
    Mtu {
        /// Interface id.
        id: String,
        /// The value given.
        mtu: u32,
    },
    /// Reserved vsock CID.
    #[error("vsock.guest_cid: {0} is reserved; it must be at least 3 and below 4294967295")]
    VsockCid(u32),
    /// A host file (kernel, initrd, drive image) that cannot be opened or is not what it must
    /// be (see [`crate::paths`]).
    #[error("{key}: {why}")]
    HostFile {
        /// The key naming the file.
        key: String,
        /// Why it was refused ([`PathError`]'s message, which names the path).
        why: String,
    },
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or(())?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| ())?;
        }
        if parts.next().is_some() {
            return Err(());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// vCPUs and memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: usize,
    /// SMT.
    pub smt: bool,
    /// Dirty page tracking.
    pub track_dirty_pages: bool,
    /// Stored CPU template (only `None` is acted upon today).
    pub cpu_template: Option<CpuTemplate>,
    /// Stored huge pages setting.
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: HugePages::None,
        }
    }
}

impl MachineConfig {
    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpu_count));
        }
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(ConfigError::SmtVcpuCount(self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::MemSizeZero);
        }
        if self.mem_size_mib > MAX_MEM_SIZE_MIB {
            return Err(ConfigError::MemSizeTooLarge(self.mem_size_mib));
        }
        if self.huge_pages == HugePages::Hugetlbfs2M && self.mem_size_mib % 2 == 1 {
            return Err(ConfigError::HugePagesMemSize(self.mem_size_mib));
        }
        if self.huge_pages != HugePages::None {
            return Err(not_implemented(
                "machine-config.huge_pages".into(),
                "\"2M\" (hugetlbfs-backed guest memory)",
                "leave it out or give \"None\"",
            ));
        }
        Ok(())
    }

    /// The API shape of this configuration.
    pub fn to_model(&self) -> MachineConfiguration {
        MachineConfiguration {
            vcpu_count: self.vcpu_count,
            mem_size_mib: self.mem_size_mib,
            smt: self.smt,
            cpu_template: self.cpu_template,
            track_dirty_pages: self.track_dirty_pages,
            huge_pages: Some(self.huge_pages),
        }
    }
}

/// Kernel, initrd and command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootSourceConfig {
    /// Guest kernel.
    pub kernel_image_path: PathBuf,
    /// Optional initrd.
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line; `None` lets the VMM pick its default.
    pub boot_args: Option<String>,
}

/// One virtio-blk device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    /// Id.
    pub drive_id: String,
    /// Backing file.
    pub path_on_host: PathBuf,
    /// Read-only.
    pub is_read_only: bool,
    /// Root device (kept first in [`VmConfig::drives`], so it becomes vda).
    pub is_root_device: bool,
    /// Partition UUID of the root partition.
    pub partuuid: Option<String>,
    /// Cache strategy.
    pub cache_type: CacheType,
    /// I/O engine.
    pub io_engine: IoEngine,
    /// Stored rate limiter.
    pub rate_limiter: Option<RateLimiter>,
}

/// One virtio-net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Id.
    pub iface_id: String,
    /// Host TAP device.
    pub host_dev_name: String,
    /// Guest MAC (random if `None`, VMM's choice).
    pub guest_mac: Option<MacAddr>,
    /// MTU advertised to the guest.
    pub mtu: Option<u16>,
    /// Stored receive rate limiter.
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Stored transmit rate limiter.
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// The vsock device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest CID.
    pub guest_cid: u32,
    /// Host Unix socket.
    pub uds_path: PathBuf,
}

/// The virtio-rng device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntropyConfig {
    /// Stored rate limiter.
    pub rate_limiter: Option<RateLimiter>,
}

/// The virtio-balloon device (`PUT /balloon`; the target and the statistics interval follow
/// the runtime `PATCH`es).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Target size in MiB, at most the guest's memory.
    pub amount_mib: u32,
    /// The guest may deflate when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics updates; 0: no statistics queue.
    pub stats_polling_interval_s: u16,
    /// Free page reporting.
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    /// The API's view.
    pub fn to_model(&self) -> Balloon {
        Balloon {
            amount_mib: self.amount_mib,
            deflate_on_oom: self.deflate_on_oom,
            stats_polling_interval_s: self.stats_polling_interval_s,
            free_page_hinting: false,
            free_page_reporting: self.free_page_reporting,
        }
    }
}

/// The whole configuration of one microVM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmConfig {
    /// vCPUs and memory.
    pub machine: MachineConfig,
    /// Kernel; required to boot.
    pub boot_source: Option<BootSourceConfig>,
    /// Block devices, the root device first.
    pub drives: Vec<DriveConfig>,
    /// Network devices.
    pub net: Vec<NetConfig>,
    /// Vsock device.
    pub vsock: Option<VsockConfig>,
    /// Entropy device.
    pub entropy: Option<EntropyConfig>,
    /// Balloon device.
    pub balloon: Option<BalloonConfig>,
    /// Logger configuration.
    pub logger: Option<Logger>,
    /// Metrics configuration.
    pub metrics: Option<Metrics>,
    /// What the host-path checks allow (not part of the API's view: a process setting).
    pub paths: PathPolicy,
}

fn host_file(key: impl Into<String>, e: PathError) -> ConfigError {
    ConfigError::HostFile {
        key: key.into(),
        why: e.to_string(),
    }
}

fn check_id(key: &'static str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidId {
            key,
            id: id.to_string(),
        })
    }
}

fn not_implemented(key: String, what: &'static str, instead: &'static str) -> ConfigError {
    ConfigError::NotImplemented { key, what, instead }
}

/// Refuses a bucket whose refill time is beyond what the limiter's arithmetic takes
/// (`devices::rate_limiter::TokenBucket::new`: at most u64::MAX / 10^6 ms, half a million years).
fn check_rate_limiter(key: String, r: &Option<RateLimiter>) -> Result<(), ConfigError> {
    let bad = |b: &Option<TokenBucket>| b.is_some_and(|b| b.refill_time > u64::MAX / 1_000_000);
    match r {
        Some(r) if bad(&r.bandwidth) || bad(&r.ops) => Err(ConfigError::RefillTime(key)),
        _ => Ok(()),
    }
}

/// Refuses a balloon larger than the guest's memory (Firecracker's message, then the values).
fn check_balloon_size(amount_mib: u32, mem_size_mib: usize) -> Result<(), ConfigError> {
    if usize::try_from(amount_mib).map_or(true, |a| a > mem_size_mib) {
        return Err(ConfigError::BalloonTooLarge {
            amount_mib,
            mem_size_mib,
        });
    }
    Ok(())
}

fn non_empty(key: String, value: &str) -> Result<PathBuf, ConfigError> {
    if value.is_empty() {
        Err(ConfigError::EmptyPath(key))
    } else {
        Ok(PathBuf::from(value))
    }
}

/// Firecracker's config-file schema. Keys cinder does not implement are
/// parsed only to be refused by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(rename = "boot-source", default)]
    boot_source: Option<BootSource>,
    #[serde(default)]
    drives: Vec<Drive>,
    #[serde(rename = "machine-config", default)]
    machine_config: Option<MachineConfiguration>,
    #[serde(rename = "network-interfaces", default)]
    network_interfaces: Vec<NetworkInterface>,
    #[serde(default)]
    vsock: Option<Vsock>,
    #[serde(default)]
    entropy: Option<EntropyDevice>,
    #[serde(default)]
    logger: Option<Logger>,
    #[serde(default)]
    metrics: Option<Metrics>,
    #[serde(default)]
    balloon: Option<Balloon>,
    #[serde(rename = "cpu-config", default)]
    cpu_config: Option<IgnoredAny>,
    #[serde(rename = "mmds-config", default)]
    mmds_config: Option<IgnoredAny>,
    #[serde(default)]
    pmem: Option<IgnoredAny>,
    #[serde(rename = "memory-hotplug", default)]
    memory_hotplug: Option<IgnoredAny>,
    #[serde(default)]
    serial: Option<IgnoredAny>,
}

/// Keys of Firecracker's config-file schema that cinder refuses.
pub const UNSUPPORTED_CONFIG_KEYS: &[&str] = &[
    "cpu-config",
    "mmds-config",
    "pmem",
    "memory-hotplug",
    "serial",
];

impl VmConfig {
    /// Parses and validates a Firecracker-style `--config-file`, with the default
    /// [`PathPolicy`] (every path checked, no block devices as drives).
    pub fn from_config_file(json: &str) -> Result<VmConfig, ConfigError> {
        Self::from_config_file_with(json, PathPolicy::default())
    }

    /// An empty configuration whose paths are checked by `paths`.
    pub fn with_paths(paths: PathPolicy) -> VmConfig {
        VmConfig {
            paths,
            ..VmConfig::default()
        }
    }

    /// [`VmConfig::from_config_file`], with the host paths checked by `paths`.
    pub fn from_config_file_with(json: &str, paths: PathPolicy) -> Result<VmConfig, ConfigError> {
        let file: ConfigFile =
            crate::model::from_json(json.as_bytes()).map_err(ConfigError::Json)?;
        let unsupported = [
            file.cpu_config.is_some(),
            file.mmds_config.is_some(),
            file.pmem.is_some(),
            file.memory_hotplug.is_some(),
            file.serial.is_some(),
        ];
        if let Some(i) = unsupported.iter().position(|&present| present) {
            return Err(ConfigError::Unsupported(UNSUPPORTED_CONFIG_KEYS[i]));
        }
        let mut cfg = VmConfig::with_paths(paths);
        if let Some(m) = &file.machine_config {
            cfg.set_machine_config(m)?;
        }
        cfg.set_boot_source(
            file.boot_source
                .as_ref()
                .ok_or(ConfigError::MissingBootSource)?,
        )?;
        for d in &file.drives {
            cfg.add_drive(d)?;
        }
        for n in &file.network_interfaces {
            cfg.add_net(n)?;
        }
        if let Some(v) = &file.vsock {
            cfg.set_vsock(v)?;
        }
        if let Some(e) = &file.entropy {
            cfg.set_entropy(e)?;
        }
        if let Some(b) = &file.balloon {
            cfg.set_balloon(b)?;
        }
        if let Some(l) = &file.logger {
            cfg.logger = Some(l.clone());
        }
        if let Some(m) = &file.metrics {
            cfg.set_metrics(m)?;
        }
        Ok(cfg)
    }

    /// Replaces the machine configuration (`PUT /machine-config`); on error
    /// nothing changes.
    pub fn set_machine_config(&mut self, m: &MachineConfiguration) -> Result<(), ConfigError> {
        let new = MachineConfig {
            vcpu_count: m.vcpu_count,
            mem_size_mib: m.mem_size_mib,
            smt: m.smt,
            track_dirty_pages: m.track_dirty_pages,
            cpu_template: m.cpu_template,
            huge_pages: m.huge_pages.unwrap_or_default(),
        };
        new.validate()?;
        self.check_mem_fits_balloon(new.mem_size_mib)?;
        self.machine = new;
        Ok(())
    }

    fn check_mem_fits_balloon(&self, mem_size_mib: usize) -> Result<(), ConfigError> {
        match self.balloon {
            Some(b) if usize::try_from(b.amount_mib).map_or(true, |a| a > mem_size_mib) => {
                Err(ConfigError::MemSizeBelowBalloon {
                    amount_mib: b.amount_mib,
                    mem_size_mib,
                })
            }
            _ => Ok(()),
        }
    }

    /// Updates the given machine fields (`PATCH /machine-config`); on error
    /// nothing changes.
    pub fn update_machine_config(
        &mut self,
        u: &MachineConfigurationUpdate,
    ) -> Result<(), ConfigError> {
        let mut new = self.machine.clone();
        if let Some(v) = u.vcpu_count {
            new.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            new.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            new.smt = v;
        }
        if let Some(v) = u.track_dirty_pages {
            new.track_dirty_pages = v;
        }
        if u.cpu_template.is_some() {
            new.cpu_template = u.cpu_template;
        }
        if let Some(v) = u.huge_pages {
            new.huge_pages = v;
        }
        new.validate()?;
        self.check_mem_fits_balloon(new.mem_size_mib)?;
        self.machine = new;
        Ok(())
    }

    /// Sets the boot source (`PUT /boot-source`). The kernel and initrd must be regular files
    /// that can be read (opened without blocking or following a link; see [`crate::paths`]).
    pub fn set_boot_source(&mut self, b: &BootSource) -> Result<(), ConfigError> {
        const KERNEL: &str = "boot-source.kernel_image_path";
        const INITRD: &str = "boot-source.initrd_path";
        let kernel_image_path = non_empty(KERNEL.into(), &b.kernel_image_path)?;
        let initrd_path = match &b.initrd_path {
            Some(p) => Some(non_empty(INITRD.into(), p)?),
            None => None,
        };
        let paths = &self.paths;
        paths
            .check_beneath("kernel image", &kernel_image_path)
            .map_err(|e| host_file(KERNEL, e))?;
        if let Some(p) = &initrd_path {
            paths
                .check_beneath("initrd", p)
                .map_err(|e| host_file(INITRD, e))?;
        }
        if paths.check_host {
            open_boot_file("kernel image", &kernel_image_path).map_err(|e| host_file(KERNEL, e))?;
            if let Some(p) = &initrd_path {
                open_boot_file("initrd", p).map_err(|e| host_file(INITRD, e))?;
            }
        }
        self.boot_source = Some(BootSourceConfig {
            kernel_image_path,
            initrd_path,
            boot_args: b.boot_args.clone(),
        });
        Ok(())
    }

    /// Adds a drive or replaces the one with the same id (`PUT /drives/{id}`).
    pub fn upsert_drive(&mut self, d: &Drive) -> Result<(), ConfigError> {
        check_id("drives.drive_id", &d.drive_id)?;
        if d.socket.is_some() {
            return Err(ConfigError::DriveVhostUser(d.drive_id.clone()));
        }
        let path = d
            .path_on_host
            .as_deref()
            .ok_or_else(|| ConfigError::DrivePathMissing(d.drive_id.clone()))?;
        let key = format!("drives[{}].path_on_host", d.drive_id);
        let path_on_host = non_empty(key.clone(), path)?;
        // Enforced by the block device (devices::rate_limiter).
        check_rate_limiter(
            format!("drives[{}].rate_limiter", d.drive_id),
            &d.rate_limiter,
        )?;
        if d.cache_type != CacheType::Writeback {
            return Err(not_implemented(
                format!("drives[{}].cache_type", d.drive_id),
                "\"Unsafe\" (FLUSH as a no-op)",
                "leave it out or give \"Writeback\": cinder honours every FLUSH",
            ));
        }
        let is_read_only = d.is_read_only.unwrap_or(false);
        self.paths
            .check_beneath("block image", &path_on_host)
            .map_err(|e| host_file(key.clone(), e))?;
        if self.paths.check_host {
            open_checked(
                "block image",
                &path_on_host,
                !is_read_only,
                true,
                self.paths.allow_block_devices,
            )
            .map_err(|e| host_file(key, e))?;
        }
        if d.is_root_device {
            if let Some(root) = self
                .drives
                .iter()
                .find(|x| x.is_root_device && x.drive_id != d.drive_id)
            {
                return Err(ConfigError::DuplicateRootDevice {
                    id: d.drive_id.clone(),
                    existing: root.drive_id.clone(),
                });
            }
        }
        let new = DriveConfig {
            drive_id: d.drive_id.clone(),
            path_on_host,
            is_read_only,
            is_root_device: d.is_root_device,
            partuuid: d.partuuid.clone(),
            cache_type: d.cache_type,
            io_engine: d.io_engine,
            rate_limiter: d.rate_limiter,
        };
        match self.drives.iter().position(|x| x.drive_id == d.drive_id) {
            Some(i) if new.is_root_device == self.drives[i].is_root_device => self.drives[i] = new,
            Some(i) => {
                self.drives.remove(i);
                self.insert_drive(new);
            }
            None => self.insert_drive(new),
        }
        Ok(())
    }

    /// Adds a drive whose id must be new (a config file or the command line, where the same
    /// id twice is a mistake, not a replacement).
    pub fn add_drive(&mut self, d: &Drive) -> Result<(), ConfigError> {
        if self.drives.iter().any(|x| x.drive_id == d.drive_id) {
            return Err(ConfigError::DuplicateId {
                key: "drives.drive_id",
                id: d.drive_id.clone(),
            });
        }
        self.upsert_drive(d)
    }

    /// Adds an interface whose id must be new (as [`VmConfig::add_drive`]).
    pub fn add_net(&mut self, n: &NetworkInterface) -> Result<(), ConfigError> {
        if self.net.iter().any(|x| x.iface_id == n.iface_id) {
            return Err(ConfigError::DuplicateId {
                key: "network-interfaces.iface_id",
                id: n.iface_id.clone(),
            });
        }
        self.upsert_net(n)
    }

    fn insert_drive(&mut self, d: DriveConfig) {
        if d.is_root_device {
            self.drives.insert(0, d);
        } else {
            self.drives.push(d);
        }
    }

    /// Applies a post-boot drive update to the stored configuration.
    pub fn patch_drive(&mut self, p: &PartialDrive) -> Result<(), ConfigError> {
        let drive = self
            .drives
            .iter_mut()
            .find(|x| x.drive_id == p.drive_id)
            .ok_or_else(|| ConfigError::NotFound {
                key: "drive_id",
                id: p.drive_id.clone(),
            })?;
        if let Some(path) = &p.path_on_host {
            let key = format!("drives[{}].path_on_host", p.drive_id);
            let path = non_empty(key.clone(), path)?;
            self.paths
                .check_beneath("block image", &path)
                .map_err(|e| host_file(key, e))?;
            drive.path_on_host = path;
        }
        if p.rate_limiter.is_some() {
            check_rate_limiter(
                format!("drives[{}].rate_limiter", p.drive_id),
                &p.rate_limiter,
            )?;
            drive.rate_limiter = p.rate_limiter;
        }
        Ok(())
    }

    /// Adds an interface or replaces the one with the same id
    /// (`PUT /network-interfaces/{id}`).
    pub fn upsert_net(&mut self, n: &NetworkInterface) -> Result<(), ConfigError> {
        check_id("network-interfaces.iface_id", &n.iface_id)?;
        let id = n.iface_id.clone();
        let name = &n.host_dev_name;
        if name.is_empty()
            || name.len() > MAX_HOST_DEV_NAME_LEN
            || name
                .bytes()
                .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
        {
            return Err(ConfigError::InvalidHostDevName {
                id,
                name: name.clone(),
            });
        }
        let guest_mac = match &n.guest_mac {
            Some(m) => Some(MacAddr::from_str(m).map_err(|()| ConfigError::InvalidMac {
                id: id.clone(),
                mac: m.clone(),
            })?),
            None => None,
        };
        let mtu = match n.mtu {
            Some(mtu) => match u16::try_from(mtu) {
                Ok(m) if MTU_RANGE.contains(&mtu) => Some(m),
                _ => return Err(ConfigError::Mtu { id, mtu }),
            },
            None => None,
        };
        for other in self.net.iter().filter(|x| x.iface_id != id) {
            if &other.host_dev_name == name {
                return Err(ConfigError::DuplicateHostDevName {
                    id,
                    name: name.clone(),
                    other: other.iface_id.clone(),
                });
            }
            if guest_mac.is_some() && other.guest_mac == guest_mac {
                return Err(ConfigError::DuplicateMac {
                    id,
                    mac: n.guest_mac.clone().unwrap_or_default(),
                    other: other.iface_id.clone(),
                });
            }
        }
        // Enforced by the network device (devices::rate_limiter), each direction apart.
        check_rate_limiter(
            format!("network-interfaces[{id}].rx_rate_limiter"),
            &n.rx_rate_limiter,
        )?;
        check_rate_limiter(
            format!("network-interfaces[{id}].tx_rate_limiter"),
            &n.tx_rate_limiter,
        )?;
        let new = NetConfig {
            iface_id: id,
            host_dev_name: name.clone(),
            guest_mac,
            mtu,
            rx_rate_limiter: n.rx_rate_limiter,
            tx_rate_limiter: n.tx_rate_limiter,
        };
        match self.net.iter().position(|x| x.iface_id == new.iface_id) {
            Some(i) => self.net[i] = new,
            None => self.net.push(new),
        }
        Ok(())
    }

    /// Applies a post-boot interface update to the stored configuration.
    pub fn patch_net(&mut self, p: &PartialNetworkInterface) -> Result<(), ConfigError> {
        let iface = self
            .net
            .iter_mut()
            .find(|x| x.iface_id == p.iface_id)
            .ok_or_else(|| ConfigError::NotFound {
                key: "iface_id",
                id: p.iface_id.clone(),
            })?;
        let key = |dir: &str| format!("network-interfaces[{}].{dir}_rate_limiter", p.iface_id);
        check_rate_limiter(key("rx"), &p.rx_rate_limiter)?;
        check_rate_limiter(key("tx"), &p.tx_rate_limiter)?;
        if p.rx_rate_limiter.is_some() {
            iface.rx_rate_limiter = p.rx_rate_limiter;
        }
        if p.tx_rate_limiter.is_some() {
            iface.tx_rate_limiter = p.tx_rate_limiter;
        }
        Ok(())
    }

    /// Sets the vsock device (`PUT /vsock`).
    pub fn set_vsock(&mut self, v: &Vsock) -> Result<(), ConfigError> {
        if v.guest_cid < 3 || v.guest_cid == u32::MAX {
            return Err(ConfigError::VsockCid(v.guest_cid));
        }
        let uds_path = non_empty("vsock.uds_path".into(), &v.uds_path)?;
        self.paths
            .check_beneath("vsock socket", &uds_path)
            .map_err(|e| host_file("vsock.uds_path", e))?;
        self.vsock = Some(VsockConfig {
            guest_cid: v.guest_cid,
            uds_path,
        });
        Ok(())
    }

    /// Enables the entropy device (`PUT /entropy`).
    pub fn set_entropy(&mut self, e: &EntropyDevice) -> Result<(), ConfigError> {
        // The rate limiter is enforced by the device (devices::rate_limiter).
        check_rate_limiter("entropy.rate_limiter".into(), &e.rate_limiter)?;
        self.entropy = Some(EntropyConfig {
            rate_limiter: e.rate_limiter,
        });
        Ok(())
    }

    /// Sets up the balloon device (`PUT /balloon`): the target must fit the guest's memory;
    /// free page hinting is refused (free page reporting gives free memory back instead).
    pub fn set_balloon(&mut self, b: &Balloon) -> Result<(), ConfigError> {
        if b.free_page_hinting {
            return Err(not_implemented(
                "balloon.free_page_hinting".into(),
                "free page hinting",
                "leave it false; free_page_reporting gives the guest's free memory back",
            ));
        }
        check_balloon_size(b.amount_mib, self.machine.mem_size_mib)?;
        self.balloon = Some(BalloonConfig {
            amount_mib: b.amount_mib,
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: b.stats_polling_interval_s,
            free_page_reporting: b.free_page_reporting,
        });
        Ok(())
    }

    /// Records a new balloon target (`PATCH /balloon`); on error nothing changes.
    pub fn patch_balloon(&mut self, amount_mib: u32) -> Result<(), ConfigError> {
        let mem = self.machine.mem_size_mib;
        let b = self.balloon.as_mut().ok_or(ConfigError::NoBalloon)?;
        check_balloon_size(amount_mib, mem)?;
        b.amount_mib = amount_mib;
        Ok(())
    }

    /// Records a new statistics interval (`PATCH /balloon/statistics`): statistics cannot be
    /// turned on or off once set up; on error nothing changes.
    pub fn patch_balloon_stats(&mut self, secs: u16) -> Result<(), ConfigError> {
        let b = self.balloon.as_mut().ok_or(ConfigError::NoBalloon)?;
        if (secs == 0) != (b.stats_polling_interval_s == 0) {
            return Err(ConfigError::BalloonStatsChange);
        }
        b.stats_polling_interval_s = secs;
        Ok(())
    }

    /// Sets the metrics destination (`PUT /metrics`).
    pub fn set_metrics(&mut self, m: &Metrics) -> Result<(), ConfigError> {
        let path = non_empty("metrics.metrics_path".into(), &m.metrics_path)?;
        self.paths
            .check_beneath("metrics file", &path)
            .map_err(|e| host_file("metrics.metrics_path", e))?;
        self.metrics = Some(m.clone());
        Ok(())
    }

    /// Checks the whole configuration, e.g. after the CLI filled it in
    /// field by field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut check = VmConfig {
            machine: self.machine.clone(),
            ..VmConfig::with_paths(self.paths.clone())
        };
        self.machine.validate()?;
        if let Some(b) = &self.boot_source {
            check.set_boot_source(&BootSource {
                kernel_image_path: b.kernel_image_path.to_string_lossy().into_owned(),
                initrd_path: b
                    .initrd_path
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                boot_args: b.boot_args.clone(),
            })?;
        }
        for d in self.drive_models() {
            check.add_drive(&d)?;
        }
        for n in self.net_models() {
            check.add_net(&n)?;
        }
        if let Some(v) = &self.vsock {
            check.set_vsock(&Vsock {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.to_string_lossy().into_owned(),
                vsock_id: None,
            })?;
        }
        if let Some(e) = &self.entropy {
            check.set_entropy(&EntropyDevice {
                rate_limiter: e.rate_limiter,
            })?;
        }
        if let Some(b) = &self.balloon {
            check.set_balloon(&b.to_model())?;
        }
        if let Some(m) = &self.metrics {
            check.set_metrics(m)?;
        }
        Ok(())
    }

    /// The root drive, if any.
    pub fn root_drive(&self) -> Option<&DriveConfig> {
        self.drives.iter().find(|d| d.is_root_device)
    }

    fn drive_models(&self) -> Vec<Drive> {
        self.drives
            .iter()
            .map(|d| Drive {
                drive_id: d.drive_id.clone(),
                partuuid: d.partuuid.clone(),
                is_root_device: d.is_root_device,
                cache_type: d.cache_type,
                is_read_only: Some(d.is_read_only),
                path_on_host: Some(d.path_on_host.to_string_lossy().into_owned()),
                rate_limiter: d.rate_limiter,
                io_engine: d.io_engine,
                socket: None,
            })
            .collect()
    }

    fn net_models(&self) -> Vec<NetworkInterface> {
        self.net
            .iter()
            .map(|n| NetworkInterface {
                iface_id: n.iface_id.clone(),
                host_dev_name: n.host_dev_name.clone(),
                guest_mac: n.guest_mac.map(|m| m.to_string()),
                mtu: n.mtu.map(u32::from),
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            })
            .collect()
    }

    /// The `GET /vm/config` view of this configuration. It is also a valid
    /// config file: `from_config_file(to_json(to_full_config()))` round-trips.
    pub fn to_full_config(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            boot_source: self.boot_source.as_ref().map(|b| BootSource {
                kernel_image_path: b.kernel_image_path.to_string_lossy().into_owned(),
                initrd_path: b
                    .initrd_path
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                boot_args: b.boot_args.clone(),
            }),
            drives: self.drive_models(),
            machine_config: Some(self.machine.to_model()),
            network_interfaces: self.net_models(),
            vsock: self.vsock.as_ref().map(|v| Vsock {
                guest_cid: v.guest_cid,
                uds_path: v.uds_path.to_string_lossy().into_owned(),
                vsock_id: None,
            }),
            entropy: self.entropy.as_ref().map(|e| EntropyDevice {
                rate_limiter: e.rate_limiter,
            }),
            balloon: self.balloon.as_ref().map(BalloonConfig::to_model),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
        }
    }
}
