//! The `init` role: the agent as PID 1 of a `cinder run` guest (README.md, "init").
//!
//! It mounts /proc, /sys and /dev at boot and, once a session's START arrives (so that one
//! booted agent, snapshotted, serves every image), the image (/dev/vda, read-only) under an
//! overlay whose upper layer is a tmpfs (so the cached image is never written and concurrent runs share
//! it), listens on vsock port 52, runs the one command a host session asks for in that root
//! (chroot), streams its stdio, reports its exit, answers copy-out requests and powers the
//! guest off (a reset: `reboot=k`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::proto::{self, Enc, Start};

/// The command's root: the overlay.
const ROOT: &str = "/mnt/root";
/// Default PATH when neither the image nor the host gives one (Docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long the agent waits for the last processes to die and their output to drain.
const DRAIN: Duration = Duration::from_secs(5);
/// Stop reading the host while this much stdin waits for the command (back-pressure). One
/// chunk: the buffers below then never grow past what was allocated (and touched) up front.
const MAX_PENDING_STDIN: usize = proto::CHUNK;

/// A buffer of `cap` bytes whose pages are all written once now, empty. On kvm-pvm hosts the
/// guest kernel runs in an emulator, and 63-byte runs of zeros were seen at 64 KiB frame
/// boundaries of 1 MiB passed through stdin and back when the kernel copied into or out of
/// freshly grown (never touched) user buffers: every buffer the kernel copies to or from is
/// made here, touched, and kept within its capacity.
fn touched(cap: usize) -> Vec<u8> {
    let mut v = vec![0x5a_u8; cap];
    v.clear();
    v
}

fn err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn cstr(s: &[u8]) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{:?} contains a NUL byte", String::from_utf8_lossy(s)))
}

