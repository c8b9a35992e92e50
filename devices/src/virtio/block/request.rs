//! One virtio-blk request: from a descriptor chain, through the disk, to a status byte.
//!
//! Layout accepted (what every known driver sends): a 16-byte device-readable header
//! descriptor, zero or more data descriptors (device-writable for IN and GET_ID, readable for
//! OUT), and a device-writable status descriptor last; the status byte is its first byte.
//! Every guest-controlled value is checked before any disk access; a request that fails a
//! check is answered with IOERR (UNSUPP for an unknown type) when there is a writable status
//! byte, and otherwise dropped (used length 0).

use std::io;
use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions};

use super::disk::DiskImage;
use super::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
    SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, SIZE_MAX, VIRTIO_BLK_ID_BYTES,
};
use crate::virtio::log_limit::warn_ratelimited;
use crate::GuestMemoryMmap;

// Request types (virtio 1.2 §5.2.6), from virtio-bindings: IN reads sectors into the guest,
// OUT writes them, FLUSH flushes the write cache, GET_ID returns the device ID string,
// DISCARD deallocates ranges (their content becomes unspecified), WRITE_ZEROES zeroes ranges
// (optionally deallocating them).
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// `flags` bit of a DISCARD / WRITE_ZEROES range: the device may deallocate the sectors.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Size of one `struct virtio_blk_discard_write_zeroes` (sector, num_sectors, flags).
pub const RANGE_SIZE: u64 = 16;
/// [`RANGE_SIZE`] as a slice length.
const RANGE_BYTES: usize = 16;
const _: () = assert!(RANGE_BYTES as u64 == RANGE_SIZE);

/// Request completed (the status byte; virtio-bindings has the values as u32).
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
// The status bytes are virtio-bindings' values.
const _: () = assert!(
    VIRTIO_BLK_S_OK as u32 == virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK
        && VIRTIO_BLK_S_IOERR as u32 == virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR
        && VIRTIO_BLK_S_UNSUPP as u32 == virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP
);

