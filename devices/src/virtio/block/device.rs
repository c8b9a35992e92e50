//! The virtio-blk device model.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Address, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::disk::DiskImage;
use super::features::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use super::request::{handle_chain_counted, parse_failed, BlockStats, Request, RequestType};
use super::worker::{
    io_poll_from_env, Batch, IoGate, IoThread, Job, StartHook, ThreadFds, DEFAULT_IO_POLL,
};
use super::{
    BlockError, IoEngine, DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SHIFT, SEG_MAX, SIZE_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use crate::rate_limiter::{Cost, RateLimiter};
use crate::virtio::device_core::{CoreDevice, DeviceCore, DRAIN_BUDGET};
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::{device_type, COMMON_FEATURES};

/// How to build a [`Block`] device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw disk image (regular file or block device), size a multiple of 512 bytes.
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes). Default: derived from the image's device
    /// and inode numbers.
    pub id: Option<String>,
    /// Whether `path` may be a host block device (`--allow-block-devices`), also for a later
    /// [`Block::set_backing`].
    pub allow_block_device: bool,
}

/// A drive's image, shared by the device and its I/O thread.
#[derive(Debug, Clone)]
pub struct Backing(Arc<Mutex<DiskImage>>);

impl Backing {
    /// Switches to the image at `path`, keeping the read-only mode. The old image is synced
    /// first (what the guest wrote must be on it before it goes), and the new one locked; on
    /// error the old image stays in use. Returns the new capacity in sectors.
    ///
    /// The same file again (a manager announcing a resized image) is reopened; its lock moves
    /// to the new open once the old one is closed.
    pub fn switch(&self, path: &std::path::Path) -> Result<u64, BlockError> {
        // The I/O thread (if any) finishes the request it is doing first.
        let mut current = lock(&self.0);
        let read_only = current.read_only();
        let same_file = current.is_file_at(path);
        let block_devices = current.allows_block_device();
        let mut disk = if same_file {
            DiskImage::open_unlocked(path, read_only, block_devices)?
        } else {
            DiskImage::open_with(path, read_only, block_devices)?
        };
        current.flush().map_err(BlockError::SyncBeforeSwitch)?;
        disk.set_write_through(current.write_through());
        let nsectors = disk.nsectors();
        // Dropping the old image closes it and releases its lock.
        *current = disk;
        if same_file {
            if let Err(e) = current.lock(path) {
                log::warn!("virtio-blk: {e}");
            }
        }
        Ok(nsectors)
    }
}

/// A virtio-blk device over a raw image file, with one request queue. Its requests run on the
/// device loop's thread, or on its own I/O thread once [`Block::start_io_thread`] started one.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Mutex<DiskImage>>,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    stats: Arc<Mutex<BlockStats>>,
    /// The drive's I/O thread, which owns the queue once started.
    io_thread: Option<IoThread>,
    /// Counts activations, so that completions of a request from before a reset are dropped.
    generation: u64,
    /// The drive's `rate_limiter`, if any (set or replaced with [`Block::set_rate_limiter`]).
    limiter: Option<RateLimiter>,
    /// Armed while the limiter is out of tokens: the queue is left alone until it fires.
    pub(super) timer: TimerFd,
    /// The timer is armed.
    throttled: bool,
    /// How long the I/O thread polls the ring after serving requests (see
    /// [`Block::set_io_poll`]).
    io_poll: std::time::Duration,
    pub(super) core: DeviceCore,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_SPACE_SIZE: usize = 60;

fn build_config_space(nsectors: u64) -> Vec<u8> {
    // struct virtio_blk_config (virtio 1.2 §5.2.4).
    let mut config = Vec::with_capacity(CONFIG_SPACE_SIZE);
    config.extend_from_slice(&nsectors.to_le_bytes()); // 0: capacity
    config.extend_from_slice(&SIZE_MAX.to_le_bytes()); // 8: size_max
    config.extend_from_slice(&SEG_MAX.to_le_bytes()); // 12: seg_max
    config.extend_from_slice(&[0u8; 4]); // 16: geometry
    config.extend_from_slice(&(1u32 << SECTOR_SHIFT).to_le_bytes()); // 20: blk_size (SECTOR_SIZE)
    config.extend_from_slice(&[0u8; 8]); // 24: topology
    config.extend_from_slice(&[0u8; 4]); // 32: writeback, unused0, num_queues
    config.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // 36
    config.extend_from_slice(&MAX_DISCARD_SEG.to_le_bytes()); // 40
    config.extend_from_slice(&DISCARD_SECTOR_ALIGNMENT.to_le_bytes()); // 44
    config.extend_from_slice(&MAX_WRITE_ZEROES_SECTORS.to_le_bytes()); // 48
    config.extend_from_slice(&MAX_WRITE_ZEROES_SEG.to_le_bytes()); // 52
    config.extend_from_slice(&[1u8, 0, 0, 0]); // 56: write_zeroes_may_unmap, unused1
    debug_assert_eq!(config.len(), CONFIG_SPACE_SIZE);
    config
}

