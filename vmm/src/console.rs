//! The host side of the serial console: stdin into the UART (raw when it is a terminal,
//! restored on every exit path), with the escape sequence Ctrl-A x to quit.

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::terminal::Terminal;

use crate::exit::{ExitReason, ExitSignal};

/// Bytes of console output that may wait for a slow reader before new output is dropped.
pub const CONSOLE_BACKLOG: usize = 64 * 1024;

/// Default cap on a `--console-out` file ([`set_console_out_max_bytes`], the
/// `--console-out-max-size` flag).
pub const DEFAULT_CONSOLE_OUT_MAX_BYTES: u64 = 64 * 1024 * 1024;

static CONSOLE_OUT_MAX_BYTES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_CONSOLE_OUT_MAX_BYTES);

/// Sets the cap of console output files opened from now on (0: no cap).
pub fn set_console_out_max_bytes(max: u64) {
    CONSOLE_OUT_MAX_BYTES.store(max, std::sync::atomic::Ordering::Relaxed);
}

/// The cap of console output files ([`set_console_out_max_bytes`]).
pub fn console_out_max_bytes() -> u64 {
    CONSOLE_OUT_MAX_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// A console output file that stops growing at a cap: the first `max` bytes the guest
/// printed are kept, then one line says the rest was dropped (a guest printing in a loop
/// must not fill the host's disk).
pub struct CappedWriter<W: std::io::Write> {
    inner: W,
    written: u64,
    max: u64,
    capped: bool,
}

impl<W: std::io::Write> CappedWriter<W> {
    /// `inner`, capped at `max` bytes (0: no cap).
    pub fn new(inner: W, max: u64) -> Self {
        CappedWriter {
            inner,
            written: 0,
            max,
            capped: false,
        }
    }
}

impl<W: std::io::Write> std::io::Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.max == 0 {
            return self.inner.write(buf);
        }
        if self.capped {
            return Ok(buf.len());
        }
        let room = self.max.saturating_sub(self.written);
        if (buf.len() as u64) <= room {
            let n = self.inner.write(buf)?;
            self.written += n as u64;
            return Ok(n);
        }
        // `room` < buf.len(), a usize.
        let fits = usize::try_from(room).unwrap_or(0);
        self.inner.write_all(&buf[..fits])?;
        self.written += room;
        self.capped = true;
        let note = format!(
            "\n[cinder: console output reached its limit of {} bytes (--console-out-max-size); \
             the rest is dropped]\n",
            self.max
        );
        self.inner.write_all(note.as_bytes())?;
        log::warn!(
            "console output reached its limit of {} bytes: the rest is dropped",
            self.max
        );
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The bytes waiting for the console writer thread, bounded by [`CONSOLE_BACKLOG`] bytes.
#[derive(Default)]
struct Backlog {
    /// Output not yet taken by the writer thread (at most `CONSOLE_BACKLOG` bytes).
    bytes: Vec<u8>,
    /// Bytes dropped because the backlog was full.
    dropped: u64,
    /// The [`ConsoleWriter`] is gone: the thread writes what is left and ends.
    closed: bool,
}

/// What the UART side and the writer thread share.
#[derive(Default)]
struct Shared {
    backlog: Mutex<Backlog>,
    /// Signalled when the backlog turns non-empty or closes.
    ready: std::sync::Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Backlog> {
        match self.backlog.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Capacity the writer thread keeps for its next batch; anything larger that a burst made it
/// grow to is given back, so an idle VM holds a few KiB here, not the whole backlog.
const KEEP_CAPACITY: usize = 4096;

/// The guest's console output as the UART sees it: a non-blocking hand-off to a writer
/// thread, so a vCPU never blocks on a stalled stdout. The hand-off is a byte buffer bounded
/// by [`CONSOLE_BACKLOG`] bytes (no allocation per byte, no memory reserved up front); when it
/// is full, output is dropped (and counted) rather than stalling the guest. The lock is only
/// ever held to append or to swap the buffer out, never across I/O.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
}

impl ConsoleWriter {
    /// Bytes dropped so far because the reader did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.lock().dropped
    }
}

impl std::io::Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut b = self.shared.lock();
        let was_empty = b.bytes.is_empty();
        let room = CONSOLE_BACKLOG.saturating_sub(b.bytes.len());
        let take = room.min(buf.len());
        if take > 0 {
            let need = b.bytes.len() + take;
            if need > b.bytes.capacity() {
                // Grow by doubling, never past the bound (so the bound is also the memory).
                // `need` <= CONSOLE_BACKLOG: `take` is at most the room left.
                let want = (b.bytes.capacity() * 2).clamp(need.max(KEEP_CAPACITY), CONSOLE_BACKLOG);
                let extra = want - b.bytes.len();
                b.bytes.reserve_exact(extra);
            }
            b.bytes.extend_from_slice(&buf[..take]);
        }
        let first_drop = take < buf.len() && {
            let before = b.dropped;
            b.dropped += (buf.len() - take) as u64;
            before == 0
        };
        drop(b);
        if first_drop {
            log::warn!("console output is not being read: dropping guest output");
        }
        // The writer sleeps only on an empty backlog: wake it on the first byte.
        if was_empty && take > 0 {
            self.shared.ready.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
    }
}

