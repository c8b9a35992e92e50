//! The virtio-console device model.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{ConsoleError, CONFIG_SIZE, QUEUE_SIZE, RX_CHUNK, RX_QUEUE, TX_QUEUE};
use crate::virtio::device_core::{rearm_when_empty, CoreDevice, DeviceCore};
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::{device_type, COMMON_FEATURES};
use crate::GuestMemoryMmap;

/// The host input of a console: something readable with an fd the event loop can watch
/// (stdin, a connected `UnixStream`, a pipe). It is read only after epoll reported it readable,
/// once per event, so it may be blocking or non-blocking.
pub trait ConsoleInput: io::Read + AsRawFd + Send {}
impl<T: io::Read + AsRawFd + Send> ConsoleInput for T {}

/// What one input readiness event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputOutcome {
    /// This many bytes went into one receive chain.
    Delivered(usize),
    /// The guest has no receive buffer posted (the input was not read).
    NoBuffers,
    /// The device is not active or has no input (nothing read).
    Inactive,
    /// The input reached end of file or failed: stop watching it for good.
    Closed,
    /// The read would block (spurious wake-up).
    WouldBlock,
}

/// A one-port virtio-console.
pub struct Console {
    input: Option<Box<dyn ConsoleInput>>,
    input_closed: bool,
    output: Box<dyn io::Write + Send>,
    pub(super) core: DeviceCore,
    /// The input fd is registered with the event loop.
    pub(super) input_watched: bool,
    tx_bytes: u64,
    rx_bytes: u64,
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("input_fd", &self.input.as_ref().map(|i| i.as_raw_fd()))
            .field("input_closed", &self.input_closed)
            .field("activated", &self.core.is_activated())
            .field("tx_bytes", &self.tx_bytes)
            .field("rx_bytes", &self.rx_bytes)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console whose guest output goes to `output` and whose guest input comes from `input`
    /// (None: the guest never receives anything).
    pub fn new(
        input: Option<Box<dyn ConsoleInput>>,
        output: Box<dyn io::Write + Send>,
    ) -> Result<Self, ConsoleError> {
        // cols = rows = 0 (unknown size), max_nr_ports = 1, emerg_wr = 0; only meaningful with
        // features cinder does not offer. Read-only: emerg_wr is only writable with
        // VIRTIO_CONSOLE_F_EMERG_WRITE, which is not offered.
        let config_space: [u8; CONFIG_SIZE] = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        let core = DeviceCore::new(
            "virtio-console",
            COMMON_FEATURES,
            config_space.to_vec(),
            &[QUEUE_SIZE, QUEUE_SIZE],
        )
        .map_err(ConsoleError::EventFd)?;
        Ok(Console {
            input,
            input_closed: false,
            output,
            core,
            input_watched: false,
            tx_bytes: 0,
            rx_bytes: 0,
        })
    }

    /// Written once per activation; the event loop reacts by registering the queue events.
    pub fn activate_event(&self) -> &EventFd {
        self.core.activate_event()
    }

    /// The input fd, if there is an input that has not been closed.
    pub fn input_fd(&self) -> Option<i32> {
        if self.input_closed {
            return None;
        }
        self.input.as_ref().map(|i| i.as_raw_fd())
    }

