//! The logger behind the `log` facade: stderr by default; `PUT /logger` (or the config
//! file's `logger`) can send it to a file or named pipe, change the level, and choose what
//! each line shows.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use log::{LevelFilter, Log, Metadata, Record};

/// Lines that may wait for the writer thread; past this, new lines are dropped and counted
/// ([`dropped_lines`], the metrics' `logger.missed_log_count`).
pub const LOG_QUEUE_LINES: usize = 1024;

/// Default cap on a log file (`--log-path`, `PUT /logger` on a regular file): once it holds
/// this many bytes, one last line says so and further lines are dropped and counted.
pub const DEFAULT_LOG_FILE_MAX_BYTES: u64 = 64 * 1024 * 1024;

struct Settings {
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    /// `--id`, shown in each line when given.
    instance_id: Option<String>,
}

/// Where a queued line goes.
enum Dest {
    /// The configured log destination (stderr until one is set).
    Log,
    /// Always stderr: the process's own last words (errors, exit reasons).
    Stderr,
}

/// The one writer thread's side: it owns the log file, takes new destinations from
/// [`Shared::new_sink`], and counts what it wrote so [`flush`] can wait for it.
struct Shared {
    /// A destination set by [`apply`], taken by the writer before its next line (the writer
    /// never holds this lock while writing, so `apply` never waits on a stalled sink).
    new_sink: Mutex<Option<File>>,
    /// Lines queued (accepted by the channel).
    queued: AtomicU64,
    /// Lines the writer is done with (written or failed).
    done: AtomicU64,
    /// Lines dropped because the queue was full (or the writer could not start).
    dropped: AtomicU64,
    /// Lines that could not be written, or were refused by the file cap.
    failed: AtomicU64,
    /// The log file's size cap in bytes.
    max_file_bytes: AtomicU64,
}

static SHARED: Shared = Shared {
    new_sink: Mutex::new(None),
    queued: AtomicU64::new(0),
    done: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    max_file_bytes: AtomicU64::new(DEFAULT_LOG_FILE_MAX_BYTES),
};

/// The lines waiting for the writer thread: at most [`LOG_QUEUE_LINES`], allocated as they
/// come (a preallocated channel of that many slots cost every VM 32 KiB of touched memory).
struct LineQueue {
    lines: Mutex<VecDeque<(Dest, String)>>,
    /// Signalled when a line is queued into an empty queue.
    ready: Condvar,
}

static LINES: LineQueue = LineQueue {
    lines: Mutex::new(VecDeque::new()),
    ready: Condvar::new(),
};

/// Whether the writer thread runs (started on first use).
static WRITER: OnceLock<bool> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The queue to the writer thread, started on first use (`None` when it cannot start).
fn queue() -> Option<&'static LineQueue> {
    let started = *WRITER.get_or_init(|| {
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(writer_loop)
            .is_ok()
    });
    started.then_some(&LINES)
}

/// The next queued line, waiting for one.
fn next_line() -> Option<(Dest, String)> {
    let mut lines = lock(&LINES.lines);
    loop {
        if let Some(l) = lines.pop_front() {
            if lines.is_empty() && lines.capacity() > 64 {
                // A burst made it grow: give the memory back once it is drained.
                lines.shrink_to(64);
            }
            return Some(l);
        }
        lines = match LINES.ready.wait(lines) {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
    }
}

/// The writer thread: the only place that writes log lines, so a stalled stderr or log
/// FIFO blocks only this thread.
fn writer_loop() {
    // Its own seccomp filter first (a no-op before `seccomp::init` or with `--seccomp off`).
    // A writer that cannot be confined ends cinder rather than run unfiltered.
    if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::LogWriter) {
        let _ = writeln!(std::io::stderr(), "cinder: [error] {e}");
        std::process::exit(1);
    }
    // The file, its size, and whether it is a regular file (a FIFO has no size to cap).
    let mut sink: Option<(File, u64, bool)> = None;
    let mut capped = false;
    while let Some((dest, line)) = next_line() {
        if let Some(f) = lock(&SHARED.new_sink).take() {
            let (size, is_file) = f.metadata().map_or((0, false), |m| (m.len(), m.is_file()));
            sink = Some((f, size, is_file));
            capped = false;
        }
        let ok = match (dest, sink.as_mut()) {
            (Dest::Log, Some((f, size, is_file))) => {
                let max = SHARED.max_file_bytes.load(Ordering::Relaxed);
                if *is_file && size.saturating_add(line.len() as u64) > max {
                    if !capped {
                        capped = true;
                        let note = format!(
                            "cinder: [warn] log file reached its limit of {max} bytes: \
                             further lines are dropped (see the metrics' logger.missed_log_count)\n"
                        );
                        let _ = f.write_all(note.as_bytes());
                        *size = size.saturating_add(note.len() as u64);
                    }
                    false
                } else {
                    let r = f.write_all(line.as_bytes()).is_ok();
                    *size = size.saturating_add(line.len() as u64);
                    r
                }
            }
            _ => std::io::stderr().lock().write_all(line.as_bytes()).is_ok(),
        };
        if !ok {
            SHARED.failed.fetch_add(1, Ordering::Relaxed);
        }
        SHARED.done.fetch_add(1, Ordering::Release);
    }
}

