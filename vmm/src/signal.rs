//! Signals: SIGINT/SIGTERM/SIGHUP read from a signalfd by the event loop, and the real-time
//! signal that kicks a vCPU thread out of `KVM_RUN`.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::signal::SIGRTMIN;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// SIGINT/SIGTERM as a readable fd (the signals are blocked for every thread).
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `sigs` in this thread (and the threads it starts later) and opens a signalfd.
    pub fn new(sigs: &[libc::c_int]) -> std::io::Result<SignalFd> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for s in sigs {
            // SAFETY: `set` is valid and `s` a signal number.
            unsafe { libc::sigaddset(&mut set, *s) };
        }
        // SAFETY: `set` is valid; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new fd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// The fd to poll.
    pub fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one pending signal number.
    pub fn read(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`, which is `size` bytes long.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                size,
            )
        };
        (usize::try_from(n) == Ok(size))
            .then(|| i32::try_from(info.ssi_signo).ok())
            .flatten()
    }
}
