//! The virtio-blk device model.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::disk::DiskImage;
use super::features::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use super::request::{handle_chain_counted, parse_failed, BlockStats, Request, RequestType};
use super::worker::{IoGate, Job, StartHook, Worker, WorkerParts};
use super::{
    BlockError, DISCARD_SECTOR_ALIGNMENT, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
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

/// Largest read the device loop serves itself when its data is in the page cache (a copy of
/// at most this much, never a wait for the disk).
const INLINE_MAX: u64 = 256 << 10;

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

/// Most requests handed to the worker and not completed yet: a ring's worth (a driver can
/// repeat heads in the avail ring, so this is counted, not assumed).
const MAX_IN_FLIGHT: usize = QUEUE_SIZE as usize;

/// A virtio-blk device over a raw image file, with one request queue. Its requests run on the
/// device loop's thread, or on its own worker once [`Block::start_worker`] started one.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Mutex<DiskImage>>,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    stats: Arc<Mutex<BlockStats>>,
    worker: Option<Worker>,
    /// Requests with the worker, of any activation (their completions bring it down).
    in_flight: usize,
    /// The last pass stopped at MAX_IN_FLIGHT: completions resume it.
    stalled: bool,
    /// Counts activations, so that completions of a request from before a reset are dropped.
    generation: u64,
    /// The drive's `rate_limiter`, if any (set or replaced with [`Block::set_rate_limiter`]).
    limiter: Option<RateLimiter>,
    /// Armed while the limiter is out of tokens: the queue is left alone until it fires.
    pub(super) timer: TimerFd,
    /// The timer is armed.
    throttled: bool,
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

    /// Moves request execution to a thread of its own named `name` (at most 15 bytes; longer
    /// is cut), which runs `hook` first (e.g. to install its seccomp filter). Its requests run
    /// inside `gate` (see [`super::worker`]). Call before the device is activated.
    pub fn start_worker(
        &mut self,
        name: &str,
        hook: StartHook,
        gate: Arc<IoGate>,
    ) -> Result<(), BlockError> {
        let mut name = name.to_string();
        while name.len() > 15 {
            name.pop();
        }
        let worker = Worker::spawn(
            name,
            hook,
            WorkerParts {
                disk: self.disk.clone(),
                stats: self.stats.clone(),
                id: self.id,
                gate,
            },
        )
        .map_err(BlockError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    /// The worker's completion EventFd, when there is a worker.
    pub(super) fn done_event(&self) -> Option<&EventFd> {
        self.worker.as_ref().map(Worker::done_event)
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
            worker: None,
            in_flight: 0,
            stalled: false,
            generation: 0,
            limiter: None,
            timer: TimerFd::new().map_err(|e| BlockError::TimerFd(e.into()))?,
            throttled: false,
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
        if let Err(e) = self.timer.wait() {
            warn_ratelimited!("virtio-blk: cannot read the rate limiter timer: {e}");
        }
        self.throttled = false;
        for index in 0..self.core.queue_max_sizes().len() {
            self.process_queue(index);
        }
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
        if self.worker.is_some() {
            self.submit_queue(index);
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

    /// The worker's half of [`Self::process_queue`]: pops and parses at most
    /// [`DRAIN_BUDGET`] chains (and at most [`MAX_IN_FLIGHT`] outstanding), answers the bad
    /// ones at once and hands the others to the worker. Past the budget the queue kicks itself,
    /// as [`crate::virtio::device_core`] does; at the in-flight limit notifications stay off
    /// and completions resume the queue.
    fn submit_queue(&mut self, index: usize) {
        if self.throttled {
            // The timer brings the loop back; until then kicks change nothing.
            return;
        }
        let write_through = !self.core.acked(VIRTIO_BLK_F_FLUSH);
        let generation = self.generation;
        let Some(active) = self.core.active_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let mut requests: Vec<(u16, Request)> = Vec::new();
        let mut stats = BlockStats::default();
        let (mut answered, mut self_kick, mut needs_reset) = (false, false, false);
        let mut budget = DRAIN_BUDGET;
        let mut wait = None;
        self.stalled = false;
        'outer: loop {
            if let Err(e) = queue.disable_notification(&mem) {
                warn_ratelimited!("virtio-blk: cannot disable notifications: {e}");
                break;
            }
            loop {
                if self.in_flight + requests.len() >= MAX_IN_FLIGHT {
                    self.stalled = true;
                    break 'outer;
                }
                if budget == 0 {
                    self_kick = true;
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
                        // Nothing outstanding (so nothing is reordered) and the image free: a
                        // read served from the page cache completes here, without the two
                        // thread hand-overs.
                        let inline = if self.in_flight == 0 && requests.is_empty() {
                            self.disk.try_lock().ok().and_then(|mut disk| {
                                request.try_run_nowait(&mem, &mut disk, &mut stats, INLINE_MAX)
                            })
                        } else {
                            None
                        };
                        match inline {
                            Some(len) => {
                                if let Err(e) = queue.add_used(&mem, head, len) {
                                    warn_ratelimited!("virtio-blk: cannot add used entry: {e}");
                                }
                                answered = true;
                            }
                            None => requests.push((head, request)),
                        }
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
        if !requests.is_empty() {
            let n = requests.len();
            let job = Job {
                mem,
                requests,
                write_through,
                generation,
            };
            match &self.worker {
                Some(w) if w.submit(job) => self.in_flight += n,
                _ => warn_ratelimited!("virtio-blk: the I/O thread is gone: {n} requests lost"),
            }
        }
        if self_kick {
            if let Some(evt) = self.core.queue_events().get(index) {
                if let Err(e) = evt.write(1) {
                    warn_ratelimited!("virtio-blk: cannot self-kick: {e}");
                }
            }
        }
    }

    /// Requests handed to the I/O thread and not yet in the used ring.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// For a snapshot of a paused VM: puts what the I/O thread completed in the used ring now
    /// (the device loop is parked), so that no request is lost with the process. The caller
    /// lets the I/O thread through its gate meanwhile and calls this until
    /// [`Self::in_flight`] is 0.
    pub fn complete_for_snapshot(&mut self) {
        self.complete();
    }

    /// Puts what the worker completed in the used ring and raises the interrupt; resumes a
    /// queue that stopped at the in-flight limit.
    pub(super) fn complete(&mut self) {
        let Some(worker) = &self.worker else {
            return;
        };
        if let Err(e) = worker.done_event().read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                warn_ratelimited!("virtio-blk: cannot read the completion event fd: {e}");
            }
        }
        let mut used = false;
        let generation = self.generation;
        let mut active = self.core.active_mut();
        while let Some(done) = worker.next_done() {
            // Counted whatever its activation: the limit bounds what the worker holds, across
            // resets too.
            self.in_flight = self.in_flight.saturating_sub(1);
            if done.generation != generation {
                continue;
            }
            if let Some(a) = active.as_mut() {
                let mem = a.mem.clone();
                if let Some(queue) = a.queues.get_mut(0) {
                    if let Err(e) = queue.add_used(&mem, done.head, done.len) {
                        warn_ratelimited!("virtio-blk: cannot add used entry: {e}");
                    }
                    used = true;
                }
            }
        }
        if used {
            if let Some(a) = active {
                a.signal_used(0);
            }
        }
        if self.stalled {
            self.process_queue(0);
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
    /// Completions of requests from before the reset are dropped when they arrive.
    fn on_reset(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.stalled = false;
    }
}

#[cfg(test)]
mod tests;
