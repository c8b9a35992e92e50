//! An interactive run of a VMM: wait for text on the guest console, type into it, wait for
//! the end. Every wait has a deadline; on any failure the caller gets the whole log.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running VMM whose console can be read and written.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<(bool, Vec<u8>)>,
    /// Both pipe readers have seen EOF (the channel is disconnected).
    eof: bool,
    out: Vec<u8>,
    err: Vec<u8>,
    /// Where in `out` the next `expect` starts looking.
    cursor: usize,
    start: Instant,
    status: Option<ExitStatus>,
}

fn reader<R: Read + Send + 'static>(mut r: R, tx: mpsc::Sender<(bool, Vec<u8>)>, is_out: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 || tx.send((is_out, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
}

impl Session {
    /// Starts `cmd` with piped stdin, stdout and stderr.
    pub fn start(mut cmd: Command) -> Session {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let (tx, rx) = mpsc::channel();
        if let Some(o) = child.stdout.take() {
            reader(o, tx.clone(), true);
        }
        if let Some(e) = child.stderr.take() {
            reader(e, tx, false);
        }
        let stdin = child.stdin.take();
        Session {
            child,
            stdin,
            rx,
            eof: false,
            out: Vec::new(),
            err: Vec::new(),
            cursor: 0,
            start: Instant::now(),
            status: None,
        }
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    fn pump(&mut self, wait: Duration) {
        match self.rx.recv_timeout(wait) {
            Ok((true, b)) => self.out.extend_from_slice(&b),
            Ok((false, b)) => self.err.extend_from_slice(&b),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.eof = true;
                // Nothing more will come: do not spin.
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
            }
        }
    }

    /// Waits until `needle` appears in the console output after the previous match; returns
    /// the text from the previous match to the end of this one, with the time it appeared.
    pub fn expect(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(String, Duration), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let hay = String::from_utf8_lossy(&self.out[self.cursor..]).into_owned();
            if let Some(pos) = hay.find(needle) {
                let end = pos + needle.len();
                let text = hay[..end].to_string();
                self.cursor += hay[..end].len();
                return Ok((text, self.start.elapsed()));
            }
            if self.status.is_some() {
                // The VMM is gone: everything it wrote is in the pipes. Read them to EOF
                // (bounded) before giving up.
                self.drain(Duration::from_secs(10));
                if !String::from_utf8_lossy(&self.out[self.cursor..]).contains(needle) {
                    return Err(format!(
                        "the VMM exited before {needle:?} appeared\n{}",
                        self.log()
                    ));
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for {needle:?}\n{}",
                    self.log()
                ));
            }
            self.pump((deadline - now).min(Duration::from_millis(50)));
        }
    }

    /// Waits until the console has any output after the previous match, without consuming it;
    /// returns the time it was first seen.
    pub fn expect_output(&mut self, timeout: Duration) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.out.len() > self.cursor {
                return Ok(self.start.elapsed());
            }
            if self.status.is_some() {
                self.drain(Duration::from_secs(10));
                if self.out.len() > self.cursor {
                    continue;
                }
                return Err(format!("the VMM exited without output\n{}", self.log()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "timed out after {timeout:?} waiting for console output\n{}",
                    self.log()
                ));
            }
            self.pump((deadline - now).min(Duration::from_millis(20)));
        }
    }

    /// Like [`Session::expect`], then also waits for the end of that line, so the whole line
    /// (which may arrive in pieces) is in the console output.
    pub fn expect_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(String, Duration), String> {
        let (mut text, at) = self.expect(needle, timeout)?;
        let (rest, _) = self.expect("\n", timeout)?;
        text.push_str(&rest);
        Ok((text, at))
    }

    /// Types `text` into the console.
    pub fn send(&mut self, text: &str) -> Result<(), String> {
        match self.stdin.as_mut() {
            Some(s) => s
                .write_all(text.as_bytes())
                .and_then(|_| s.flush())
                .map_err(|e| format!("cannot write to the console: {e}\n{}", self.log())),
            None => Err("stdin closed".into()),
        }
    }

    /// Waits for the VMM to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "the VMM did not exit within {timeout:?}\n{}",
                    self.log()
                ));
            }
            self.pump((deadline - now).min(Duration::from_millis(50)));
        }
        self.drain(Duration::from_secs(10));
        Ok(self.status.expect("checked above"))
    }

    /// Reads the pipes until nothing has arrived for `quiet` (or `limit` has passed): after
    /// this, what the VMM had written before is in the log.
    pub fn settle(&mut self, quiet: Duration, limit: Duration) {
        let until = Instant::now() + limit;
        let mut last = (self.out.len(), self.err.len(), Instant::now());
        while Instant::now() < until && !self.eof {
            self.pump(Duration::from_millis(20));
            if (self.out.len(), self.err.len()) != (last.0, last.1) {
                last = (self.out.len(), self.err.len(), Instant::now());
            } else if last.2.elapsed() >= quiet {
                break;
            }
        }
    }

    /// Reads the pipes until both are at EOF or `limit` has passed.
    fn drain(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while !self.eof && Instant::now() < until {
            self.pump(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the VMM.
    pub fn signal(&self, sig: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a Linux pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, sig) };
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything so far.
    pub fn log(&self) -> String {
        format!(
            "status={:?} elapsed={:.2?}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.start.elapsed(),
            String::from_utf8_lossy(&self.out),
            String::from_utf8_lossy(&self.err)
        )
    }

    /// The console output so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
