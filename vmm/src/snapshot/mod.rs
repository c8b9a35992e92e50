//! Snapshots: the state file's format, what it holds, and guest memory in a file.
//!
//! **The state file** is `magic (8) | major (u16 LE) | minor (u16 LE) | reserved (u32) |
//! payload length (u64 LE) | payload | CRC-64/ECMA-182 (u64 LE) of everything before it`. The
//! payload is a [`MicrovmState`] in JSON (serde_json): the configuration the VM was built from
//! (as a config file, so a restore builds the same devices), the memory regions, the VM's
//! state (PIT, PIC, IOAPIC, KVM clock), every vCPU's state and the legacy devices'. A wrong
//! magic, an unknown major version, a bad CRC, a payload over [`MAX_PAYLOAD`] and a memory
//! file shorter than the configured memory are each refused with one line, before any vCPU
//! exists.
//!
//! **The memory file** holds guest RAM, region after region (below the MMIO gap, then above
//! it), each at the offset [`MemRegion::offset`] says. A restore maps it `MAP_PRIVATE`: pages
//! come in on demand and the guest's writes stay in this process, so the file is never
//! written and any number of clones can share it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use arch::GuestMemoryMmap;
use devices::i8042::I8042State;
use devices::legacy::SerialSnapshot;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::{MmapRegionBuilder, NewBitmap};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::vcpu::VcpuState;

pub mod uffd;

/// The state file's first 8 bytes.
pub const MAGIC: [u8; 8] = *b"CINDSNAP";
/// The format's major version: a file with another one is refused.
pub const MAJOR: u16 = 1;
/// The format's minor version (additions a reader of the same major version may ignore).
pub const MINOR: u16 = 0;
/// The largest payload taken back (a 32-vCPU state is well under 2 MiB of JSON).
pub const MAX_PAYLOAD: u64 = 64 << 20;
const HEADER: usize = 8 + 2 + 2 + 4 + 8;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);

/// Why a snapshot could not be written or taken back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file cannot be opened or created.
    #[error("{what} {}: {source}", path.display())]
    Open {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a regular file.
    #[error("{what} {}: not a regular file", path.display())]
    NotRegular {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("{what} {}: {why}", path.display())]
    Io {
        /// Which file and operation.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Not a cinder snapshot.
    #[error("snapshot {}: not a cinder snapshot state file (bad magic)", .0.display())]
    BadMagic(PathBuf),
    /// A format version this cinder does not read.
    #[error("snapshot {}: format version {major}.{minor} is not supported (this cinder reads {MAJOR}.x)", path.display())]
    UnknownVersion {
        /// The file.
        path: PathBuf,
        /// Its major version.
        major: u16,
        /// Its minor version.
        minor: u16,
    },
    /// The CRC does not match: the file is damaged.
    #[error("snapshot {}: CRC mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is damaged", path.display())]
    BadCrc {
        /// The file.
        path: PathBuf,
        /// The CRC in the file.
        stored: u64,
        /// The CRC of its content.
        computed: u64,
    },
    /// A payload larger than any state cinder writes.
    #[error("snapshot {}: payload of {len} bytes is over the limit of {MAX_PAYLOAD} bytes", path.display())]
    Oversized {
        /// The file.
        path: PathBuf,
        /// The payload length it claims (or has).
        len: u64,
    },
    /// The file ends before its payload and CRC.
    #[error("snapshot {}: truncated ({len} bytes, {need} needed)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length its header implies.
        need: u64,
    },
    /// The payload is not a state this cinder understands.
    #[error("snapshot {}: invalid state: {why}", path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The memory file is shorter than the snapshot's memory.
    #[error("memory file {}: {len} bytes, shorter than the snapshot's {need} bytes of guest memory", path.display())]
    MemoryTooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The guest memory it must hold.
        need: u64,
    },
    /// The memory regions of the state do not match its configuration.
    #[error("snapshot: its memory regions do not match its machine configuration ({0})")]
    RegionMismatch(String),
    /// Mapping guest memory failed.
    #[error("memory file {}: cannot map it: {why}", path.display())]
    Map {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The VM is not paused.
    #[error("the microVM must be paused first (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    /// Something the snapshot cannot hold yet.
    #[error("{0} cannot be snapshotted by cinder yet")]
    Unsupported(String),
    /// A snapshot type cinder does not take.
    #[error("{0}")]
    Invalid(String),
    /// Reading the VM's or a vCPU's state from KVM failed.
    #[error("{0}")]
    Kvm(String),
}

