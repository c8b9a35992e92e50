//! The guest's kernel command line and the virtio slots it announces.
//!
//! The guest gets: the kernel part of the user's command line, one
//! `virtio_mmio.device=4K@ADDR:IRQ` per virtio device (in slot order), `root=/dev/vdX ro|rw`
//! for the root drive, then init's part (from the first `--` outside double quotes).

use api::config::VmConfig;
use arch::layout;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;

use crate::options::ConsoleSpec;

/// The command line a guest gets when none is configured.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// The MMIO base and IRQ of virtio slot `i`.
pub fn virtio_slot(i: usize) -> (u64, u32) {
    (
        layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE,
        // i < MAX_VIRTIO_DEVICES (19): slots beyond are refused before any is placed.
        layout::IRQ_BASE.saturating_add(u32::try_from(i).unwrap_or(u32::MAX)),
    )
}

/// The size of one virtio-mmio window.
const VIRTIO_MMIO_SIZE: u64 = layout::VIRTIO_MMIO_SIZE;

/// How many virtio slots there are: one per IOAPIC pin from `IRQ_BASE` to `IRQ_MAX`.
pub const MAX_VIRTIO_DEVICES: usize = (layout::IRQ_MAX - layout::IRQ_BASE + 1) as usize;

/// How many virtio devices the guest gets, each in its own slot: the drives (the root drive
/// first, so it is vda), the network interfaces, then rng, virtio-console, vsock and the balloon.
pub fn virtio_count(cfg: &VmConfig, console: &ConsoleSpec) -> usize {
    cfg.drives.len()
        + cfg.net.len()
        + usize::from(cfg.entropy.is_some())
        + usize::from(console.is_virtio())
        + usize::from(cfg.vsock.is_some())
        + usize::from(cfg.balloon.is_some())
}

/// The configured command line, or [`DEFAULT_CMDLINE`].
pub fn user_cmdline(cfg: &VmConfig) -> &str {
    cfg.boot_source
        .as_ref()
        .and_then(|b| b.boot_args.as_deref())
        .unwrap_or(DEFAULT_CMDLINE)
}

/// Why a command line could not be built (linux-loader refuses what is not printable ASCII).
#[derive(Debug, thiserror::Error)]
#[error("kernel command line: {0} (it takes printable ASCII only)")]
pub struct CmdlineError(#[source] pub linux_loader::cmdline::Error);

/// The guest's kernel command line, built as the VM is put together (linux-loader's
/// `Cmdline`): the user's kernel parameters first, then a `virtio_mmio.device=` entry for
/// each virtio device as it is placed in its slot, then the root device, and init's
/// arguments (what followed the user's first `--` outside double quotes) last.
pub struct GuestCmdline {
    line: Cmdline,
    init: String,
}

/// Room for the builder; the guest's real limit (2048 bytes) is checked, with its own
/// message, when the line is written into guest memory.
const BUILD_CAPACITY: usize = 1 << 20;

impl GuestCmdline {
    /// Starts from the user's command line `user`.
    pub fn new(user: &str) -> Result<Self, CmdlineError> {
        let user = user.trim();
        let (kernel_part, init) = match init_args_start(user) {
            Some(i) => (&user[..i], user[i + 2..].trim()),
            None => (user, ""),
        };
        let mut line = Cmdline::new(BUILD_CAPACITY).map_err(CmdlineError)?;
        if !kernel_part.trim().is_empty() {
            line.insert_str(kernel_part).map_err(CmdlineError)?;
        }
        Ok(GuestCmdline {
            line,
            init: init.to_string(),
        })
    }

    /// Announces the virtio device just placed in slot `slot`.
    pub fn add_virtio_device(&mut self, slot: usize) -> Result<(), CmdlineError> {
        let (base, irq) = virtio_slot(slot);
        self.line
            .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(base), irq, None)
            .map_err(CmdlineError)
    }

    /// Boots from the `index`th virtio disk (`root=/dev/vdX`, `ro` or `rw`).
    pub fn add_root(&mut self, index: usize, read_only: bool) -> Result<(), CmdlineError> {
        let mode = if read_only { "ro" } else { "rw" };
        self.line
            .insert_str(format!("root=/dev/{} {mode}", virtio_disk_name(index)))
            .map_err(CmdlineError)
    }

    /// The finished command line.
    pub fn finish(mut self) -> Result<String, CmdlineError> {
        if !self.init.is_empty() {
            self.line
                .insert_init_args(&self.init)
                .map_err(CmdlineError)?;
        }
        let c = self.line.as_cstring().map_err(CmdlineError)?;
        Ok(c.to_string_lossy().into_owned())
    }
}

