//! seccomp, per thread, on by default. Each thread kind has its own allow-list
//! ([`tables`]: one line per system call, with its arguments and who needs it), compiled with
//! `seccompiler` and installed by the thread itself when it starts, before it reads guest or
//! client input:
//!
//! | kind | thread(s) | installed |
//! |---|---|---|
//! | `vmm` | main, the control loop | in `main` after set-up, before the VM is built or the API served |
//! | `api` | api | first thing in the thread (main.rs) |
//! | `vcpu` | vcpuN | first thing in the thread (vm.rs) |
//! | `devices` | devices | first thing in the thread (device_loop.rs) |
//! | `console-out` | console-out | first thing in the thread (console.rs) |
//! | `blk` | blk-<id> | (at merge) its start hook (builder.rs's `blk_thread_start_hook`) |
//! | `log-writer` | log-writer | (at merge) first thing in the thread (logger.rs) |
//! | `run` | `cinder run`'s front-end: main and the threads it spawns | main, once the VMM child runs (run/mod.rs) |
//!
//! A thread inherits the filters of the thread that spawns it; the kernel runs every filter a
//! thread has and the strictest answer wins. main spawns vcpuN, devices and console-out after
//! its own filter is on (InstanceStart over the API builds the VM on main), so main's filter
//! also allows what those threads need ([`rules`] adds their tables to `vmm`'s); each of them
//! is confined by its own filter on top. main alone may `clone`, and only with CLONE_THREAD; a
//! second filter on main answers `clone3` (whose flags a filter cannot read) with ENOSYS, so
//! glibc falls back to `clone` ([`Args::Enosys`]). A thread of another kind that tried to
//! spawn one would be killed by SIGSYS without the line below: glibc blocks every signal
//! around `clone3`, so the handler cannot run.
//!
//! A system call outside the list (mode `on`) raises SIGSYS (SECCOMP_RET_TRAP); the handler
//! writes one line, `cinder: seccomp: thread vcpu0 made forbidden syscall 59 (execve); exiting
//! with code 148`, restores the terminal if cinder put it in raw mode, and ends the process
//! with [`EXIT_CODE`] (148, as Firecracker). Mode `log` allows it and has the kernel log it
//! (SECCOMP_RET_LOG: the audit log or dmesg, with the thread's name as `comm`); mode `off`
//! installs nothing.
//!
//! Adding a thread kind: a table in [`tables`], a [`ThreadKind`] variant, and one
//! [`install`] call (or a [`start_hook`] handed to code outside this crate) at the spawn site.