/// One guest memory region and where it is in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset in the memory file.
    pub offset: u64,
}

/// The VM-wide state KVM keeps.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The PIT.
    pub pit: kvm_bindings::kvm_pit_state2,
    /// The master PIC.
    pub pic_master: kvm_bindings::kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_bindings::kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_bindings::kvm_irqchip,
    /// The KVM clock.
    pub clock: kvm_bindings::kvm_clock_data,
}

/// The devices' state.
#[derive(Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1, when the VM has it.
    pub serial: Option<SerialSnapshot>,
    /// The i8042.
    pub i8042: I8042State,
    /// Every virtio device's transport and queues, in slot order, with its name.
    #[serde(default)]
    pub virtio: Vec<(String, devices::virtio::TransportState)>,
    /// The balloon's own state (target, actual, statistics, inflated pages), when the VM has
    /// one; absent in state files written before it was saved (the balloon then starts empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<devices::virtio::balloon::BalloonState>,
}

/// Everything a snapshot's state file holds.
#[derive(Serialize, Deserialize)]
pub struct MicrovmState {
    /// The configuration the VM was built from, as a config file (`GET /vm/config`).
    pub config: serde_json::Value,
    /// Guest memory regions, in the memory file's order.
    pub memory: Vec<MemRegion>,
    /// KVM's VM state.
    pub vm: VmState,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DeviceStates,
}

/// The memory regions of `mem`, laid out one after the other in a memory file.
pub fn mem_regions(mem: &GuestMemoryMmap) -> Vec<MemRegion> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let m = MemRegion {
                gpa: r.start_addr().0,
                len: r.len(),
                offset,
            };
            offset += r.len();
            m
        })
        .collect()
}

/// Opens (creating or truncating) a file a client named for writing, without blocking on a
/// FIFO and refusing anything but a regular file.
fn create_file(what: &'static str, path: &Path) -> Result<File, SnapshotError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|source| SnapshotError::Open {
            what,
            path: path.into(),
            source,
        })?;
    let meta = f.metadata().map_err(|source| SnapshotError::Open {
        what,
        path: path.into(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(SnapshotError::NotRegular {
            what,
            path: path.into(),
        });
    }
    f.set_len(0).map_err(|e| SnapshotError::Io {
        what,
        path: path.into(),
        why: e.to_string(),
    })?;
    Ok(f)
}

/// Opens a file a client named for reading: no blocking on a FIFO, regular files only.
pub fn open_file(what: &'static str, path: &Path) -> Result<File, SnapshotError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| SnapshotError::Open {
            what,
            path: path.into(),
            source,
        })?;
    let meta = f.metadata().map_err(|source| SnapshotError::Open {
        what,
        path: path.into(),
        source,
    })?;
    let t = meta.file_type();
    if !t.is_file() || t.is_fifo() {
        return Err(SnapshotError::NotRegular {
            what,
            path: path.into(),
        });
    }
    Ok(f)
}

