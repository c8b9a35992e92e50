//! The raw image file behind a virtio-blk device: opening it with precise errors, and moving
//! sectors directly between the file and guest memory (no host-side copy of guest data).
//!
//! Durability: the image holds an OFD lock for as long as it is open (a write lock when
//! writable, a read lock when read-only), so two VMMs never write one image. In write-through
//! mode (the driver did not negotiate VIRTIO_BLK_F_FLUSH) every write-type request is
//! fdatasync'ed before it completes. A failed fdatasync is sticky: the kernel may have dropped
//! the dirty pages, so every later flush and write of this image fails too.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use vm_memory::{
    GuestAddress, GuestMemory, Permissions, ReadVolatile, VolatileMemoryError, WriteVolatile,
};
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use super::{BlockError, SECTOR_SHIFT, SECTOR_SIZE};
use crate::GuestMemoryMmap;

/// An opened raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    nsectors: u64,
    read_only: bool,
    /// A host block device may back this drive (`--allow-block-devices`): kept for PATCH.
    allow_block_device: bool,
    /// Sync every write-type request before it completes (no VIRTIO_BLK_F_FLUSH).
    write_through: bool,
    /// The errno of the first failed fdatasync: once set, flushes and writes fail.
    sync_failed: Option<i32>,
    /// Test double: the next fdatasyncs fail with EIO.
    #[cfg(test)]
    pub(super) fail_syncs: bool,
    /// Test double: fdatasyncs done.
    #[cfg(test)]
    pub(super) syncs: u64,
    /// Unique per open image in this process: tells the io_uring engine that a `PATCH /drives`
    /// switched the image (it keeps a duplicate of the fd per open).
    open_id: u64,
}

