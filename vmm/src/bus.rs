//! The bus that routes a vCPU's port I/O or MMIO exit to the device registered at that
//! address. Lookups are a binary search over non-overlapping ranges.

use std::sync::{Arc, Mutex};

use devices::BusDevice;

/// A device shared between vCPU threads (and the event loop).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors inserting a device.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range overlaps another device's.
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
    /// Empty or wrapping range.
    #[error("invalid device range {base:#x}+{len:#x}")]
    Invalid {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    dev: SharedDevice,
}

/// A set of devices by address range.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Registers `dev` at [base, base + len).
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Invalid { base, len })?;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let pos = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(pos, Entry { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Entry, u64)> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(idx.checked_sub(1)?)?;
        let off = addr - e.base;
        (off < e.len).then_some((e, off))
    }

    /// Dispatches a read; returns false when no device is there (the caller decides what the
    /// guest sees: `data` is left as it was).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                match e.dev.lock() {
                    Ok(mut d) => d.read(off, data),
                    Err(p) => p.into_inner().read(off, data),
                }
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((e, off)) => {
                match e.dev.lock() {
                    Ok(mut d) => d.write(off, data),
                    Err(p) => p.into_inner().write(off, data),
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(u8::try_from(offset).unwrap_or(0)));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x3f8, 8)
            .unwrap();
        bus.insert(Arc::new(Mutex::new(Echo(20))), 0x60, 5).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x3fc, 8).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x10, 0).is_err());
        let mut b = [0u8];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b[0], 11);
        assert!(bus.read(0x64, &mut b));
        assert_eq!(b[0], 24);
        assert!(!bus.read(0x65, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.read(0x400, &mut b));
        assert!(bus.write(0x60, &[1]));
        assert!(bus.read(0x60, &mut b));
        assert_eq!(b[0], 1);
    }
}
