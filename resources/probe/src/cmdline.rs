//! Kernel command line: `key=value` tokens separated by spaces.

/// Iterates over the space-separated tokens.
pub fn tokens(cmd: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmd.split(|&b| b == b' ' || b == b'\t' || b == b'\n')
        .filter(|t| !t.is_empty())
}

/// Value of the first `key=value` token with this key.
pub fn get<'a>(cmd: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    tokens(cmd).find_map(|t| value_of(t, key))
}

fn value_of<'a>(tok: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    if tok.len() > key.len() && tok.starts_with(key) && tok[key.len()] == b'=' {
        Some(&tok[key.len() + 1..])
    } else {
        None
    }
}

/// Decimal or `0x` hexadecimal.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in digits {
        let d = (b as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// A number with an optional K/M/G suffix (like the kernel's memparse).
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (num, shift) = match s.last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_u64(num)?.checked_mul(1u64 << shift)
}

/// One `virtio_mmio.device=<size>@<addr>:<irq>` entry.
#[derive(Clone, Copy, Debug, Default)]
pub struct MmioDev {
    pub size: u64,
    pub addr: u64,
    pub irq: u32,
}

/// Parses `<size>@<addr>:<irq>[:<id>]`.
pub fn parse_mmio_dev(v: &[u8]) -> Option<MmioDev> {
    let at = v.iter().position(|&b| b == b'@')?;
    let size = parse_size(&v[..at])?;
    let rest = &v[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let addr = parse_u64(&rest[..colon])?;
    let irq_part = &rest[colon + 1..];
    let irq_end = irq_part
        .iter()
        .position(|&b| b == b':')
        .unwrap_or(irq_part.len());
    let irq = parse_u64(&irq_part[..irq_end])?;
    if size == 0 || irq > u32::MAX as u64 || addr.checked_add(size).is_none() {
        return None;
    }
    Some(MmioDev {
        size,
        addr,
        irq: irq as u32,
    })
}

/// All `virtio_mmio.device=` tokens: Ok(device) or Err(raw token value).
pub fn mmio_devices(cmd: &[u8]) -> impl Iterator<Item = Result<MmioDev, &[u8]>> {
    tokens(cmd)
        .filter_map(|t| value_of(t, b"virtio_mmio.device"))
        .map(|v| parse_mmio_dev(v).ok_or(v))
}