fn owned(fd: RawFd, what: &str) -> Result<OwnedFd, String> {
    if fd < 0 {
        return Err(err(what));
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One line to the kernel log (and so to the guest console, which cinder run keeps in a file).
fn log(msg: &str) {
    // SAFETY: timespec is plain data that clock_gettime fills.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: `ts` is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let ms = ts.tv_sec as i64 * 1000 + ts.tv_nsec as i64 / 1_000_000;
    let line = format!("<3>cinder-agent: [{ms} ms] {msg}\n");
    // SAFETY: a NUL-terminated path literal; the fd is closed below.
    let fd = unsafe { libc::open(c"/dev/kmsg".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: `line` is valid for reads of its length; `fd` is ours.
        unsafe {
            libc::write(fd, line.as_ptr().cast(), line.len());
            libc::close(fd);
        }
    }
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    let (s, t, f, d) = (
        cstr(src.as_bytes())?,
        cstr(target.as_bytes())?,
        cstr(fstype.as_bytes())?,
        cstr(data.as_bytes())?,
    );
    // SAFETY: all four are valid NUL-terminated strings that outlive the call.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if r != 0 {
        return Err(err(&format!("mount {fstype} {src} on {target}")));
    }
    Ok(())
}

/// `mkdir -p`, ignoring what exists.
fn mkdir_p(path: &[u8]) -> Result<(), String> {
    let mut cur = Vec::new();
    for part in path.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
        cur.push(b'/');
        cur.extend_from_slice(part);
        let c = cstr(&cur)?;
        // SAFETY: `c` is a valid NUL-terminated path.
        if unsafe { libc::mkdir(c.as_ptr(), 0o755) } != 0
            && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
        {
            return Err(err(&format!("mkdir {}", String::from_utf8_lossy(&cur))));
        }
    }
    Ok(())
}

/// A path inside the command's root.
fn in_root(p: &[u8]) -> Vec<u8> {
    let mut v = ROOT.as_bytes().to_vec();
    if !p.starts_with(b"/") {
        v.push(b'/');
    }
    v.extend_from_slice(p);
    v
}

/// The mounts at boot: the kernel file systems. Nothing image-specific happens before a
/// session's START, so one booted agent (a `cinder run` template snapshot) serves any image.
fn setup() -> Result<(), String> {
    for d in ["/dev", "/proc", "/sys", "/mnt/lower", "/mnt/rw", ROOT] {
        mkdir_p(d.as_bytes())?;
    }
    // devtmpfs is on /dev already (main; CONFIG_DEVTMPFS_MOUNT does not apply to an
    // initramfs).
    mount("proc", "/proc", "proc", 0, "")?;
    mount("sysfs", "/sys", "sysfs", 0, "")?;
    Ok(())
}

/// How long START waits for /dev/vda to reach the size it names (after a restore the VMM
/// tells the guest's driver the new drive's capacity with a config-change interrupt).
const ROOT_SIZE_WAIT: Duration = Duration::from_secs(10);

/// /sys/block/vda/size (512-byte sectors).
fn vda_sectors() -> Option<u64> {
    std::fs::read_to_string("/sys/block/vda/size")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The session's root: waits (bounded) until /dev/vda has `sectors` (0: any size), drops its
/// cached blocks (a template saw a placeholder there), then mounts it read-only under an
/// overlay whose upper layer is a tmpfs, with the kernel file systems inside.
fn mount_root(sectors: u64) -> Result<(), String> {
    if sectors != 0 {
        let until = Instant::now() + ROOT_SIZE_WAIT;
        loop {
            let now = vda_sectors();
            if now == Some(sectors) {
                break;
            }
            if Instant::now() >= until {
                return Err(format!(
                    "the image (/dev/vda) has {} sectors after {} s, the host said {sectors}",
                    now.map_or("no".to_string(), |n| n.to_string()),
                    ROOT_SIZE_WAIT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // SAFETY: a NUL-terminated path literal; the fd is checked and closed below.
    let fd = unsafe { libc::open(c"/dev/vda".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd >= 0 {
        // SAFETY: BLKFLSBUF takes no argument; `fd` is ours and closed right after.
        unsafe {
            libc::ioctl(fd, BLKFLSBUF);
            libc::close(fd);
        }
    }
    log("vda has its size");
    let ro = libc::MS_RDONLY;
    mount("/dev/vda", "/mnt/lower", "ext4", ro, "")
        .map_err(|e| format!("the image (/dev/vda) is not a mountable ext4 file system: {e}"))?;
    mount("tmpfs", "/mnt/rw", "tmpfs", 0, "mode=0755")?;
    mkdir_p(b"/mnt/rw/upper")?;
    mkdir_p(b"/mnt/rw/work")?;
    mount(
        "overlay",
        ROOT,
        "overlay",
        0,
        "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work",
    )?;
    for (fs, dir) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        let t = in_root(dir.as_bytes());
        mkdir_p(&t)?;
        mount(fs, &String::from_utf8_lossy(&t), fs, 0, "")?;
    }
    let pts = in_root(b"/dev/pts");
    mkdir_p(&pts)?;
    mount(
        "devpts",
        &String::from_utf8_lossy(&pts),
        "devpts",
        0,
        "ptmxmode=0666,mode=0620",
    )?;
    log("root mounted");
    Ok(())
}

/// `BLKFLSBUF`: write back and drop a block device's cached blocks.
const BLKFLSBUF: libc::c_ulong = 0x1261;
/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// What START says about this guest rather than the command: the wall clock, fresh entropy
/// and the hostname. Two runs restored from one template start with the same RNG state and
/// the template's clock: the host's bytes go in with RNDADDENTROPY (credited) and the CRNG is
/// reseeded at once (RNDRESEEDCRNG), so reads of /dev/urandom differ from here on.
fn apply_host_state(start: &Start) -> Result<(), String> {
    if start.realtime_ns != 0 {
        let ts = libc::timespec {
            tv_sec: (start.realtime_ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (start.realtime_ns % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec for the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(err("clock_settime"));
        }
    }
    if !start.entropy.is_empty() {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let mut info = Vec::with_capacity(8 + start.entropy.len());
        info.extend_from_slice(&((start.entropy.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(start.entropy.len() as i32).to_ne_bytes());
        info.extend_from_slice(&start.entropy);
        // SAFETY: a NUL-terminated path literal; the fd is checked and closed below.
        let fd = unsafe { libc::open(c"/dev/urandom".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(err("open /dev/urandom"));
        }
        // SAFETY: `info` is a rand_pool_info of buf_size bytes of data; `fd` is ours.
        let r = unsafe { libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) };
        let add = err("RNDADDENTROPY");
        // SAFETY: RNDRESEEDCRNG takes no argument.
        let r2 = unsafe { libc::ioctl(fd, RNDRESEEDCRNG) };
        let reseed = err("RNDRESEEDCRNG");
        // SAFETY: closes the fd opened above.
        unsafe { libc::close(fd) };
        if r != 0 {
            return Err(add);
        }
        if r2 != 0 {
            return Err(reseed);
        }
    }
    if !start.hostname.is_empty() {
        // SAFETY: `hostname` is valid for reads of its length (at most 64, checked in decode).
        if unsafe { libc::sethostname(start.hostname.as_ptr().cast(), start.hostname.len()) } != 0 {
            return Err(err("sethostname"));
        }
    }
    Ok(())
}

/// The host connection: blocking writes, buffered frame reads.
struct Conn {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl Conn {
    fn send(&self, kind: u8, payload: &[u8]) -> Result<(), String> {
        let mut msg = Vec::with_capacity(5 + payload.len());
        msg.extend_from_slice(&proto::header(kind, payload.len()));
        msg.extend_from_slice(payload);
        write_all(self.fd.as_raw_fd(), &msg).map_err(|e| format!("write to host: {e}"))
    }

    /// One read; false at end of stream.
    fn fill(&mut self) -> Result<bool, String> {
        let old = self.buf.len();
        self.buf.resize(old + proto::CHUNK + 5, 0);
        let n = read_fd(self.fd.as_raw_fd(), &mut self.buf[old..]);
        match n {
            Ok(n) => {
                self.buf.truncate(old + n);
                Ok(n > 0)
            }
            Err(e) => {
                self.buf.truncate(old);
                Err(format!("read from host: {e}"))
            }
        }
    }

    /// Whether a whole frame is buffered.
    fn has_frame(&self) -> bool {
        self.buf.len() >= 5
            && self.buf.len()
                >= 5 + u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize
    }

    /// A complete frame from the buffer, if there is one.
    fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > proto::MAX_FRAME {
            return Err(format!("frame of {len} bytes (most {})", proto::MAX_FRAME));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let kind = self.buf[0];
        let payload = self.buf[5..5 + len].to_vec();
        self.buf.drain(..5 + len);
        Ok(Some((kind, payload)))
    }

    fn read_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, String> {
        loop {
            if let Some(f) = self.next_frame()? {
                return Ok(Some(f));
            }
            if !self.fill()? {
                return Ok(None);
            }
        }
    }

    fn error(&self, msg: &str) {
        log(msg);
        let _ = self.send(proto::ERROR, &Enc::default().bytes(msg.as_bytes()).0);
    }
}

fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is valid for reads of its length.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// PID 1's entry point: never returns.
pub fn main() -> ! {
    // The kernel gives init /dev/console as fds 0-2 only when the initramfs has that node
    // (ours has none): fill 0-2 with /dev/null so that no fd of ours lands there and is
    // mistaken for, or clobbered as, the command's stdio.
    let _ = mkdir_p(b"/dev");
    let _ = mount("devtmpfs", "/dev", "devtmpfs", 0, "");
    loop {
        // SAFETY: a valid path literal; the fd is kept open on purpose (or closed below).
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        if fd < 0 {
            break;
        }
        if fd > 2 {
            // SAFETY: closes the fd just opened.
            unsafe { libc::close(fd) };
            break;
        }
    }
    // SIGCHLD arrives through a signalfd; the command gets an empty mask back.
    // SAFETY: sigset_t is plain data; the calls only touch our own set and mask.
    let sfd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    let setup_err = setup().err();
    if let Some(e) = &setup_err {
        log(e);
    }
    match owned(sfd, "signalfd").and_then(|sfd| serve(&sfd, setup_err)) {
        Ok(()) => {}
        Err(e) => log(&e),
    }
    poweroff()
}

fn poweroff() -> ! {
    // SAFETY: sync and reboot take no pointers; the guest's command line has reboot=k, so
    // RB_AUTOBOOT resets through the i8042 and cinder exits.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        // SAFETY: pause takes no arguments.
        unsafe { libc::pause() };
    }
}

/// Listens on the agent's port and serves one session. A connection that ends (or breaks)
/// before its START is dropped and the next one accepted: `cinder run` builds its template by
/// reading HELLO, closing and snapshotting, and after a restore that connection is reset.
fn serve(sfd: &OwnedFd, setup_err: Option<String>) -> Result<(), String> {
    // SAFETY: plain socket(2); the result is checked by `owned`.
    let l = owned(
        unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        "socket(AF_VSOCK)",
    )?;
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = libc::VMADDR_CID_ANY;
    a.svm_port = proto::PORT;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes; the fd is ours.
    if unsafe { libc::bind(l.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) } != 0 {
        return Err(err("bind vsock"));
    }
    // SAFETY: plain listen(2) on our socket.
    if unsafe { libc::listen(l.as_raw_fd(), 1) } != 0 {
        return Err(err("listen vsock"));
    }
    log("listening");
    let mut buf = touched(4 * proto::CHUNK + 16);
    let (mut conn, start) = loop {
        // SAFETY: accept without an address; the result is checked by `owned`.
        let fd = match owned(
            unsafe {
                libc::accept4(
                    l.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            },
            "accept vsock",
        ) {
            Ok(fd) => fd,
            Err(e) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {
                log(&e);
                continue;
            }
            Err(e) => return Err(e),
        };
        buf.clear();
        let mut conn = Conn { fd, buf };
        let first = conn
            .send(proto::HELLO, &Enc::default().u32(proto::VERSION).0)
            .and_then(|()| conn.read_frame());
        match first {
            Ok(Some((proto::START, p))) => break (conn, p),
            Ok(Some((k, _))) => {
                conn.error(&format!("expected START (0x01), got frame type {k:#04x}"));
                return Ok(());
            }
            Ok(None) | Err(_) => {
                // The host went away before START: wait for the next one.
                buf = conn.buf;
            }
        }
    };
    drop(l);
    if let Some(e) = setup_err {
        conn.error(&e);
        return Ok(());
    }
    let start = match Start::decode(&start) {
        Ok(s) => s,
        Err(e) => {
            conn.error(&format!("bad START: {e}"));
            return Ok(());
        }
    };
    log("START");
    if let Err(e) = apply_host_state(&start).and_then(|()| {
        log("host state applied");
        mount_root(start.root_sectors)
    }) {
        conn.error(&e);
        return Ok(());
    }
    match run(&mut conn, sfd, &start) {
        Ok(true) => {}
        Ok(false) => return Ok(()),
        Err(e) => {
            conn.error(&e);
            return Ok(());
        }
    }
    // After EXIT: copy-out requests until POWEROFF or the end of the connection.
    while let Some((kind, p)) = conn.read_frame()? {
        match kind {
            proto::COPY_OUT => copy_out(&conn, &p)?,
            proto::POWEROFF => break,
            _ => {}
        }
    }
    Ok(())
}

fn copy_out(conn: &Conn, p: &[u8]) -> Result<(), String> {
    let path = proto::Dec(p)
        .bytes()
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let end = |code: i32, msg: &str| {
        conn.send(
            proto::FILE_END,
            &Enc::default().i32(code).bytes(msg.as_bytes()).0,
        )
    };
    let full = match cstr(&in_root(&path)) {
        Ok(c) => c,
        Err(e) => return end(libc::EINVAL, &e),
    };
    // SAFETY: `full` is a valid NUL-terminated path.
    let fd = unsafe { libc::open(full.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return end(e.raw_os_error().unwrap_or(libc::EIO), &e.to_string());
    }
    // SAFETY: `fd` was just opened.
    let f = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes; the fd is ours.
    if unsafe { libc::fstat(f.as_raw_fd(), &mut st) } != 0
        || st.st_mode & libc::S_IFMT != libc::S_IFREG
    {
        return end(libc::EISDIR, "not a regular file (copy-out takes files)");
    }
    let mut buf = vec![0u8; proto::CHUNK];
    loop {
        match read_fd(f.as_raw_fd(), &mut buf) {
            Ok(0) => return end(0, ""),
            Ok(n) => conn.send(proto::FILE_DATA, &buf[..n])?,
            Err(e) => return end(e.raw_os_error().unwrap_or(libc::EIO), &e.to_string()),
        }
    }
}

/// A user from START (`""`, `uid[:gid]`, `name[:group]`), resolved in the image.
struct User {
    uid: u32,
    gid: u32,
    home: Vec<u8>,
}

fn read_root_file(p: &str) -> String {
    std::fs::read(format!("{ROOT}{p}"))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn resolve_user(spec: &[u8]) -> Result<User, String> {
    let spec = String::from_utf8_lossy(spec).into_owned();
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u.to_string(), Some(g.to_string())),
        None => (spec.clone(), None),
    };
    let passwd = read_root_file("/etc/passwd");
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && (f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u)));
    let (uid, mut gid, home) = match (&entry, u.as_str()) {
        (_, "") => (0, 0, b"/root".to_vec()),
        (Some(f), _) => (
            f[2].parse()
                .map_err(|_| format!("bad uid in /etc/passwd for {u}"))?,
            f[3].parse()
                .map_err(|_| format!("bad gid in /etc/passwd for {u}"))?,
            f[5].as_bytes().to_vec(),
        ),
        (None, _) => match u.parse::<u32>() {
            Ok(n) => (n, 0, b"/".to_vec()),
            Err(_) => {
                return Err(format!(
                    "unable to find user {u}: no matching entries in the image's /etc/passwd"
                ))
            }
        },
    };
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read_root_file("/etc/group")
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| {
                    format!(
                        "unable to find group {g}: no matching entries in the image's /etc/group"
                    )
                })?,
        };
    }
    Ok(User { uid, gid, home })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is valid for two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(err("pipe"));
    }
    Ok((owned(fds[0], "pipe")?, owned(fds[1], "pipe")?))
}

fn set_winsize(fd: RawFd, rows: u16, cols: u16) {
    if rows == 0 || cols == 0 {
        return;
    }
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which outlives the call.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// A pseudo-terminal in the command's /dev/pts: (master, slave).
fn open_pty() -> Result<(OwnedFd, OwnedFd), String> {
    let ptmx = cstr(&in_root(b"/dev/pts/ptmx"))?;
    // SAFETY: a valid path; the result is checked by `owned`.
    let m = owned(
        unsafe {
            libc::open(
                ptmx.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        },
        "open /dev/pts/ptmx",
    )?;
    let unlock: libc::c_int = 0;
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCSPTLCK reads an int, TIOCGPTN writes an unsigned int; both outlive the call.
    unsafe {
        if libc::ioctl(m.as_raw_fd(), libc::TIOCSPTLCK, &unlock) != 0
            || libc::ioctl(m.as_raw_fd(), libc::TIOCGPTN, &mut n) != 0
        {
            return Err(err("unlock the pty"));
        }
    }
    let slave = cstr(&in_root(format!("/dev/pts/{n}").as_bytes()))?;
    // SAFETY: a valid path; the result is checked by `owned`.
    let s = owned(
        unsafe {
            libc::open(
                slave.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        },
        "open the pty's slave",
    )?;
    Ok((m, s))
}

/// What the command's end was.
struct Ended {
    status: Option<libc::c_int>,
    timed_out: bool,
}

/// Runs START's command to its end; Ok(false) when the host went away.
fn run(conn: &mut Conn, sfd: &OwnedFd, start: &Start) -> Result<bool, String> {
    for m in &start.mounts {
        let t = in_root(&m.target);
        mkdir_p(&t)?;
        let flags = if m.read_only { libc::MS_RDONLY } else { 0 };
        mount(
            &String::from_utf8_lossy(&m.device),
            &String::from_utf8_lossy(&t),
            "ext4",
            flags,
            "",
        )?;
    }
    let user = resolve_user(&start.user)?;
    let mut env = start.env.clone();
    if !env.iter().any(|e| e.starts_with(b"HOME=")) {
        env.push([b"HOME=".as_slice(), &user.home].concat());
    }
    if !env.iter().any(|e| e.starts_with(b"PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}").into_bytes());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix(b"PATH="))
        .unwrap_or(DEFAULT_PATH.as_bytes())
        .to_vec();
    let cwd = if start.cwd.is_empty() {
        b"/".to_vec()
    } else {
        start.cwd.clone()
    };
    mkdir_p(&in_root(&cwd))?;
    let tty = start.flags & proto::FLAG_TTY != 0;

    // The command's stdio: (child fd 0/1/2), and our ends.
    let (child_in, child_out, child_err, mut outs, mut stdin): (
        OwnedFd,
        OwnedFd,
        OwnedFd,
        Vec<(OwnedFd, u8)>,
        Option<OwnedFd>,
    );
    if tty {
        let (m, s) = open_pty()?;
        set_winsize(m.as_raw_fd(), start.rows, start.cols);
        let dup = |f: &OwnedFd| f.try_clone().map_err(|e| format!("dup: {e}"));
        child_in = dup(&s)?;
        child_out = dup(&s)?;
        child_err = s;
        stdin = Some(dup(&m)?);
        outs = vec![(m, proto::STDOUT)];
    } else {
        let (or, ow) = pipe()?;
        let (er, ew) = pipe()?;
        child_out = ow;
        child_err = ew;
        outs = vec![(or, proto::STDOUT), (er, proto::STDERR)];
        if start.flags & proto::FLAG_STDIN != 0 {
            let (ir, iw) = pipe()?;
            child_in = ir;
            stdin = Some(iw);
        } else {
            // SAFETY: a valid path literal; checked by `owned`.
            child_in = owned(
                unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) },
                "open /dev/null",
            )?;
            stdin = None;
        }
    }
    if let Some(f) = &stdin {
        // Never block on the command's stdin: its output must keep flowing meanwhile.
        // SAFETY: F_SETFL on our own fd.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    }
    let (err_r, err_w) = pipe()?;

    // Everything the child needs, allocated before fork.
    let argv: Vec<CString> = start
        .argv
        .iter()
        .map(|a| cstr(a))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = env.iter().map(|e| cstr(e)).collect::<Result<_, _>>()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let arg0 = &start.argv[0];
    let candidates: Vec<CString> = if arg0.contains(&b'/') {
        vec![argv[0].clone()]
    } else {
        path.split(|&b| b == b':')
            .map(|d| if d.is_empty() { b".".as_slice() } else { d })
            .map(|d| cstr(&[d, b"/", arg0].concat()))
            .collect::<Result<_, _>>()?
    };
    // ENOEXEC: run it with /bin/sh, as execvp does.
    let sh = c"/bin/sh";
    let sh_argv: Vec<Vec<*const libc::c_char>> = candidates
        .iter()
        .map(|c| {
            let mut v = vec![sh.as_ptr(), c.as_ptr()];
            v.extend(argv.iter().skip(1).map(|a| a.as_ptr()));
            v.push(std::ptr::null());
            v
        })
        .collect();
    let root = cstr(ROOT.as_bytes())?;
    let cwd_c = cstr(&cwd)?;
    let gid = user.gid;
    let uid = user.uid;

    // SAFETY: the agent is single-threaded, so the child may do anything; it only makes
    // system calls on memory prepared above and leaves by exec or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(err("fork"));
    }
    if pid == 0 {
        // SAFETY: the child: each call uses fds and strings prepared before fork.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::setsid();
            // Above 2 first, so that no dup2 below overwrites a source still needed.
            let high = |fd: RawFd| libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
            let (i, o, e) = (
                high(child_in.as_raw_fd()),
                high(child_out.as_raw_fd()),
                high(child_err.as_raw_fd()),
            );
            libc::dup2(i, 0);
            libc::dup2(o, 1);
            libc::dup2(e, 2);
            if tty {
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            let fail = |e: i32| -> ! {
                let b = e.to_le_bytes();
                libc::write(err_w.as_raw_fd(), b.as_ptr().cast(), 4);
                libc::_exit(127)
            };
            let errno = || {
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            };
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(cwd_c.as_ptr()) != 0 {
                fail(errno());
            }
            let groups = [gid];
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                fail(errno());
            }
            let mut seen_eacces = false;
            let mut last = libc::ENOENT;
            for (c, sh_args) in candidates.iter().zip(&sh_argv) {
                libc::execve(c.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
                last = errno();
                if last == libc::ENOEXEC {
                    libc::execve(sh.as_ptr(), sh_args.as_ptr(), envp_p.as_ptr());
                    last = errno();
                }
                match last {
                    libc::EACCES => seen_eacces = true,
                    libc::ENOENT | libc::ENOTDIR | libc::ENOEXEC => {}
                    _ => break,
                }
            }
            fail(if seen_eacces && last != libc::ENOEXEC {
                libc::EACCES
            } else {
                last
            })
        }
    }
    drop((child_in, child_out, child_err, err_w));
    let mut b = [0u8; 4];
    let got = read_fd(err_r.as_raw_fd(), &mut b).unwrap_or(0);
    if got == 4 {
        let e = i32::from_le_bytes(b);
        let mut st = 0;
        // SAFETY: waits for our own child; `st` is valid for writes.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        let msg = format!(
            "{}: {}",
            String::from_utf8_lossy(arg0),
            io::Error::from_raw_os_error(e)
        );
        conn.send(
            proto::EXIT,
            &Enc::default()
                .u8(proto::EXIT_EXEC_FAILED)
                .i32(e)
                .u32(0)
                .bytes(msg.as_bytes())
                .0,
        )?;
        return Ok(true);
    }
    conn.send(proto::STARTED, &Enc::default().u32(pid as u32).0)?;

    let deadline =
        (start.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(start.timeout_ms));
    let mut ended = Ended {
        status: None,
        timed_out: false,
    };
    let mut killed_all = false;
    let mut drain_until: Option<Instant> = None;
    let mut pending = touched(MAX_PENDING_STDIN + 2 * proto::CHUNK);
    let mut stdin_eof = false;
    let mut host_gone = false;
    let mut buf = touched(proto::CHUNK);
    buf.resize(proto::CHUNK, 0);
    let kill_all = |killed: &mut bool, until: &mut Option<Instant>| {
        if !*killed {
            // SAFETY: kill(-1) signals every process but PID 1 (us).
            unsafe { libc::kill(-1, libc::SIGKILL) };
            *killed = true;
            *until = Some(Instant::now() + DRAIN);
        }
    };
    loop {
        if ended.status.is_some() && outs.is_empty() {
            break;
        }
        let now = Instant::now();
        if let Some(u) = drain_until {
            if now >= u {
                break;
            }
        }
        if let Some(d) = deadline {
            if now >= d && ended.status.is_none() && !ended.timed_out {
                ended.timed_out = true;
                kill_all(&mut killed_all, &mut drain_until);
            }
        }
        // A whole frame already buffered: do not sleep before serving it.
        let mut wait = if !host_gone && pending.len() < MAX_PENDING_STDIN && conn.has_frame() {
            0
        } else {
            -1i64
        };
        for t in [deadline.filter(|_| !ended.timed_out), drain_until]
            .into_iter()
            .flatten()
        {
            let ms = t.saturating_duration_since(now).as_millis() as i64 + 1;
            wait = if wait < 0 { ms } else { wait.min(ms) };
        }
        let mut pfds = vec![libc::pollfd {
            fd: sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let conn_i = if !host_gone && pending.len() < MAX_PENDING_STDIN {
            pfds.push(libc::pollfd {
                fd: conn.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            Some(pfds.len() - 1)
        } else {
            None
        };
        let stdin_i = match &stdin {
            Some(f) if !pending.is_empty() => {
                pfds.push(libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
                Some(pfds.len() - 1)
            }
            _ => None,
        };
        let outs_base = pfds.len();
        for (f, _) in &outs {
            pfds.push(libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: `pfds` is valid for its length.
        let r = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                wait.min(i32::MAX as i64) as i32,
            )
        };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err("poll"));
        }
        // Output first, so that it reaches the host before EXIT.
        let mut closed = Vec::new();
        for (i, (f, kind)) in outs.iter().enumerate() {
            if pfds[outs_base + i].revents == 0 {
                continue;
            }
            match read_fd(f.as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => conn.send(*kind, &buf[..n])?,
                // A pty's master shares the stdin side's O_NONBLOCK.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // End of file, or EIO: a pty whose last slave fd closed.
                _ => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            outs.remove(i);
        }
        if let Some(i) = stdin_i {
            if pfds[i].revents != 0 {
                if let Some(f) = &stdin {
                    // SAFETY: `pending` is valid for reads of its length.
                    let n = unsafe {
                        libc::write(
                            f.as_raw_fd(),
                            pending.as_ptr().cast(),
                            pending.len().min(proto::CHUNK),
                        )
                    };
                    if n > 0 {
                        pending.drain(..n as usize);
                    } else if n < 0
                        && !matches!(
                            io::Error::last_os_error().kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                        )
                    {
                        // EPIPE: the command closed its stdin.
                        pending.clear();
                        stdin = None;
                    }
                }
            }
        }
        if let Some(i) = conn_i {
            if pfds[i].revents != 0 && !conn.fill().unwrap_or(false) {
                host_gone = true;
                kill_all(&mut killed_all, &mut drain_until);
            }
            // Frames that came with an earlier read (START's) are served too.
            {
                while let Some((kind, p)) = conn.next_frame()? {
                    match kind {
                        proto::STDIN => pending.extend_from_slice(&p),
                        proto::STDIN_EOF => {
                            if tty {
                                pending.push(4); // ^D: the terminal's end of file
                            } else {
                                stdin_eof = true;
                            }
                        }
                        proto::RESIZE => {
                            let mut d = proto::Dec(&p);
                            if let (Ok(r), Ok(c), Some((m, _))) = (d.u16(), d.u16(), outs.first()) {
                                if tty {
                                    set_winsize(m.as_raw_fd(), r, c);
                                }
                            }
                        }
                        proto::SIGNAL => {
                            if let Ok(sig) = proto::Dec(&p).u32() {
                                if ended.status.is_none() && (1..=64).contains(&sig) {
                                    // SAFETY: signals our own child.
                                    unsafe { libc::kill(pid, sig as i32) };
                                }
                            }
                        }
                        proto::POWEROFF => {
                            host_gone = true;
                            kill_all(&mut killed_all, &mut drain_until);
                        }
                        _ => {}
                    }
                }
            }
        }
        if stdin_eof && pending.is_empty() {
            stdin = None;
        }
        if pfds[0].revents != 0 {
            // SAFETY: signalfd_siginfo is plain data, valid for writes of its size.
            let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            // SAFETY: as above; a non-blocking read of whole records.
            while unsafe {
                libc::read(
                    sfd.as_raw_fd(),
                    (&mut si as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            } > 0
            {}
            loop {
                let mut st = 0;
                // SAFETY: `st` is valid for writes.
                let p = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
                if p <= 0 {
                    break;
                }
                if p == pid {
                    ended.status = Some(st);
                    // As docker: when the command ends, whatever it left running ends too.
                    kill_all(&mut killed_all, &mut drain_until);
                }
            }
        }
    }
    if host_gone {
        return Ok(false);
    }
    let leftover = reap_all(sfd);
    let (kind, value) = match ended.status {
        _ if ended.timed_out => (proto::EXIT_TIMEOUT, 0),
        Some(st) if libc::WIFEXITED(st) => (proto::EXIT_CODE, libc::WEXITSTATUS(st)),
        Some(st) if libc::WIFSIGNALED(st) => (proto::EXIT_SIGNAL, libc::WTERMSIG(st)),
        _ => (proto::EXIT_SIGNAL, libc::SIGKILL),
    };
    conn.send(
        proto::EXIT,
        &Enc::default()
            .u8(kind)
            .i32(value)
            .u32(leftover)
            .bytes(b"")
            .0,
    )?;
    Ok(true)
}

/// Reaps every process left (all were sent SIGKILL); returns how many are still there.
fn reap_all(sfd: &OwnedFd) -> u32 {
    let until = Instant::now() + DRAIN;
    loop {
        let mut st = 0;
        // SAFETY: `st` is valid for writes.
        let p = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        if p > 0 {
            continue;
        }
        if p < 0 {
            // ECHILD: every user process was our descendant (we are PID 1), none is left.
            return 0;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: sfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32 + 1) };
        // SAFETY: signalfd_siginfo is plain data.
        let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        // SAFETY: as above; non-blocking.
        while unsafe {
            libc::read(
                sfd.as_raw_fd(),
                (&mut si as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        } > 0
        {}
    }
    // Count the children still there.
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                .filter(|&p| p != 1)
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .ok()
                        .and_then(|s| s.rsplit(')').next().map(str::to_string))
                        .and_then(|s| s.split_whitespace().nth(1).map(|pp| pp == "1"))
                        .unwrap_or(false)
                })
                .count() as u32
        })
        .unwrap_or(0)
}
