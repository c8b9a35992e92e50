//! An existing Linux TAP interface opened for a virtio-net device, and the [`NetBackend`]
//! trait the device uses (so RX/TX logic can be tested over a socketpair, without root).
//!
//! cinder never creates or configures host interfaces: [`Tap::open`] attaches to a TAP that
//! someone created beforehand (`ip tuntap add dev NAME mode tap`) and refuses to create one.
//! Opening is `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` on `/dev/net/tun`; the
//! vnet header size is set to 12 bytes (`TUNSETVNETHDRSZ`) and offloads start off.

use std::ffi::CStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;

/// `IFF_TAP` (linux/if_tun.h).
pub const IFF_TAP: u16 = 0x0002;
/// `IFF_TUN`.
pub const IFF_TUN: u16 = 0x0001;
/// `IFF_NO_PI`: no packet information prefix.
pub const IFF_NO_PI: u16 = 0x1000;
/// `IFF_VNET_HDR`: frames carry a virtio-net header.
pub const IFF_VNET_HDR: u16 = 0x4000;
/// `IFF_PERSIST` (reported by TUNGETIFF): the interface outlives its file descriptors.
pub const IFF_PERSIST: u16 = 0x0800;

/// [`VNET_HDR_LEN`] as the C int `TUNSETVNETHDRSZ` reads.
const VNET_HDR_SIZE: libc::c_int = 12;
const _: () = assert!(VNET_HDR_SIZE as usize == VNET_HDR_LEN);

/// TUN offload flags for `TUNSETOFFLOAD`.
pub mod offload {
    /// The guest accepts partial checksums.
    pub const TUN_F_CSUM: u32 = 0x01;
    /// The guest accepts TSOv4.
    pub const TUN_F_TSO4: u32 = 0x02;
    /// The guest accepts TSOv6.
    pub const TUN_F_TSO6: u32 = 0x04;
    /// The guest accepts TSO with ECN.
    pub const TUN_F_TSO_ECN: u32 = 0x08;
    /// The guest accepts UFO.
    pub const TUN_F_UFO: u32 = 0x10;
}

// _IOW('T', 202, int) and friends (asm-generic ioctl encoding, x86_64 and aarch64).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFNAMSIZ: usize = 16;

/// What the device needs from the host side of a network interface.
pub trait NetBackend: AsRawFd + Send + fmt::Debug {
    /// Read one frame (virtio-net header first) without blocking; `WouldBlock` when none is
    /// queued.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write one frame (virtio-net header first).
    fn send(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Apply the offloads the guest accepted (`offload::TUN_F_*`).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// Errors opening a TAP interface. Each message is one line naming the interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("invalid tap name {0:?}: use 1 to 15 characters without '/', ':' or whitespace")]
    InvalidName(String),
    /// No interface of that name in this network namespace.
    #[error(
        "tap {0} does not exist: create it first (ip tuntap add dev {0} mode tap) and bring it up"
    )]
    NotFound(String),
    /// The interface exists but is not a TAP.
    #[error("{0} is not a tap device (it is a tun device or another kind of interface)")]
    NotTap(String),
    /// Another process holds the TAP.
    #[error("tap {0} is in use by another process")]
    Busy(String),
    /// No CAP_NET_ADMIN and the TAP is not owned by this user.
    #[error("no permission to attach to tap {0}: run with CAP_NET_ADMIN or create the tap with `user`/`group` set to this user")]
    PermissionDenied(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun for tap {name}: {source}")]
    OpenTun {
        /// Interface name.
        name: String,
        /// The OS error.
        source: io::Error,
    },
    /// Another ioctl failed.
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// The ioctl.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IfReqFlags {
    name: [u8; IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str, flags: u16) -> Self {
        let mut req = IfReqFlags {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

/// An open TAP interface.
pub struct Tap {
    file: File,
    name: String,
}

impl fmt::Debug for Tap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("fd", &self.file.as_raw_fd())
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

fn interface_exists(name: &str) -> bool {
    let mut buf = [0u8; IFNAMSIZ];
    buf[..name.len()].copy_from_slice(name.as_bytes());
    let Ok(cname) = CStr::from_bytes_until_nul(&buf) else {
        return false;
    };
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

impl Tap {
    /// Attach to the existing TAP `name` (in the caller's network namespace), non-blocking,
    /// with 12-byte virtio-net headers and no offloads.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        // TUNSETIFF would create a missing interface: refuse before, and check after (below)
        // in case it vanished in between.
        if !interface_exists(name) {
            return Err(TapError::NotFound(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let mut req = IfReqFlags::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes, which IfReqFlags is)
        // through the pointer, valid for the call; the fd is ours.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    TapError::PermissionDenied(name.to_string())
                }
                Some(libc::EINVAL) => TapError::NotTap(name.to_string()),
                _ => TapError::Ioctl {
                    name: name.to_string(),
                    what: "TUNSETIFF",
                    source: err,
                },
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        // A TAP made with `ip tuntap add` is persistent; one TUNSETIFF just created is not.
        let flags = tap.get_flags()?;
        if flags & IFF_PERSIST == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        if flags & IFF_TAP == 0 {
            return Err(TapError::NotTap(name.to_string()));
        }
        let size = VNET_HDR_SIZE;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, valid for the call.
        let ret = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        if ret < 0 {
            return Err(tap.ioctl_error("TUNSETVNETHDRSZ"));
        }
        let mut tap = tap;
        tap.set_offload(0).map_err(|source| TapError::Ioctl {
            name: name.to_string(),
            what: "TUNSETOFFLOAD",
            source,
        })?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source: io::Error::last_os_error(),
        }
    }

    fn get_flags(&self) -> Result<u16, TapError> {
        let mut req = IfReqFlags::new("", 0);
        // SAFETY: TUNGETIFF writes a `struct ifreq` (40 bytes) through the pointer, valid
        // for the call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNGETIFF, &mut req) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNGETIFF"));
        }
        Ok(req.flags)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        let arg = libc::c_ulong::from(flags);
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is ours.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
