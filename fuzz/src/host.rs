//! Host-side doubles the device targets share: an anonymous file for a disk image or a
//! kernel, a SOCK_SEQPACKET pair in place of a TAP, and a private temporary directory.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// An anonymous in-memory file (memfd) holding `contents`, and a path that opens it.
pub fn memfd(name: &str, contents: &[u8]) -> (File, PathBuf) {
    let cname = CString::new(name).expect("memfd name has a NUL");
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: memfd_create returned a new fd that nothing else owns.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(contents).expect("cannot fill the memfd");
    let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
    (file, path)
}

/// A regular file in the temporary directory holding `contents`, one per thread and `name`
/// (rewritten on each call): for code that refuses links, as the kernel loader does with
/// `O_NOFOLLOW` (a memfd's `/proc/self/fd/N` is one). Removed when the guard drops.
pub fn tmpfile(name: &str, contents: &[u8]) -> TmpFile {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let tid = std::thread::current().id();
    let path = dir.join(format!(
        "cinder-fuzz-{}-{name}-{}",
        std::process::id(),
        format!("{tid:?}").replace(|c: char| !c.is_ascii_alphanumeric(), "")
    ));
    std::fs::write(&path, contents).expect("cannot write the fuzz file");
    TmpFile(path)
}

/// A file [`tmpfile`] wrote; removed on drop.
pub struct TmpFile(pub PathBuf);

impl Drop for TmpFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A connected pair of non-blocking SOCK_SEQPACKET sockets (message boundaries kept, like a
/// TAP's frames).
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds socketpair writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
    // SAFETY: socketpair succeeded: both fds are new and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Sends one message on a non-blocking socket; the count or the error.
pub fn send(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length; the fd is open.
    let n = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Receives one message from a non-blocking socket; the count or the error.
pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; the fd is open.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A fresh, empty temporary directory for one input (removed on drop).
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates one under the system temporary directory, named after the process.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cf-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("cannot create a temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
