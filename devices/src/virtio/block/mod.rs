//! virtio-blk backed by a raw image file (virtio 1.2 §5.2).
//!
//! * [`device`]: the [`Block`] model (features, config space, queue processing).
//! * [`request`]: parsing one descriptor chain into a request and executing it.
//! * [`event_handler`]: how the event loop drives a [`Block`].
//! * [`worker`]: the drive's I/O thread, which runs the requests off the event loop, and the
//!   [`IoGate`] that a pause closes.
//! * [`disk`]: the image: its lock, write-through mode and sticky fdatasync failure.

pub mod device;
pub mod disk;
pub mod event_handler;
pub mod request;
mod uring;
pub mod worker;

use std::io;
use std::path::PathBuf;

pub use device::{Backing, Block, BlockConfig};
pub use uring::DISABLE_ENV as IO_URING_DISABLE_ENV;
pub use worker::{IoGate, StartHook, DEFAULT_IO_POLL, IO_POLL_ENV, MAX_IO_POLL_US};

/// How a drive's I/O thread does its reads and writes (`io_engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// Synchronous system calls on the I/O thread.
    #[default]
    Sync,
    /// io_uring; the drive fails to start when it cannot be set up.
    Async,
    /// io_uring when it can be set up at start, else the sync engine (one log line, and the
    /// drive's `io_uring_fallback` metric).
    Auto,
}

/// Size of a virtio-blk sector, whatever the image's real block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
const _: () = assert!(SECTOR_SIZE == 1 << SECTOR_SHIFT);
/// Length of the device ID string returned by VIRTIO_BLK_T_GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Size of the (single) request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Maximum number of data segments in one request (VIRTIO_BLK_F_SEG_MAX).
pub const SEG_MAX: u32 = 128;
/// Maximum size of one data segment (VIRTIO_BLK_F_SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most sectors one DISCARD range may cover (`max_discard_sectors`): a hole punch costs the
/// same whatever its size.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX;
/// Most ranges in one DISCARD request (`max_discard_seg`); Linux merges up to this many.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors one WRITE_ZEROES range may cover (`max_write_zeroes_sectors`), 64 MiB: where
/// the host file system can neither zero nor punch a range, the zeroes are written, on the
/// drive's I/O thread, and this bounds that.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 17;
/// Most ranges in one WRITE_ZEROES request (`max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// `discard_sector_alignment`: the host page size, in sectors.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// virtio-blk feature bits (virtio 1.2 §5.2.3), from virtio-bindings: `size_max`, `seg_max`
/// and `blk_size` in config space, read-only, FLUSH, DISCARD and WRITE_ZEROES (with their
/// limits in config space).
pub mod features {
    pub use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
        VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
    };
}

/// Errors opening a block device's backing image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image path does not exist.
    #[error("block image {0} does not exist: check the path")]
    ImageNotFound(PathBuf),
    /// The image path is a directory.
    #[error("block image {0} is a directory, not a raw disk image file")]
    ImageIsDirectory(PathBuf),
    /// The image is neither a regular file nor a block device.
    #[error("block image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    /// A host block device, which the operator did not allow.
    #[error("block image {0} is a block device: cinder attaches host block devices only when started with --allow-block-devices")]
    BlockDeviceNotAllowed(PathBuf),
    /// No permission to open the image in the requested mode.
    #[error("no permission to open block image {path} for {mode}: fix its permissions{hint}")]
    PermissionDenied {
        /// The image path.
        path: PathBuf,
        /// "reading" or "reading and writing".
        mode: &'static str,
        /// Extra advice.
        hint: &'static str,
    },
    /// Any other error opening the image.
    #[error("cannot open block image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The image size could not be determined.
    #[error("cannot determine the size of block image {path}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The image size is not a whole number of 512-byte sectors.
    #[error("block image {path} is {size} bytes, not a multiple of 512: pad or resize it")]
    SizeNotSectorMultiple {
        /// The image path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The serial (device ID) is too long.
    #[error("block device id {id:?} is {len} bytes; at most 20 are allowed")]
    IdTooLong {
        /// The requested id.
        id: String,
        /// Its length in bytes.
        len: usize,
    },
    /// Another open of the image (another VMM, or another drive of this one) holds a lock
    /// that conflicts with this one.
    #[error("block image {path} is in use (locked by another process or drive): cannot lock it for {mode}")]
    Locked {
        /// The image path.
        path: PathBuf,
        /// "reading" or "writing".
        mode: &'static str,
    },
    /// Taking the image's lock failed for another reason.
    #[error("cannot lock block image {path}: {source}")]
    Lock {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The image being replaced could not be synced: the guest's data may not be on it, so
    /// it stays in use.
    #[error("cannot sync the current image before switching: {0}; the drive keeps it")]
    SyncBeforeSwitch(io::Error),
    /// The device's I/O thread could not be started.
    #[error("cannot start the block device's I/O thread: {0}")]
    Worker(io::Error),
    /// `io_engine: Async`, and io_uring cannot be set up on this host.
    #[error(
        "io_engine Async: cannot set up io_uring: {0} (use Sync, or auto on the command line)"
    )]
    IoUring(io::Error),
    /// Creating an event fd failed.
    #[error("cannot create an event fd for the block device: {0}")]
    EventFd(io::Error),
    /// The rate limiter's buckets are out of range.
    #[error("rate_limiter: {0}")]
    RateLimiter(#[from] crate::rate_limiter::RateLimiterError),
    /// Creating the rate limiter's timer failed.
    #[error("cannot create the block device's rate limiter timer: {0}")]
    TimerFd(io::Error),
}
