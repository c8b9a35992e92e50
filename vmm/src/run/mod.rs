//! `cinder run [OPTIONS] IMAGE [--] CMD [ARGS...]`: run one command in a fresh microVM, like
//! `docker run`.
//!
//! The front-end spawns this same binary as a plain VMM (`--kernel --initrd --drive --vsock`,
//! the same flags and `VmConfig` setters as any user), rather than building the VM in-process:
//! the VMM keeps its threads, seccomp filters and exit paths exactly as tested, its console
//! goes to a log file (never into the command's stdout), and a VMM crash is a child's exit
//! status that the front-end turns into exit code 125 with one line. The front-end then
//! speaks the agent's exec protocol (`proto`) through the vsock device's Unix socket.
//!
//! Exit codes (README.md, "cinder run"): the command's own status; 124 `--timeout` ran out;
//! 125 cinder, the VM or the agent failed (one line on stderr says what); 126 the command
//! cannot be executed; 127 the command was not found; 128+N the command was killed by
//! signal N.

pub mod guest;
pub mod image;
pub mod proto;
pub mod template;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

pub use image::{resolve_image, ImageConfig};
use proto::Exit;

/// The command ran past `--timeout` (coreutils' `timeout` uses 124 too).
pub const EXIT_TIMEOUT: u8 = 124;
/// cinder, the VM or the guest agent failed (Docker's 125).
pub const EXIT_FAILURE: u8 = 125;
/// The command was found but cannot be executed (Docker's 126).
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// The command was not found (Docker's 127).
pub const EXIT_NOT_FOUND: u8 = 127;

/// The guest's vsock CID.
const GUEST_CID: u32 = 3;
/// How long the guest may take to boot to its agent (the emulated test hosts take ~60 s of
/// CPU; with 2 cores shared, several times that).
const BOOT_DEADLINE: Duration = Duration::from_secs(900);
/// How long the VM may take to power off after the session.
const POWEROFF_DEADLINE: Duration = Duration::from_secs(20);

/// What went wrong in `cinder run` itself (exit 125).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A bad option value.
    #[error("{0}")]
    Usage(String),
    /// The image cannot be used.
    #[error("{0}")]
    Image(String),
    /// No guest kernel or agent initramfs.
    #[error("{0}")]
    Guest(String),
    /// The VM did not start or ended early.
    #[error("{0}")]
    Vm(String),
    /// The agent refused or the session broke.
    #[error("{0}")]
    Agent(String),
    /// A host file operation failed.
    #[error("{0}")]
    Host(String),
    /// A signal arrived before the command started.
    #[error("ended by signal {0} while the guest was booting")]
    Interrupted(i32),
}

