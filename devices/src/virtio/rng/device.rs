//! The virtio-rng device model.

use std::io;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryError, Permissions};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{RngError, MAX_BYTES_PER_REQUEST, QUEUE_SIZE};
use crate::rate_limiter::{Cost, RateLimiter};
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

/// The bytes a request would be given: its writable lengths, at most
/// [`MAX_BYTES_PER_REQUEST`] (what the rate limiter is charged before the chain is served).
/// Bounded: the chain iterator stops after a queue's worth of descriptors.
fn request_bytes<M>(chain: &DescriptorChain<M>) -> u64
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let total: u64 = chain
        .clone()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    total.min(u64::from(MAX_BYTES_PER_REQUEST))
}

/// A virtio-rng device with one request queue.
#[derive(Debug)]
pub struct Rng {
    pub(super) core: DeviceCore,
    /// Random bytes handed to the guest so far.
    bytes_served: u64,
    /// The limiter of `PUT /entropy`'s `rate_limiter`, if any.
    limiter: Option<RateLimiter>,
    /// Armed while the limiter is out of tokens: the queue is left alone until it fires.
    pub(super) timer: TimerFd,
    /// The timer is armed.
    pub(super) throttled: bool,
}

impl Rng {
    /// Build the device.
    pub fn new() -> Result<Self, RngError> {
        Self::with_rate_limiter(None)
    }

    /// Build the device with a rate limiter: a request passes when the limiter has its bytes
    /// (the chain's writable length, at most [`MAX_BYTES_PER_REQUEST`]) and one op; otherwise
    /// the device stops taking requests and resumes from a timer, dropping none.
    pub fn with_rate_limiter(limiter: Option<RateLimiter>) -> Result<Self, RngError> {
        Ok(Rng {
            core: DeviceCore::new("virtio-rng", COMMON_FEATURES, Vec::new(), &[QUEUE_SIZE])
                .map_err(RngError::EventFd)?,
            bytes_served: 0,
            limiter: limiter.filter(|l| !l.is_unlimited()),
            timer: TimerFd::new().map_err(|e| RngError::TimerFd(e.into()))?,
            throttled: false,
        })
    }

    /// Requests the rate limiter held back so far (each time the device stopped for tokens).
    pub fn throttled_events(&self) -> u64 {
        self.limiter.as_ref().map_or(0, RateLimiter::throttled)
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
        if self.throttled {
            // The timer brings the loop back; until then kicks change nothing.
            return;
        }
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let served = &mut self.bytes_served;
        let limiter = &mut self.limiter;
        let mut wait = None;
        active.drain_queue_until(0, |chain, mem| {
            if let Some(l) = limiter.as_mut() {
                let cost = Cost {
                    bytes: request_bytes(&chain),
                    ops: 1,
                };
                if let Err(w) = l.consume(cost) {
                    wait = Some(w);
                    return None;
                }
            }
            let len = match fill_chain(chain, mem) {
                Ok(len) => len,
                Err(e) => {
                    warn_ratelimited!("virtio-rng: request dropped: {e}");
                    0
                }
            };
            *served = served.saturating_add(u64::from(len));
            Some(len)
        });
        if let Some(w) = wait {
            match self.timer.reset(w, None) {
                Ok(()) => self.throttled = true,
                // Without a timer the next kick retries: late, never lost.
                Err(e) => warn_ratelimited!("virtio-rng: cannot arm the rate limiter timer: {e}"),
            }
        }
    }

    /// The rate limiter's timer fired: take requests again.
    pub(super) fn on_timer(&mut self) {
        if let Err(e) = self.timer.wait() {
            warn_ratelimited!("virtio-rng: cannot read the rate limiter timer: {e}");
        }
        self.throttled = false;
        self.process_queue();
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
