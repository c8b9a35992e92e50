//! Content digests (`sha256:<hex>`, `sha512:<hex>`): parsing a digest named by an image, and
//! hashing what is read.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256, Sha512};

/// A checked digest: a known algorithm and lowercase hex of the right length, so it is safe to
/// use as a file name under `blobs/<alg>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// `sha256` or `sha512`.
    pub alg: &'static str,
    /// Lowercase hex.
    pub hex: String,
}

impl Digest {
    /// Parses `alg:hex`; `None` for anything else (another algorithm, bad hex).
    pub fn parse(s: &str) -> Option<Digest> {
        let (alg, hex) = s.split_once(':')?;
        let (alg, len) = match alg {
            "sha256" => ("sha256", 64),
            "sha512" => ("sha512", 128),
            _ => return None,
        };
        if hex.len() != len
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        Some(Digest {
            alg,
            hex: hex.to_string(),
        })
    }

    /// The hasher for this algorithm.
    pub fn hasher(&self) -> Hasher {
        if self.alg == "sha512" {
            Hasher::Sha512(Sha512::new())
        } else {
            Hasher::Sha256(Sha256::new())
        }
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.alg, self.hex)
    }
}

/// A running hash.
pub enum Hasher {
    /// SHA-256.
    Sha256(Sha256),
    /// SHA-512.
    Sha512(Sha512),
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl Hasher {
    /// Adds bytes.
    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Sha512(h) => h.update(b),
        }
    }

    /// The digest of everything added, as `alg:hex`.
    pub fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => format!("sha256:{}", hex(&h.finalize())),
            Hasher::Sha512(h) => format!("sha512:{}", hex(&h.finalize())),
        }
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let mut h = Hasher::Sha256(Sha256::new());
    h.update(bytes);
    h.finish()
}

/// A reader that hashes and counts what it reads.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    /// Bytes read so far.
    pub count: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, hasher: Hasher) -> Self {
        HashingReader {
            inner,
            hasher,
            count: 0,
        }
    }

    /// Reads the rest to the end (what a decompressor or the tar reader left), then returns
    /// the digest and the byte count.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((self.hasher.finish(), self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_paths_and_unknown_algorithms() {
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_none());
        assert!(Digest::parse("sha256:../../etc/passwd").is_none());
        assert!(Digest::parse(&format!("md5:{}", "a".repeat(32))).is_none());
        assert_eq!(
            sha256(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