mod ioctls;
mod tables;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit code of a cinder that made a forbidden system call (Firecracker's too).
pub const EXIT_CODE: u8 = 148;

/// What a system call may be called with.
#[derive(Clone, Copy, Debug)]
pub enum Args {
    /// Anything.
    Any,
    /// Argument `.0` (its low 32 bits) is one of these values: ioctl requests, socket
    /// families, prctl options.
    In(u8, &'static [u64]),
    /// Argument `.0`, a protection, has no PROT_EXEC: mmap, mprotect.
    NoExec(u8),
    /// Argument `.0` has every bit of `.1` set: clone with CLONE_THREAD.
    AllSet(u8, u64),
    /// Answered ENOSYS, not run (a second filter, whose ERRNO wins over the table's ALLOW), so
    /// that glibc falls back to a call whose arguments a filter can check: clone3 -> clone. A
    /// kind whose threads spawn threads needs this line for clone3 and an `AllSet` clone line.
    Enosys,
}

/// One line of an allow-list: the system call, its arguments, who needs it.
pub type Allow = (i64, Args, &'static str);

/// The kinds of thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// main: the control loop, which also builds the VM.
    Vmm,
    /// The API server thread.
    Api,
    /// A vCPU thread.
    Vcpu,
    /// The device event loop.
    Devices,
    /// The console writer.
    ConsoleOut,
    /// A drive's I/O thread (`blk-<id>`, the blk branch's worker: its start hook installs it).
    BlockIo,
    /// The log writer (`log-writer`, the procrobust branch's logger thread).
    LogWriter,
    /// `cinder run`'s front-end process (main, once the VMM child is started, and the threads
    /// it spawns then: signal forwarding, stdin, terminal size): no KVM, no guest memory; a
    /// socket to the guest agent, the host's stdio, the VMM child, its scratch files.
    Run,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::Devices,
        ThreadKind::ConsoleOut,
        ThreadKind::BlockIo,
        ThreadKind::LogWriter,
        ThreadKind::Run,
    ];

    /// Its name (Firecracker's names for `vmm`, `api` and `vcpu`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::ConsoleOut => "console-out",
            ThreadKind::BlockIo => "blk",
            ThreadKind::LogWriter => "log-writer",
            ThreadKind::Run => "run",
        }
    }

    /// Its own table (besides [`tables::COMMON`]).
    fn table(self) -> &'static [Allow] {
        match self {
            ThreadKind::Vmm => tables::VMM,
            ThreadKind::Api => tables::API,
            ThreadKind::Vcpu => tables::VCPU,
            ThreadKind::Devices => tables::DEVICES,
            ThreadKind::ConsoleOut => tables::CONSOLE_OUT,
            ThreadKind::BlockIo => tables::BLOCK_IO,
            ThreadKind::LogWriter => tables::LOG_WRITER,
            ThreadKind::Run => tables::RUN,
        }
    }

    /// Whether one thread at most of this kind runs in a process (the control loop, the API
    /// thread, the log writer, `cinder run`'s front-end): its programs are dropped once that
    /// thread installed them, and a second install fails.
    fn once(self) -> bool {
        matches!(
            self,
            ThreadKind::Vmm | ThreadKind::Api | ThreadKind::LogWriter | ThreadKind::Run
        )
    }

    /// The kinds of thread it spawns after its filter is on (they inherit its filter).
    fn spawns(self) -> &'static [ThreadKind] {
        match self {
            ThreadKind::Vmm => &[
                ThreadKind::Vcpu,
                ThreadKind::Devices,
                ThreadKind::ConsoleOut,
                ThreadKind::BlockIo,
                ThreadKind::LogWriter,
            ],
            _ => &[],
        }
    }
}

/// `--seccomp`: what a forbidden system call does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Ends cinder (SIGSYS, one line, exit code 148).
    #[default]
    On,
    /// Installs no filter.
    Off,
    /// Allowed, and logged by the kernel (audit log / dmesg).
    Log,
}