/// Size of the request header (type, reserved, sector).
pub const REQUEST_HEADER_SIZE: u32 = 16;
/// Most descriptors one request may have: header, `SEG_MAX` data segments, status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// The request types cinder knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN.
    In,
    /// VIRTIO_BLK_T_OUT.
    Out,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// Anything else (answered with UNSUPP).
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// What was wrong with a request, or why executing it failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain yielded no descriptor at all.
    #[error("empty or unreadable descriptor chain")]
    EmptyChain,
    /// The chain ended on a descriptor that still has NEXT set: a loop, a chain longer than the
    /// queue, a next index out of range, a bad indirect table or an unreadable descriptor.
    #[error("malformed descriptor chain (loop, too long, bad next index or bad indirect table)")]
    MalformedChain,
    /// The last descriptor is device-readable: nowhere to put the status.
    #[error("last descriptor is device-readable, so there is no status byte")]
    StatusNotWritable,
    /// The last descriptor has length 0.
    #[error("status descriptor has length 0")]
    StatusTooSmall,
    /// The status byte is outside guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutOfMemory(u64),
    /// More descriptors than `MAX_DESCRIPTORS`.
    #[error("chain has {0} descriptors, more than {MAX_DESCRIPTORS}")]
    TooManyDescriptors(usize),
    /// No device-readable descriptor: no request header.
    #[error("chain has no request header")]
    MissingHeader,
    /// The device-readable part is shorter than the 16-byte header.
    #[error("request header is {0} bytes, expected {REQUEST_HEADER_SIZE}")]
    HeaderLength(u32),
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    MixedDirections,
    /// The header is outside guest memory.
    #[error("cannot read the request header at {addr:#x}: {source}")]
    HeaderRead {
        /// Guest address of the header.
        addr: u64,
        /// Why.
        source: GuestMemoryError,
    },
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// A data descriptor has the wrong direction for the request type.
    #[error("{0:?} request has a data descriptor with the wrong direction")]
    DataDirection(RequestType),
    /// Too many data segments.
    #[error("{0} data segments, more than seg_max {SEG_MAX}")]
    TooManySegments(usize),
    /// A data segment is larger than size_max.
    #[error("data segment of {0} bytes exceeds size_max {SIZE_MAX}")]
    SegmentTooLarge(u32),
    /// IN/OUT data is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    DataLengthNotSectorMultiple(u64),
    /// A data buffer is (partly) outside guest memory.
    #[error("data buffer {addr:#x}+{len:#x} is outside guest memory")]
    DataOutOfMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The sector range is past the end of the disk.
    #[error("sectors {sector}+{count} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// OUT on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// GET_ID without a buffer.
    #[error("GET_ID request has no data buffer")]
    NoIdBuffer,
    /// Writing the ID into guest memory failed.
    #[error("cannot write the device ID into guest memory: {0}")]
    IdWrite(GuestMemoryError),
    /// DISCARD / WRITE_ZEROES data is empty or not a whole number of 16-byte ranges.
    #[error("{kind:?} data is {len} bytes, not a non-zero multiple of 16")]
    RangeDataLength {
        /// DISCARD or WRITE_ZEROES.
        kind: RequestType,
        /// Data length in bytes.
        len: u64,
    },
    /// More ranges than `max_discard_seg` / `max_write_zeroes_seg`.
    #[error("{kind:?} request has {count} ranges, more than {max}")]
    TooManyRanges {
        /// DISCARD or WRITE_ZEROES.
        kind: RequestType,
        /// Ranges in the request.
        count: u64,
        /// The advertised limit.
        max: u32,
    },
    /// A range covers more than `max_discard_sectors` / `max_write_zeroes_sectors`.
    #[error("{kind:?} range of {count} sectors, more than {max}")]
    RangeTooLarge {
        /// DISCARD or WRITE_ZEROES.
        kind: RequestType,
        /// Sectors in the range.
        count: u32,
        /// The advertised limit.
        max: u32,
    },
    /// A range has flags the device does not know, or UNMAP on a DISCARD (virtio 1.2
    /// §5.2.6.2: both are UNSUPP).
    #[error("{kind:?} range has unsupported flags {flags:#x}")]
    RangeFlags {
        /// DISCARD or WRITE_ZEROES.
        kind: RequestType,
        /// The flags.
        flags: u32,
    },
    /// Reading the ranges from guest memory failed.
    #[error("cannot read the {kind:?} ranges from guest memory: {source}")]
    RangeRead {
        /// DISCARD or WRITE_ZEROES.
        kind: RequestType,
        /// Why.
        source: GuestMemoryError,
    },
    /// The disk I/O failed.
    #[error("disk I/O failed: {0}")]
    Io(io::Error),
}

impl RequestError {
    /// The status byte that reports this error to the guest.
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::RangeFlags { .. } => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// A request that failed parsing, and where to report it (if anywhere).
#[derive(Debug)]
pub struct ParseError {
    /// What was wrong.
    pub error: RequestError,
    /// The status byte, when the chain has a usable one.
    pub status_addr: Option<GuestAddress>,
}

/// A parsed, validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request type (never `Unsupported`).
    pub kind: RequestType,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Data segments (address, length), all inside guest memory, with the right direction.
    pub data: Vec<(GuestAddress, u32)>,
    /// Total data length in bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

struct Collected {
    descs: Vec<Descriptor>,
    count: usize,
    last: Option<Descriptor>,
}

/// Guest buffers (address, length) that together form one byte stream.
type Segments = Vec<(GuestAddress, u32)>;

/// Splits a byte stream of segments after its first `n` bytes.
fn split_stream(segs: &[(GuestAddress, u32)], n: u64) -> (Segments, Segments) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    let mut left = n;
    for &(addr, len) in segs {
        if left == 0 {
            tail.push((addr, len));
            continue;
        }
        match u32::try_from(left) {
            // The split falls inside this segment (so `left` < `len` fits in a u32).
            Ok(part) if part < len => {
                head.push((addr, part));
                tail.push((GuestAddress(addr.0.wrapping_add(left)), len - part));
                left = 0;
            }
            _ => {
                head.push((addr, len));
                left -= u64::from(len);
            }
        }
    }
    (head, tail)
}

