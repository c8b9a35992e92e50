//! Real TAP devices in a private network namespace (the test thread unshares its own). Needs
//! root (CAP_SYS_ADMIN and CAP_NET_ADMIN); without it the test says so and returns.

use super::*;
use std::os::fd::{FromRawFd, OwnedFd};

const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// Run `f` on a thread in a fresh network namespace; false if that is not possible here.
fn in_netns(f: impl FnOnce() + Send + 'static) -> bool {
    std::thread::spawn(move || {
        // SAFETY: unshare(2) on this thread only; no pointers.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipping: cannot create a network namespace: {}",
                io::Error::last_os_error()
            );
            return false;
        }
        f();
        true
    })
    .join()
    .unwrap()
}

/// Create a persistent interface like `ip tuntap add` does.
fn create(name: &str, flags: u16) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    let mut req = IfReqFlags::new(name, flags | IFF_NO_PI);
    // SAFETY: ifreq-sized buffer valid for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req) };
    assert_eq!(r, 0);
    // SAFETY: the argument is passed by value.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    assert_eq!(r, 0);
}

fn set_up(name: &str) {
    // SAFETY: plain socket(2) call.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    assert!(s >= 0);
    // SAFETY: `s` was just created and is owned here.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReqFlags::new(name, 0);
    // SAFETY: ifreq-sized buffers valid for the calls.
    unsafe {
        assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req), 0);
        req.flags |= u16::try_from(libc::IFF_UP).unwrap();
        assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req), 0);
    }
}

#[test]
fn open_errors_and_frames_through_a_real_tap() {
    in_netns(|| {
        for bad in ["", "a/b", "sixteen-chars-xx", "with space", "."] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::InvalidName(_))),
                "{bad:?}"
            );
        }
        let err = Tap::open("cndr-missing").unwrap_err();
        assert!(matches!(err, TapError::NotFound(_)));
        assert_eq!(err.to_string().lines().count(), 1, "one-line error: {err}");
        assert!(err
            .to_string()
            .starts_with("tap cndr-missing does not exist"));
        // Not created by the attempt.
        assert!(!interface_exists("cndr-missing"));

        create("cndr-tun0", IFF_TUN);
        assert!(matches!(Tap::open("cndr-tun0"), Err(TapError::NotTap(_))));
        assert!(matches!(Tap::open("lo"), Err(TapError::NotTap(_))));

        create("cndr-tap0", IFF_TAP);
        let mut tap = Tap::open("cndr-tap0").unwrap();
        assert_eq!(tap.name(), "cndr-tap0");
        let err = Tap::open("cndr-tap0").unwrap_err();
        assert!(matches!(err, TapError::Busy(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "tap cndr-tap0 is in use by another process"
        );
        tap.set_offload(
            offload::TUN_F_CSUM | offload::TUN_F_TSO4 | offload::TUN_F_TSO6 | offload::TUN_F_UFO,
        )
        .unwrap();
        tap.set_offload(0).unwrap();

        // Frames in both directions with the 12-byte header, through an AF_PACKET socket.
        set_up("cndr-tap0");
        // SAFETY: plain socket(2) call.
        let ps = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(u16::try_from(libc::ETH_P_ALL).unwrap().to_be()),
            )
        };
        assert!(ps >= 0, "{}", io::Error::last_os_error());
        // SAFETY: just created, owned here.
        let ps = unsafe { OwnedFd::from_raw_fd(ps) };
        // SAFETY: zeroed sockaddr_ll is valid; bind reads it.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        sll.sll_protocol = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
        sll.sll_ifindex = {
            let c = std::ffi::CString::new("cndr-tap0").unwrap();
            // SAFETY: valid C string.
            let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
            i32::try_from(index).unwrap()
        };
        // SAFETY: `sll` is a valid sockaddr_ll of the given size.
        let r = unsafe {
            libc::bind(
                ps.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        // Guest -> host: header + a 60-byte frame with an unused ethertype.
        let mut frame = vec![0xffu8; 6];
        frame.extend([0x02, 0, 0, 0, 0, 0x0f, 0x88, 0xb5]);
        frame.extend((0..46u8).map(|i| i ^ 0x5a));
        let mut pkt = vec![0u8; VNET_HDR_LEN];
        pkt.extend(&frame);
        assert_eq!(tap.send(&pkt).unwrap(), pkt.len());
        let mut buf = vec![0u8; 2048];
        let mut got = None;
        for _ in 0..100 {
            // SAFETY: `buf` valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    ps.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let n = usize::try_from(n).unwrap_or(0);
            if n > 0 && buf[..n] == frame[..] {
                got = Some(n);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            got.is_some(),
            "the frame reached the host without its header"
        );
        // Host -> guest: the tap gives header + frame.
        // SAFETY: `frame` valid for reads of its length.
        let n = unsafe { libc::send(ps.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, isize::try_from(frame.len()).unwrap());
        let mut seen = false;
        for _ in 0..100 {
            match tap.recv(&mut buf) {
                Ok(n) if buf[VNET_HDR_LEN..n] == frame[..] => {
                    seen = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("tap read: {e}"),
            }
        }
        assert!(seen, "the frame came out of the tap after a 12-byte header");
    });
}
