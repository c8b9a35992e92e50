//! Runs a VMM (cinder or QEMU) as a child process with a timeout, collecting its console.
//!
//! The child's stdout (the guest's serial console) is read on a thread; the run ends when the
//! child exits, when `stop_when` matches the output so far (the child is then killed), or at
//! the timeout (killed, and reported as timed out). Every loop here is bounded by the timeout.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a run produced.
#[derive(Debug)]
pub struct RunResult {
    /// Exit status (None if the child had to be killed).
    pub status: Option<ExitStatus>,
    /// Everything the child wrote to stdout.
    pub stdout: String,
    /// Everything the child wrote to stderr.
    pub stderr: String,
    /// The timeout hit.
    pub timed_out: bool,
    /// `stop_when` matched and the child was killed.
    pub stopped: bool,
    /// Wall time from spawn to the end.
    pub elapsed: Duration,
}

impl RunResult {
    /// The exit code, if the child exited by itself.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// A report of the whole run, for assertion messages.
    pub fn log(&self) -> String {
        format!(
            "status={:?} timed_out={} stopped={} elapsed={:.2?}\n--- stdout (guest console) ---\n{}\n--- stderr ---\n{}",
            self.status, self.timed_out, self.stopped, self.elapsed, self.stdout, self.stderr
        )
    }
}

fn spawn_reader<R: Read + Send + 'static>(
    mut r: R,
    tx: mpsc::Sender<(bool, Vec<u8>)>,
    is_out: bool,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((is_out, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` (stdin from /dev/null unless set) until it exits, `stop_when(stdout)` is true,
/// or `timeout` passes.
pub fn run(mut cmd: Command, timeout: Duration, stop_when: impl Fn(&str) -> bool) -> RunResult {
    let start = Instant::now();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start {cmd:?}: {e}"),
    };
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        spawn_reader(out, tx.clone(), true);
    }
    if let Some(err) = child.stderr.take() {
        spawn_reader(err, tx, false);
    }
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut status = None;
    let (mut timed_out, mut stopped) = (false, false);
    let mut open_pipes = 2;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            timed_out = true;
            kill(&mut child);
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(50))) {
            Ok((true, bytes)) => {
                out.extend_from_slice(&bytes);
                if stop_when(&String::from_utf8_lossy(&out)) {
                    stopped = true;
                    kill(&mut child);
                    break;
                }
            }
            Ok((false, bytes)) => err.extend_from_slice(&bytes),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open_pipes = 0,
        }
        if open_pipes == 0 || status.is_none() {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s);
            }
        }
        if status.is_some() {
            // Drain what is left in the pipes (bounded: 2 s).
            let until = Instant::now() + Duration::from_secs(2);
            while let Ok((is_out, bytes)) =
                rx.recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                if is_out {
                    out.extend_from_slice(&bytes);
                } else {
                    err.extend_from_slice(&bytes);
                }
            }
            break;
        }
    }
    RunResult {
        status,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        timed_out,
        stopped,
        elapsed: start.elapsed(),
    }
}