/// Walk the chain, keeping at most `MAX_DESCRIPTORS` (the walk itself is bounded by
/// virtio-queue: the queue size, or the indirect table size).
fn collect<M>(chain: DescriptorChain<M>) -> Collected
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut descs = Vec::new();
    let mut count = 0usize;
    let mut last = None;
    for desc in chain {
        if descs.len() < MAX_DESCRIPTORS {
            descs.push(desc);
        }
        count += 1;
        last = Some(desc);
    }
    Collected { descs, count, last }
}

impl Request {
    /// Parse and validate a chain against guest memory (not yet against the disk).
    pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Result<Self, ParseError>
    where
        M: Deref,
        M::Target: GuestMemory,
    {
        let drop = |error| ParseError {
            error,
            status_addr: None,
        };
        let collected = collect(chain);
        let Some(last) = collected.last else {
            return Err(drop(RequestError::EmptyChain));
        };
        if last.has_next() {
            return Err(drop(RequestError::MalformedChain));
        }
        if !last.is_write_only() {
            return Err(drop(RequestError::StatusNotWritable));
        }
        if last.len() == 0 {
            return Err(drop(RequestError::StatusTooSmall));
        }
        // The status is the last device-writable byte of the chain (VIRTIO_F_VERSION_1 implies
        // ANY_LAYOUT: the driver frames header, data and status as it likes, readable bytes
        // first, then writable ones).
        // A descriptor whose end wraps around the address space has no last byte.
        let Some(status_at) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
            return Err(drop(RequestError::StatusOutOfMemory(last.addr().0)));
        };
        let status_addr = GuestAddress(status_at);
        if !mem.check_range(status_addr, 1, Permissions::Write) {
            return Err(drop(RequestError::StatusOutOfMemory(status_addr.0)));
        }
        let fail = |error| ParseError {
            error,
            status_addr: Some(status_addr),
        };
        if collected.count > MAX_DESCRIPTORS {
            return Err(fail(RequestError::TooManyDescriptors(collected.count)));
        }
        let descs = &collected.descs;
        // Device-readable descriptors, then device-writable ones; never mixed.
        let first_writable = descs
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descs.len());
        if descs[first_writable..].iter().any(|d| !d.is_write_only()) {
            return Err(fail(RequestError::MixedDirections));
        }
        let readable: Segments = descs[..first_writable]
            .iter()
            .map(|d| (d.addr(), d.len()))
            .collect();
        // The writable stream without its final status byte.
        let mut writable: Segments = descs[first_writable..]
            .iter()
            .map(|d| (d.addr(), d.len()))
            .collect();
        if let Some(tail) = writable.last_mut() {
            tail.1 -= 1;
        }
        if readable.is_empty() {
            return Err(fail(RequestError::MissingHeader));
        }
        // The 16-byte header: the first readable bytes, possibly over several descriptors.
        let (header_segs, out_data) = split_stream(&readable, u64::from(REQUEST_HEADER_SIZE));
        let header_len: u64 = header_segs.iter().map(|s| u64::from(s.1)).sum();
        if header_len < u64::from(REQUEST_HEADER_SIZE) {
            // Below REQUEST_HEADER_SIZE here, so the conversion cannot saturate.
            let len = u32::try_from(header_len).unwrap_or(u32::MAX);
            return Err(fail(RequestError::HeaderLength(len)));
        }
        let mut raw = [0u8; REQUEST_HEADER_SIZE as usize];
        let mut at = 0usize;
        for (addr, len) in header_segs {
            let n = len as usize;
            mem.read_slice(&mut raw[at..at + n], addr)
                .map_err(|source| {
                    fail(RequestError::HeaderRead {
                        addr: addr.0,
                        source,
                    })
                })?;
            at += n;
        }
        let mut ty = [0u8; 4];
        ty.copy_from_slice(&raw[0..4]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[8..16]);
        let kind = RequestType::from(u32::from_le_bytes(ty));
        let sector = u64::from_le_bytes(sector);

        let (data, access) = match kind {
            RequestType::In | RequestType::GetId => {
                if out_data.iter().any(|s| s.1 > 0) {
                    return Err(fail(RequestError::DataDirection(kind)));
                }
                (writable, Permissions::Write)
            }
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
                if writable.iter().any(|s| s.1 > 0) {
                    return Err(fail(RequestError::DataDirection(kind)));
                }
                (out_data, Permissions::Read)
            }
            // FLUSH carries no data; anything the driver attached is ignored.
            RequestType::Flush => {
                return Ok(Request {
                    kind,
                    sector,
                    data: Vec::new(),
                    data_len: 0,
                    status_addr,
                })
            }
            RequestType::Unsupported(t) => return Err(fail(RequestError::Unsupported(t))),
        };
        let data: Segments = data.into_iter().filter(|s| s.1 > 0).collect();
        if data.len() > SEG_MAX as usize {
            return Err(fail(RequestError::TooManySegments(data.len())));
        }
        let mut data_len = 0u64;
        for &(addr, len) in &data {
            if len > SIZE_MAX {
                return Err(fail(RequestError::SegmentTooLarge(len)));
            }
            if !mem.check_range(addr, len as usize, access) {
                return Err(fail(RequestError::DataOutOfMemory { addr: addr.0, len }));
            }
            data_len += u64::from(len);
        }
        match kind {
            RequestType::In | RequestType::Out if data_len & (SECTOR_SIZE - 1) != 0 => {
                return Err(fail(RequestError::DataLengthNotSectorMultiple(data_len)))
            }
            RequestType::GetId if data_len == 0 => return Err(fail(RequestError::NoIdBuffer)),
            RequestType::Discard | RequestType::WriteZeroes => {
                if data_len == 0 || !data_len.is_multiple_of(RANGE_SIZE) {
                    return Err(fail(RequestError::RangeDataLength {
                        kind,
                        len: data_len,
                    }));
                }
                let max = if kind == RequestType::Discard {
                    MAX_DISCARD_SEG
                } else {
                    MAX_WRITE_ZEROES_SEG
                };
                if data_len / RANGE_SIZE > u64::from(max) {
                    return Err(fail(RequestError::TooManyRanges {
                        kind,
                        count: data_len / RANGE_SIZE,
                        max,
                    }));
                }
            }
            _ => {}
        }
        Ok(Request {
            kind,
            sector,
            data,
            data_len,
            status_addr,
        })
    }

    /// Execute against the disk. Returns the number of data bytes written into guest memory.
    pub fn execute(
        &self,
        mem: &GuestMemoryMmap,
        disk: &mut DiskImage,
        id: &[u8; VIRTIO_BLK_ID_BYTES],
    ) -> Result<u32, RequestError> {
        match self.kind {
            RequestType::In | RequestType::Out => {
                if self.kind == RequestType::Out && disk.read_only() {
                    return Err(RequestError::ReadOnly);
                }
                let count = self.data_len >> SECTOR_SHIFT;
                let capacity = disk.nsectors();
                let in_range = self
                    .sector
                    .checked_add(count)
                    .is_some_and(|end| end <= capacity);
                if !in_range {
                    return Err(RequestError::OutOfRange {
                        sector: self.sector,
                        count,
                        capacity,
                    });
                }
                // sector <= capacity, and capacity << 9 is the file size: no overflow.
                let offset = self.sector << SECTOR_SHIFT;
                if self.kind == RequestType::In {
                    disk.read_to_guest(mem, offset, &self.data)
                        .map_err(RequestError::Io)?;
                    // At most SEG_MAX * SIZE_MAX bytes.
                    Ok(u32::try_from(self.data_len).unwrap_or(u32::MAX))
                } else {
                    disk.write_from_guest(mem, offset, &self.data)
                        .map_err(RequestError::Io)?;
                    Ok(0)
                }
            }
            RequestType::Flush => {
                disk.flush().map_err(RequestError::Io)?;
                Ok(0)
            }
            RequestType::GetId => {
                let mut done = 0usize;
                for &(addr, len) in &self.data {
                    if done == id.len() {
                        break;
                    }
                    let n = (len as usize).min(id.len() - done);
                    mem.write_slice(&id[done..done + n], addr)
                        .map_err(RequestError::IdWrite)?;
                    done += n;
                }
                // At most VIRTIO_BLK_ID_BYTES.
                Ok(u32::try_from(done).unwrap_or(u32::MAX))
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if disk.read_only() {
                    return Err(RequestError::ReadOnly);
                }
                // Every range is read and checked before the first is carried out, so a bad
                // request changes nothing.
                let ranges = self.ranges(mem, disk.nsectors())?;
                for (sector, count, flags) in ranges.into_iter().filter(|r| r.1 > 0) {
                    let (offset, len) = (sector << SECTOR_SHIFT, u64::from(count) << SECTOR_SHIFT);
                    if self.kind == RequestType::Discard {
                        disk.discard(offset, len)
                    } else {
                        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                        disk.write_zeroes(offset, len, unmap)
                    }
                    .map_err(RequestError::Io)?;
                }
                Ok(0)
            }
            RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
        }
    }

    /// The (sector, num_sectors, flags) ranges of a DISCARD / WRITE_ZEROES request, each
    /// checked: known flags (UNMAP on WRITE_ZEROES only), at most the advertised sectors, and
    /// inside a disk of `capacity` sectors.
    fn ranges(
        &self,
        mem: &GuestMemoryMmap,
        capacity: u64,
    ) -> Result<Vec<(u64, u32, u32)>, RequestError> {
        let kind = self.kind;
        // parse() bounded the data to at most MAX_DISCARD_SEG 16-byte ranges.
        let len = usize::try_from(self.data_len).map_err(|_| RequestError::RangeDataLength {
            kind,
            len: self.data_len,
        })?;
        let mut raw = vec![0u8; len];
        let mut at = 0usize;
        for &(addr, len) in &self.data {
            let n = len as usize;
            mem.read_slice(&mut raw[at..at + n], addr)
                .map_err(|source| RequestError::RangeRead { kind, source })?;
            at += n;
        }
        let (max, allowed_flags) = if kind == RequestType::Discard {
            (MAX_DISCARD_SECTORS, 0)
        } else {
            (MAX_WRITE_ZEROES_SECTORS, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        };
        let mut ranges = Vec::with_capacity(raw.len() / RANGE_BYTES);
        for r in raw.chunks_exact(RANGE_BYTES) {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&r[0..8]);
            let sector = u64::from_le_bytes(sector);
            let mut word = [0u8; 4];
            word.copy_from_slice(&r[8..12]);
            let count = u32::from_le_bytes(word);
            word.copy_from_slice(&r[12..16]);
            let flags = u32::from_le_bytes(word);
            if flags & !allowed_flags != 0 {
                return Err(RequestError::RangeFlags { kind, flags });
            }
            if count > max {
                return Err(RequestError::RangeTooLarge { kind, count, max });
            }
            let in_range = sector
                .checked_add(u64::from(count))
                .is_some_and(|end| end <= capacity);
            if !in_range {
                return Err(RequestError::OutOfRange {
                    sector,
                    count: u64::from(count),
                    capacity,
                });
            }
            ranges.push((sector, count, flags));
        }
        Ok(ranges)
    }
}

