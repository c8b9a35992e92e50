//! cinder on a terminal: the test owns a pseudo-terminal and gives its slave side to cinder
//! as stdin and stdout, the way a shell would. While the probe guest runs, the terminal must
//! be raw (no line buffering, echo or signal keys); Ctrl-A x must quit with exit code 0; and
//! on every exit path (Ctrl-A x, SIGTERM, the guest's own reset) the terminal must get back
//! exactly the settings it had before, not some generic cooked mode. The terminal starts with
//! deliberately unusual settings (echo off, IXANY on) so that only an exact restore passes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder, require_kvm};
use cinder_tests::probe;

struct Pty {
    master: File,
    slave: File,
}

fn pty() -> Pty {
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two fds into the given ints; the name, termios and winsize
    // arguments may be null.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two new fds that nothing else owns.
    unsafe {
        Pty {
            master: File::from_raw_fd(m),
            slave: File::from_raw_fd(s),
        }
    }
}

fn get_attrs(f: &File) -> libc::termios {
    let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: tcgetattr fills the termios when it returns 0.
    let r = unsafe { libc::tcgetattr(f.as_raw_fd(), t.as_mut_ptr()) };
    assert_eq!(r, 0, "tcgetattr: {}", std::io::Error::last_os_error());
    // SAFETY: tcgetattr returned 0.
    unsafe { t.assume_init() }
}

/// The fields a restore must bring back (modes and control characters).
fn modes(t: &libc::termios) -> (u32, u32, u32, u32, Vec<u8>) {
    (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc.to_vec())
}

impl Pty {
    /// A pty whose slave has echo off and IXANY on: settings a generic "cooked" restore
    /// would not reproduce.
    fn unusual() -> (Pty, libc::termios) {
        let p = pty();
        let mut t = get_attrs(&p.slave);
        t.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK);
        t.c_iflag |= libc::IXANY;
        // SAFETY: tcsetattr reads the termios passed by reference.
        let r = unsafe { libc::tcsetattr(p.slave.as_raw_fd(), libc::TCSANOW, &t) };
        assert_eq!(r, 0, "tcsetattr: {}", std::io::Error::last_os_error());
        let before = get_attrs(&p.slave);
        (p, before)
    }

    /// cinder booting the probe with `cmdline`, its stdin and stdout on the slave side,
    /// which is its controlling terminal (a session of its own, in the foreground), as when a
    /// shell starts it: with the terminal's signal keys on, Ctrl-C would send it SIGINT.
    fn spawn(&self, cmdline: &str) -> Child {
        let mut c: Command = cinder();
        c.arg("--kernel")
            .arg(probe::elf_path())
            .args(["--cmdline", cmdline])
            .stdin(Stdio::from(self.slave.try_clone().expect("dup slave")))
            .stdout(Stdio::from(self.slave.try_clone().expect("dup slave")))
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec the closure only makes async-signal-safe calls
        // (setsid, ioctl) on the child's own fd 0.
        unsafe {
            c.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.spawn().expect("start cinder")
    }

    /// Reads the master side for up to 200 ms into `out`.
    fn pump(&self, out: &mut Vec<u8>) {
        let mut pfd = libc::pollfd {
            fd: self.master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd passed.
        if unsafe { libc::poll(&mut pfd, 1, 200) } > 0 {
            let mut buf = [0u8; 4096];
            if let Ok(n) = (&self.master).read(&mut buf) {
                out.extend_from_slice(&buf[..n]);
            }
        }
    }

    /// Reads until the output contains `want`, for at most `timeout`.
    fn read_until(&self, want: &str, timeout: Duration, out: &mut Vec<u8>) -> bool {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if String::from_utf8_lossy(out).contains(want) {
                return true;
            }
            self.pump(out);
        }
        String::from_utf8_lossy(out).contains(want)
    }

    /// Waits for `child` to exit (reading the terminal meanwhile), for at most `timeout`.
    fn wait(&self, child: &mut Child, timeout: Duration, out: &mut Vec<u8>) -> ExitStatus {
        let until = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().expect("wait for cinder") {
                return st;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "cinder did not exit within {timeout:?}; terminal output:\n{}",
                    String::from_utf8_lossy(out)
                );
            }
            self.pump(out);
        }
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Starts a long-running probe on an unusual terminal, checks the terminal went raw, ends
/// cinder with `end`, and checks the exit status and that the terminal was restored exactly.
fn raw_then_restored(what: &str, end: impl FnOnce(&Pty, &mut Child), want_code: i32) {
    require_kvm();
    let (p, before) = Pty::unusual();
    let mut child = p.spawn("probe.run=tick probe.ticks=100000 probe.tick_ms=10");
    let mut out = Vec::new();
    if !p.read_until("PROBE tick 3 ", Duration::from_secs(120), &mut out) {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{what}: the probe never ticked; terminal output:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out),
            stderr_of(&mut child)
        );
    }
    let during = get_attrs(&p.slave);
    let off = libc::ICANON | libc::ECHO | libc::ISIG;
    assert_eq!(
        during.c_lflag & off,
        0,
        "{what}: the terminal is not raw while the guest runs (c_lflag {:#x})",
        during.c_lflag
    );
    end(&p, &mut child);
    let st = p.wait(&mut child, Duration::from_secs(30), &mut out);
    let err = stderr_of(&mut child);
    assert_eq!(
        st.code(),
        Some(want_code),
        "{what}: exit status; stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "{what}: cinder panicked:\n{err}");
    assert_eq!(
        modes(&get_attrs(&p.slave)),
        modes(&before),
        "{what}: the terminal's settings were not restored exactly"
    );
}

