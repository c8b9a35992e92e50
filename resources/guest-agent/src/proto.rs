//! The exec protocol between `cinder run` (host) and the agent (guest), version 2.
//! Byte layout: README.md, "The exec protocol". The host's copy is `vmm/src/run/proto.rs`.

/// Protocol version, sent in HELLO and START.
pub const VERSION: u32 = 2;
/// The vsock port the init agent listens on.
pub const PORT: u32 = 52;
/// Largest frame payload accepted (START carries argv and env).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk sent (each guest system call costs ~1.5 ms on emulated hosts).
pub const CHUNK: usize = 64 * 1024;

// Host -> guest.
pub const START: u8 = 0x01;
pub const STDIN: u8 = 0x02;
pub const STDIN_EOF: u8 = 0x03;
pub const RESIZE: u8 = 0x04;
pub const SIGNAL: u8 = 0x05;
pub const COPY_OUT: u8 = 0x06;
pub const POWEROFF: u8 = 0x07;
// Guest -> host.
pub const HELLO: u8 = 0x80;
pub const STARTED: u8 = 0x81;
pub const STDOUT: u8 = 0x82;
pub const STDERR: u8 = 0x83;
pub const EXIT: u8 = 0x84;
pub const ERROR: u8 = 0x85;
pub const FILE_DATA: u8 = 0x86;
pub const FILE_END: u8 = 0x87;

/// EXIT kinds.
pub const EXIT_CODE: u8 = 0;
pub const EXIT_SIGNAL: u8 = 1;
pub const EXIT_TIMEOUT: u8 = 2;
pub const EXIT_EXEC_FAILED: u8 = 3;

/// START flags.
pub const FLAG_TTY: u32 = 1;
pub const FLAG_STDIN: u32 = 2;

/// A frame header: type, then the payload length (u32 little-endian).
pub fn header(kind: u8, len: usize) -> [u8; 5] {
    let l = (len as u32).to_le_bytes();
    [kind, l[0], l[1], l[2], l[3]]
}

/// A payload being built.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self = self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self
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
    pub fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        let lo = self.u32()? as u64;
        let hi = self.u32()? as u64;
        Ok(lo | (hi << 32))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn list(&mut self) -> Result<Vec<&'a [u8]>, String> {
        let n = self.u32()? as usize;
        // Each element has at least a 4-byte length: bound the count by what is left.
        if n > self.0.len() / 4 {
            return Err(format!("list of {n} elements in {} bytes", self.0.len()));
        }
        (0..n).map(|_| self.bytes()).collect()
    }
}

/// A mount requested in START: a block device mounted at a directory of the command's root.
pub struct Mount {
    pub device: Vec<u8>,
    pub target: Vec<u8>,
    pub read_only: bool,
}

/// The START message.
pub struct Start {
    pub flags: u32,
    pub timeout_ms: u64,
    pub rows: u16,
    pub cols: u16,
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    pub cwd: Vec<u8>,
    pub user: Vec<u8>,
    pub mounts: Vec<Mount>,
    /// The root drive's size in 512-byte sectors: the agent waits (bounded) until /dev/vda
    /// has it before mounting (after a restore the drive is a new file).
    pub root_sectors: u64,
    /// The host's wall clock (ns since the epoch; 0: leave the guest's).
    pub realtime_ns: u64,
    /// Bytes from the host's getrandom, mixed into the guest's pool (at most 512).
    pub entropy: Vec<u8>,
    /// The guest's hostname (empty: leave it).
    pub hostname: Vec<u8>,
}

impl Start {
    pub fn decode(p: &[u8]) -> Result<Start, String> {
        let mut d = Dec(p);
        let version = d.u32()?;
        if version != VERSION {
            return Err(format!(
                "protocol version {version} not supported (agent speaks {VERSION})"
            ));
        }
        let flags = d.u32()?;
        let timeout_ms = d.u64()?;
        let rows = d.u16()?;
        let cols = d.u16()?;
        let argv: Vec<Vec<u8>> = d.list()?.into_iter().map(<[u8]>::to_vec).collect();
        let env = d.list()?.into_iter().map(<[u8]>::to_vec).collect();
        let cwd = d.bytes()?.to_vec();
        let user = d.bytes()?.to_vec();
        let n = d.u32()? as usize;
        if n > 16 {
            return Err(format!("{n} mounts: at most 16"));
        }
        let mut mounts = Vec::new();
        for _ in 0..n {
            let device = d.bytes()?.to_vec();
            let target = d.bytes()?.to_vec();
            let read_only = d.u32()? & 1 != 0;
            mounts.push(Mount {
                device,
                target,
                read_only,
            });
        }
        let root_sectors = d.u64()?;
        let realtime_ns = d.u64()?;
        let entropy = d.bytes()?.to_vec();
        if entropy.len() > 512 {
            return Err(format!("{} entropy bytes: at most 512", entropy.len()));
        }
        let hostname = d.bytes()?.to_vec();
        if hostname.len() > 64 {
            return Err(format!(
                "a hostname of {} bytes: at most 64",
                hostname.len()
            ));
        }
        if argv.is_empty() {
            return Err("empty argv: no command to run".into());
        }
        Ok(Start {
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
            realtime_ns,
            entropy,
            hostname,
        })
    }
}