/// Counters of what a block device did; serialised as its metrics section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockStats {
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
    /// Completed flushes.
    pub flushes: u64,
    /// Completed DISCARD requests.
    pub discards: u64,
    /// Completed WRITE_ZEROES requests.
    pub write_zeroes: u64,
    /// Bytes read from the disk into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the disk.
    pub write_bytes: u64,
    /// Requests answered with an error status or dropped.
    pub errors: u64,
    /// 1 when the drive asked for `io_engine=auto` and io_uring could not be set up, so it
    /// uses the sync engine.
    pub io_uring_fallback: u64,
}

/// Parse, execute and complete one chain. Returns the used length for the used ring: the data
/// bytes written plus the status byte, or 0 for a dropped request.
pub fn handle_chain<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    disk: &mut DiskImage,
    id: &[u8; VIRTIO_BLK_ID_BYTES],
) -> u32
where
    M: Deref,
    M::Target: GuestMemory,
{
    handle_chain_counted(chain, mem, disk, id, &mut BlockStats::default())
}

/// [`handle_chain`], counting into `stats`.
pub fn handle_chain_counted<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    disk: &mut DiskImage,
    id: &[u8; VIRTIO_BLK_ID_BYTES],
    stats: &mut BlockStats,
) -> u32
where
    M: Deref,
    M::Target: GuestMemory,
{
    match Request::parse(chain, mem) {
        Ok(request) => request.run(mem, disk, id, stats),
        Err(e) => parse_failed(e, mem, stats),
    }
}