/// Source of [`DiskImage::open_id`].
static NEXT_OPEN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Takes an OFD lock over the whole of `file`: shared (read) when `read_only`, exclusive
/// (write) otherwise. Open file description locks belong to this open file, are released when
/// it is closed, and conflict with the same lock taken through any other open of the image
/// (another process, or this one).
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    // flock's l_type and l_whence are shorts; the constants are 0, 1 and 0.
    #[allow(clippy::cast_possible_truncation)]
    const RDLCK: libc::c_short = libc::F_RDLCK as libc::c_short;
    #[allow(clippy::cast_possible_truncation)]
    const WRLCK: libc::c_short = libc::F_WRLCK as libc::c_short;
    #[allow(clippy::cast_possible_truncation)]
    const SEEK_SET: libc::c_short = libc::SEEK_SET as libc::c_short;
    const _: () = assert!(
        RDLCK as i32 == libc::F_RDLCK
            && WRLCK as i32 == libc::F_WRLCK
            && SEEK_SET as i32 == libc::SEEK_SET
    );
    use std::os::fd::AsRawFd;
    // SAFETY: flock is plain old data; all-zero is a valid value (l_start = l_len = 0 covers
    // the whole file, l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if read_only { RDLCK } else { WRLCK };
    fl.l_whence = SEEK_SET;
    // SAFETY: the fd is open for the duration of the call and `fl` a valid flock that fcntl
    // only reads.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if ret == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(BlockError::Locked {
            path: path.to_path_buf(),
            mode: if read_only { "reading" } else { "writing" },
        }),
        _ => Err(BlockError::Lock {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Clears `O_NONBLOCK` on `file`.
fn clear_nonblock(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor `file` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor `file` owns, with an int argument; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_error(path: &Path, read_only: bool, source: io::Error) -> BlockError {
    match source.kind() {
        io::ErrorKind::NotFound => BlockError::ImageNotFound(path.to_path_buf()),
        io::ErrorKind::PermissionDenied => BlockError::PermissionDenied {
            path: path.to_path_buf(),
            mode: if read_only {
                "reading"
            } else {
                "reading and writing"
            },
            hint: if read_only {
                ""
            } else {
                " or attach it read-only"
            },
        },
        _ if source.raw_os_error() == Some(libc::EISDIR) => {
            BlockError::ImageIsDirectory(path.to_path_buf())
        }
        _ => BlockError::Open {
            path: path.to_path_buf(),
            source,
        },
    }
}

impl DiskImage {
    /// Open `path` (read-only or read-write) and lock it (see the module comment); its size
    /// must be a multiple of 512 bytes. A regular file only: a host block device needs
    /// [`DiskImage::open_with`].
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        Self::open_with(path, read_only, false)
    }

    /// As [`DiskImage::open`]; `block_devices` lets the image be a host block device (the
    /// operator's `--allow-block-devices`).
    pub fn open_with(
        path: &Path,
        read_only: bool,
        block_devices: bool,
    ) -> Result<Self, BlockError> {
        let disk = Self::open_unlocked(path, read_only, block_devices)?;
        disk.lock(path)?;
        Ok(disk)
    }

    /// Take this image's lock ([`Self::open`] does).
    pub(super) fn lock(&self, path: &Path) -> Result<(), BlockError> {
        lock(&self.file, path, self.read_only)
    }

    /// Whether this is the file at `path` (same device and inode).
    pub(super) fn is_file_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Whether a host block device may back this drive (what it was opened with).
    pub(super) fn allows_block_device(&self) -> bool {
        self.allow_block_device
    }

    /// [`Self::open_with`] without the lock. The open never blocks (`O_NONBLOCK`: a FIFO opens
    /// at once) and the type is checked on the opened file (`fstat`).
    pub(super) fn open_unlocked(
        path: &Path,
        read_only: bool,
        block_devices: bool,
    ) -> Result<Self, BlockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_error(path, read_only, e))?;
        let ft = file
            .metadata()
            .map_err(|e| open_error(path, read_only, e))?
            .file_type();
        if ft.is_dir() {
            return Err(BlockError::ImageIsDirectory(path.to_path_buf()));
        }
        if ft.is_block_device() && !block_devices {
            return Err(BlockError::BlockDeviceNotAllowed(path.to_path_buf()));
        }
        if !ft.is_file() && !ft.is_block_device() {
            return Err(BlockError::NotAFile(path.to_path_buf()));
        }
        // O_NONBLOCK was for the open only: I/O on the image is ordinary blocking I/O (an
        // io_uring request on an O_NONBLOCK file would fail with EAGAIN instead of waiting).
        clear_nonblock(&file).map_err(|e| open_error(path, read_only, e))?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.to_path_buf(),
                source,
            })?;
        if size & (SECTOR_SIZE - 1) != 0 {
            return Err(BlockError::SizeNotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(DiskImage {
            file,
            nsectors: size >> SECTOR_SHIFT,
            read_only,
            allow_block_device: block_devices,
            write_through: false,
            sync_failed: None,
            #[cfg(test)]
            fail_syncs: false,
            #[cfg(test)]
            syncs: 0,
            open_id: NEXT_OPEN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Whether every write-type request is synced before it completes.
    pub fn write_through(&self) -> bool {
        self.write_through
    }

    /// Sync every write-type request before it completes (the driver did not negotiate
    /// VIRTIO_BLK_F_FLUSH: virtio 1.2 §5.2.5, the device is write-through) or not.
    pub fn set_write_through(&mut self, on: bool) {
        self.write_through = on;
    }

    /// Fails with the first fdatasync error once one failed (see the module comment).
    fn check_sync_failed(&self) -> io::Result<()> {
        match self.sync_failed {
            Some(errno) => Err(io::Error::new(
                io::Error::from_raw_os_error(errno).kind(),
                format!(
                    "an earlier fdatasync of the image failed ({}): its written data may be lost",
                    io::Error::from_raw_os_error(errno)
                ),
            )),
            None => Ok(()),
        }
    }

    /// fdatasync, remembering a failure for good.
    fn sync(&mut self) -> io::Result<()> {
        self.check_sync_failed()?;
        #[cfg(test)]
        let result = if self.fail_syncs {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            self.syncs += 1;
            self.file.sync_data()
        };
        #[cfg(not(test))]
        let result = self.file.sync_data();
        if let Err(e) = &result {
            self.sync_failed = Some(e.raw_os_error().unwrap_or(libc::EIO));
        }
        result
    }

    /// After a write-type request did `result`: in write-through mode, sync it.
    fn written(&mut self, result: io::Result<()>) -> io::Result<()> {
        result?;
        if self.write_through {
            self.sync()?;
        }
        Ok(())
    }

    /// Unique per open image in this process (a switched image has a new one).
    pub(super) fn open_id(&self) -> u64 {
        self.open_id
    }

    /// Whether a write may go to the image now: it is writable and no fdatasync failed.
    pub(super) fn writes_allowed(&self) -> bool {
        !self.read_only && self.sync_failed.is_none()
    }

    /// Capacity in 512-byte sectors.
    pub fn nsectors(&self) -> u64 {
        self.nsectors
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Read `len` bytes of the image at byte `offset` into guest memory at each of `segments`
    /// in turn. The caller checked the range against the capacity.
    ///
    /// One preadv(2) at `offset` for the whole request (the common case); should it move less
    /// than everything or fail, the request is read again segment by segment, which reports
    /// any error precisely (reading again is harmless).
    pub fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[(GuestAddress, u32)],
    ) -> io::Result<()> {
        if self.vectored(mem, offset, segments, true) {
            return Ok(());
        }
        self.file.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in segments {
            let slices = mem
                .get_slices(addr, len as usize, Permissions::Write)
                .map_err(io::Error::other)?;
            for slice in slices {
                let slice = slice.map_err(io::Error::other)?;
                let mut done = 0;
                while done < slice.len() {
                    let mut rest = slice.offset(done).map_err(io::Error::other)?;
                    match self.file.read_volatile(&mut rest) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => done += n,
                        Err(e) => retry_or_fail(e)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads (`into_guest`) or writes the whole request with one preadv(2) / pwritev(2) at
    /// `offset`: one system call where a seek and a read or write per segment took several.
    /// Returns whether every byte moved (false: nothing may be assumed, the caller takes the
    /// segment-by-segment path).
    fn vectored(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[(GuestAddress, u32)],
        into_guest: bool,
    ) -> bool {
        /// More iovecs than this (IOV_MAX) and the request takes the other path.
        const IOV_MAX: usize = 1024;
        let Ok(off) = libc::off_t::try_from(offset) else {
            return false;
        };
        let perm = if into_guest {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut guards = Vec::with_capacity(segments.len());
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(segments.len());
        let mut total = 0usize;
        for &(addr, len) in segments {
            let Ok(slices) = mem.get_slices(addr, len as usize, perm) else {
                return false;
            };
            for slice in slices {
                let Ok(slice) = slice else {
                    return false;
                };
                let guard = slice.ptr_guard_mut();
                iovs.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: slice.len(),
                });
                total += slice.len();
                guards.push(guard);
            }
        }
        if iovs.len() > IOV_MAX {
            return false;
        }
        let Ok(count) = libc::c_int::try_from(iovs.len()) else {
            return false;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.file);
        let n = if into_guest {
            // SAFETY: every iovec points into guest memory checked by get_slices and kept
            // mapped by its guard (in `guards`) for the duration of the call; the kernel
            // writes at most iov_len bytes to each. The fd is open.
            unsafe { libc::preadv(fd, iovs.as_ptr(), count, off) }
        } else {
            // SAFETY: as above; the kernel only reads the iovecs' memory.
            unsafe { libc::pwritev(fd, iovs.as_ptr(), count, off) }
        };
        drop(guards);
        if usize::try_from(n).ok() != Some(total) {
            return false;
        }
        if into_guest {
            // The kernel wrote guest memory behind vm-memory's back: mark those pages dirty
            // for a diff snapshot (read_volatile marks its own).
            for &(addr, len) in segments {
                if let Ok(slices) = mem.get_slices(addr, len as usize, Permissions::Write) {
                    for slice in slices.flatten() {
                        vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, slice.len());
                    }
                }
            }
        }
        true
    }

    /// Write the guest memory at each of `segments` in turn to the image at byte `offset`. The
    /// caller checked the range against the capacity and that the image is writable.
    pub fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[(GuestAddress, u32)],
    ) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.check_sync_failed()?;
        let result = self.write_segments(mem, offset, segments);
        self.written(result)
    }

    /// One pwritev(2) at `offset` for the whole request (the common case); should it move
    /// less than everything or fail, the request is written again segment by segment, which
    /// reports any error precisely (writing the same bytes again is harmless).
    fn write_segments(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[(GuestAddress, u32)],
    ) -> io::Result<()> {
        if self.vectored(mem, offset, segments, false) {
            return Ok(());
        }
        self.file.seek(SeekFrom::Start(offset))?;
        for &(addr, len) in segments {
            let slices = mem
                .get_slices(addr, len as usize, Permissions::Read)
                .map_err(io::Error::other)?;
            for slice in slices {
                let slice = slice.map_err(io::Error::other)?;
                let mut done = 0;
                while done < slice.len() {
                    let rest = slice.offset(done).map_err(io::Error::other)?;
                    match self.file.write_volatile(&rest) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(n) => done += n,
                        Err(e) => retry_or_fail(e)?,
                    }
                }
            }
        }
        Ok(())
    }

    /// fdatasync the image. Once an fdatasync failed, every later flush fails too.
    pub fn flush(&mut self) -> io::Result<()> {
        self.sync()
    }

    /// Deallocate `len` bytes at byte `offset` (a hole punch, size kept). Discarding is a hint:
    /// where the host file system cannot punch holes the data simply stays. The caller checked
    /// the range against the capacity and that the image is writable.
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.check_sync_failed()?;
        let result = match fallocate(&self.file, FallocateMode::PunchHole, true, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(e.errno()) => Ok(()),
            Err(e) => Err(io::Error::from_raw_os_error(e.errno())),
        };
        self.written(result)
    }

    /// Make `len` bytes at byte `offset` read back as zeroes: a hole punch when `unmap` allows
    /// deallocation, else a zeroed range; when the host file system supports neither, the
    /// zeroes are written. The caller checked the range against the capacity, that the image
    /// is writable, and bounded `len`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.check_sync_failed()?;
        let result = self.zero_range(offset, len, unmap);
        self.written(result)
    }

    fn zero_range(&mut self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let modes = if unmap {
            [FallocateMode::PunchHole, FallocateMode::ZeroRange]
        } else {
            [FallocateMode::ZeroRange, FallocateMode::PunchHole]
        };
        for mode in modes {
            match fallocate(&self.file, mode, true, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(e.errno()) => {}
                Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
            }
        }
        const CHUNK: usize = 1 << 20;
        // At most CHUNK bytes of the `left` still to write.
        let chunk = |left: u64| usize::try_from(left).map_or(CHUNK, |left| left.min(CHUNK));
        let zeroes = vec![0u8; chunk(len)];
        let mut done = 0u64;
        while done < len {
            let n = chunk(len - done);
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Whether a fallocate errno means "this file (system) cannot do that mode".
fn unsupported(errno: i32) -> bool {
    errno == libc::EOPNOTSUPP || errno == libc::ENOSYS || errno == libc::EINVAL
}

fn retry_or_fail(e: VolatileMemoryError) -> io::Result<()> {
    match e {
        VolatileMemoryError::IOError(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        VolatileMemoryError::IOError(e) => Err(e),
        e => Err(io::Error::other(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempdir::TempDir;
    use vmm_sys_util::tempfile::TempFile;

    #[test]
    fn open_errors_are_precise() {
        let err = DiskImage::open(Path::new("/nonexistent/cinder.img"), false).unwrap_err();
        assert!(matches!(err, BlockError::ImageNotFound(_)), "{err}");
        assert!(err.to_string().contains("does not exist"));

        let dir = TempDir::new().unwrap();
        let err = DiskImage::open(dir.as_path(), true).unwrap_err();
        assert!(matches!(err, BlockError::ImageIsDirectory(_)), "{err}");

        let f = TempFile::new().unwrap();
        f.as_file().write_all(&[0u8; 513]).unwrap();
        let err = DiskImage::open(f.as_path(), false).unwrap_err();
        assert!(
            matches!(err, BlockError::SizeNotSectorMultiple { size: 513, .. }),
            "{err}"
        );
        assert!(!err.to_string().contains('\n'));

        let err = DiskImage::open(Path::new("/dev/null"), true).unwrap_err();
        assert!(matches!(err, BlockError::NotAFile(_)), "{err}");
    }

    #[test]
    fn permission_denied() {
        // Root ignores file modes; only meaningful as a non-root user.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let f = TempFile::new().unwrap();
        std::fs::set_permissions(f.as_path(), std::fs::Permissions::from_mode(0o400)).unwrap();
        let err = DiskImage::open(f.as_path(), false).unwrap_err();
        assert!(matches!(err, BlockError::PermissionDenied { .. }), "{err}");
        assert!(DiskImage::open(f.as_path(), true).is_ok());
    }

    /// Bytes the file really occupies on the host.
    fn allocated(f: &TempFile) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.as_file().metadata().unwrap().blocks() * 512
    }

    #[test]
    fn discard_and_write_zeroes() {
        let f = TempFile::new().unwrap();
        let size = 4usize << 20;
        let content: Vec<u8> = (0..size)
            .map(|i| u8::try_from(i % 253).unwrap() | 1)
            .collect();
        std::fs::write(f.as_path(), &content).unwrap();
        f.as_file().sync_all().unwrap();
        let before = allocated(&f);
        let mut disk = DiskImage::open(f.as_path(), false).unwrap();
        let mib = 1u64 << 20;
        let at = |off: u64| usize::try_from(off).unwrap();
        // Zeroes without unmap, with unmap, and a discard (1 MiB each, 4 KiB aligned).
        disk.write_zeroes(mib / 2 + 512, 4096, false).unwrap();
        disk.write_zeroes(mib, mib, true).unwrap();
        disk.discard(2 * mib, mib).unwrap();
        let after = std::fs::read(f.as_path()).unwrap();
        let mut want = content.clone();
        want[at(mib / 2 + 512)..at(mib / 2 + 512 + 4096)].fill(0);
        want[at(mib)..at(2 * mib)].fill(0);
        // The discarded range may read as zeroes or keep its data; nothing else may change.
        let d = at(2 * mib)..at(3 * mib);
        assert!(after[d.clone()] == want[d.clone()] || after[d.clone()].iter().all(|&b| b == 0));
        want[d.clone()].copy_from_slice(&after[d]);
        assert!(
            after == want,
            "write_zeroes/discard changed bytes outside their ranges"
        );
        // Where the file system punches holes (tmpfs, ext4, xfs, btrfs), space was returned.
        let now = allocated(&f);
        if now < before {
            assert!(before - now >= mib, "{before} -> {now}");
        }
        // The size is kept.
        assert_eq!(f.as_file().metadata().unwrap().len(), size as u64);
    }

    #[test]
    fn discard_and_write_zeroes_refused_read_only() {
        let f = TempFile::new().unwrap();
        f.as_file().write_all(&[7u8; 8192]).unwrap();
        let mut disk = DiskImage::open(f.as_path(), true).unwrap();
        assert!(disk.discard(0, 4096).is_err());
        assert!(disk.write_zeroes(0, 4096, false).is_err());
        assert_eq!(std::fs::read(f.as_path()).unwrap(), vec![7u8; 8192]);
    }

    /// A diff snapshot must see the pages cinder itself wrote: a block read into guest memory
    /// (a preadv behind vm-memory's back) marks its pages in guest memory's dirty bitmap, and
    /// only those.
    #[test]
    fn block_reads_mark_guest_pages_dirty() {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryBackend;
        let f = TempFile::new().unwrap();
        f.as_file().write_all(&[0x5au8; 65536]).unwrap();
        let mut disk = DiskImage::open(f.as_path(), true).unwrap();
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
        let dirty = |page: usize| {
            let r = mem.iter().next().expect("a region");
            vm_memory::mmap::MmapRegion::bitmap(r).dirty_at(page * 4096)
        };
        assert!(!(0..256).any(dirty));
        // One segment, and two pages in one segment: the sync engine's one preadv marks each
        // page the kernel wrote behind vm-memory's back.
        disk.read_to_guest(&mem, 0, &[(GuestAddress(0x3000), 4096)])
            .unwrap();
        disk.read_to_guest(&mem, 4096, &[(GuestAddress(0x8000), 8192)])
            .unwrap();
        let marked: Vec<usize> = (0..256).filter(|&p| dirty(p)).collect();
        assert_eq!(marked, vec![3, 8, 9]);
    }

    /// The sync engine moves a request with one preadv / pwritev at its offset (it used to seek,
    /// then read or write segment by segment: one system call more per request, and one per
    /// extra segment): the file's position never moves. Segments that cross a guest memory
    /// region boundary (several iovecs) and several segments per request are all moved.
    #[test]
    fn requests_move_with_one_positional_vectored_call() {
        use std::io::Seek;
        use vm_memory::Bytes;
        let f = TempFile::new().unwrap();
        let image: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        f.as_file().write_all(&image).unwrap();
        let mut disk = DiskImage::open(f.as_path(), false).unwrap();
        disk.file().rewind().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .expect("guest memory");
        // 2 KiB across the region boundary, then 1 KiB elsewhere: 3 iovecs.
        let segs = [(GuestAddress(0xfc00), 2048), (GuestAddress(0x1_8000), 1024)];
        disk.read_to_guest(&mem, 4096, &segs).unwrap();
        let mut got = vec![0u8; 3072];
        mem.read_slice(&mut got[..2048], GuestAddress(0xfc00))
            .unwrap();
        mem.read_slice(&mut got[2048..], GuestAddress(0x1_8000))
            .unwrap();
        assert_eq!(got, image[4096..4096 + 3072]);
        assert_eq!(
            disk.file().stream_position().unwrap(),
            0,
            "no seek, no read(2)"
        );
        mem.write_slice(&[0xabu8; 2048], GuestAddress(0xfc00))
            .unwrap();
        mem.write_slice(&[0xcdu8; 1024], GuestAddress(0x1_8000))
            .unwrap();
        disk.write_from_guest(&mem, 8192, &segs).unwrap();
        assert_eq!(
            disk.file().stream_position().unwrap(),
            0,
            "no seek, no write(2)"
        );
        let mut want = image.clone();
        want[8192..8192 + 2048].fill(0xab);
        want[8192 + 2048..8192 + 3072].fill(0xcd);
        assert_eq!(std::fs::read(f.as_path()).unwrap(), want);
    }

    #[test]
    fn size_in_sectors() {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let disk = DiskImage::open(f.as_path(), true).unwrap();
        assert_eq!(disk.nsectors(), 8);
        assert!(disk.read_only());
    }

    #[test]
    fn a_fifo_is_refused_and_an_image_is_left_blocking() {
        let dir = TempDir::new().unwrap();
        let fifo = dir.as_path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path and touches no memory of ours.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for ro in [true, false] {
            let err = DiskImage::open(&fifo, ro).unwrap_err();
            assert!(matches!(err, BlockError::NotAFile(_)), "{err}");
        }
        let f = TempFile::new().unwrap();
        f.as_file().write_all(&[0u8; 512]).unwrap();
        let disk = DiskImage::open(f.as_path(), false).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL on a descriptor the image owns.
        let flags = unsafe { libc::fcntl(disk.file().as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0, "the image's I/O must block");
    }
}