/// `payload` framed as a state file with format version `major.minor`: header, payload, CRC.
pub fn frame(major: u16, minor: u16, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER + payload.len() + 8);
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&major.to_le_bytes());
    buf.extend_from_slice(&minor.to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = CRC.checksum(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// The payload of a state file (no checks): for tests that alter one.
pub fn payload_of(bytes: &[u8]) -> Option<&[u8]> {
    bytes.get(HEADER..bytes.len().checked_sub(8)?)
}

/// Writes `state` to `path` in the state file format.
pub fn write_state(path: &Path, state: &MicrovmState) -> Result<u64, SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(|e| SnapshotError::Io {
        what: "snapshot: encoding the state for",
        path: path.into(),
        why: e.to_string(),
    })?;
    let buf = frame(MAJOR, MINOR, &payload);
    let mut f = create_file("snapshot_path", path)?;
    f.write_all(&buf)
        .and_then(|_| f.sync_all())
        .map_err(|e| SnapshotError::Io {
            what: "snapshot_path: writing",
            path: path.into(),
            why: e.to_string(),
        })?;
    Ok(buf.len() as u64)
}

/// Checks a state file's frame (magic, version, size, CRC) and returns its payload.
pub fn check_frame(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, SnapshotError> {
    let len = bytes.len() as u64;
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path.into()));
    }
    if bytes.len() < HEADER {
        return Err(SnapshotError::Truncated {
            path: path.into(),
            len,
            need: HEADER as u64 + 8,
        });
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let (major, minor) = (u16_at(8), u16_at(10));
    if major != MAJOR {
        return Err(SnapshotError::UnknownVersion {
            path: path.into(),
            major,
            minor,
        });
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&bytes[16..24]);
    let plen = u64::from_le_bytes(l);
    if plen > MAX_PAYLOAD {
        return Err(SnapshotError::Oversized {
            path: path.into(),
            len: plen,
        });
    }
    let need = HEADER as u64 + plen + 8;
    if len < need {
        return Err(SnapshotError::Truncated {
            path: path.into(),
            len,
            need,
        });
    }
    // Within MAX_PAYLOAD, so it fits usize.
    let end = HEADER + usize::try_from(plen).unwrap_or(usize::MAX - HEADER);
    let mut c = [0u8; 8];
    c.copy_from_slice(&bytes[end..end + 8]);
    let stored = u64::from_le_bytes(c);
    let computed = CRC.checksum(&bytes[..end]);
    if stored != computed {
        return Err(SnapshotError::BadCrc {
            path: path.into(),
            stored,
            computed,
        });
    }
    Ok(bytes[HEADER..end].to_vec())
}

/// `--snapshot-version`: the state file format this cinder writes (and the newest it reads).
pub fn format_version() -> String {
    format!("v{MAJOR}.{MINOR}.0")
}

/// `--describe-snapshot`: the format version of a state file, after the same checks as a
/// load (magic, version, size, CRC, a payload that decodes).
pub fn describe(path: &Path) -> Result<String, SnapshotError> {
    read_state(path)?;
    Ok(format_version())
}

/// Whether a restore advances the guest's KVM clock by the wall time since the snapshot
/// (`clock_realtime`): with it, the saved `realtime` stays flagged and
/// [`crate::vm::restore_vm_state`] hands it to `KVM_SET_CLOCK` with `KVM_CLOCK_REALTIME`;
/// without it, the flag is dropped and the clock resumes where it stopped. A host whose
/// `KVM_GET_CLOCK` gave no `realtime` at snapshot time (no stable master clock) cannot do it:
/// that is refused, naming the field.
pub fn set_clock_realtime(vm: &mut VmState, wanted: bool) -> Result<(), SnapshotError> {
    let has = vm.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME != 0;
    if wanted && !has {
        return Err(SnapshotError::Invalid(
            "clock_realtime: the host's KVM did not report the wall-clock time (KVM_CLOCK_REALTIME) when the snapshot was taken, so the guest clock cannot be advanced by it; load without clock_realtime".into(),
        ));
    }
    if !wanted {
        vm.clock.flags &= !kvm_bindings::KVM_CLOCK_REALTIME;
    }
    Ok(())
}