/// Starts the thread that writes console output to `out`; it ends when the
/// [`ConsoleWriter`] is dropped and the backlog is written.
pub fn spawn_console_writer(
    mut out: Box<dyn std::io::Write + Send>,
) -> std::io::Result<(ConsoleWriter, std::thread::JoinHandle<()>)> {
    let shared = Arc::new(Shared::default());
    let theirs = shared.clone();
    let handle = std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || {
            // Its own filter first, before any guest output (vmm/src/seccomp). Should the
            // kernel refuse it, the guest's output is dropped (the backlog stays full) and said.
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::ConsoleOut) {
                log::error!("{e}");
                return;
            }
            let mut batch: Vec<u8> = Vec::new();
            loop {
                {
                    let mut b = theirs.lock();
                    while b.bytes.is_empty() && !b.closed {
                        b = match theirs.ready.wait(b) {
                            Ok(g) => g,
                            Err(p) => p.into_inner(),
                        };
                    }
                    if b.bytes.is_empty() {
                        return;
                    }
                    std::mem::swap(&mut b.bytes, &mut batch);
                }
                // A reader that went away: keep taking the bytes so the backlog never fills.
                let _ = out.write_all(&batch).and_then(|_| out.flush());
                batch.clear();
                batch.shrink_to(KEEP_CAPACITY);
            }
        })?;
    Ok((ConsoleWriter { shared }, handle))
}

/// Standard input read straight from fd 0, unbuffered: std's buffered stdin could hold bytes
/// that epoll no longer reports, stalling a console until the next keystroke.
pub struct StdinFd;

impl std::io::Read for StdinFd {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into buf.
        let rc = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        // A negative return is an error; any other fits in usize.
        usize::try_from(rc).map_err(|_| std::io::Error::last_os_error())
    }
}

// SAFETY: fd 0 is open for the life of the process and is the terminal it names.
unsafe impl Terminal for StdinFd {
    fn tty_fd(&self) -> std::os::unix::io::RawFd {
        libc::STDIN_FILENO
    }
}

impl std::os::unix::io::AsRawFd for StdinFd {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        libc::STDIN_FILENO
    }
}

/// Terminal input for a virtio-console: fd 0 through the escape parser, so Ctrl-A x quits
/// there too. The quit request goes to `exit`; the console then sees end of input.
pub struct EscapingStdin {
    parser: EscapeParser,
    exit: Arc<ExitSignal>,
}

impl EscapingStdin {
    /// Reads fd 0, watching for the escape sequence.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        EscapingStdin {
            parser: EscapeParser::default(),
            exit,
        }
    }
}

impl std::io::Read for EscapingStdin {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.len() < 2 {
            return StdinFd.read(buf);
        }
        // One byte of room: a held Ctrl-A plus the next byte can come out as two.
        let mut raw = vec![0u8; buf.len() - 1];
        let n = StdinFd.read(&mut raw)?;
        if n == 0 {
            return Ok(0);
        }
        let mut out = Vec::with_capacity(n + 1);
        if self.parser.feed(&raw[..n], &mut out) {
            self.exit.request(ExitReason::Escape);
            return Ok(0);
        }
        if out.is_empty() {
            // Only a held Ctrl-A: nothing for the guest yet, but not end of input.
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        buf[..out.len()].copy_from_slice(&out);
        Ok(out.len())
    }
}

impl std::os::unix::io::AsRawFd for EscapingStdin {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        libc::STDIN_FILENO
    }
}

/// Ctrl-A: the escape prefix.
pub const ESCAPE_PREFIX: u8 = 0x01;