/// Answers a request that failed parsing: its error status when it has a status byte, else
/// it is dropped. Returns the used length (1, or 0 for a dropped request).
pub fn parse_failed(e: ParseError, mem: &GuestMemoryMmap, stats: &mut BlockStats) -> u32 {
    stats.errors += 1;
    match e {
        ParseError {
            error,
            status_addr: Some(addr),
        } => {
            warn_ratelimited!("virtio-blk: bad request: {error}");
            write_status(mem, error.status(), 0, addr)
        }
        ParseError {
            error,
            status_addr: None,
        } => {
            warn_ratelimited!("virtio-blk: request dropped: {error}");
            0
        }
    }
}

/// Writes the status byte; returns the used length (`written` + 1), or 0 when the status
/// cannot be written.
fn write_status(mem: &GuestMemoryMmap, status: u8, written: u32, addr: GuestAddress) -> u32 {
    if let Err(e) = mem.write_obj(status, addr) {
        warn_ratelimited!("virtio-blk: cannot write the status byte: {e}");
        return 0;
    }
    written.saturating_add(1)
}

impl BlockStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &BlockStats) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.flushes += other.flushes;
        self.discards += other.discards;
        self.write_zeroes += other.write_zeroes;
        self.read_bytes += other.read_bytes;
        self.write_bytes += other.write_bytes;
        self.errors += other.errors;
        self.io_uring_fallback = self.io_uring_fallback.max(other.io_uring_fallback);
    }
}