/// The name Linux gives the `i`th virtio disk: vda .. vdz, vdaa .. vdzz, ...
fn virtio_disk_name(i: usize) -> String {
    let mut letters = Vec::new();
    let mut n = i;
    loop {
        letters.push(b'a' + u8::try_from(n % 26).unwrap_or(0));
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

/// Where the `--` that starts init's arguments is in a kernel command line: the first word
/// that is exactly `--` outside double quotes, as Linux's `parse_args` finds it (a `--`
/// inside a quoted value, such as `run="set -- a"`, belongs to that value).
pub(crate) fn init_args_start(cmdline: &str) -> Option<usize> {
    let mut in_quote = false;
    let mut word_start = None;
    for (i, ch) in cmdline
        .char_indices()
        .chain(std::iter::once((cmdline.len(), ' ')))
    {
        if ch == '"' {
            in_quote = !in_quote;
        }
        if ch.is_ascii_whitespace() && !in_quote {
            if let Some(start) = word_start.take() {
                if &cmdline[start..i] == "--" {
                    return Some(start);
                }
            }
        } else if word_start.is_none() {
            word_start = Some(i);
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use api::config::{BootSourceConfig, DriveConfig, EntropyConfig, NetConfig, VsockConfig};
    use std::path::PathBuf;

    /// A configuration booting `k` with `cmdline`, `drives` (as given: the root drive
    /// first) and an entropy device.
    pub(crate) fn config(cmdline: &str, drives: Vec<DriveConfig>) -> VmConfig {
        VmConfig {
            boot_source: Some(BootSourceConfig {
                kernel_image_path: PathBuf::from("k"),
                initrd_path: None,
                boot_args: Some(cmdline.into()),
            }),
            drives,
            entropy: Some(EntropyConfig::default()),
            // Paths that need not exist: the builder's own checks are tested here.
            ..VmConfig::with_paths(api::paths::PathPolicy::UNCHECKED)
        }
    }

    /// A drive backed by the file named as its id.
    pub(crate) fn drive(id: &str, root: bool, ro: bool) -> DriveConfig {
        DriveConfig {
            drive_id: id.into(),
            path_on_host: PathBuf::from(id),
            is_read_only: ro,
            is_root_device: root,
            partuuid: None,
            cache_type: Default::default(),
            io_engine: Default::default(),
            rate_limiter: None,
        }
    }

    /// What the builder writes for `cfg` with a serial console: every virtio device placed in
    /// slot order (drives first), then the root drive.
    pub(crate) fn cmdline(cfg: &VmConfig) -> String {
        cmdline_with(cfg, &ConsoleSpec::Serial)
    }

    fn cmdline_with(cfg: &VmConfig, console: &ConsoleSpec) -> String {
        let mut c = GuestCmdline::new(user_cmdline(cfg)).unwrap();
        for slot in 0..virtio_count(cfg, console) {
            c.add_virtio_device(slot).unwrap();
        }
        if let Some(i) = cfg.drives.iter().position(|d| d.is_root_device) {
            c.add_root(i, cfg.drives[i].is_read_only).unwrap();
        }
        c.finish().unwrap()
    }

    #[test]
    fn cmdline_gets_devices_and_root_before_init_args() {
        let c = config(
            "console=ttyS0 -- init-arg",
            vec![drive("r", true, true), drive("d", false, false)],
        );
        assert_eq!(
            cmdline(&c),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7 root=/dev/vda ro -- init-arg"
        );
        let c = config("quiet", vec![]);
        assert_eq!(cmdline(&c), "quiet virtio_mmio.device=4K@0xd0000000:5");
        let c = config("-- a b", vec![]);
        assert_eq!(cmdline(&c), "virtio_mmio.device=4K@0xd0000000:5 -- a b");
    }

    #[test]
    fn a_quoted_double_dash_is_not_the_init_separator() {
        let c = config(
            "quiet run=\"set -- $x; echo --\" x=\"a\"-- -- init \"--\"",
            vec![drive("r", true, false)],
        );
        assert_eq!(
            cmdline(&c),
            "quiet run=\"set -- $x; echo --\" x=\"a\"-- virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6 root=/dev/vda rw -- init \"--\""
        );
        assert_eq!(init_args_start("a=\"--\" b"), None);
        assert_eq!(init_args_start("--"), Some(0));
        assert_eq!(init_args_start("a\t--\tb"), Some(2));
        assert_eq!(init_args_start("a --b -- c"), Some(6));
    }

    #[test]
    fn no_boot_args_is_the_default_command_line() {
        let mut c = config("", vec![]);
        c.entropy = None;
        if let Some(b) = c.boot_source.as_mut() {
            b.boot_args = None;
        }
        assert_eq!(cmdline(&c), DEFAULT_CMDLINE);
    }

    #[test]
    fn every_virtio_device_gets_a_slot() {
        let mut c = config("quiet", vec![drive("r", true, false)]);
        c.net.push(NetConfig {
            iface_id: "n".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        });
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::from("v.sock"),
        });
        let console = ConsoleSpec::Virtio(Default::default());
        assert_eq!(virtio_count(&c, &console), 5);
        assert_eq!(virtio_count(&c, &ConsoleSpec::Serial), 4);
        assert_eq!(
            cmdline_with(&c, &console),
            "quiet virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7 virtio_mmio.device=4K@0xd0003000:8 \
             virtio_mmio.device=4K@0xd0004000:9 root=/dev/vda rw"
        );
        assert_eq!(
            virtio_slot(MAX_VIRTIO_DEVICES - 1),
            (0xd000_0000 + 18 * 0x1000, 23)
        );
    }

    #[test]
    fn what_linux_loader_refuses_is_an_error() {
        let e = GuestCmdline::new("quiet\tx").err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("printable ASCII")),
            "{e:?}"
        );
        let mut c = GuestCmdline::new("a -- b").unwrap();
        c.add_virtio_device(0).unwrap();
        assert_eq!(
            c.finish().unwrap(),
            "a virtio_mmio.device=4K@0xd0000000:5 -- b"
        );
    }

    #[test]
    fn disk_names_follow_linux() {
        assert_eq!(virtio_disk_name(0), "vda");
        assert_eq!(virtio_disk_name(25), "vdz");
        assert_eq!(virtio_disk_name(26), "vdaa");
        assert_eq!(virtio_disk_name(27), "vdab");
        assert_eq!(virtio_disk_name(26 + 26 * 26), "vdaaa");
    }
}
