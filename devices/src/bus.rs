//! The seam between the VMM's PIO/MMIO bus and the device models.

/// A device that answers guest register accesses (port I/O or MMIO).
///
/// `offset` is relative to the base address the device was registered at. `data.len()` is
/// the access width (1, 2, 4 or 8 bytes). The guest controls both: an implementation must
/// treat any offset and width as possible and never panic on them. Reads that the device
/// does not implement fill `data` with zeroes (or all ones, where the hardware does that).
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}
