//! The io_uring engine of a drive's I/O thread (`io_engine: "Async"`).
//!
//! Reads and writes go to a ring of [`RING_ENTRIES`] entries as READV / WRITEV straight
//! between the image and guest memory; never more than that are in flight (a pass takes at most
//! the free slots from the queue, see `Block::take_batch`). Completions wake the I/O thread
//! through an eventfd registered with the ring. Everything else (FLUSH, DISCARD, WRITE_ZEROES,
//! GET_ID, a write in write-through mode, a request the checks refuse) runs synchronously on
//! the thread as with the sync engine, after the requests in flight completed, so every request
//! path (the sticky fdatasync failure, the fallocate fallbacks, the error statuses) stays the
//! same. A read or write that completes short or with an error is run again synchronously, which
//! finishes it or reports the error precisely.
//!
//! The ring is created disabled, restricted to the two opcodes it uses and no SQE flags
//! (IORING_REGISTER_RESTRICTIONS), then enabled: a bug elsewhere in cinder cannot use it for
//! anything else. Each request keeps a duplicate of the image's fd and a clone of the guest
//! memory (which keeps its mapping) until it completes, so a `PATCH /drives` switching the
//! image or the end of the VM never leaves the kernel a dangling fd.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::register::Restriction;
use io_uring::{opcode, types, IoUring};
use vm_memory::{GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::disk::DiskImage;
use super::request::{BlockStats, Request, RequestType};
use super::SECTOR_SHIFT;
use crate::GuestMemoryMmap;

/// Entries of the submission ring, and most requests in flight.
pub(super) const RING_ENTRIES: u32 = 128;

/// More iovecs than this (IOV_MAX) and a request runs synchronously.
const IOV_MAX: usize = 1024;

/// Set (to anything) in cinder's environment, the ring cannot be set up: how the tests make
/// `io_engine=auto` fall back and `io_engine=async` fail on a host where io_uring works.
pub const DISABLE_ENV: &str = "CINDER_TEST_NO_IO_URING";

/// A request in flight.
pub(super) struct Slot {
    pub(super) head: u16,
    pub(super) request: Request,
    pub(super) mem: GuestMemoryMmap,
    pub(super) generation: u64,
    /// The buffers the kernel reads or writes: guest memory, kept mapped by `mem`.
    iovecs: Box<[libc::iovec]>,
    /// Bytes the request moves.
    expect: usize,
    /// The image's fd the SQE names, open until the completion.
    _file: Arc<File>,
}

/// A completed request and the kernel's result.
pub(super) struct Completed {
    pub(super) slot: Slot,
    /// Whether it moved all its bytes (else it is run again synchronously).
    pub(super) ok: bool,
}

/// The ring and its requests in flight.
pub(super) struct Uring {
    ring: IoUring,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
}

impl Uring {
    /// Sets up the ring (disabled, restricted to READV/WRITEV, then enabled) with `evt`
    /// registered for completions.
    pub(super) fn new(evt: &EventFd) -> io::Result<Self> {
        if std::env::var_os(DISABLE_ENV).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring disabled by {DISABLE_ENV}"),
            ));
        }
        let ring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
        let sub = ring.submitter();
        sub.register_eventfd(evt.as_raw_fd())?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_flags_allowed(0),
        ];
        sub.register_restrictions(&mut allowed)?;
        sub.register_enable_rings()?;
        let n = RING_ENTRIES as usize;
        Ok(Uring {
            ring,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
        })
    }

    /// Requests in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Requests the ring can still take.
    pub(super) fn room(&self) -> usize {
        self.free.len()
    }

    /// Queues `request` (a read, or a write outside write-through mode) for submission;
    /// gives it back when it must run synchronously (another type, out of range, a read-only
    /// or failed image, too many segments, no room).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn push(
        &mut self,
        head: u16,
        request: Request,
        mem: &GuestMemoryMmap,
        generation: u64,
        write_through: bool,
        disk: &DiskImage,
        file: &Arc<File>,
    ) -> Result<(), Request> {
        let write = match request.kind {
            RequestType::In => false,
            RequestType::Out if !write_through && disk.writes_allowed() => true,
            _ => return Err(request),
        };
        let count = request.data_len >> SECTOR_SHIFT;
        let in_range = request
            .sector
            .checked_add(count)
            .is_some_and(|end| end <= disk.nsectors());
        if !in_range {
            return Err(request);
        }
        let perm = if write {
            Permissions::Read
        } else {
            Permissions::Write
        };
        let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(request.data.len());
        let mut expect = 0usize;
        for &(addr, len) in &request.data {
            let Ok(slices) = mem.get_slices(addr, len as usize, perm) else {
                return Err(request);
            };
            for slice in slices {
                let Ok(slice) = slice else {
                    return Err(request);
                };
                iovecs.push(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                });
                if !write {
                    // The kernel writes these pages behind vm-memory's back: mark them dirty
                    // for a diff snapshot now (a request that then fails only costs a page in
                    // the diff).
                    vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, slice.len());
                }
                expect += slice.len();
            }
        }
        let Ok(n_iov) = u32::try_from(iovecs.len()) else {
            return Err(request);
        };
        if iovecs.len() > IOV_MAX {
            return Err(request);
        }
        let Some(index) = self.free.pop() else {
            return Err(request);
        };
        let iovecs = iovecs.into_boxed_slice();
        let fd = types::Fd(file.as_raw_fd());
        let offset = request.sector << SECTOR_SHIFT;
        let entry = if write {
            opcode::Writev::new(fd, iovecs.as_ptr(), n_iov)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, iovecs.as_ptr(), n_iov)
                .offset(offset)
                .build()
        }
        .user_data(index as u64);
        // SAFETY: the SQE's iovec array and the buffers it points to (guest memory, mapped as
        // long as `mem` lives) and its fd (`file`) are kept in the slot until its completion is
        // reaped; the iovecs' boxed storage does not move when the slot does.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(index);
            return Err(request);
        }
        self.slots[index] = Some(Slot {
            head,
            request,
            mem: mem.clone(),
            generation,
            iovecs,
            expect,
            _file: file.clone(),
        });
        Ok(())
    }

    /// Hands the queued entries to the kernel, waiting for `want` completions.
    pub(super) fn submit(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The completions the kernel posted.
    pub(super) fn reap(&mut self, out: &mut Vec<Completed>) {
        for cqe in self.ring.completion() {
            let Ok(index) = usize::try_from(cqe.user_data()) else {
                continue;
            };
            let Some(slot) = self.slots.get_mut(index).and_then(Option::take) else {
                continue;
            };
            self.free.push(index);
            let ok = usize::try_from(cqe.result()).is_ok_and(|n| n == slot.expect);
            let _ = &slot.iovecs;
            out.push(Completed { slot, ok });
        }
    }
}

impl Completed {
    /// Finishes the request: counts it and writes its status byte when the ring moved all its
    /// bytes, else runs it again synchronously on `disk`. Returns (head, used length).
    pub(super) fn finish(
        self,
        disk: &std::sync::Mutex<DiskImage>,
        id: &[u8; super::VIRTIO_BLK_ID_BYTES],
        stats: &mut BlockStats,
    ) -> (u16, u32) {
        let slot = self.slot;
        let len = if self.ok {
            slot.request.complete_ok(&slot.mem, stats)
        } else {
            let mut disk = match disk.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            // Only writes outside write-through mode went to the ring.
            disk.set_write_through(false);
            slot.request.run(&slot.mem, &mut disk, id, stats)
        };
        (slot.head, len)
    }
}