impl Request {
    /// A read or write that moved all its data elsewhere (the io_uring engine): counts it
    /// into `stats` and writes the OK status byte. Returns the used length.
    pub(super) fn complete_ok(&self, mem: &GuestMemoryMmap, stats: &mut BlockStats) -> u32 {
        let written = if self.kind == RequestType::In {
            stats.reads += 1;
            stats.read_bytes += self.data_len;
            // At most SEG_MAX * SIZE_MAX bytes.
            u32::try_from(self.data_len).unwrap_or(u32::MAX)
        } else {
            stats.writes += 1;
            stats.write_bytes += self.data_len;
            0
        };
        write_status(mem, VIRTIO_BLK_S_OK, written, self.status_addr)
    }

    /// Executes a parsed request, counts it into `stats` and writes its status byte. Returns
    /// the used length for the used ring: the data bytes written plus the status byte.
    pub fn run(
        &self,
        mem: &GuestMemoryMmap,
        disk: &mut DiskImage,
        id: &[u8; VIRTIO_BLK_ID_BYTES],
        stats: &mut BlockStats,
    ) -> u32 {
        let (status, written) = match self.execute(mem, disk, id) {
            Ok(written) => {
                match self.kind {
                    RequestType::In => {
                        stats.reads += 1;
                        stats.read_bytes += self.data_len;
                    }
                    RequestType::Out => {
                        stats.writes += 1;
                        stats.write_bytes += self.data_len;
                    }
                    RequestType::Flush => stats.flushes += 1,
                    RequestType::Discard => stats.discards += 1,
                    RequestType::WriteZeroes => stats.write_zeroes += 1,
                    _ => {}
                }
                (VIRTIO_BLK_S_OK, written)
            }
            Err(e) => {
                warn_ratelimited!("virtio-blk: request failed: {e}");
                stats.errors += 1;
                (e.status(), 0)
            }
        };
        write_status(mem, status, written, self.status_addr)
    }
}

#[cfg(test)]
mod tests;