/// `cinder run`'s options (Docker's names where Docker has them).
#[derive(Parser, Debug)]
#[command(
    name = "cinder run",
    about = "Run a command in a new microVM from an image, like `docker run`.",
    after_help = "Exit status: the command's own; 124 --timeout ran out; 125 cinder, the VM or \
                  the guest agent failed (one line on stderr says what); 126 the command cannot \
                  be executed; 127 the command was not found; 128+N killed by signal N."
)]
pub struct RunArgs {
    /// Forward stdin to the command (without it the command's stdin is /dev/null).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// A pseudo-terminal for the command; its size follows this terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Set an environment variable (KEY=VALUE; KEY alone takes this process's value).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The command's working directory (created when missing, as Docker does).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// The user: UID[:GID] or NAME[:GROUP] (resolved in the image's /etc/passwd).
    #[arg(short = 'u', long = "user", value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Guest memory in MiB (the writable layer is a tmpfs in it).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vcpus: u8,
    /// Network: none, or tap=NAME (a virtio-net on an existing TAP; the guest's address is
    /// the command's business).
    #[arg(long, value_name = "none|tap=NAME", default_value = "none")]
    pub net: String,
    /// A host directory in the guest: HOST_DIR:GUEST_DIR[:ro]. Copied in when the VM starts
    /// (an ext4 image of it as an extra drive): writes in the guest never reach the host; `ro`
    /// mounts it read-only.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volumes: Vec<String>,
    /// Copy a regular file out of the guest after the command ends: GUEST_PATH:HOST_PATH.
    #[arg(long = "copy-out", value_name = "GUEST:HOST")]
    pub copy_out: Vec<String>,
    /// Kill the command's processes and end the VM after SECS seconds (exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Guest kernel (default: the one scripts/run.sh boots on this host, built and cached).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// The agent's initramfs (default: $CINDER_AGENT_INITRD, or built and cached).
    #[arg(long, value_name = "PATH")]
    pub agent_initrd: Option<PathBuf>,
    /// Keep the run's scratch directory (VM console log, cinder's log) and say where it is.
    #[arg(long)]
    pub keep_scratch: bool,
    /// Boot the guest instead of restoring the cached run template (also
    /// CINDER_RUN_SNAPSHOT=0). Runs with -v or --net tap= always boot.
    #[arg(long)]
    pub no_snapshot: bool,
    /// Say on stderr how the VM started (template built, restored, or booted and why).
    #[arg(long)]
    pub verbose: bool,
    /// The image: an ext4 image file or a root filesystem directory.
    pub image: String,
    /// The command and its arguments (default: the image's Entrypoint and Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

/// A `-v` volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    /// Host directory.
    pub host: PathBuf,
    /// Mount point in the guest.
    pub guest: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Parses `HOST_DIR:GUEST_DIR[:ro]`.
pub fn parse_volume(s: &str) -> Result<Volume, RunError> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, guest, ro) = match parts.as_slice() {
        [h, g] => (*h, *g, false),
        [h, g, "ro"] => (*h, *g, true),
        [h, g, "rw"] => (*h, *g, false),
        _ => {
            return Err(RunError::Usage(format!(
                "-v {s}: expected HOST_DIR:GUEST_DIR[:ro]"
            )))
        }
    };
    if host.is_empty() || !guest.starts_with('/') {
        return Err(RunError::Usage(format!(
            "-v {s}: expected HOST_DIR:GUEST_DIR[:ro] with an absolute GUEST_DIR"
        )));
    }
    if !Path::new(host).is_dir() {
        return Err(RunError::Usage(format!(
            "-v {s}: {host} is not a directory"
        )));
    }
    Ok(Volume {
        host: PathBuf::from(host),
        guest: guest.to_string(),
        read_only: ro,
    })
}

/// Parses `GUEST_PATH:HOST_PATH`.
pub fn parse_copy_out(s: &str) -> Result<(String, PathBuf), RunError> {
    match s.split_once(':') {
        Some((g, h)) if g.starts_with('/') && !h.is_empty() => {
            Ok((g.to_string(), PathBuf::from(h)))
        }
        _ => Err(RunError::Usage(format!(
            "--copy-out {s}: expected GUEST_PATH:HOST_PATH with an absolute GUEST_PATH"
        ))),
    }
}

/// Docker's rules: the command is Entrypoint + (CMD given ? CMD : image Cmd); the image's
/// Env, then `-e` (a later KEY wins); `-w` over WorkingDir; `-u` over User.
pub fn compose(
    args: &RunArgs,
    cfg: &ImageConfig,
) -> Result<(Vec<String>, Vec<String>, String, String), RunError> {
    let mut argv = cfg.entrypoint.clone();
    argv.extend(if args.cmd.is_empty() {
        cfg.cmd.clone()
    } else {
        args.cmd.clone()
    });
    if argv.is_empty() {
        return Err(RunError::Usage(
            "no command given and the image has no Entrypoint or Cmd".into(),
        ));
    }
    let mut env: Vec<String> = Vec::new();
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    };
    if !cfg.env.iter().any(|e| e.starts_with("PATH=")) {
        set("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    for e in &cfg.env {
        set(e.clone());
    }
    for e in &args.env {
        if e.is_empty() || e.starts_with('=') {
            return Err(RunError::Usage(format!("-e {e:?}: expected KEY=VALUE")));
        }
        if e.contains('=') {
            set(e.clone());
        } else if let Ok(v) = std::env::var(e) {
            set(format!("{e}={v}"));
        }
    }
    let cwd = args
        .workdir
        .clone()
        .or_else(|| cfg.working_dir.clone())
        .unwrap_or_default();
    if !cwd.is_empty() && !cwd.starts_with('/') {
        return Err(RunError::Usage(format!(
            "-w {cwd}: the working directory must be absolute"
        )));
    }
    let user = args
        .user
        .clone()
        .or_else(|| cfg.user.clone())
        .unwrap_or_default();
    Ok((argv, env, cwd, user))
}