    /// Bytes the guest transmitted (written to the output or dropped).
    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes
    }

    /// Bytes delivered to the guest.
    pub fn rx_bytes(&self) -> u64 {
        self.rx_bytes
    }

    /// Whether the input should be watched now: active, open, and the guest posted at least one
    /// receive buffer.
    pub fn wants_input(&self) -> bool {
        if self.input_fd().is_none() {
            return false;
        }
        let Some(active) = self.core.active() else {
            return false;
        };
        let Some(q) = active.queues.get(RX_QUEUE) else {
            return false;
        };
        if !q.ready() {
            return false;
        }
        match q.avail_idx(&active.mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != q.next_avail(),
            Err(_) => false,
        }
    }

    /// The input is readable: move one read's worth of bytes (at most [`RX_CHUNK`], at most
    /// what the next receive chain holds) into the guest. Bad receive chains on the way are
    /// completed with length 0.
    pub fn handle_input_ready(&mut self) -> InputOutcome {
        if self.input_closed {
            return InputOutcome::Inactive;
        }
        let (Some(active), Some(input)) = (self.core.active_mut(), self.input.as_mut()) else {
            return InputOutcome::Inactive;
        };
        let mem = &active.mem;
        let Some(queue) = active.queues.get_mut(RX_QUEUE) else {
            return InputOutcome::Inactive;
        };
        if !queue.ready() {
            return InputOutcome::Inactive;
        }
        let mut used_any = false;
        let mut rearmed = false;
        let outcome = loop {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    warn_ratelimited!("virtio-console: receive queue: {e}");
                    break InputOutcome::NoBuffers;
                }
            };
            let Some(chain) = chain else {
                if rearm_when_empty(queue, mem, &mut rearmed, "virtio-console") {
                    continue;
                }
                break InputOutcome::NoBuffers;
            };
            let head = chain.head_index();
            // Collect the writable buffers, checking them all before reading any input.
            let mut bufs: Vec<(GuestAddress, usize)> = Vec::with_capacity(2);
            let mut cap = 0usize;
            let mut bad = None;
            let mut last_has_next = false;
            for desc in chain {
                last_has_next = desc.has_next();
                if !desc.is_write_only() {
                    bad = Some("device-readable descriptor in a receive chain");
                    break;
                }
                let len = desc.len() as usize;
                if len > 0 && !mem.check_range(desc.addr(), len, Permissions::Write) {
                    bad = Some("receive buffer outside guest memory");
                    break;
                }
                if cap < RX_CHUNK && len > 0 {
                    let take = len.min(RX_CHUNK - cap);
                    bufs.push((desc.addr(), take));
                    cap += take;
                }
            }
            if bad.is_none() && last_has_next {
                bad = Some("malformed receive chain");
            }
            if bad.is_none() && cap == 0 {
                bad = Some("receive chain with no room");
            }
            if let Some(why) = bad {
                warn_ratelimited!("virtio-console: {why}; completed with length 0");
                if let Err(e) = queue.add_used(mem, head, 0) {
                    warn_ratelimited!("virtio-console: cannot add used entry: {e}");
                }
                used_any = true;
                continue;
            }
            let mut chunk = [0u8; RX_CHUNK];
            let n = match input.read(&mut chunk[..cap]) {
                Ok(0) => {
                    queue.go_to_previous_position();
                    break InputOutcome::Closed;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    queue.go_to_previous_position();
                    break InputOutcome::WouldBlock;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    queue.go_to_previous_position();
                    break InputOutcome::WouldBlock;
                }
                Err(e) => {
                    log::warn!("virtio-console: input failed, no more input: {e}");
                    queue.go_to_previous_position();
                    break InputOutcome::Closed;
                }
            };
            let mut done = 0usize;
            for (addr, len) in bufs {
                if done >= n {
                    break;
                }
                let take = len.min(n - done);
                // The range was checked above; a failure here means memory changed under us.
                if let Err(e) = mem.write_slice(&chunk[done..done + take], addr) {
                    warn_ratelimited!("virtio-console: cannot write receive buffer: {e}");
                    break;
                }
                done += take;
            }
            let used_len = u32::try_from(done).unwrap_or(0);
            if let Err(e) = queue.add_used(mem, head, used_len) {
                warn_ratelimited!("virtio-console: cannot add used entry: {e}");
            }
            used_any = true;
            self.rx_bytes = self.rx_bytes.saturating_add(done as u64);
            break InputOutcome::Delivered(done);
        };
        if outcome == InputOutcome::Closed {
            self.input_closed = true;
        }
        if used_any {
            active.signal_used(RX_QUEUE);
        }
        outcome
    }

    /// Write every transmitted buffer to the output and complete it.
    pub fn process_tx(&mut self) {
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let (output, tx_bytes) = (&mut self.output, &mut self.tx_bytes);
        let used_any = active.drain_queue(TX_QUEUE, |chain, mem| {
            let mut bufs: Vec<(GuestAddress, usize)> = Vec::with_capacity(2);
            let mut bad = None;
            let mut last_has_next = false;
            for desc in chain {
                last_has_next = desc.has_next();
                let len = desc.len() as usize;
                if desc.is_write_only() {
                    bad = Some("device-writable descriptor in a transmit chain");
                    break;
                }
                if len > 0 && !mem.check_range(desc.addr(), len, Permissions::Read) {
                    bad = Some("transmit buffer outside guest memory");
                    break;
                }
                bufs.push((desc.addr(), len));
            }
            if bad.is_none() && last_has_next {
                bad = Some("malformed transmit chain");
            }
            if let Some(why) = bad {
                warn_ratelimited!("virtio-console: {why}; dropped");
            } else {
                let sent = write_out(&mut **output, mem, &bufs);
                *tx_bytes = tx_bytes.saturating_add(sent);
            }
            0
        });
        if used_any {
            if let Err(e) = self.output.flush() {
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn_ratelimited!("virtio-console: cannot flush the output: {e}");
                }
            }
        }
    }
}

/// Copy the buffers to `out` in chunks; stop (dropping the rest) when the output would block or
/// fails. Returns the bytes consumed from the guest.
fn write_out(
    out: &mut dyn io::Write,
    mem: &GuestMemoryMmap,
    bufs: &[(GuestAddress, usize)],
) -> u64 {
    let mut chunk = [0u8; 4096];
    let mut total = 0u64;
    for &(addr, len) in bufs {
        let mut off = 0usize;
        while off < len {
            let n = (len - off).min(chunk.len());
            let Some(at) = addr.checked_add(off as u64) else {
                return total;
            };
            if let Err(e) = mem.read_slice(&mut chunk[..n], at) {
                warn_ratelimited!("virtio-console: cannot read transmit buffer: {e}");
                return total;
            }
            if let Err(e) = out.write_all(&chunk[..n]) {
                if e.kind() == io::ErrorKind::WouldBlock {
                    warn_ratelimited!("virtio-console: output would block; guest output dropped");
                } else {
                    warn_ratelimited!("virtio-console: cannot write the output: {e}");
                }
                return total;
            }
            off += n;
            total += n as u64;
        }
    }
    total
}

impl CoreDevice for Console {
    const DEVICE_TYPE: u32 = device_type::CONSOLE;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }
}

#[cfg(test)]
mod tests;