/// The settings stdin's terminal had before cinder made it raw: what every exit path puts
/// back (the drop of [`RawTerminal`], and the panic hook through [`restore_terminal`]).
static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Puts stdin's terminal back as it was before [`RawTerminal::enter`]; does nothing if it was
/// never made raw. Safe to call from a panic hook (never blocks on the lock).
pub fn restore_terminal() {
    let saved = match SAVED_TERMIOS.try_lock() {
        Ok(g) => *g,
        Err(std::sync::TryLockError::Poisoned(p)) => *p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some(t) = saved {
        // SAFETY: tcsetattr only reads the termios passed by reference; fd 0 is open for the
        // life of the process.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}

/// Puts stdin in raw mode while it lives, if stdin is a terminal, and restores the exact
/// settings it had (not a generic cooked mode) when dropped.
pub struct RawTerminal {
    active: bool,
}

impl RawTerminal {
    /// Switches a terminal stdin to raw mode; does nothing for pipes and files.
    pub fn enter() -> RawTerminal {
        // fd 0 itself, not std's Stdin: that would allocate its 8 KiB read buffer, kept for
        // the life of every VM and never used (cinder reads fd 0 unbuffered, StdinFd).
        let stdin = StdinFd;
        // SAFETY: isatty only inspects the fd.
        let tty = unsafe { libc::isatty(stdin.as_raw_fd()) } == 1;
        let mut saved = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr writes a whole termios into `saved` when it returns 0.
        let got = tty && unsafe { libc::tcgetattr(stdin.as_raw_fd(), saved.as_mut_ptr()) } == 0;
        if got {
            // SAFETY: tcgetattr returned 0, so `saved` is initialised.
            let saved = unsafe { saved.assume_init() };
            match SAVED_TERMIOS.lock() {
                Ok(mut g) => *g = Some(saved),
                Err(p) => *p.into_inner() = Some(saved),
            }
        }
        let active = got && stdin.set_raw_mode().is_ok();
        RawTerminal { active }
    }

    /// Whether stdin is a terminal in raw mode.
    pub fn is_active(&self) -> bool {
        self.active
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.active {
            restore_terminal();
        }
    }
}

/// Splits escape sequences out of terminal input. Ctrl-A x quits; Ctrl-A Ctrl-A sends one
/// Ctrl-A; Ctrl-A followed by anything else sends both bytes.
#[derive(Default)]
pub struct EscapeParser {
    pending_prefix: bool,
}

impl EscapeParser {
    /// Appends the guest-bound bytes of `input` to `out`; returns true when the user asked
    /// to quit.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.pending_prefix {
                self.pending_prefix = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE_PREFIX => out.push(ESCAPE_PREFIX),
                    other => out.extend_from_slice(&[ESCAPE_PREFIX, other]),
                }
            } else if b == ESCAPE_PREFIX {
                self.pending_prefix = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

/// Feeds stdin to the UART. Reads stdin only when everything read before is in the UART's
/// FIFO, so a guest that does not read its console never makes cinder buffer without bound.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    in_buffer_empty: Arc<EventFd>,
    exit: Arc<ExitSignal>,
    pending: Vec<u8>,
    escape: Option<EscapeParser>,
    stdin_registered: bool,
    stdin_open: bool,
}

impl ConsoleInput {
    /// `escape` is on when stdin is an interactive terminal.
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        in_buffer_empty: Arc<EventFd>,
        exit: Arc<ExitSignal>,
        escape: bool,
    ) -> Self {
        ConsoleInput {
            serial,
            in_buffer_empty,
            exit,
            pending: Vec::new(),
            escape: escape.then(EscapeParser::default),
            stdin_registered: false,
            stdin_open: true,
        }
    }

    fn push_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut serial = match self.serial.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let n = serial.enqueue(&self.pending);
        self.pending.drain(..n);
    }

    fn update_stdin_interest(&mut self, ops: &mut EventOps) {
        let want = self.stdin_open && self.pending.is_empty();
        let stdin_fd = libc::STDIN_FILENO;
        if want && !self.stdin_registered {
            if ops.add(Events::new_raw(stdin_fd, EventSet::IN)).is_ok() {
                self.stdin_registered = true;
            } else {
                // A regular file or /dev/null cannot be polled: treat it as no input.
                self.stdin_open = false;
            }
        } else if !want && self.stdin_registered {
            let _ = ops.remove(Events::new_raw(stdin_fd, EventSet::IN));
            self.stdin_registered = false;
        }
    }

    fn read_stdin(&mut self) {
        let mut buf = [0u8; 256];
        match std::io::Read::read(&mut StdinFd, &mut buf) {
            Ok(0) => self.stdin_open = false,
            Ok(n) => {
                let quit = match self.escape.as_mut() {
                    Some(p) => p.feed(&buf[..n], &mut self.pending),
                    None => {
                        self.pending.extend_from_slice(&buf[..n]);
                        false
                    }
                };
                if quit {
                    self.exit.request(ExitReason::Escape);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("console input closed: {e}");
                self.stdin_open = false;
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.in_buffer_empty.as_ref(), EventSet::IN)) {
            log::warn!("console input disabled: {e:?}");
            return;
        }
        self.update_stdin_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.in_buffer_empty.as_raw_fd() {
            let _ = self.in_buffer_empty.read();
        } else if events
            .event_set()
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.read_stdin();
        }
        self.push_pending();
        self.update_stdin_interest(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_writer_delivers_in_order_and_never_blocks() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let (mut w, h) = spawn_console_writer(Box::new(sink.clone())).unwrap();
        for b in b"hello, console" {
            std::io::Write::write_all(&mut w, &[*b]).unwrap();
        }
        drop(w);
        h.join().unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"hello, console");

        // A writer that never returns: the UART side still does not block.
        struct Stuck;
        impl std::io::Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (mut w, _h) = spawn_console_writer(Box::new(Stuck)).unwrap();
        let start = std::time::Instant::now();
        // The thread takes one batch (at most the backlog) and blocks on it for good; the
        // backlog holds the next CONSOLE_BACKLOG bytes; the rest is dropped.
        for _ in 0..(2 * CONSOLE_BACKLOG + 10_000) {
            std::io::Write::write_all(&mut w, b"x").unwrap();
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        assert!(w.dropped() >= 10_000, "{}", w.dropped());
    }

    /// Issue 17 item 5: the backlog is counted in bytes and is the memory bound. A stalled
    /// reader and a flood: writes never block, the buffer never holds more than
    /// CONSOLE_BACKLOG bytes (nor reserves more), and every byte past it is counted as dropped.
    #[test]
    fn console_backlog_is_bounded_in_bytes_under_a_flood() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Stuck(Arc<AtomicUsize>);
        impl std::io::Write for Stuck {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.store(b.len(), Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let taken = Arc::new(AtomicUsize::new(0));
        let (mut w, _h) = spawn_console_writer(Box::new(Stuck(taken.clone()))).unwrap();
        // One byte the thread takes and then blocks on for good.
        std::io::Write::write_all(&mut w, b"a").unwrap();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while taken.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < until,
                "the writer never took a byte"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let start = std::time::Instant::now();
        let total = 4 * CONSOLE_BACKLOG;
        for i in 0..total {
            if i % 1000 == 0 {
                std::io::Write::write_all(&mut w, &[b'y'; 1000]).unwrap();
            }
        }
        for _ in 0..total {
            std::io::Write::write_all(&mut w, b"z").unwrap();
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        let b = w.shared.lock();
        assert_eq!(b.bytes.len(), CONSOLE_BACKLOG);
        assert!(
            b.bytes.capacity() <= CONSOLE_BACKLOG,
            "{}",
            b.bytes.capacity()
        );
        // 4 * BACKLOG in 1000-byte writes plus 4 * BACKLOG single bytes, BACKLOG kept.
        let written = (total / 1000 + usize::from(!total.is_multiple_of(1000))) * 1000 + total;
        assert_eq!(b.dropped, (written - CONSOLE_BACKLOG) as u64);
    }

    #[test]
    fn capped_writer_keeps_the_first_bytes_and_says_so() {
        use std::io::Write;
        let mut w = CappedWriter::new(Vec::new(), 10);
        for _ in 0..1000 {
            w.write_all(b"abcd").unwrap();
        }
        let out = String::from_utf8(w.inner).unwrap();
        assert!(
            out.starts_with("abcdabcdab\n[cinder: console output reached"),
            "{out}"
        );
        assert_eq!(out.lines().count(), 2, "{out}");
        let mut w = CappedWriter::new(Vec::new(), 0);
        w.write_all(&[7u8; 5000]).unwrap();
        assert_eq!(w.inner.len(), 5000);
    }

    #[test]
    fn escape_sequences() {
        let mut p = EscapeParser::default();
        let mut out = Vec::new();
        assert!(!p.feed(b"ab\x01\x01c\x01", &mut out));
        assert_eq!(out, b"ab\x01c");
        // The prefix carries across reads.
        assert!(!p.feed(b"q", &mut out));
        assert_eq!(out, b"ab\x01c\x01q");
        assert!(p.feed(b"\x01x", &mut out));
    }
}