/// The exit code for how the command ended (the table in this module's comment).
pub fn exit_code(e: &Exit) -> u8 {
    match e {
        Exit::Code(c) => u8::try_from(*c & 0xff).unwrap_or(EXIT_FAILURE),
        Exit::Signal(n) => 128u8.wrapping_add(u8::try_from(*n & 0x7f).unwrap_or(0)),
        Exit::Timeout => EXIT_TIMEOUT,
        Exit::ExecFailed(errno, _) if *errno == libc::ENOENT || *errno == libc::ENOTDIR => {
            EXIT_NOT_FOUND
        }
        Exit::ExecFailed(..) => EXIT_CANNOT_EXECUTE,
    }
}

/// `cinder run ...` (`args` without the program name and `run`): the process's exit code.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let parsed = RunArgs::try_parse_from(std::iter::once(OsString::from("cinder run")).chain(args));
    let args = match parsed {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_FAILURE),
            };
        }
    };
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cinder run: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The run's scratch directory (removed at the end unless --keep-scratch).
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Scratch {
    fn new(keep: bool) -> Result<Scratch, RunError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let base = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/tmp".into());
        let path = base.join(format!("cinder-run-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&path)
            .map_err(|e| RunError::Host(format!("{}: {e}", path.display())))?;
        Ok(Scratch { path, keep })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!(
                "cinder run: scratch directory kept: {}",
                self.path.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The signals `cinder run` forwards to the command (Docker's sig-proxy): a signal that
/// arrives while the guest boots ends the run instead (exit 128+N).
const FORWARDED: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The first forwarded signal that arrived before the session started (0: none).
static EARLY_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Where a forwarded signal goes once START was sent.
static SIGNAL_SINK: Mutex<Option<Writer>> = Mutex::new(None);

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise and edit it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the forwarded signals in this thread (and so in the threads it spawns; the VMM
/// child gets an empty mask from `Command`) and takes them on a thread of their own.
fn forward_signals() {
    let set = forwarded_set();
    // SAFETY: `set` is a valid sigset_t; only this thread's mask changes.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` and `sig` are valid for the call.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let sink = SIGNAL_SINK.lock().ok().and_then(|g| g.clone());
        match sink {
            Some(w) => {
                let sig = u32::try_from(sig).unwrap_or(0);
                let _ = send(&w, proto::SIGNAL, &proto::Enc::default().u32(sig).0);
            }
            None => {
                let _ = EARLY_SIGNAL.compare_exchange(
                    0,
                    sig,
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                );
            }
        }
    });
}

/// Kills and reaps the VMM child when dropped.
struct Vm {
    child: Child,
    log: PathBuf,
    console: PathBuf,
}

impl Vm {
    /// The VMM's exit and the last line it or the guest printed, for a 125 message.
    fn why(&mut self) -> String {
        let status = self.child.try_wait().ok().flatten();
        let last = |p: &Path| {
            std::fs::read(p)
                .ok()
                .and_then(|b| {
                    String::from_utf8_lossy(&b)
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .map(|l| l.trim().to_string())
                })
                .unwrap_or_default()
        };
        let (vmm, con) = (last(&self.log), last(&self.console));
        match status {
            Some(s) => format!(
                "the VM ended ({s}){}{}",
                tail(" cinder: ", &vmm),
                tail(" last console line: ", &con)
            ),
            None => format!(
                "the VM is running but its agent did not answer{}",
                tail(" (last console line: ", &con)
            ),
        }
    }
}

fn tail(prefix: &str, s: &str) -> String {
    if s.is_empty() {
        String::new()
    } else {
        format!(";{prefix}{s}")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes all of `data` to fd 1 or 2 at once (no buffering in between).
fn write_fd(fd: i32, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is valid for reads of its length; fd 1 and 2 stay open.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        data = &data[n.unsigned_abs()..];
    }
    Ok(())
}

/// The terminal's size (rows, cols) of fd, if it is one.
fn winsize(fd: i32) -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ writes one.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `ws` outlives the call.
    (unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0).then_some((ws.ws_row, ws.ws_col))
}

/// Puts the host terminal (stdin) in raw mode until dropped.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn new() -> RawTerminal {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(0) } != 1 {
            return RawTerminal(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is valid for writes.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawTerminal(None);
        }
        let saved = t;
        // SAFETY: cfmakeraw edits `t` in place; tcsetattr reads it.
        unsafe {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
        }
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the saved termios on fd 0.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

type Writer = Arc<Mutex<UnixStream>>;

fn send(w: &Writer, kind: u8, payload: &[u8]) -> Result<(), RunError> {
    let mut s = w
        .lock()
        .map_err(|_| RunError::Agent("connection lock poisoned".into()))?;
    proto::write_frame(&mut *s, kind, payload)
        .map_err(|e| RunError::Agent(format!("write to the guest agent: {e}")))
}

/// Connects to the agent through the vsock device's Unix socket, retrying while the guest
/// boots; gives up when the VMM ends or the boot deadline passes.
fn connect(vm: &mut Vm, uds: &Path) -> Result<UnixStream, RunError> {
    let deadline = Instant::now() + BOOT_DEADLINE;
    loop {
        if let Ok(Some(_)) = vm.child.try_wait() {
            return Err(RunError::Vm(vm.why()));
        }
        let sig = EARLY_SIGNAL.load(std::sync::atomic::Ordering::SeqCst);
        if sig != 0 {
            return Err(RunError::Interrupted(sig));
        }
        if Instant::now() >= deadline {
            return Err(RunError::Vm(format!(
                "the guest agent did not answer within {} s: {}",
                BOOT_DEADLINE.as_secs(),
                vm.why()
            )));
        }
        if let Some(s) = handshake(uds) {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One try at the vsock device's hybrid handshake to the agent's port: the stream, once the
/// VMM answered `OK` (the guest accepted), else None.
pub(crate) fn handshake(uds: &Path) -> Option<UnixStream> {
    let mut s = UnixStream::connect(uds).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    s.write_all(format!("CONNECT {}\n", proto::PORT).as_bytes())
        .ok()?;
    let line = read_line(&mut s)?;
    if !line.starts_with("OK ") {
        return None;
    }
    let _ = s.set_read_timeout(None);
    Some(s)
}

/// How long a restored VM may take to answer the vsock handshake before its template is
/// taken as broken.
const RESTORE_DEADLINE: Duration = Duration::from_secs(60);

/// How long a restored agent may take to send HELLO on a first connection before another is
/// tried (doubled on each try, up to [`HELLO_WAIT_MAX`]).
const HELLO_WAIT: Duration = Duration::from_millis(250);
/// The longest wait for HELLO on one connection.
const HELLO_WAIT_MAX: Duration = Duration::from_secs(8);

/// Waits until the restored agent says HELLO (Ok: the stream and HELLO's payload) or the VMM
/// ends (Err: why). A connection made while the guest still handles the restore's vsock
/// transport reset can be reset with it, silently on the host's side: one that brings no
/// HELLO within [`HELLO_WAIT`] (then twice that, ...) is dropped and another one made. (HELLO is read before the
/// seccomp filter: the guest is the template's kernel and agent, no user code has run.)
fn await_restore(vm: &mut Vm, uds: &Path) -> Result<(UnixStream, Vec<u8>), String> {
    let deadline = Instant::now() + RESTORE_DEADLINE;
    let mut wait = HELLO_WAIT;
    loop {
        if let Ok(Some(_)) = vm.child.try_wait() {
            return Err(vm.why());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no answer within {} s: {}",
                RESTORE_DEADLINE.as_secs(),
                vm.why()
            ));
        }
        if let Some(mut s) = handshake(uds) {
            let _ = s.set_read_timeout(Some(wait));
            if let Ok(Some((proto::HELLO, p))) = proto::read_frame(&mut s) {
                let _ = s.set_read_timeout(None);
                return Ok((s, p));
            }
            wait = (wait * 2).min(HELLO_WAIT_MAX);
            continue;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the VMM child: its console to `console`, its own stderr to `log`; it dies with us.
fn spawn_vmm(mut cmd: Command, log: &Path, console: &Path) -> Result<Vm, RunError> {
    let out = std::fs::File::create(console)
        .map_err(|e| RunError::Host(format!("{}: {e}", console.display())))?;
    let err = std::fs::File::create(log)
        .map_err(|e| RunError::Host(format!("{}: {e}", log.display())))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure only makes one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            // The VM dies with its front-end.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| RunError::Vm(format!("cannot start the VMM: {e}")))?;
    Ok(Vm {
        child,
        log: log.to_path_buf(),
        console: console.to_path_buf(),
    })
}

/// Where a run's VM comes from.
struct Paths<'a> {
    exe: &'a Path,
    uds: &'a Path,
    log: &'a Path,
    console: &'a Path,
}

/// The VM restored from the run template (built first when missing; rebuilt once when it
/// does not restore) and its agent's stream; None (after one line on stderr) to boot cold.
fn restore_from_template(
    args: &RunArgs,
    spec: &template::Spec,
    rootfs: &Path,
    p: &Paths,
) -> Option<(Vm, (UnixStream, Vec<u8>))> {
    let dir = template::dir_for(spec, p.exe);
    for attempt in 0..2 {
        let t0 = Instant::now();
        let (t, built) = match template::ensure(&dir, spec, p.exe, attempt > 0) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("cinder run: {e}; booting cold");
                return None;
            }
        };
        if built && args.verbose {
            eprintln!(
                "cinder run: built the run template {} in {} ms",
                t.dir.display(),
                t0.elapsed().as_millis()
            );
        }
        let t1 = Instant::now();
        let _ = std::fs::remove_file(p.uds);
        let mut cmd = Command::new(p.exe);
        cmd.arg("--restore").arg(format!(
            "state={},mem={},resume,vsock={},drive=image:{}",
            t.state().display(),
            t.mem().display(),
            p.uds.display(),
            rootfs.display()
        ));
        let mut vm = match spawn_vmm(cmd, p.log, p.console) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("cinder run: {e}; booting cold");
                return None;
            }
        };
        match await_restore(&mut vm, p.uds) {
            Ok(s) => {
                if args.verbose {
                    eprintln!(
                        "cinder run: restored from the run template {} in {} ms",
                        t.dir.display(),
                        t1.elapsed().as_millis()
                    );
                }
                return Some((vm, s));
            }
            Err(why) => {
                drop(vm);
                let _ = std::fs::remove_file(p.uds);
                if attempt == 0 {
                    if args.verbose {
                        eprintln!(
                            "cinder run: the run template {} did not restore ({why}); rebuilding it",
                            t.dir.display()
                        );
                    }
                    continue;
                }
                eprintln!(
                    "cinder run: the run template {} did not restore ({why}); booting cold",
                    t.dir.display()
                );
            }
        }
    }
    None
}

/// `n` bytes from the host's getrandom (zeros if it fails: the guest keeps its own pool).
fn host_random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let mut got = 0;
    while got < n {
        // SAFETY: `v[got..]` is valid for writes of its length.
        let r = unsafe { libc::getrandom(v[got..].as_mut_ptr().cast(), n - got, 0) };
        if r <= 0 {
            break;
        }
        got += r.unsigned_abs();
    }
    v
}

/// The hybrid handshake's answer line, read a byte at a time so that nothing after it (the
/// agent's HELLO) is consumed; at most 64 bytes.
fn read_line(s: &mut UnixStream) -> Option<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => return Some(String::from_utf8_lossy(&line).into_owned()),
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
    None
}

/// The whole run: Ok(exit code) or a 125 failure.
fn run(args: &RunArgs) -> Result<u8, RunError> {
    let volumes: Vec<Volume> = args
        .volumes
        .iter()
        .map(|v| parse_volume(v))
        .collect::<Result<_, _>>()?;
    let copy_outs: Vec<(String, PathBuf)> = args
        .copy_out
        .iter()
        .map(|c| parse_copy_out(c))
        .collect::<Result<_, _>>()?;
    if volumes.len() > 8 {
        return Err(RunError::Usage("at most 8 -v volumes".into()));
    }
    let timeout_ms = match args.timeout {
        None => 0,
        Some(t) if t > 0.0 && t < 1e9 => Duration::try_from_secs_f64(t)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok())
            .unwrap_or(1)
            .max(1),
        Some(t) => {
            return Err(RunError::Usage(format!(
                "--timeout {t}: expected a positive number of seconds"
            )))
        }
    };
    let tap = match args.net.as_str() {
        "none" => None,
        n => match n.strip_prefix("tap=") {
            Some(name) if !name.is_empty() => Some(name.to_string()),
            _ => {
                return Err(RunError::Usage(format!(
                    "--net {n}: expected none or tap=NAME"
                )))
            }
        },
    };
    let scratch = Scratch::new(args.keep_scratch)?;
    let (rootfs, cfg) = resolve_image(&args.image).map_err(RunError::Image)?;
    let (argv, env, cwd, user) = compose(args, &cfg)?;
    let kernel = guest::kernel(args.kernel.as_deref()).map_err(RunError::Guest)?;
    let initrd = guest::agent_initrd(args.agent_initrd.as_deref()).map_err(RunError::Guest)?;
    let mut mounts = Vec::new();
    let mut drives = vec![format!("path={},id=image,ro", rootfs.display())];
    for (i, v) in volumes.iter().enumerate() {
        let img = scratch.path.join(format!("volume{i}.ext4"));
        image::ext4_from_dir(&v.host, &img)
            .map_err(|e| RunError::Host(format!("-v {}: {e}", v.host.display())))?;
        let mut d = format!("path={},id=vol{i}", img.display());
        if v.read_only {
            d.push_str(",ro");
        }
        drives.push(d);
        // The root drive is /dev/vda; the volumes follow in order.
        let letter = char::from(b'b' + u8::try_from(i).unwrap_or(0));
        mounts.push((format!("/dev/vd{letter}"), v.guest.clone(), v.read_only));
    }

    let uds = scratch.path.join("vsock");
    let log = scratch.path.join("cinder.log");
    let console = scratch.path.join("console.log");
    let exe = std::env::current_exe()
        .map_err(|e| RunError::Host(format!("cannot find cinder itself: {e}")))?;
    let paths = Paths {
        exe: &exe,
        uds: &uds,
        log: &log,
        console: &console,
    };
    let root_sectors = std::fs::metadata(&rootfs)
        .map(|m| m.len() / 512)
        .map_err(|e| RunError::Image(format!("{}: {e}", rootfs.display())))?;
    // Before the seccomp filter: the guest's fresh entropy and its hostname.
    let entropy = host_random(64);
    let hostname: String = host_random(6).iter().map(|b| format!("{b:02x}")).collect();
    let cold =
        if args.no_snapshot || std::env::var_os("CINDER_RUN_SNAPSHOT").is_some_and(|v| v == "0") {
            Some("--no-snapshot")
        } else if !volumes.is_empty() {
            Some("-v volumes have no slot in the run template")
        } else if tap.is_some() {
            Some("--net tap= has no slot in the run template")
        } else if rootfs.to_string_lossy().contains(',') {
            Some("the image's path has a comma")
        } else {
            None
        };
    let restored = match cold {
        Some(_) => None,
        None => {
            let spec = template::Spec {
                kernel: &kernel,
                initrd: &initrd,
                memory: args.memory,
                vcpus: args.vcpus,
            };
            restore_from_template(args, &spec, &rootfs, &paths)
        }
    };
    let (mut vm, early_stream) = match restored {
        Some((vm, s)) => (vm, Some(s)),
        None => {
            if args.verbose {
                eprintln!(
                    "cinder run: booting cold ({})",
                    cold.unwrap_or("no run template")
                );
            }
            let mut cmd = Command::new(&exe);
            cmd.arg("--kernel")
                .arg(&kernel.path)
                .arg("--initrd")
                .arg(&initrd)
                .args(["--cmdline", &kernel.cmdline])
                .args([
                    "--memory",
                    &args.memory.to_string(),
                    "--vcpus",
                    &args.vcpus.to_string(),
                ])
                .arg("--vsock")
                .arg(format!("cid={GUEST_CID},uds={}", uds.display()));
            for d in &drives {
                cmd.arg("--drive").arg(d);
            }
            if let Some(t) = &tap {
                cmd.arg("--net").arg(format!("tap={t}"));
            }
            if kernel.no_pv_hypercalls {
                cmd.args(["--cpu-template", "no-pv-hypercalls"]);
            }
            (spawn_vmm(cmd, &log, &console)?, None)
        }
    };

    // From here on the front-end only talks to the agent, the host's stdio and its VMM child:
    // it runs under its own seccomp filter (`run` in seccomp/tables.rs), as every VMM thread
    // does under theirs; the threads it spawns below inherit it. (A restored VM's handshake
    // above reads only the VMM's `OK` line, nothing the guest wrote.)
    crate::seccomp::init(crate::seccomp::SeccompMode::On)
        .and_then(|()| crate::seccomp::install(crate::seccomp::ThreadKind::Run))
        .map_err(|e| RunError::Host(e.to_string()))?;
    forward_signals();
    let (stream, hello) = match early_stream {
        Some((s, hello)) => (s, Some(hello)),
        None => match connect(&mut vm, &uds) {
            Err(RunError::Interrupted(sig)) => {
                drop(vm);
                return Ok(128u8.wrapping_add(u8::try_from(sig & 0x7f).unwrap_or(0)));
            }
            r => (r?, None),
        },
    };
    let mut reader = stream
        .try_clone()
        .map_err(|e| RunError::Host(format!("socket: {e}")))?;
    let writer: Writer = Arc::new(Mutex::new(stream));
    let first = match hello {
        Some(p) => Ok(Some((proto::HELLO, p))),
        None => proto::read_frame(&mut reader),
    };
    match first {
        Ok(Some((proto::HELLO, p))) => {
            let v = proto::Dec(&p).u32().map_err(RunError::Agent)?;
            if v != proto::VERSION {
                return Err(RunError::Agent(format!(
                    "the guest agent speaks protocol version {v}, this cinder {}",
                    proto::VERSION
                )));
            }
        }
        Ok(Some((k, _))) => {
            return Err(RunError::Agent(format!(
                "expected HELLO from the guest agent, got frame {k:#04x}"
            )))
        }
        Ok(None) | Err(_) => {
            return Err(RunError::Agent(format!(
                "the guest agent closed the connection: {}",
                vm.why()
            )))
        }
    }
    let tty = args.tty;
    let (rows, cols) = if tty {
        winsize(0).or_else(|| winsize(1)).unwrap_or((24, 80))
    } else {
        (0, 0)
    };
    let mut flags = 0;
    if tty {
        flags |= proto::FLAG_TTY;
    }
    if args.interactive {
        flags |= proto::FLAG_STDIN;
    }
    let start = proto::Start {
        flags,
        timeout_ms,
        rows,
        cols,
        argv,
        env,
        cwd,
        user,
        mounts,
        root_sectors,
        realtime_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok())
            .unwrap_or(0),
        entropy,
        hostname: format!("cinder-{hostname}"),
    };
    send(&writer, proto::START, &start.encode())?;
    if let Ok(mut g) = SIGNAL_SINK.lock() {
        *g = Some(writer.clone());
    }
    let early = EARLY_SIGNAL.swap(0, std::sync::atomic::Ordering::SeqCst);
    if early != 0 {
        let sig = u32::try_from(early).unwrap_or(0);
        send(&writer, proto::SIGNAL, &proto::Enc::default().u32(sig).0)?;
    }
    let _raw = (tty && args.interactive).then(RawTerminal::new);

    // stdin flows once the command runs (STARTED): nothing is queued in the guest while it
    // forks and execs, and nothing at all when the exec fails.
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    if args.interactive {
        let w = writer.clone();
        std::thread::spawn(move || {
            if started_rx.recv().is_err() {
                return;
            }
            let mut buf = vec![0u8; proto::CHUNK];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = send(&w, proto::STDIN_EOF, &[]);
                        return;
                    }
                    Ok(n) => {
                        if send(&w, proto::STDIN, &buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    if tty {
        // The terminal's size, looked at four times a second (no signal handler to confine).
        let w = writer.clone();
        std::thread::spawn(move || {
            let mut last = (rows, cols);
            loop {
                std::thread::sleep(Duration::from_millis(250));
                if let Some(now) = winsize(0).or_else(|| winsize(1)) {
                    if now != last {
                        last = now;
                        if send(
                            &w,
                            proto::RESIZE,
                            &proto::Enc::default().u16(now.0).u16(now.1).0,
                        )
                        .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
    }

    // Output until EXIT.
    let exit = loop {
        match proto::read_frame(&mut reader) {
            Ok(Some((proto::STDOUT, p))) => {
                let _ = write_fd(1, &p);
            }
            Ok(Some((proto::STDERR, p))) => {
                let _ = write_fd(2, &p);
            }
            Ok(Some((proto::STARTED, _))) => {
                let _ = started_tx.send(());
            }
            Ok(Some((proto::EXIT, p))) => break proto::decode_exit(&p).map_err(RunError::Agent)?,
            Ok(Some((proto::ERROR, p))) => {
                let msg = proto::Dec(&p)
                    .bytes()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                return Err(RunError::Agent(format!(
                    "the guest agent could not run the command: {msg}"
                )));
            }
            Ok(Some((k, _))) => {
                return Err(RunError::Agent(format!(
                    "unexpected frame {k:#04x} from the guest agent"
                )))
            }
            Ok(None) | Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                return Err(RunError::Agent(format!(
                    "the connection to the guest agent ended before the command's exit status: {}",
                    vm.why()
                )));
            }
        }
    };
    drop(_raw);
    let (exit, leftover) = exit;
    if leftover != 0 {
        eprintln!("cinder run: warning: {leftover} processes were still running in the guest after the command ended");
    }
    if let Exit::ExecFailed(_, msg) = &exit {
        eprintln!("cinder run: exec {msg}");
    }

    let mut copy_err = None;
    for (guest_path, host_path) in &copy_outs {
        if let Err(e) = copy_out(&writer, &mut reader, guest_path, host_path) {
            copy_err.get_or_insert(e);
        }
    }
    let _ = send(&writer, proto::POWEROFF, &[]);
    let until = Instant::now() + POWEROFF_DEADLINE;
    while Instant::now() < until {
        if let Ok(Some(_)) = vm.child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(vm);
    if let Some(e) = copy_err {
        return Err(e);
    }
    Ok(exit_code(&exit))
}

fn copy_out(
    w: &Writer,
    r: &mut UnixStream,
    guest_path: &str,
    host_path: &Path,
) -> Result<(), RunError> {
    send(
        w,
        proto::COPY_OUT,
        &proto::Enc::default().bytes(guest_path.as_bytes()).0,
    )?;
    let mut f = std::fs::File::create(host_path).map_err(|e| {
        RunError::Host(format!(
            "--copy-out {guest_path}: {}: {e}",
            host_path.display()
        ))
    })?;
    loop {
        match proto::read_frame(r) {
            Ok(Some((proto::FILE_DATA, p))) => f.write_all(&p).map_err(|e| {
                RunError::Host(format!(
                    "--copy-out {guest_path}: {}: {e}",
                    host_path.display()
                ))
            })?,
            Ok(Some((proto::FILE_END, p))) => {
                let mut d = proto::Dec(&p);
                let code = d.u32().map_err(RunError::Agent)?;
                if code == 0 {
                    return Ok(());
                }
                let msg = d
                    .bytes()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let _ = std::fs::remove_file(host_path);
                return Err(RunError::Agent(format!("--copy-out {guest_path}: {msg}")));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                return Err(RunError::Agent(format!(
                    "--copy-out {guest_path}: the connection to the guest agent ended"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> RunArgs {
        RunArgs::try_parse_from(std::iter::once("cinder run").chain(v.iter().copied())).unwrap()
    }

    #[test]
    fn exit_codes_follow_docker() {
        assert_eq!(exit_code(&Exit::Code(0)), 0);
        assert_eq!(exit_code(&Exit::Code(42)), 42);
        assert_eq!(exit_code(&Exit::Signal(9)), 137);
        assert_eq!(exit_code(&Exit::Timeout), 124);
        assert_eq!(
            exit_code(&Exit::ExecFailed(libc::ENOENT, String::new())),
            127
        );
        assert_eq!(
            exit_code(&Exit::ExecFailed(libc::EACCES, String::new())),
            126
        );
    }

    #[test]
    fn command_env_cwd_and_user_are_composed_as_docker_does() {
        let cfg = ImageConfig {
            entrypoint: vec!["/bin/ep".into()],
            cmd: vec!["default".into()],
            env: vec!["A=1".into(), "B=2".into()],
            working_dir: Some("/srv".into()),
            user: Some("nobody".into()),
        };
        let (argv, env, cwd, user) = compose(&args(&["img"]), &cfg).unwrap();
        assert_eq!(argv, ["/bin/ep", "default"]);
        assert!(env.contains(&"A=1".to_string()) && env.iter().any(|e| e.starts_with("PATH=")));
        assert_eq!((cwd.as_str(), user.as_str()), ("/srv", "nobody"));
        let a = args(&[
            "-e", "A=9", "-w", "/x", "-u", "1:2", "img", "--", "sh", "-c", "x",
        ]);
        let (argv, env, cwd, user) = compose(&a, &cfg).unwrap();
        assert_eq!(argv, ["/bin/ep", "sh", "-c", "x"]);
        assert!(env.contains(&"A=9".to_string()) && !env.contains(&"A=1".to_string()));
        assert_eq!((cwd.as_str(), user.as_str()), ("/x", "1:2"));
        assert!(compose(&args(&["img"]), &ImageConfig::default()).is_err());
        assert!(compose(
            &args(&["-w", "rel", "img", "true"]),
            &ImageConfig::default()
        )
        .is_err());
    }

    #[test]
    fn volume_and_copy_out_specs() {
        let v = parse_volume("/tmp:/data:ro").unwrap();
        assert_eq!((v.guest.as_str(), v.read_only), ("/data", true));
        assert!(!parse_volume("/tmp:/data").unwrap().read_only);
        assert!(parse_volume("/tmp:data").is_err());
        assert!(parse_volume("/nonexistent-cinder:/d").is_err());
        assert!(parse_volume("/tmp:/d:rx").is_err());
        assert_eq!(
            parse_copy_out("/a:/b").unwrap(),
            ("/a".to_string(), PathBuf::from("/b"))
        );
        assert!(parse_copy_out("a:/b").is_err());
    }
}
