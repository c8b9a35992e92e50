//! The host's half of the exec protocol spoken with the guest agent, version 2. The byte
//! layout is in `resources/guest-agent/README.md` ("The exec protocol"); the agent's half is
//! `resources/guest-agent/src/proto.rs` (a separate static program, so the constants are
//! written twice: keep them in step).

use std::io::{self, Read, Write};

/// Protocol version.
pub const VERSION: u32 = 2;
/// The vsock port the guest agent listens on.
pub const PORT: u32 = 52;
/// Largest frame payload accepted from the guest.
pub const MAX_FRAME: usize = 1 << 20;
/// Data chunk size (each guest system call costs ~1.5 ms on emulated hosts).
pub const CHUNK: usize = 64 * 1024;

/// Host -> guest: the command (argv, env, cwd, user, tty, timeout, mounts).
pub const START: u8 = 0x01;
/// Host -> guest: bytes for the command's stdin.
pub const STDIN: u8 = 0x02;
/// Host -> guest: the end of stdin.
pub const STDIN_EOF: u8 = 0x03;
/// Host -> guest: the terminal's new size (rows u16, cols u16).
pub const RESIZE: u8 = 0x04;
/// Host -> guest: a signal (u32) for the command.
pub const SIGNAL: u8 = 0x05;
/// Host -> guest: send this file (after EXIT).
pub const COPY_OUT: u8 = 0x06;
/// Host -> guest: the session is over; power off.
pub const POWEROFF: u8 = 0x07;
/// Guest -> host: the agent's protocol version, first on every connection.
pub const HELLO: u8 = 0x80;
/// Guest -> host: the command runs (its pid).
pub const STARTED: u8 = 0x81;
/// Guest -> host: the command's stdout (or the pty's output).
pub const STDOUT: u8 = 0x82;
/// Guest -> host: the command's stderr.
pub const STDERR: u8 = 0x83;
/// Guest -> host: how the command ended.
pub const EXIT: u8 = 0x84;
/// Guest -> host: the agent could not run the command (one line).
pub const ERROR: u8 = 0x85;
/// Guest -> host: a chunk of a copied-out file.
pub const FILE_DATA: u8 = 0x86;
/// Guest -> host: the end of a copied-out file (errno, message).
pub const FILE_END: u8 = 0x87;

/// START flag: a pseudo-terminal.
pub const FLAG_TTY: u32 = 1;
/// START flag: stdin is forwarded (else /dev/null).
pub const FLAG_STDIN: u32 = 2;

/// How the command ended, as EXIT says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// `--timeout` ran out: the agent killed every process.
    Timeout,
    /// exec failed with this errno (and message).
    ExecFailed(i32, String),
}

/// EXIT's payload: the end and the number of processes the agent could not reap.
pub fn decode_exit(p: &[u8]) -> Result<(Exit, u32), String> {
    let mut d = Dec(p);
    let kind = d.u8()?;
    let value = i32::from_le_bytes(d.u32()?.to_le_bytes());
    let leftover = d.u32()?;
    let msg = String::from_utf8_lossy(d.bytes()?).into_owned();
    let e = match kind {
        0 => Exit::Code(value),
        1 => Exit::Signal(value),
        2 => Exit::Timeout,
        3 => Exit::ExecFailed(value, msg),
        k => return Err(format!("unknown EXIT kind {k}")),
    };
    Ok((e, leftover))
}

/// A payload being built.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// Appends a u16 (little-endian).
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32 (little-endian).
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64 (little-endian).
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a length (u32) and the bytes.
    pub fn bytes(self, v: &[u8]) -> Self {
        let len = u32::try_from(v.len()).unwrap_or(u32::MAX);
        let mut s = self.u32(len);
        s.0.extend_from_slice(v);
        s
    }
    /// Appends a count (u32) and each element as `bytes`.
    pub fn list<S: AsRef<[u8]>>(self, items: &[S]) -> Self {
        let n = u32::try_from(items.len()).unwrap_or(u32::MAX);
        items.iter().fold(self.u32(n), |s, i| s.bytes(i.as_ref()))
    }
}

/// A payload being read; every read is bounds-checked.
pub struct Dec<'a>(pub &'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated payload: need {n} bytes, have {}",
                self.0.len()
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    /// A u8.
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    /// A u32 (little-endian).
    pub fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// The START message.
