//! The host side of Firecracker's hybrid vsock protocol, as cinder serves it on `uds_path`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Connects to the hybrid socket at `uds`, sends `CONNECT <port>\n` and returns the stream once
/// `OK <host port>\n` has been read (reads on it time out after `timeout`). Otherwise: the
/// answer seen (`EOF after "..."` when cinder closed without one, as for a refused port), or
/// the I/O error.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, String> {
    let mut c = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    c.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    c.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    // One byte at a time: nothing after the newline (the guest's first data) is consumed.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        match c.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&line))),
            Err(e) => return Err(e.to_string()),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    match line.strip_prefix("OK ").map(str::parse::<u32>) {
        Some(Ok(_)) => Ok(c),
        _ => Err(format!("bad answer {line:?}")),
    }
}
