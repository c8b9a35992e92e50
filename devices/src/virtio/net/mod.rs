//! virtio-net backed by an existing Linux TAP device (virtio 1.2 §5.1).
//!
//! * [`tap`]: opening a TAP device (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and the
//!   [`NetBackend`] trait the device model talks to (a TAP, or a socketpair in tests).
//! * [`device`]: the [`Net`] model (features, config space, RX and TX processing).
//! * [`event_handler`]: how the event loop drives a [`Net`] (TAP readiness, queue kicks).
//!
//! Frames cross the TAP with the 12-byte virtio 1.x header in front (`TUNSETVNETHDRSZ`), so
//! offload metadata (checksum offsets, GSO) passes straight between guest and host; the
//! offloads the guest accepts are applied to the TAP with `TUNSETOFFLOAD` on activation.
//! cinder never creates or configures host interfaces: the TAP must already exist.

/// `log::error!` limited like [`crate::virtio::log_limit`]'s `warn_ratelimited!`: at most
/// its `BURST` lines per `WINDOW` per call site. After a TAP failure each guest kick would
/// otherwise log again, at the guest's kick rate.
macro_rules! error_ratelimited {
    ($($arg:tt)+) => {{
        static LIMITER: $crate::virtio::log_limit::LogLimiter =
            $crate::virtio::log_limit::LogLimiter::new();
        if LIMITER.allow() {
            log::error!($($arg)+);
        }
    }};
}

pub mod device;
pub mod event_handler;
pub mod tap;

use std::io;

pub use device::{Net, NetStats};
pub use tap::{NetBackend, Tap, TapError};

/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the virtio-net header in front of every frame (virtio 1.x: with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Shortest frame accepted from the guest: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Longest frame (header excluded): the largest IP datagram plus an Ethernet header and one
/// VLAN tag. What a guest sends beyond this is dropped.
pub const MAX_FRAME_LEN: usize = 65535 + 14 + 4;
/// Default MTU reported in config space.
pub const DEFAULT_MTU: u16 = 1500;
/// Smallest MTU accepted in the configuration (IPv4 minimum).
pub const MIN_MTU: u16 = 68;

/// virtio-net feature bits (virtio 1.2 §5.1.3), from virtio-bindings: checksum offload each
/// way, `mtu` / `mac` / `status` in config space, TSO and UFO each way, mergeable receive
/// buffers.
pub mod features {
    pub use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    };
}

/// `status` bit in config space: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// virtio-net header `flags`: the checksum at `csum_start + csum_offset` must be completed.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// virtio-net header `flags` (RX only): the checksum was validated.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// virtio-net header `gso_type`: no segmentation.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// virtio-net header `gso_type`: TCPv4 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// virtio-net header `gso_type`: UDP fragmentation.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// virtio-net header `gso_type`: TCPv6 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// virtio-net header `gso_type` bit: ECN (needs VIRTIO_NET_F_HOST_ECN, not offered).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// A MAC address.
pub type MacAddr = [u8; 6];

/// How to build a [`Net`] device on a TAP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of an existing TAP interface (at most 15 bytes).
    pub tap: String,
    /// The guest's MAC address; see [`generate_mac`] for a stable default.
    pub mac: MacAddr,
    /// MTU reported to the guest (VIRTIO_NET_F_MTU), 68..=65535.
    pub mtu: u16,
}

/// Errors building a [`Net`] device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening the TAP failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The MAC address is multicast or all zeros.
    #[error("MAC address {0} is not a unicast address: the first byte must be even and the address non-zero")]
    MacNotUnicast(String),
    /// A MAC address string did not parse.
    #[error("invalid MAC address {0:?}: expected six hex bytes like 02:00:00:00:00:01")]
    MacSyntax(String),
    /// The MTU is out of range.
    #[error("MTU {0} is out of range: use 68..=65535")]
    Mtu(u16),
    /// Creating an event fd failed.
    #[error("cannot create an event fd for the network device: {0}")]
    EventFd(io::Error),
    /// A rate limiter's buckets are out of range.
    #[error("rate_limiter: {0}")]
    RateLimiter(#[from] crate::rate_limiter::RateLimiterError),
    /// Creating a rate limiter's timer failed.
    #[error("cannot create the network device's rate limiter timer: {0}")]
    TimerFd(io::Error),
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &MacAddr) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parse `aa:bb:cc:dd:ee:ff` (or with `-`), and require a unicast, non-zero address.
pub fn parse_mac(s: &str) -> Result<MacAddr, NetError> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(NetError::MacSyntax(s.to_string()));
    }
    let mut mac = [0u8; 6];
    for (out, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return Err(NetError::MacSyntax(s.to_string()));
        }
        *out = u8::from_str_radix(part, 16).map_err(|_| NetError::MacSyntax(s.to_string()))?;
    }
    check_unicast(&mac)?;
    Ok(mac)
}

/// Whether `mac` may be a guest's address.
pub fn check_unicast(mac: &MacAddr) -> Result<(), NetError> {
    if mac[0] & 1 != 0 || mac.iter().all(|&b| b == 0) {
        return Err(NetError::MacNotUnicast(format_mac(mac)));
    }
    Ok(())
}

/// A locally administered unicast MAC derived from `seed` (e.g. the VM id and the interface
/// id): stable for the same seed, different (with overwhelming probability) across seeds.
/// FNV-1a 64 of the seed; the first byte gets the locally-administered bit and loses the
/// multicast bit.
pub fn generate_mac(seed: &[u8]) -> MacAddr {
    let h = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    // Mix the high bits down so every output byte depends on every input byte.
    let h = (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let h = h ^ (h >> 32);
    let b = h.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_format_generate() {
        let m = parse_mac("02:00:0a:00:02:0f").unwrap();
        assert_eq!(m, [2, 0, 0xa, 0, 2, 0xf]);
        assert_eq!(format_mac(&m), "02:00:0a:00:02:0f");
        assert_eq!(parse_mac("02-00-0A-00-02-0F").unwrap(), m);
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "0g:00:00:00:00:01",
            "2:0:0:0:0:1",
        ] {
            assert!(
                matches!(parse_mac(bad), Err(NetError::MacSyntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_mac("01:00:5e:00:00:01"),
            Err(NetError::MacNotUnicast(_))
        ));
        assert!(matches!(
            parse_mac("00:00:00:00:00:00"),
            Err(NetError::MacNotUnicast(_))
        ));
        let a = generate_mac(b"vm1/eth0");
        assert_eq!(a, generate_mac(b"vm1/eth0"));
        assert_ne!(a, generate_mac(b"vm1/eth1"));
        assert_ne!(a, generate_mac(b"vm2/eth0"));
        assert_eq!(a[0] & 3, 2, "locally administered unicast");
        check_unicast(&a).unwrap();
    }
}