#[derive(Clone, Debug, Default)]
pub struct Start {
    /// FLAG_TTY, FLAG_STDIN.
    pub flags: u32,
    /// 0: no timeout.
    pub timeout_ms: u64,
    /// The terminal's size (0 when unknown).
    pub rows: u16,
    /// The terminal's size (0 when unknown).
    pub cols: u16,
    /// The command and its arguments (not empty).
    pub argv: Vec<String>,
    /// KEY=VALUE.
    pub env: Vec<String>,
    /// The working directory (empty: /).
    pub cwd: String,
    /// `""`, `uid[:gid]` or `name[:group]`, resolved in the image.
    pub user: String,
    /// (guest device, mount point, read-only).
    pub mounts: Vec<(String, String, bool)>,
    /// The root drive's size in 512-byte sectors (0: any; the agent waits for it).
    pub root_sectors: u64,
    /// The host's wall clock, ns since the epoch (0: leave the guest's).
    pub realtime_ns: u64,
    /// Bytes from the host's getrandom for the guest's pool (at most 512).
    pub entropy: Vec<u8>,
    /// The guest's hostname (at most 64 bytes; empty: leave it).
    pub hostname: String,
}

impl Start {
    /// The payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default()
            .u32(VERSION)
            .u32(self.flags)
            .u64(self.timeout_ms)
            .u16(self.rows)
            .u16(self.cols)
            .list(&self.argv)
            .list(&self.env)
            .bytes(self.cwd.as_bytes())
            .bytes(self.user.as_bytes())
            .u32(u32::try_from(self.mounts.len()).unwrap_or(u32::MAX));
        for (dev, target, ro) in &self.mounts {
            e = e
                .bytes(dev.as_bytes())
                .bytes(target.as_bytes())
                .u32(u32::from(*ro));
        }
        e.u64(self.root_sectors)
            .u64(self.realtime_ns)
            .bytes(&self.entropy)
            .bytes(self.hostname.as_bytes())
            .0
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    let mut msg = Vec::with_capacity(5 + payload.len());
    msg.push(kind);
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(payload);
    w.write_all(&msg)
}

/// Reads one frame; `None` at a clean end of stream (between frames).
pub fn read_frame(r: &mut impl Read) -> Result<Option<(u8, Vec<u8>)>, String> {
    let mut h = [0u8; 5];
    let mut got = 0;
    while got < 5 {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(format!(
                    "connection closed inside a frame header ({got} of 5 bytes)"
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "frame of {len} bytes from the guest (at most {MAX_FRAME})"
        ));
    }
    let mut p = vec![0u8; len];
    r.read_exact(&mut p)
        .map_err(|e| format!("connection closed inside a frame: {e}"))?;
    Ok(Some((h[0], p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, STDOUT, b"abc").unwrap();
        write_frame(&mut buf, STDIN_EOF, b"").unwrap();
        assert_eq!(&buf[..5], &[STDOUT, 3, 0, 0, 0]);
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((STDOUT, b"abc".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((STDIN_EOF, vec![])));
        assert_eq!(read_frame(&mut r).unwrap(), None);
        let huge = [STDOUT, 0xff, 0xff, 0xff, 0xff];
        assert!(read_frame(&mut &huge[..]).unwrap_err().contains("at most"));
        let cut = [STDOUT, 9, 0, 0, 0, 1, 2];
        assert!(read_frame(&mut &cut[..]).is_err());
        assert!(read_frame(&mut &huge[..2]).is_err());
    }

    #[test]
    fn start_layout_is_the_documented_one() {
        let s = Start {
            flags: FLAG_TTY,
            timeout_ms: 2000,
            rows: 24,
            cols: 80,
            argv: vec!["sh".into()],
            env: vec!["A=1".into()],
            cwd: "/w".into(),
            user: "1:2".into(),
            mounts: vec![("/dev/vdb".into(), "/data".into(), true)],
            root_sectors: 8,
            realtime_ns: 0x0102,
            entropy: vec![7, 7],
            hostname: "h".into(),
        };
        let p = s.encode();
        let mut want = vec![
            2, 0, 0, 0, 1, 0, 0, 0, 0xd0, 0x07, 0, 0, 0, 0, 0, 0, 24, 0, 80, 0,
        ];
        want.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0, b's', b'h']);
        want.extend_from_slice(&[1, 0, 0, 0, 3, 0, 0, 0, b'A', b'=', b'1']);
        want.extend_from_slice(&[2, 0, 0, 0, b'/', b'w', 3, 0, 0, 0, b'1', b':', b'2']);
        want.extend_from_slice(&[1, 0, 0, 0, 8, 0, 0, 0]);
        want.extend_from_slice(b"/dev/vdb");
        want.extend_from_slice(&[5, 0, 0, 0]);
        want.extend_from_slice(b"/data");
        want.extend_from_slice(&[1, 0, 0, 0]);
        want.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[2, 0, 0, 0, 7, 7, 1, 0, 0, 0, b'h']);
        assert_eq!(p, want);
    }

    #[test]
    fn exit_payloads_decode_and_garbage_is_an_error() {
        let p = [2u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode_exit(&p).unwrap(), (Exit::Timeout, 0));
        let mut p = vec![3u8, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0];
        p.extend_from_slice(b"no");
        assert_eq!(
            decode_exit(&p).unwrap(),
            (Exit::ExecFailed(2, "no".into()), 1)
        );
        assert!(decode_exit(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_exit(&[0, 1]).is_err());
    }
}