/// Reads and checks a state file (see the module's comment for what is refused).
pub fn read_state(path: &Path) -> Result<MicrovmState, SnapshotError> {
    let f = open_file("snapshot_path", path)?;
    let io = |e: std::io::Error| SnapshotError::Io {
        what: "snapshot_path: reading",
        path: path.into(),
        why: e.to_string(),
    };
    let len = f.metadata().map_err(io)?.len();
    let limit = HEADER as u64 + MAX_PAYLOAD + 8;
    if len > limit {
        return Err(SnapshotError::Oversized {
            path: path.into(),
            len: len.saturating_sub(HEADER as u64 + 8),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(limit).read_to_end(&mut bytes).map_err(io)?;
    let payload = check_frame(path, &bytes)?;
    serde_json::from_slice(&payload).map_err(|e| SnapshotError::Decode {
        path: path.into(),
        why: e.to_string(),
    })
}

/// Writes all of guest memory to `path` (a full snapshot's memory file). The file gets the
/// memory's full size; pages of zeros are left as holes (a guest touches a fraction of its
/// RAM, and a restore maps holes as zeros), the rest is written in runs.
pub fn write_memory(path: &Path, mem: &GuestMemoryMmap) -> Result<u64, SnapshotError> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    static ZERO: [u8; PAGE] = [0; PAGE];
    let f = create_file("mem_file_path", path)?;
    let io = |e: String| SnapshotError::Io {
        what: "mem_file_path: writing",
        path: path.into(),
        why: e,
    };
    let total = mem_regions(mem).iter().map(|r| r.len).sum();
    f.set_len(total).map_err(|e| io(e.to_string()))?;
    let mut written = 0u64;
    let mut file_off = 0u64;
    for region in mem.iter() {
        let len = usize::try_from(region.len()).map_err(|e| io(e.to_string()))?;
        // SAFETY: `as_ptr()` and `len` are one live mapping of `mem` (vm-memory's MmapRegion),
        // which outlives this function. The VM is paused: its vCPUs are parked and its devices
        // too (the device loop parked, each drive's I/O thread held at its gate), so nothing
        // writes guest memory while this shared slice exists.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        let mut p = 0;
        while p < len {
            let page = |q: usize| &bytes[q..(q + PAGE).min(len)];
            // memcmp against a page of zeros.
            if page(p) == &ZERO[..page(p).len()] {
                p += PAGE;
                continue;
            }
            let start = p;
            while p < len && page(p) != &ZERO[..page(p).len()] {
                p += PAGE;
            }
            let end = p.min(len);
            f.write_all_at(&bytes[start..end], file_off + start as u64)
                .map_err(|e| io(e.to_string()))?;
            written += (end - start) as u64;
        }
        file_off += region.len();
    }
    f.sync_all().map_err(|e| io(e.to_string()))?;
    Ok(written)
}

/// Writes the pages marked in `dirty` (one bitmap per region, a bit per 4 KiB page) at their
/// places in `path` (a Diff snapshot's memory file: as long as guest memory, holes elsewhere).
/// Merged over the previous snapshot's memory file (its data ranges, SEEK_DATA), it gives
/// guest memory as it is now.
pub fn write_dirty_memory(
    path: &Path,
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
) -> Result<u64, SnapshotError> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    let f = create_file("mem_file_path", path)?;
    let io = |e: String| SnapshotError::Io {
        what: "mem_file_path: writing",
        path: path.into(),
        why: e,
    };
    let total = mem_regions(mem).iter().map(|r| r.len).sum();
    f.set_len(total).map_err(|e| io(e.to_string()))?;
    let mut written = 0u64;
    let mut file_off = 0u64;
    for (region, bits) in mem.iter().zip(dirty) {
        let len = usize::try_from(region.len()).map_err(|e| io(e.to_string()))?;
        // SAFETY: as in `write_memory`: one live mapping of `mem`, the VM paused.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        let is_dirty = |page: usize| {
            bits.get(page / 64)
                .is_some_and(|w| w & (1u64 << (page % 64)) != 0)
        };
        let pages = len / PAGE;
        let mut p = 0;
        while p < pages {
            if !is_dirty(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && is_dirty(p) {
                p += 1;
            }
            let (a, b) = (start * PAGE, p * PAGE);
            f.write_all_at(&bytes[a..b], file_off + a as u64)
                .map_err(|e| io(e.to_string()))?;
            written += (b - a) as u64;
        }
        file_off += region.len();
    }
    f.sync_all().map_err(|e| io(e.to_string()))?;
    Ok(written)
}

/// Maps the memory file at `path` as guest memory with `regions`, `MAP_PRIVATE`: the file is
/// never written. Refuses a file shorter than the regions.
pub fn map_memory(path: &Path, regions: &[MemRegion]) -> Result<GuestMemoryMmap, SnapshotError> {
    let f = open_file("mem_file_path", path)?;
    let len = f
        .metadata()
        .map_err(|e| SnapshotError::Io {
            what: "mem_file_path: reading",
            path: path.into(),
            why: e.to_string(),
        })?
        .len();
    let need = regions
        .iter()
        .map(|r| r.offset.saturating_add(r.len))
        .max()
        .unwrap_or(0);
    if len < need {
        return Err(SnapshotError::MemoryTooShort {
            path: path.into(),
            len,
            need,
        });
    }
    let file = std::sync::Arc::new(f);
    let map_err = |why: String| SnapshotError::Map {
        path: path.into(),
        why,
    };
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let size = usize::try_from(r.len).map_err(|e| map_err(e.to_string()))?;
        let region: MmapRegion<AtomicBitmap> =
            MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                .with_file_offset(FileOffset::from_arc(file.clone(), r.offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| map_err(e.to_string()))?;
        out.push(
            GuestRegionMmap::new(region, GuestAddress(r.gpa))
                .ok_or_else(|| map_err(format!("region at {:#x} overflows", r.gpa)))?,
        );
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_state(flags: u32) -> VmState {
        VmState {
            pit: Default::default(),
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            clock: kvm_bindings::kvm_clock_data {
                clock: 5,
                flags,
                realtime: 7,
                ..Default::default()
            },
        }
    }

    #[test]
    fn clock_realtime_needs_the_saved_wall_clock() {
        let rt = kvm_bindings::KVM_CLOCK_REALTIME;
        let stable = kvm_bindings::KVM_CLOCK_TSC_STABLE;
        let mut s = vm_state(stable);
        let e = set_clock_realtime(&mut s, true).unwrap_err().to_string();
        assert!(e.starts_with("clock_realtime: "), "{e}");
        let mut s = vm_state(stable | rt);
        set_clock_realtime(&mut s, true).unwrap();
        assert_eq!(s.clock.flags & rt, rt);
        let mut s = vm_state(stable | rt);
        set_clock_realtime(&mut s, false).unwrap();
        assert_eq!(s.clock.flags & rt, 0);
        let mut s = vm_state(0);
        set_clock_realtime(&mut s, false).unwrap();
    }

    fn framed(payload: &[u8]) -> Vec<u8> {
        frame(MAJOR, MINOR, payload)
    }

    #[test]
    fn the_frame_is_checked() {
        let p = Path::new("s");
        let good = framed(b"{}");
        assert_eq!(check_frame(p, &good).unwrap(), b"{}");
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            check_frame(p, &bad),
            Err(SnapshotError::BadMagic(_))
        ));
        let mut bad = good.clone();
        bad[8] = 2;
        let e = check_frame(p, &bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshot s: format version 2.0 is not supported (this cinder reads 1.x)"
        );
        let mut bad = good.clone();
        bad[HEADER] ^= 1;
        assert!(matches!(
            check_frame(p, &bad),
            Err(SnapshotError::BadCrc { .. })
        ));
        let mut bad = good.clone();
        bad[16..24].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(matches!(
            check_frame(p, &bad),
            Err(SnapshotError::Oversized { .. })
        ));
        assert!(matches!(
            check_frame(p, &good[..good.len() - 1]),
            Err(SnapshotError::Truncated { .. })
        ));
    }
}
