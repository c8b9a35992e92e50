//! The virtio-rng device model.

use std::io;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryError, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{RngError, MAX_BYTES_PER_REQUEST, QUEUE_SIZE};
use crate::virtio::device_core::{CoreDevice, DeviceCore};
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::{device_type, COMMON_FEATURES};
use crate::GuestMemoryMmap;

/// Size of the host bounce buffer getrandom(2) fills before the bytes are copied to the guest.
const CHUNK: u32 = 4096;

/// Why a request was completed with used length 0.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A descriptor of the chain is device-readable.
    #[error("descriptor at {0:#x} is device-readable; virtio-rng buffers must be writable")]
    ReadOnlyDescriptor(u64),
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The chain ended on a descriptor that still has NEXT set (loop, bad index, too long).
    #[error("malformed descriptor chain (loop, too long, bad next index or bad indirect table)")]
    MalformedChain,
    /// getrandom(2) failed.
    #[error("getrandom failed: {0}")]
    Getrandom(io::Error),
    /// Copying into guest memory failed.
    #[error("cannot write into guest memory: {0}")]
    Write(GuestMemoryError),
}

/// Fill `buf` from getrandom(2), retrying on EINTR and short reads.
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        // SAFETY: the pointer and length describe `rest`, a live, writable byte slice that
        // getrandom fills at most `rest.len()` bytes of.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += usize::try_from(r).unwrap_or(0);
    }
    Ok(())
}

/// Fill the writable buffers of one chain with random bytes, at most
/// [`MAX_BYTES_PER_REQUEST`]. Returns the number of bytes written (the used length).
pub fn fill_chain<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Result<u32, RequestError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    // Check the whole chain before writing anything. The chain iterator stops after at most
    // queue-size descriptors, so this is bounded.
    let mut bufs = Vec::with_capacity(4);
    let mut last_has_next = false;
    for desc in chain {
        last_has_next = desc.has_next();
        if !desc.is_write_only() {
            return Err(RequestError::ReadOnlyDescriptor(desc.addr().0));
        }
        if desc.len() > 0 && !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write)
        {
            return Err(RequestError::OutOfMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        bufs.push((desc.addr(), desc.len()));
    }
    if last_has_next {
        return Err(RequestError::MalformedChain);
    }
    let mut chunk = [0u8; CHUNK as usize];
    let mut left = MAX_BYTES_PER_REQUEST;
    let mut written: u32 = 0;
    for (addr, len) in bufs {
        let mut off: u32 = 0;
        let want = len.min(left);
        while off < want {
            let n = (want - off).min(CHUNK);
            let part = &mut chunk[..n as usize];
            getrandom(part).map_err(RequestError::Getrandom)?;
            let at = addr
                .checked_add(u64::from(off))
                .ok_or(RequestError::OutOfMemory { addr: addr.0, len })?;
            mem.write_slice(part, at).map_err(RequestError::Write)?;
            off += n;
        }
        written += want;
        left -= want;
        if left == 0 {
            break;
        }
    }
    Ok(written)
}

/// A virtio-rng device with one request queue.
#[derive(Debug)]
pub struct Rng {
    pub(super) core: DeviceCore,
    /// Random bytes handed to the guest so far.
    bytes_served: u64,
}

impl Rng {
    /// Build the device.
    pub fn new() -> Result<Self, RngError> {
        Ok(Rng {
            core: DeviceCore::new("virtio-rng", COMMON_FEATURES, Vec::new(), &[QUEUE_SIZE])
                .map_err(RngError::EventFd)?,
            bytes_served: 0,
        })
    }

    /// Written once per activation; the event loop reacts by registering the queue event.
    pub fn activate_event(&self) -> &EventFd {
        self.core.activate_event()
    }

    /// Random bytes handed to the guest since the device was created.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }

    /// Complete every available request, then notify the guest if needed. A no-op when the
    /// device is not active.
    pub fn process_queue(&mut self) {
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let served = &mut self.bytes_served;
        active.drain_queue(0, |chain, mem| {
            let len = match fill_chain(chain, mem) {
                Ok(len) => len,
                Err(e) => {
                    warn_ratelimited!("virtio-rng: request dropped: {e}");
                    0
                }
            };
            *served = served.saturating_add(u64::from(len));
            len
        });
    }
}

impl CoreDevice for Rng {
    const DEVICE_TYPE: u32 = device_type::RNG;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }
}

#[cfg(test)]
mod tests;
