//! A private network namespace with a TAP for network tests, and an ICMP ping from inside it.
//!
//! Each [`NetNs`] is `cndr-t-<pid>-<n>` holding a TAP with 10.0.2.2/24; the VMM runs inside it
//! (`ip netns exec`, see [`NetNs::wrap`]) and the host side runs on a thread that entered it
//! with setns(2) ([`NetNs::run`]). Dropping it deletes the TAP and the namespace, so all
//! traffic stays on 10.0.2.0/24 inside the namespace and nothing is left behind.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The host's address on the TAP.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The address tests give the guest.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);

/// Runs a command that must succeed.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a TAP at 10.0.2.2/24, deleted on drop.
pub struct NetNs {
    /// The namespace's name (`cndr-t-<pid>-<n>`), for `ip netns exec`.
    pub name: String,
    /// The TAP device's name inside the namespace (`tapc<n>`).
    pub tap: String,
}

impl NetNs {
    /// Creates a fresh namespace with `lo` up and the TAP at 10.0.2.2/24, up (panics if an
    /// `ip` command fails).
    pub fn new() -> NetNs {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let ns = NetNs {
            name: format!("cndr-t-{pid}-{n}"),
            tap: format!("tapc{n}"),
        };
        sh(&["ip", "netns", "add", &ns.name]);
        let x = |cmd: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &ns.name];
            v.extend_from_slice(cmd);
            sh(&v);
        };
        x(&["ip", "link", "set", "lo", "up"]);
        x(&["ip", "tuntap", "add", "dev", &ns.tap, "mode", "tap"]);
        x(&["ip", "addr", "add", "10.0.2.2/24", "dev", &ns.tap]);
        x(&["ip", "link", "set", &ns.tap, "up"]);
        ns
    }

    /// `ip netns exec NS <program> <args>` for a prepared command.
    pub fn wrap(&self, c: &Command) -> Command {
        let mut w = Command::new("ip");
        w.args(["netns", "exec", &self.name])
            .arg(c.get_program())
            .args(c.get_args());
        w
    }

    /// Runs `f` on a thread inside the namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        std::thread::spawn(move || {
            // SAFETY: setns(2) on this thread with a namespace fd we hold open.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip", "link", "del", &self.tap])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut s: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !u16::try_from(s).expect("the sum is folded into 16 bits")
}

/// ICMP echo to `dst` through a raw socket (run it inside the namespace); the number of
/// replies to `count` requests, each waited for up to `timeout`.
pub fn ping(dst: Ipv4Addr, count: u16, timeout: Duration) -> u16 {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw ICMP socket: {}", io::Error::last_os_error());
    // SAFETY: just created and owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt reads a timeval through the pointer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>())
                .expect("a timeval's size fits socklen_t"),
        )
    };
    let sa = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits sa_family_t"),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let id = (std::process::id() & 0xffff) as u16;
    let mut replies = 0;
    for seq in 1..=count {
        let mut pkt = vec![8u8, 0, 0, 0];
        pkt.extend(id.to_be_bytes());
        pkt.extend(seq.to_be_bytes());
        pkt.extend((0..56u8).map(|i| i.wrapping_mul(3)));
        let c = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        // SAFETY: `pkt` and `sa` are valid for the call.
        unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>())
                    .expect("a sockaddr_in's size fits socklen_t"),
            )
        };
        let until = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while Instant::now() < until {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            if n < 28 {
                continue;
            }
            let ihl = usize::from(buf[0] & 0xf) * 4;
            let icmp = &buf[ihl.min(n)..n];
            if buf[12..16] == dst.octets()
                && icmp.len() == pkt.len()
                && icmp[0] == 0
                && icmp[4..] == pkt[4..]
                && icmp_checksum(icmp) == 0
            {
                replies += 1;
                break;
            }
        }
    }
    replies
}