/// Queues `line` without ever blocking; a full queue drops it and counts it.
fn enqueue(dest: Dest, line: String) {
    let Some(q) = queue() else {
        SHARED.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut lines = lock(&q.lines);
    if lines.len() >= LOG_QUEUE_LINES {
        drop(lines);
        SHARED.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let was_empty = lines.is_empty();
    SHARED.queued.fetch_add(1, Ordering::AcqRel);
    lines.push_back((dest, line));
    drop(lines);
    if was_empty {
        q.ready.notify_one();
    }
}

/// Log lines dropped because the writer could not keep up (a stalled stderr or log pipe),
/// plus those refused by the log file's cap.
pub fn dropped_lines() -> u64 {
    SHARED.dropped.load(Ordering::Relaxed) + SHARED.failed.load(Ordering::Relaxed)
}

/// Writes `msg` and a newline to stderr through the writer thread (never blocking the
/// caller), whatever the log level and destination: for the process's last words. Call
/// [`flush`] before exiting.
pub fn print_stderr(msg: &str) {
    enqueue(Dest::Stderr, format!("{msg}\n"));
}

/// Waits until every line queued so far is written, at most `timeout`. Returns whether it
/// got there (false: stderr or the log file is stalled; the rest is lost at exit).
pub fn flush(timeout: Duration) -> bool {
    let target = SHARED.queued.load(Ordering::Acquire);
    let deadline = Instant::now() + timeout;
    // Bounded: sleeps of 2 ms until the deadline.
    loop {
        if SHARED.done.load(Ordering::Acquire) >= target {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sets the log file's size cap (bytes).
pub fn set_max_file_bytes(max: u64) {
    SHARED.max_file_bytes.store(max, Ordering::Relaxed);
}

struct CinderLogger {
    settings: Mutex<Settings>,
}

impl Log for CinderLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // Formatting only under the lock: no I/O here, so no caller ever waits on a sink.
        let s = lock(&self.settings);
        if let Some(m) = &s.module {
            if !record.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let mut line = String::from("cinder: ");
        if let Some(id) = &s.instance_id {
            line.push_str(&format!("[{id}] "));
        }
        if s.show_level {
            line.push_str(&format!("[{}] ", record.level().as_str().to_lowercase()));
        }
        if s.show_origin {
            line.push_str(&format!(
                "{}:{}: ",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        drop(s);
        line.push_str(&format!("{}\n", record.args()));
        enqueue(Dest::Log, line);
    }

    fn flush(&self) {}
}

static LOGGER: CinderLogger = CinderLogger {
    settings: Mutex::new(Settings {
        show_level: true,
        show_origin: false,
        module: None,
        instance_id: None,
    }),
};

/// Shows the instance id (`--id`) in each line, after `cinder: ` and before the level.
pub fn set_instance_id(id: &str) {
    let mut s = lock(&LOGGER.settings);
    s.instance_id = Some(id.to_string());
}

/// Installs the logger at `level` (a second call only changes the level).
pub fn init(level: LevelFilter) {
    let _ = queue();
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Why a logger configuration could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("logger: cannot open log_path {path}: {source}")]
pub struct LoggerError {
    /// The destination asked for.
    pub path: String,
    /// Why it could not be opened.
    #[source]
    pub source: std::io::Error,
}

/// Applies a `PUT /logger` body: level, destination (file or named pipe, opened for
/// appending), and what each line shows. Nothing changes when it fails.
pub fn apply(cfg: &api::model::Logger) -> Result<(), LoggerError> {
    use api::model::LogLevel;
    let sink = match &cfg.log_path {
        Some(p) => Some(
            crate::metrics::open_sink(std::path::Path::new(p)).map_err(|source| LoggerError {
                path: p.clone(),
                source,
            })?,
        ),
        None => None,
    };
    if let Some(f) = sink {
        *lock(&SHARED.new_sink) = Some(f);
    }
    let mut s = lock(&LOGGER.settings);
    if let Some(v) = cfg.show_level {
        s.show_level = v;
    }
    if let Some(v) = cfg.show_log_origin {
        s.show_origin = v;
    }
    s.module = cfg.module.clone();
    drop(s);
    if let Some(level) = cfg.level {
        log::set_max_level(match level {
            LogLevel::Off => LevelFilter::Off,
            LogLevel::Error => LevelFilter::Error,
            LogLevel::Warning => LevelFilter::Warn,
            LogLevel::Info => LevelFilter::Info,
            LogLevel::Debug => LevelFilter::Debug,
            LogLevel::Trace => LevelFilter::Trace,
        });
    }
    Ok(())
}
