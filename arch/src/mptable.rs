//! The Intel MultiProcessor Specification 1.4 table, so that a guest finds every vCPU, the
//! IOAPIC and the ISA interrupt routing without ACPI. Written at [`MPTABLE_START`], inside
//! the BIOS area that Linux scans for the `_MP_` floating pointer.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, IOAPIC_START, MPTABLE_MAX_SIZE, MPTABLE_START};
use crate::GuestMemoryMmap;

/// Largest vCPU count the table supports (APIC IDs 0..=254; 255 is broadcast and the IOAPIC
/// takes the ID after the last CPU).
pub const MAX_CPUS: u8 = 254;
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many vCPUs for the table.
    #[error("{0} vCPUs is more than the MP table supports ({MAX_CPUS})")]
    TooManyCpus(u8),
    /// No vCPUs.
    #[error("the MP table needs at least one vCPU")]
    NoCpus,
    /// An address the table must hold does not fit its 32-bit fields.
    #[error("the MP table cannot hold address {0:#x}: it only has 32-bit addresses")]
    AddressAbove4GiB(u64),
    /// Writing guest memory failed.
    #[error("cannot write the MP table at guest address {0:#x}")]
    GuestWrite(u64),
}

/// `addr` as the 32-bit address the table stores.
fn addr32(addr: u64) -> Result<u32, MptableError> {
    u32::try_from(addr).map_err(|_| MptableError::AddressAbove4GiB(addr))
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// Builds the floating pointer and configuration table for `num_cpus` vCPUs with APIC IDs
/// 0..num_cpus, as bytes to be placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 {
        return Err(MptableError::NoCpus);
    }
    if num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = cpu;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        // CPU signature (family 6) and feature flags (FPU, APIC): informational.
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes());
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // The IOAPIC.
    let mut io = [2u8, ioapic_id, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    io[4..8].copy_from_slice(&addr32(IOAPIC_START)?.to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;
    // ISA IRQ n -> IOAPIC pin n, conforming polarity and trigger.
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, MP_IRQ_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 ExtINT and LINT1 NMI on every local APIC.
    entries.extend_from_slice(&[4, MP_IRQ_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut hdr = [0u8; 44];
    hdr[0..4].copy_from_slice(b"PCMP");
    // At most MAX_CPUS processor entries: far below 64 KiB.
    let length =
        u16::try_from(44 + entries.len()).map_err(|_| MptableError::TooManyCpus(num_cpus))?;
    hdr[4..6].copy_from_slice(&length.to_le_bytes());
    hdr[6] = 4; // spec revision 1.4
    hdr[8..16].copy_from_slice(b"CINDER  ");
    hdr[16..28].copy_from_slice(b"MICROVM     ");
    hdr[34..36].copy_from_slice(&count.to_le_bytes());
    hdr[36..40].copy_from_slice(&addr32(APIC_START)?.to_le_bytes());
    let mut table = hdr.to_vec();
    table.extend_from_slice(&entries);
    table[7] = 0u8.wrapping_sub(checksum(&table));

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&addr32(table_addr)?.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = 0u8.wrapping_sub(checksum(&fp));

    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    if bytes.len() as u64 > MPTABLE_MAX_SIZE {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::GuestWrite(MPTABLE_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 4, 32, MAX_CPUS] {
            let t = build(n, MPTABLE_START).unwrap();
            assert_eq!(checksum(&t[..16]), 0, "floating pointer checksum");
            let table = &t[16..];
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(checksum(table), 0, "table checksum");
            let cpus = table[44..]
                .chunks(20)
                .take(n as usize)
                .filter(|e| e[0] == 0)
                .count();
            assert_eq!(cpus, n as usize);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, n as usize + 2 + 24 + 2);
        }
    }

    #[test]
    fn refuses_zero_and_too_many() {
        assert!(matches!(build(0, 0), Err(MptableError::NoCpus)));
        assert!(matches!(build(255, 0), Err(MptableError::TooManyCpus(255))));
    }

    #[test]
    fn refuses_a_table_above_4gib() {
        assert!(matches!(
            build(1, 1 << 32),
            Err(MptableError::AddressAbove4GiB(a)) if a == (1 << 32) + 16
        ));
    }

    #[test]
    fn written_in_guest_memory() {
        let m = GuestMemoryMmap::from_ranges(&crate::layout::ram_regions(16 << 20)).unwrap();
        setup_mptable(&m, 2).unwrap();
        let mut sig = [0u8; 4];
        m.read_slice(&mut sig, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