#[test]
fn terminal_ctrl_a_x_quits_and_restores_under_cinder() {
    raw_then_restored(
        "Ctrl-A x",
        |p, _| {
            (&p.master)
                .write_all(b"\x01x")
                .expect("type Ctrl-A x into the terminal");
        },
        0,
    );
}

#[test]
fn terminal_restored_after_sigterm_under_cinder() {
    raw_then_restored(
        "SIGTERM",
        |_, child| {
            let pid = libc::pid_t::try_from(child.id()).expect("a Linux pid fits pid_t");
            // SAFETY: kill only sends a signal to the child we started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        },
        143,
    );
}

#[test]
fn terminal_restored_after_guest_reset_under_cinder() {
    require_kvm();
    let (p, before) = Pty::unusual();
    let mut child = p.spawn("probe.run=boot");
    let mut out = Vec::new();
    let st = p.wait(&mut child, Duration::from_secs(120), &mut out);
    let err = stderr_of(&mut child);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("PROBE DONE 1/1"),
        "probe output:\n{text}\n{err}"
    );
    assert_eq!(
        st.code(),
        Some(0),
        "the guest's reset ends cinder with 0:\n{err}"
    );
    assert_eq!(
        modes(&get_attrs(&p.slave)),
        modes(&before),
        "the terminal's settings were not restored exactly after the guest reset"
    );
}

/// On a terminal that is not raw, Ctrl-C would reach cinder (its controlling terminal's
/// foreground process) as SIGINT and end it with 130; raw, it is a byte for the guest, and
/// cinder keeps running until Ctrl-A x.
#[test]
fn terminal_ctrl_c_goes_to_the_guest_under_cinder() {
    raw_then_restored(
        "Ctrl-C, then Ctrl-A x",
        |p, child| {
            (&p.master).write_all(b"\x03").expect("type Ctrl-C");
            let mut after = Vec::new();
            assert!(
                p.read_until("PROBE tick ", Duration::from_secs(30), &mut after),
                "the guest stopped after Ctrl-C"
            );
            let still = child.try_wait().expect("poll cinder");
            assert!(still.is_none(), "Ctrl-C ended cinder: {still:?}");
            (&p.master).write_all(b"\x01x").expect("type Ctrl-A x");
        },
        0,
    );
}