/// Errors of building and installing the filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A table did not compile (a bug in a table).
    #[error("seccomp: the {kind} filter does not compile: {source}")]
    Compile {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("seccomp: cannot install the {kind} filter on thread {thread}: {source}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// The thread's name.
        thread: String,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("seccomp: cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    /// A second thread of a kind that runs once per process, or one [`forget`] dropped.
    #[error("seccomp: a {kind} thread was started already (or cannot start in this process): its filter is gone")]
    Gone {
        /// The thread kind.
        kind: &'static str,
    },
    /// [`init`] was called twice.
    #[error("seccomp: the filters are set up already")]
    AlreadyInitialised,
    /// A `--seccomp-filter` file cannot be used.
    #[error("--seccomp-filter {path}: {why}")]
    FilterFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
}

fn cond(
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// The rules of `kind`'s filter: [`tables::COMMON`], its own table and the tables of the
/// threads it spawns, merged per system call (an `Any` line wins over argument rules).
pub fn rules(
    kind: ThreadKind,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut lines: Vec<&Allow> = tables::COMMON.iter().chain(kind.table()).collect();
    for k in kind.spawns() {
        lines.extend(k.table());
    }
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut any: BTreeSet<i64> = BTreeSet::new();
    for (nr, args, _who) in lines {
        let rules = map.entry(*nr).or_default();
        match args {
            // Allowed by the table (its TRAP would win over the ENOSYS), answered by
            // `compile_enosys`'s filter.
            Args::Any | Args::Enosys => {
                any.insert(*nr);
            }
            Args::In(arg, values) => {
                for v in values.iter() {
                    rules.push(SeccompRule::new(vec![cond(*arg, SeccompCmpOp::Eq, *v)?])?);
                }
            }
            Args::AllSet(arg, bits) => {
                rules.push(SeccompRule::new(vec![cond(
                    *arg,
                    SeccompCmpOp::MaskedEq(*bits),
                    *bits,
                )?])?);
            }
            Args::NoExec(arg) => {
                let exec = u64::try_from(libc::PROT_EXEC).unwrap_or(4);
                rules.push(SeccompRule::new(vec![cond(
                    *arg,
                    SeccompCmpOp::MaskedEq(exec),
                    0,
                )?])?);
            }
        }
    }
    // An empty rule list matches the system call whatever its arguments.
    for nr in any {
        map.insert(nr, Vec::new());
    }
    Ok(map)
}

/// Compiles `kind`'s filter for `mode` (`None` for [`SeccompMode::Off`]).
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let err = |source| SeccompError::Compile {
        kind: kind.name(),
        source,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(err)?;
    let filter = SeccompFilter::new(
        rules(kind).map_err(err)?,
        mismatch,
        SeccompAction::Allow,
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map(Some).map_err(err)
}

/// The filter that answers `kind`'s [`Args::Enosys`] lines with ENOSYS, if it has any (its
/// own table's: the threads it spawns inherit it).
pub fn compile_enosys(kind: ThreadKind) -> Result<Option<BpfProgram>, SeccompError> {
    let calls: Vec<i64> = tables::COMMON
        .iter()
        .chain(kind.table())
        .filter(|(_, args, _)| matches!(args, Args::Enosys))
        .map(|(nr, _, _)| *nr)
        .collect();
    if calls.is_empty() {
        return Ok(None);
    }
    let err = |source| SeccompError::Compile {
        kind: kind.name(),
        source,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(err)?;
    let rules = calls.into_iter().map(|nr| (nr, Vec::new())).collect();
    let enosys = u32::try_from(libc::ENOSYS).unwrap_or(38);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(enosys),
        arch,
    )
    .map_err(err)?;
    BpfProgram::try_from(filter).map(Some).map_err(err)
}

/// The compiled filters of this process: per thread kind, the programs it installs.
struct Filters {
    mode: SeccompMode,
    /// Kept only while a thread of the kind may still start (issue 17 item 5: the programs
    /// of all kinds are tens of KiB of every microVM's heap).
    progs: Mutex<Programs>,
}

struct Programs {
    by_kind: HashMap<ThreadKind, Vec<BpfProgram>>,
    /// The [`ThreadKind::once`] kinds installed, or [`forget`]-ten: no thread of theirs may
    /// start now.
    gone: Vec<ThreadKind>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Compiles every kind's filter for `mode` and installs the SIGSYS handler; call once, early
/// in `main`. Until it is called, [`install`] installs nothing (library users, unit tests).
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    let mut progs = HashMap::new();
    for kind in ThreadKind::ALL {
        if let Some(p) = compile(kind, mode)? {
            let mut list = vec![p];
            list.extend(compile_enosys(kind)?);
            // Built by pushing: up to half of each is spare capacity, kept for the
            // process's life otherwise.
            for p in list.iter_mut() {
                p.shrink_to_fit();
            }
            progs.insert(kind, list);
        }
    }
    init_with(mode, progs)
}

/// As [`init`], with the programs given (a `--seccomp-filter` file's).
fn init_with(
    mode: SeccompMode,
    progs: HashMap<ThreadKind, Vec<BpfProgram>>,
) -> Result<(), SeccompError> {
    if mode == SeccompMode::On {
        install_sigsys_handler()?;
    }
    let progs = Mutex::new(Programs {
        by_kind: progs,
        gone: Vec::new(),
    });
    FILTERS
        .set(Filters { mode, progs })
        .map_err(|_| SeccompError::AlreadyInitialised)
}

/// Uses the filters of a Firecracker `--seccomp-filter` file (seccompiler-bin's output: the
/// "vmm", "api" and "vcpu" programs); the device loop and the console writer, which run on
/// Firecracker's vmm thread there, get its "vmm" program.
pub fn init_from_file(path: &std::path::Path) -> Result<(), SeccompError> {
    let bad = |why: String| SeccompError::FilterFile {
        path: path.display().to_string(),
        why,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| bad(format!("cannot read it: {e}")))?
        .len();
    if len > binary::MAX_BYTES as u64 {
        return Err(bad(format!("{len} bytes: at most {}", binary::MAX_BYTES)));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let mut map = binary::parse(&bytes)
        .map_err(|why| bad(format!("not a seccompiler-bin filter file: {why}")))?;
    let mut take = |name: &str| {
        map.remove(name)
            .ok_or_else(|| bad(format!("it has no \"{name}\" filter")))
    };
    let vmm = take("vmm")?;
    let api = take("api")?;
    let vcpu = take("vcpu")?;
    let progs = HashMap::from([
        (ThreadKind::Devices, vmm.clone()),
        (ThreadKind::ConsoleOut, vmm.clone()),
        (ThreadKind::BlockIo, vmm.clone()),
        (ThreadKind::LogWriter, vmm.clone()),
        (ThreadKind::Vmm, vmm),
        (ThreadKind::Api, api),
        (ThreadKind::Vcpu, vcpu),
    ]);
    // An empty program installs nothing on that thread, as in Firecracker.
    let progs = progs
        .into_iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(k, p)| (k, vec![p]))
        .collect();
    init_with(SeccompMode::On, progs)
}

/// The mode [`init`] set (`Off` before it).
pub fn mode() -> SeccompMode {
    FILTERS.get().map_or(SeccompMode::Off, |f| f.mode)
}

thread_local! {
    /// This thread's name for the SIGSYS line (set by [`install`], read in the handler: a
    /// const-initialised thread-local without a destructor, so reading it there is safe).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new(*b"?\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0") };
}

/// Installs `kind`'s filter on the calling thread (nothing when the mode is `off`, or before
/// [`init`]). Call it first thing in the thread, before it reads any guest or client input.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let mut all = match filters.progs.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if all.gone.contains(&kind) {
        return Err(SeccompError::Gone { kind: kind.name() });
    }
    let taken;
    let progs = if kind.once() {
        all.gone.push(kind);
        let Some(p) = all.by_kind.remove(&kind) else {
            return Ok(());
        };
        taken = p;
        &taken
    } else {
        let Some(p) = all.by_kind.get(&kind) else {
            return Ok(());
        };
        p
    };
    let current = std::thread::current();
    let thread = current.name().unwrap_or(kind.name());
    let mut name = [0u8; 16];
    let n = thread.len().min(15);
    name[..n].copy_from_slice(&thread.as_bytes()[..n]);
    THREAD_NAME.with(|t| t.set(name));
    for prog in progs {
        seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install {
            kind: kind.name(),
            thread: thread.to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Drops the programs of a kind of thread that will not start in this process (the API
/// thread without an API socket, `cinder run`'s front-end in the VMM); a later [`install`] of
/// it fails.
pub fn forget(kind: ThreadKind) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    let mut all = match filters.progs.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    all.by_kind.remove(&kind);
    if !all.gone.contains(&kind) {
        all.gone.push(kind);
    }
}

/// What a thread spawned outside this crate (e.g. by a device in `devices`, which does not
/// depend on `vmm`) runs first to install `kind`'s filter.
pub type ThreadStartHook = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// A [`ThreadStartHook`] that installs `kind`'s filter.
pub fn start_hook(kind: ThreadKind) -> ThreadStartHook {
    Arc::new(move || install(kind).map_err(|e| std::io::Error::other(e.to_string())))
}

/// `siginfo_t`'s `si_syscall` (the `_sigsys` member of its union) on x86_64: after
/// si_signo, si_errno, si_code, the union's padding (16 bytes) and `_call_addr` (8).
const SI_SYSCALL_OFFSET: usize = 24;

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: sigaction is plain data; zeroed is a valid (empty) value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act` is a valid sigaction whose handler is async-signal-safe (`on_sigsys`).
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A byte buffer that a signal handler can fill (no allocation).
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = *b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The line the SIGSYS handler writes.
fn forbidden_line(thread: &[u8], nr: i32) -> Line {
    let mut line = Line {
        buf: [0; 160],
        len: 0,
    };
    let name = usize::try_from(nr)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or("unknown", |s| s.name());
    line.push(b"cinder: seccomp: thread ");
    let end = thread.iter().position(|b| *b == 0).unwrap_or(thread.len());
    line.push(&thread[..end]);
    line.push(b" made forbidden syscall ");
    line.push_num(i64::from(nr));
    line.push(b" (");
    line.push(name.as_bytes());
    line.push(b"); exiting with code ");
    line.push_num(i64::from(EXIT_CODE));
    line.push(b"\n");
    line
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS from
    // seccomp its `_sigsys` member is filled, whose `_syscall` int is at this offset.
    let nr =
        unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) };
    let thread = THREAD_NAME.with(|t| t.get());
    let line = forbidden_line(&thread, nr);
    // The user's terminal back from raw mode (a try_lock and one tcsetattr: no allocation,
    // never blocks).
    crate::console::restore_terminal();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours and `len` long.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::_exit(i32::from(EXIT_CODE));
    }
}

/// Firecracker's `--seccomp-filter` file: seccompiler-bin's output, a bincode map (fixed-size
/// little-endian integers) from thread category to BPF program:
/// `u64 count, then per entry: u64 len + name bytes, u64 len + len * {u16 code, u8 jt, u8 jf,
/// u32 k}`.
mod binary {
    use std::collections::HashMap;

    use seccompiler::{sock_filter, BpfProgram};

    /// The most instructions in one BPF program (the kernel's BPF_MAXINSNS).
    const MAX_INSNS: u64 = 4096;
    /// The largest file (Firecracker's limit).
    pub const MAX_BYTES: usize = 100_000;
    /// The most programs in a file.
    const MAX_PROGRAMS: u64 = 64;

    struct Reader<'a>(&'a [u8]);

    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], String> {
            if self.0.len() < n {
                return Err("it ends early".into());
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Ok(a)
        }
        fn u64(&mut self) -> Result<u64, String> {
            let b = self.take(8)?;
            Ok(u64::from_le_bytes([
                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
            ]))
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<HashMap<String, BpfProgram>, String> {
        if bytes.len() > MAX_BYTES {
            return Err(format!("{} bytes: at most {MAX_BYTES}", bytes.len()));
        }
        let mut r = Reader(bytes);
        let count = r.u64()?;
        if count > MAX_PROGRAMS {
            return Err(format!("{count} filters: at most {MAX_PROGRAMS}"));
        }
        let mut map = HashMap::new();
        for _ in 0..count {
            let len = r.u64()?;
            if len > 64 {
                return Err(format!("a thread category name of {len} bytes"));
            }
            let name = std::str::from_utf8(
                r.take(usize::try_from(len).map_err(|_| "a huge name".to_string())?)?,
            )
            .map_err(|_| "a thread category name is not UTF-8".to_string())?
            .to_string();
            let n = r.u64()?;
            if n > MAX_INSNS {
                return Err(format!(
                    "filter {name:?} has {n} instructions (at most {MAX_INSNS})"
                ));
            }
            let mut prog = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
            for _ in 0..n {
                let b = r.take(8)?;
                prog.push(sock_filter {
                    code: u16::from_le_bytes([b[0], b[1]]),
                    jt: b[2],
                    jf: b[3],
                    k: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                });
            }
            map.insert(name, prog);
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the last filter", r.0.len()));
        }
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let p = compile(kind, mode).unwrap().unwrap();
                assert!(!p.is_empty() && p.len() < 4096, "{kind:?}: {}", p.len());
            }
            assert!(compile(kind, SeccompMode::Off).unwrap().is_none());
        }
    }

    #[test]
    fn vmm_holds_what_the_threads_it_spawns_need() {
        let vmm = rules(ThreadKind::Vmm).unwrap();
        for kind in ThreadKind::Vmm.spawns() {
            for nr in rules(*kind).unwrap().keys() {
                assert!(vmm.contains_key(nr), "{kind:?} needs {nr}");
            }
        }
    }

    #[test]
    fn no_thread_may_exec_or_open_inet_sockets() {
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_fork,
            ] {
                assert!(!r.contains_key(&nr), "{kind:?} allows {nr}");
            }
            if let Some(socket) = r.get(&libc::SYS_socket) {
                assert!(!socket.is_empty(), "{kind:?} allows any socket family");
            }
        }
    }

    #[test]
    fn before_init_nothing_is_installed() {
        // (No unit test calls init: the filters would stay on the test harness's threads.)
        assert_eq!(mode(), SeccompMode::Off);
        assert!(install(ThreadKind::Vcpu).is_ok());
        assert!(start_hook(ThreadKind::Devices)().is_ok());
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        assert!(status.contains("Seccomp:\t0"), "{status}");
    }

    #[test]
    fn only_vmm_and_run_may_clone_and_only_threads() {
        // The two kinds whose threads spawn threads: main of the VMM and of `cinder run`.
        let spawner = |k| k == ThreadKind::Vmm || k == ThreadKind::Run;
        for kind in ThreadKind::ALL {
            let r = rules(kind).unwrap();
            assert!(compile_enosys(kind).unwrap().is_some() == spawner(kind));
            match r.get(&libc::SYS_clone) {
                Some(rules) => assert!(spawner(kind) && rules.len() == 1),
                None => assert!(!spawner(kind)),
            }
        }
    }

    #[test]
    fn the_sigsys_line_names_thread_syscall_and_code() {
        let mut t = [0u8; 16];
        t[..5].copy_from_slice(b"vcpu0");
        let l = forbidden_line(&t, 59);
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "cinder: seccomp: thread vcpu0 made forbidden syscall 59 (execve); exiting with code 148\n"
        );
        let l = forbidden_line(&t, 100_000);
        assert!(std::str::from_utf8(&l.buf[..l.len])
            .unwrap()
            .contains("100000 (unknown)"));
    }

    #[test]
    fn a_firecracker_filter_file_parses_and_bad_ones_are_refused() {
        let mut f = Vec::new();
        f.extend(1u64.to_le_bytes());
        f.extend(3u64.to_le_bytes());
        f.extend(b"vmm");
        f.extend(1u64.to_le_bytes());
        f.extend(6u16.to_le_bytes());
        f.extend([0u8, 0]);
        f.extend(0x7fff_0000u32.to_le_bytes());
        let m = binary::parse(&f).unwrap();
        assert_eq!(m["vmm"].len(), 1);
        assert_eq!(m["vmm"][0].k, 0x7fff_0000);
        assert!(binary::parse(&f[..f.len() - 1]).is_err());
        assert!(binary::parse(b"{\"vmm\": {}}").is_err());
        assert!(binary::parse(&u64::MAX.to_le_bytes()).is_err());
    }
}
