//! The raw image file behind a virtio-blk device: opening it with precise errors, and moving
//! sectors directly between the file and guest memory (no host-side copy of guest data).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use vm_memory::{
    GuestAddress, GuestMemory, Permissions, ReadVolatile, VolatileMemoryError, WriteVolatile,
};

use super::{BlockError, SECTOR_SHIFT, SECTOR_SIZE};
use crate::GuestMemoryMmap;

/// An opened raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    nsectors: u64,
    read_only: bool,
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
    /// Open `path` (read-only or read-write); its size must be a multiple of 512 bytes.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        // Check the type first: opening a directory read-only succeeds on Linux.
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {
                return Err(BlockError::ImageIsDirectory(path.to_path_buf()))
            }
            Ok(meta) if !meta.is_file() && !meta.file_type().is_block_device() => {
                return Err(BlockError::NotAFile(path.to_path_buf()))
            }
            Ok(_) => {}
            Err(e) => return Err(open_error(path, read_only, e)),
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| open_error(path, read_only, e))?;
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
        })
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
    pub fn read_to_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        segments: &[(GuestAddress, u32)],
    ) -> io::Result<()> {
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

    /// fdatasync the image.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
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

    #[test]
    fn size_in_sectors() {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        let disk = DiskImage::open(f.as_path(), true).unwrap();
        assert_eq!(disk.nsectors(), 8);
        assert!(disk.read_only());
    }
}