impl Block {
    /// What the device did so far.
    pub fn stats(&self) -> BlockStats {
        *lock(&self.stats)
    }

    /// The image (tests).
    #[cfg(test)]
    pub(super) fn disk(&self) -> MutexGuard<'_, DiskImage> {
        lock(&self.disk)
    }

    /// Gives the device's queue to a thread of its own named `name` (at most 15 bytes; longer
    /// is cut), which runs `hook` first (e.g. to install its seccomp filter), then polls the
    /// queue's notification fd, the activate fd and the rate limiter's timer itself: it pops
    /// the chains, runs the requests (image I/O straight into guest memory), writes the used
    /// ring and raises the interrupt, with no hand-over per request (see [`super::worker`]).
    /// Its reads and writes use `engine` (io_uring for `Async`, and for `Auto` when it can be
    /// set up: see [`super::uring`]); returns the engine in use.
    /// Every pass runs inside `gate`. The device loop then leaves the device alone (its
    /// `init` watches nothing). Call before the device is activated. The thread ends when the
    /// device is dropped.
    pub fn start_io_thread(
        dev: &Arc<Mutex<Block>>,
        name: &str,
        hook: StartHook,
        gate: Arc<IoGate>,
        engine: IoEngine,
    ) -> Result<IoEngine, BlockError> {
        let mut name = name.to_string();
        while name.len() > 15 {
            name.pop();
        }
        let mut b = lock(dev);
        let fds = b.thread_fds().map_err(BlockError::Worker)?;
        let (thread, fell_back) = IoThread::spawn(
            name.clone(),
            hook,
            Arc::downgrade(dev),
            fds,
            gate,
            engine,
            b.io_poll,
        )?;
        b.io_thread = Some(thread);
        let used = match (engine, fell_back) {
            (IoEngine::Sync, _) => IoEngine::Sync,
            (_, None) => IoEngine::Async,
            (_, Some(e)) => {
                log::warn!("virtio-blk: {name}: io_uring unavailable ({e}): using the sync engine");
                lock(&b.stats).io_uring_fallback = 1;
                IoEngine::Sync
            }
        };
        Ok(used)
    }

    /// How long the I/O thread (started after this) polls the avail ring after a pass that
    /// served requests, before it sleeps in epoll ([`DEFAULT_IO_POLL`], or what
    /// `CINDER_BLK_IO_POLL_US` says; zero: never). While
    /// it polls, notifications are off (a driver that honours that skips its kick, a costly
    /// exit), and on again before it sleeps. An idle drive never polls.
    pub fn set_io_poll(&mut self, poll: std::time::Duration) {
        self.io_poll = poll;
    }

    /// Duplicates of the fds the I/O thread polls.
    fn thread_fds(&self) -> std::io::Result<ThreadFds> {
        use std::os::fd::{AsRawFd, BorrowedFd};
        let queue = match self.core.queue_events().first() {
            Some(q) => q.try_clone()?,
            None => return Err(std::io::Error::other("the device has no queue")),
        };
        // SAFETY: the timer fd is open for as long as `self`, which outlives this borrow.
        let timer = unsafe { BorrowedFd::borrow_raw(self.timer.as_raw_fd()) };
        Ok(ThreadFds {
            queue,
            activate: self.core.activate_event().try_clone()?,
            timer: timer.try_clone_to_owned()?,
        })
    }

    /// Whether an I/O thread owns the queue.
    pub(super) fn has_io_thread(&self) -> bool {
        self.io_thread.is_some()
    }

    /// The image, for the I/O thread.
    pub(super) fn disk_arc(&self) -> Arc<Mutex<DiskImage>> {
        self.disk.clone()
    }

    /// The counters, for the I/O thread.
    pub(super) fn stats_arc(&self) -> Arc<Mutex<BlockStats>> {
        self.stats.clone()
    }

    /// Switches the backing image (Firecracker's `PATCH /drives/{id}` with `path_on_host`):
    /// [`Backing::switch`], then [`Self::announce_capacity`]. On error the old image stays.
    pub fn set_backing(&mut self, path: &std::path::Path) -> Result<(), BlockError> {
        let nsectors = self.backing().switch(path)?;
        self.announce_capacity(nsectors);
        Ok(())
    }

    /// The drive's image, to switch it without holding the device: the switch waits for the
    /// request the I/O thread is doing, and the device loop and the vCPUs need the device
    /// meanwhile.
    pub fn backing(&self) -> Backing {
        Backing(self.disk.clone())
    }

    /// Publishes a capacity of `nsectors` in config space and tells the driver with a
    /// config-change interrupt.
    pub fn announce_capacity(&mut self, nsectors: u64) {
        self.core.update_config(build_config_space(nsectors));
    }

    /// Open the image and build the device.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let id = match &config.id {
            Some(id) if id.len() > VIRTIO_BLK_ID_BYTES => {
                return Err(BlockError::IdTooLong {
                    id: id.clone(),
                    len: id.len(),
                })
            }
            Some(id) => Some(id.clone()),
            None => None,
        };
        let disk = DiskImage::open_with(&config.path, config.read_only, config.allow_block_device)?;
        let id = id.unwrap_or_else(|| match disk.file().metadata() {
            Ok(meta) => format!("{:x}{:x}", meta.dev(), meta.ino()),
            Err(_) => String::new(),
        });
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);

        let mut avail_features = COMMON_FEATURES
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX);
        if config.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let config_space = build_config_space(disk.nsectors());
        let core = DeviceCore::new("virtio-blk", avail_features, config_space, &[QUEUE_SIZE])
            .map_err(BlockError::EventFd)?;
        Ok(Block {
            disk: Arc::new(Mutex::new(disk)),
            id: id_bytes,
            stats: Arc::new(Mutex::new(BlockStats::default())),
            io_thread: None,
            generation: 0,
            limiter: None,
            timer: TimerFd::new().map_err(|e| BlockError::TimerFd(e.into()))?,
            throttled: false,
            io_poll: io_poll_from_env().unwrap_or(DEFAULT_IO_POLL),
            core,
        })
    }

    /// Sets or replaces the rate limiter (a `PATCH /drives/{id}` of a running VM: the new
    /// buckets start full). With the I/O thread, each parsed request is charged its data bytes
    /// and one op before it is served; out of tokens the device leaves the queue alone until
    /// its timer fires, and drops nothing. (The inline path without an I/O thread, used by unit
    /// tests and the fuzz harness, does not limit.) A replaced limiter keeps counting throttles.
    pub fn set_rate_limiter(&mut self, limiter: Option<RateLimiter>) {
        let throttled = self.throttled_events();
        self.limiter = limiter.filter(|l| !l.is_unlimited());
        if let Some(l) = &mut self.limiter {
            l.add_throttled(throttled);
        }
        if self.throttled {
            // Re-check at once under the new buckets.
            if let Err(e) = self.timer.reset(std::time::Duration::from_nanos(1), None) {
                warn_ratelimited!("virtio-blk: cannot arm the rate limiter timer: {e}");
            }
        }
    }

    /// Requests the rate limiter held back so far (each time the device stopped for tokens).
    pub fn throttled_events(&self) -> u64 {
        self.limiter.as_ref().map_or(0, RateLimiter::throttled)
    }

    /// The rate limiter's timer fired: take requests again.
    pub(super) fn on_timer(&mut self) {
        self.timer_fired();
        for index in 0..self.core.queue_max_sizes().len() {
            self.process_queue(index);
        }
    }

    /// The rate limiter's timer fired: the next pass takes requests again.
    pub(super) fn timer_fired(&mut self) {
        if let Err(e) = self.timer.wait() {
            warn_ratelimited!("virtio-blk: cannot read the rate limiter timer: {e}");
        }
        self.throttled = false;
    }

    /// Capacity in 512-byte sectors.
    pub fn nsectors(&self) -> u64 {
        lock(&self.disk).nsectors()
    }

    /// The 20-byte device ID returned by GET_ID.
    pub fn id(&self) -> &[u8; VIRTIO_BLK_ID_BYTES] {
        &self.id
    }

    /// Written once per activation; the event loop reacts by registering the queue events.
    pub fn activate_event(&self) -> &EventFd {
        self.core.activate_event()
    }

    /// Process the available requests of queue `index` (at most a budget per call, see
    /// `DRAIN_BUDGET`), then notify the guest if needed: here, or, with an I/O thread, hand
    /// them to it (see [`Self::start_worker`]). A no-op when the device is not active or the
    /// queue does not exist / is not ready.
    pub fn process_queue(&mut self, index: usize) {
        if self.io_thread.is_some() {
            // The I/O thread owns the queue.
            return;
        }
        let write_through = !self.core.acked(VIRTIO_BLK_F_FLUSH);
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let mut disk = lock(&self.disk);
        disk.set_write_through(write_through);
        let (id, mut stats) = (&self.id, BlockStats::default());
        active.drain_queue(index, |chain, mem| {
            handle_chain_counted(chain, mem, &mut disk, id, &mut stats)
        });
        lock(&self.stats).add(&stats);
    }

    /// The I/O thread's half of [`Self::process_queue`]: pops and parses at most
    /// [`DRAIN_BUDGET`] chains and at most `room` valid requests (what the engine can take),
    /// answers the bad ones at once and returns the others, to run without the device's lock.
    /// Past the budget the queue kicks itself, as [`crate::virtio::device_core`] does; out of
    /// room notifications stay off and the batch says so (completions resume the queue).
    ///
    /// With `keep_off`, a pass that emptied the ring leaves notifications off (the I/O thread
    /// polls the ring meanwhile): the caller must [`Self::rearm`] before it sleeps.
    pub(super) fn take_batch(&mut self, index: usize, room: usize, keep_off: bool) -> Batch {
        let mut out = Batch::default();
        if self.throttled {
            // The timer brings the thread back; until then kicks change nothing.
            return out;
        }
        let write_through = !self.core.acked(VIRTIO_BLK_F_FLUSH);
        let generation = self.generation;
        let Some(active) = self.core.active_mut() else {
            return out;
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(index) else {
            return out;
        };
        if !queue.ready() {
            return out;
        }
        let mut requests: Vec<(u16, Request)> = Vec::new();
        let mut stats = BlockStats::default();
        let (mut answered, mut self_kick, mut needs_reset) = (false, false, false);
        let mut budget = DRAIN_BUDGET;
        let mut wait = None;
        'outer: loop {
            if let Err(e) = queue.disable_notification(&mem) {
                warn_ratelimited!("virtio-blk: cannot disable notifications: {e}");
                break;
            }
            loop {
                // The budget first: its self-kick brings the thread back whatever the room.
                if budget == 0 {
                    self_kick = true;
                    break 'outer;
                }
                if requests.len() >= room {
                    out.stalled = true;
                    break 'outer;
                }
                budget -= 1;
                let chain = match queue.iter(&mem) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => {
                        warn_ratelimited!("virtio-blk: {e}");
                        needs_reset = true;
                        break 'outer;
                    }
                };
                let Some(chain) = chain else {
                    if keep_off {
                        break 'outer;
                    }
                    break;
                };
                let head = chain.head_index();
                match Request::parse(chain, &mem) {
                    Ok(request) => {
                        if let Some(l) = self.limiter.as_mut() {
                            let bytes = match request.kind {
                                RequestType::In | RequestType::Out => request.data_len,
                                _ => 0,
                            };
                            if let Err(w) = l.consume(Cost { bytes, ops: 1 }) {
                                // Back on the avail ring, parsed again when the timer fires.
                                queue.go_to_previous_position();
                                wait = Some(w);
                                break 'outer;
                            }
                        }
                        requests.push((head, request));
                    }
                    Err(e) => {
                        let len = parse_failed(e, &mem, &mut stats);
                        if let Err(e) = queue.add_used(&mem, head, len) {
                            warn_ratelimited!("virtio-blk: cannot add used entry: {e}");
                        }
                        answered = true;
                    }
                }
            }
            match queue.enable_notification(&mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn_ratelimited!("virtio-blk: cannot enable notifications: {e}");
                    break;
                }
            }
        }
        if let Some(w) = wait {
            match self.timer.reset(w, None) {
                Ok(()) => self.throttled = true,
                // Without a timer the next kick or completion retries: late, never lost.
                Err(e) => warn_ratelimited!("virtio-blk: cannot arm the rate limiter timer: {e}"),
            }
        }
        if needs_reset {
            if let Err(e) = active.interrupt.signal_needs_reset() {
                warn_ratelimited!("virtio-blk: cannot raise the interrupt: {e}");
            }
        }
        if answered {
            active.signal_used(index);
        }
        lock(&self.stats).add(&stats);
        if self_kick {
            if let Some(evt) = self.core.queue_events().get(index) {
                if let Err(e) = evt.write(1) {
                    warn_ratelimited!("virtio-blk: cannot self-kick: {e}");
                }
            }
        }
        if !requests.is_empty() {
            out.job = Some(Job {
                mem,
                requests,
                write_through,
                generation,
            });
        }
        out
    }

    /// Where the I/O thread can watch queue `index`'s avail index without the device's lock
    /// while it polls: None when the device or the queue is not active.
    pub(super) fn avail_hint(&self, index: usize) -> Option<AvailHint> {
        let active = self.core.active()?;
        let queue = active.queues.get(index)?;
        if !queue.ready() {
            return None;
        }
        Some(AvailHint {
            mem: active.mem.clone(),
            idx_addr: GuestAddress(queue.avail_ring()).checked_add(2)?,
            next_avail: queue.next_avail(),
        })
    }

    /// Ends a poll after [`Self::take_batch`] with `keep_off`: notifications on again, then
    /// one more look at the avail ring. Returns whether requests came meanwhile (a pass is
    /// due: no kick will announce them). Throttled, notifications stay off (the rate
    /// limiter's timer brings the thread back) and this returns false.
    pub(super) fn rearm(&mut self, index: usize) -> bool {
        if self.throttled {
            return false;
        }
        let Some(active) = self.core.active_mut() else {
            return false;
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(index) else {
            return false;
        };
        if !queue.ready() {
            return false;
        }
        match queue.enable_notification(&mem) {
            Ok(more) => more,
            Err(e) => {
                warn_ratelimited!("virtio-blk: cannot enable notifications: {e}");
                // A pass finds out what is wrong with the ring.
                true
            }
        }
    }

    /// Puts one executed request of activation `generation` in the used ring at once (the
    /// driver may be polling it), without the interrupt ([`Self::finish`] with nothing raises
    /// it); dropped if a reset ended that activation.
    pub(super) fn publish(&mut self, generation: u64, head: u16, len: u32) {
        if generation != self.generation {
            return;
        }
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let mem = active.mem.clone();
        if let Some(queue) = active.queues.get_mut(0) {
            if let Err(e) = queue.add_used(&mem, head, len) {
                warn_ratelimited!("virtio-blk: cannot add used entry: {e}");
            }
        }
    }

    /// Puts executed requests (head, used length) of activation `generation` in the used
    /// ring and raises the interrupt (if the driver wants one for what was used since the
    /// last); those of an activation a reset ended are dropped.
    pub(super) fn finish(&mut self, generation: u64, done: &[(u16, u32)]) {
        if generation != self.generation {
            return;
        }
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(0) else {
            return;
        };
        for &(head, len) in done {
            if let Err(e) = queue.add_used(&mem, head, len) {
                warn_ratelimited!("virtio-blk: cannot add used entry: {e}");
            }
        }
        active.signal_used(0);
    }
}

/// A snapshot of where a queue's avail index lives and how far the device got, to poll the
/// ring without the device's lock (a hint: every pass re-reads the queue under the lock).
pub(super) struct AvailHint {
    mem: crate::GuestMemoryMmap,
    idx_addr: GuestAddress,
    next_avail: u16,
}

impl AvailHint {
    /// Whether the driver made requests available since the snapshot (or the index cannot be
    /// read: a pass then finds out why).
    pub(super) fn pending(&self) -> bool {
        use vm_memory::Bytes;
        match self
            .mem
            .load::<u16>(self.idx_addr, std::sync::atomic::Ordering::Acquire)
        {
            Ok(idx) => u16::from_le(idx) != self.next_avail,
            Err(_) => true,
        }
    }
}

impl CoreDevice for Block {
    const DEVICE_TYPE: u32 = device_type::BLOCK;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    /// A driver that did not negotiate VIRTIO_BLK_F_FLUSH has a write-through device: every
    /// write is durable before it completes.
    /// Requests of the ended activation that the I/O thread completes later are dropped.
    fn on_reset(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests;
