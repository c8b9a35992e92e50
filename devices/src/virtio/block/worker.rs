//! The block device's I/O thread (`blk-<drive id>`), so that a long request (128 MiB of data,
//! a DISCARD of 32 ranges of `u32::MAX` sectors, a 64 MiB WRITE_ZEROES fallback, a slow
//! fdatasync) never holds the device loop, and with it the other devices, the vCPUs touching
//! this device's registers and the pause path.
//!
//! The thread owns the drive's queue, like Cloud Hypervisor's per-device epoll threads: it
//! polls the queue's ioeventfd, the device's activate fd and the rate limiter's timer itself
//! (the device loop does not watch the device at all). One pass, at most
//! `DRAIN_BUDGET` (64) chains: pop and parse them under the device's lock (a bad
//! chain is answered at once), execute the valid ones without it (the data moves directly
//! between the image and guest memory, the status byte is written), then, under the lock again,
//! write the used ring and raise the irqfd. No hand-over per request: an earlier design had the
//! device loop pop the chains and pass them to a worker through a channel and back, which cost
//! two thread wake-ups per batch (futex calls 1.3k -> 22k in a blkbench run, QD1 random writes
//! -35..45%).
//!
//! Per request, the sync engine makes one preadv/pwritev (at the request's offset) and, per
//! pass, one epoll_wait and one irqfd write: the kick fd is edge-triggered and never read.
//! With a poll window (off by default: see [`DEFAULT_IO_POLL`], [`PollWindow`], [`IO_POLL_ENV`]),
//! after a pass that served requests
//! the thread watches the avail ring for a while with notifications off, then turns them on
//! and looks once more before it sleeps; an idle drive never polls.
//!
//! Not holding the device's lock during the I/O keeps the vCPUs (register accesses) and
//! metrics (counters) free while a request waits for the disk. A reset meanwhile bumps the
//! device's generation, and the pass's completions are then dropped.
//!
//! Pause: the thread touches guest memory, so a paused VM must hold it too. Every pass runs
//! inside the [`IoGate`]: the pause path closes the gate once the device loop is parked, which
//! waits for the pass in progress (if any) to finish and keeps the thread from starting another
//! until resume; kicks arriving meanwhile wait in the ioeventfd.
//!
//! The thread ends when the device is dropped: it holds only a weak reference to the device,
//! duplicates of the fds it polls, and a stop fd that the device writes when it goes.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::Block;
use super::disk::DiskImage;
use super::request::{BlockStats, Request};
use super::uring::Uring;
use super::{BlockError, IoEngine, VIRTIO_BLK_ID_BYTES};
use crate::virtio::device_core::DRAIN_BUDGET;
use crate::GuestMemoryMmap;

/// Called first thing on a thread the devices crate spawns (e.g. to install its seccomp
/// filter): the creator decides what it does.
pub type StartHook = Arc<dyn Fn() + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    busy: usize,
}

/// Lets device workers touch guest memory only while the VM runs: see the module comment.
/// One gate serves every worker of a VM.
#[derive(Debug, Default)]
pub struct IoGate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// `state.closed`, readable without the lock by a thread polling its ring.
    closed_hint: AtomicBool,
}

impl IoGate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits while the gate is closed, then counts the caller in.
    fn enter(&self) {
        let mut st = lock(&self.state);
        while st.closed {
            st = match self.changed.wait(st) {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
        }
        st.busy += 1;
    }

    /// [`Self::closing`] without the lock (for a thread polling its ring: it stops soon).
    fn closing_hint(&self) -> bool {
        self.closed_hint.load(Ordering::Acquire)
    }

    /// Counts the caller out.
    fn exit(&self) {
        let mut st = lock(&self.state);
        st.busy = st.busy.saturating_sub(1);
        // Only a closer waits for `busy` to drop (enter waits for `open`): wake it then, and
        // spare every request a futex wake otherwise.
        let closing = st.closed;
        drop(st);
        if closing {
            self.changed.notify_all();
        }
    }

    /// Closes the gate and waits (at most `timeout`) until no worker is inside. Returns
    /// whether none is; the gate stays closed either way (until [`Self::open`]).
    pub fn close(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        st.closed = true;
        self.closed_hint.store(true, Ordering::Release);
        while st.busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match self.changed.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Whether a pause is closing (or closed) the gate: a thread inside takes no new work.
    pub(super) fn closing(&self) -> bool {
        lock(&self.state).closed
    }

    /// Opens the gate: waiting workers go on.
    pub fn open(&self) {
        let mut st = lock(&self.state);
        st.closed = false;
        self.closed_hint.store(false, Ordering::Release);
        drop(st);
        self.changed.notify_all();
    }
}

/// The valid requests of one pass, popped and parsed under the device's lock and executed
/// without it.
pub(super) struct Job {
    pub(super) mem: GuestMemoryMmap,
    /// (descriptor head, request).
    pub(super) requests: Vec<(u16, Request)>,
    /// Sync every write-type request (no VIRTIO_BLK_F_FLUSH negotiated).
    pub(super) write_through: bool,
    /// The device's activation the requests belong to.
    pub(super) generation: u64,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("requests", &self.requests.len())
            .finish()
    }
}

/// What one pass over the queue produced.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// The requests to execute, if any.
    pub(super) job: Option<Job>,
    /// The pass stopped because the engine had no room: notifications stay off, and the
    /// thread comes back once requests complete.
    pub(super) stalled: bool,
}

/// The device's end of its I/O thread: dropping it (with the device) ends the thread.
#[derive(Debug)]
pub(super) struct IoThread {
    stop: EventFd,
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("virtio-blk: cannot stop the I/O thread: {e}");
        }
    }
}

/// What the I/O thread polls: duplicates of the device's fds (so they outlive it) and its
/// stop fd.
pub(super) struct ThreadFds {
    pub(super) queue: EventFd,
    pub(super) activate: EventFd,
    pub(super) timer: OwnedFd,
}

const TAG_QUEUE: u64 = 0;
const TAG_ACTIVATE: u64 = 1;
const TAG_TIMER: u64 = 2;
const TAG_STOP: u64 = 3;
const TAG_URING: u64 = 4;

/// How long the thread waits, at its end, for io_uring requests still in flight.
const STOP_DRAIN: Duration = Duration::from_secs(1);

/// What the I/O thread runs the requests with.
enum Engine {
    Sync,
    Uring(Box<Uring>),
}

impl Engine {
    fn in_flight(&self) -> usize {
        match self {
            Engine::Sync => 0,
            Engine::Uring(u) => u.in_flight(),
        }
    }
}

impl IoThread {
    /// Spawns the thread `name` (at most 15 bytes), which runs `hook` first, sets up its
    /// engine, then serves `dev`'s queue until the device goes (see
    /// [`Block::start_io_thread`]). Returns once the engine is set up: whether it uses
    /// io_uring, or why `Auto` fell back to the sync engine.
    pub(super) fn spawn(
        name: String,
        hook: StartHook,
        dev: Weak<Mutex<Block>>,
        fds: ThreadFds,
        gate: Arc<IoGate>,
        engine: IoEngine,
        poll: Duration,
    ) -> Result<(Self, Option<io::Error>), BlockError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(BlockError::Worker)?;
        let their_stop = stop.try_clone().map_err(BlockError::Worker)?;
        let uring_evt = EventFd::new(EFD_NONBLOCK).map_err(BlockError::Worker)?;
        let epoll = Epoll::new().map_err(BlockError::Worker)?;
        // The queue's kick fd is edge-triggered: every kick (each eventfd write) is one event,
        // and its counter is never read, which spares a read(2) per wake-up.
        for (fd, tag, events) in [
            (
                fds.queue.as_raw_fd(),
                TAG_QUEUE,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (fds.activate.as_raw_fd(), TAG_ACTIVATE, EventSet::IN),
            (fds.timer.as_raw_fd(), TAG_TIMER, EventSet::IN),
            (their_stop.as_raw_fd(), TAG_STOP, EventSet::IN),
            (uring_evt.as_raw_fd(), TAG_URING, EventSet::IN),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, tag))
                .map_err(BlockError::Worker)?;
        }
        let (ready_tx, ready_rx) =
            std::sync::mpsc::channel::<Result<Option<io::Error>, io::Error>>();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                hook();
                // The ring is set up here, under the thread's own seccomp filter.
                let (engine, fell_back) = match engine {
                    IoEngine::Sync => (Engine::Sync, None),
                    IoEngine::Async | IoEngine::Auto => match Uring::new(&uring_evt) {
                        Ok(u) => (Engine::Uring(Box::new(u)), None),
                        Err(e) if engine == IoEngine::Auto => (Engine::Sync, Some(e)),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    },
                };
                if ready_tx.send(Ok(fell_back)).is_err() {
                    return;
                }
                let mut t = Thread {
                    dev,
                    fds,
                    _stop: their_stop,
                    uring_evt,
                    epoll,
                    gate,
                    engine,
                    image: None,
                    poll: PollWindow::new(poll),
                };
                t.run();
            })
            .map_err(BlockError::Worker)?;
        match ready_rx.recv() {
            Ok(Ok(fell_back)) => Ok((IoThread { stop }, fell_back)),
            Ok(Err(e)) => Err(BlockError::IoUring(e)),
            Err(_) => Err(BlockError::Worker(io::Error::other(
                "the I/O thread ended before it was ready",
            ))),
        }
    }
}

struct Thread {
    dev: Weak<Mutex<Block>>,
    fds: ThreadFds,
    _stop: EventFd,
    uring_evt: EventFd,
    epoll: Epoll,
    gate: Arc<IoGate>,
    engine: Engine,
    /// The io_uring engine's duplicate of the image's fd, by [`DiskImage::open_id`].
    image: Option<(u64, Arc<File>)>,
    /// How long to poll the ring after a pass that served requests.
    poll: PollWindow,
}

/// The poll window, adapted as QEMU's iothreads do: it halves each time a poll found nothing
/// (the spin was wasted: a host too busy to run the guest meanwhile, or a guest done), and
/// doubles (from [`PollWindow::MIN`]) up to its maximum each time the thread slept less than
/// that maximum (a poll would have caught the request). So an idle or slow guest costs no
/// spinning, and a busy one is served without sleeping.
#[derive(Debug, Clone, Copy)]
pub(super) struct PollWindow {
    max: Duration,
    now: Duration,
}

impl PollWindow {
    /// The smallest window worth spinning for; below it the thread does not poll.
    const MIN: Duration = Duration::from_micros(2);

    /// A window of at most `max` (zero: never poll), starting at `max`.
    pub(super) fn new(max: Duration) -> Self {
        Self { max, now: max }
    }

    /// Whether the thread polls at all (`max` is not zero).
    pub(super) fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// How long to poll now (zero: do not).
    pub(super) fn window(&self) -> Duration {
        self.now
    }

    /// A poll ran its whole window and found nothing.
    pub(super) fn missed(&mut self) {
        self.now /= 2;
        if self.now < Self::MIN {
            self.now = Duration::ZERO;
        }
    }

    /// The thread slept `slept` in epoll before a kick woke it.
    pub(super) fn woke_after(&mut self, slept: Duration) {
        if slept < self.max && self.now < self.max {
            self.now = (self.now * 2).clamp(Self::MIN, self.max);
        }
    }
}

/// Passes of one poll session before the thread goes through epoll again (for its stop fd,
/// activation and timer): a guest that keeps the ring busy is served in passes of
/// [`DRAIN_BUDGET`], and still the thread sees its other events.
const POLL_PASSES: u32 = 64;

/// How long the I/O thread polls the ring by default after a pass that served requests,
/// before it sleeps in epoll: not at all. On the 2-core kvm-pvm development host shared by
/// several users, a 32 us window (QEMU's iothread default) cost QD1 random reads 0.34..0.82x in
/// three bench_io runs (the spinning thread takes the core the vCPU needs) and bought nothing
/// clear elsewhere; [`IO_POLL_ENV`] turns it on where cores are to spare.
pub const DEFAULT_IO_POLL: Duration = Duration::ZERO;

/// In cinder's environment, the poll window in microseconds for every drive (0: never poll;
/// at most [`MAX_IO_POLL_US`]): how the benchmarks compare polling with sleeping in one
/// build. Anything else is refused with a warning and the default stays.
pub const IO_POLL_ENV: &str = "CINDER_BLK_IO_POLL_US";

/// The longest poll window [`IO_POLL_ENV`] may ask for.
pub const MAX_IO_POLL_US: u64 = 1000;

/// The poll window [`IO_POLL_ENV`] asks for, if it is set and valid.
pub(super) fn io_poll_from_env() -> Option<Duration> {
    let v = std::env::var_os(IO_POLL_ENV)?;
    match v.to_str().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(us) if us <= MAX_IO_POLL_US => Some(Duration::from_micros(us)),
        _ => {
            log::warn!(
                "virtio-blk: {IO_POLL_ENV}={v:?} is not a number of microseconds from 0 to \
                 {MAX_IO_POLL_US}: polling {} us",
                DEFAULT_IO_POLL.as_micros()
            );
            None
        }
    }
}

impl Thread {
    /// The loop: wait for a kick, the activation, the limiter's timer or completions; then,
    /// inside the gate, complete what the ring finished and make a pass over the queue. With
    /// requests in flight the thread stays inside the gate (a pause waits for them), and while
    /// a pause is closing it it takes no new ones.
    fn run(&mut self) {
        let mut events = [EpollEvent::default(); 8];
        // A pass is due.
        let mut pending = false;
        // Counted in the gate.
        let mut inside = false;
        // The last pass stopped for want of room in the ring.
        let mut stalled = false;
        loop {
            // A pass is due: do not wait in epoll (outside the gate, wait at it below; inside
            // it, wait only while a pause is closing it, for the completions).
            let timeout = if pending && (!inside || !self.gate.closing()) {
                0
            } else {
                -1
            };
            let slept_from = (timeout < 0 && self.poll.enabled()).then(Instant::now);
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-blk: the I/O thread cannot wait for events: {e}");
                    break;
                }
            };
            let mut timer = false;
            let mut stop = false;
            for ev in &events[..n] {
                match ev.data() {
                    TAG_STOP => stop = true,
                    TAG_QUEUE => {
                        if let Some(t) = slept_from {
                            self.poll.woke_after(t.elapsed());
                        }
                        pending = true;
                    }
                    TAG_ACTIVATE => {
                        drain(&self.fds.activate);
                        pending = true;
                    }
                    TAG_TIMER => {
                        timer = true;
                        pending = true;
                    }
                    TAG_URING => drain(&self.uring_evt),
                    _ => {}
                }
            }
            if stop {
                break;
            }
            if !inside {
                self.gate.enter();
                inside = true;
            }
            let Some(dev) = self.dev.upgrade() else {
                break;
            };
            if self.reap(&dev) && stalled {
                pending = true;
            }
            if timer {
                lock(&dev).timer_fired();
            }
            if pending && !self.gate.closing() {
                pending = false;
                let keep_off = self.poll.enabled();
                let served;
                (stalled, served) = self.pass(&dev, keep_off);
                if stalled {
                    // Completions reaped within the pass made room: go on at once.
                    pending = self.room() > 0;
                } else if keep_off {
                    pending = if served {
                        self.poll_ring(&dev, &mut stalled)
                    } else {
                        lock(&dev).rearm(0)
                    };
                }
            }
            drop(dev);
            if self.engine.in_flight() == 0 {
                self.gate.exit();
                inside = false;
            }
        }
        if inside {
            self.gate.exit();
        }
        self.drain_at_stop();
    }

    /// Requests the engine can take now.
    fn room(&self) -> usize {
        match &self.engine {
            Engine::Sync => DRAIN_BUDGET,
            Engine::Uring(u) => u.room(),
        }
    }

    /// After a pass that served requests (notifications left off by it), polls the avail ring
    /// for up to the poll window for more (see [`PollWindow`]: it may be zero), without the
    /// device's lock and without a syscall, and
    /// serves what comes; the window starts again after each pass, for at most
    /// [`POLL_PASSES`] passes. A driver sees notifications off meanwhile and need not kick
    /// (a kick from one that ignores that is a spurious wake-up later). Then notifications go
    /// on again and the ring is looked at once more, so that a request made just before is
    /// not lost (see [`Block::rearm`]). Also completes what the io_uring engine finished.
    /// Stops at once when a pause closes the gate. Returns whether a pass is due.
    fn poll_ring(&mut self, dev: &Arc<Mutex<Block>>, stalled: &mut bool) -> bool {
        let mut passes = 0;
        'session: loop {
            let window = self.poll.window();
            if window.is_zero() {
                break;
            }
            let Some(hint) = lock(dev).avail_hint(0) else {
                break;
            };
            let deadline = Instant::now() + window;
            while !hint.pending() {
                if self.engine.in_flight() > 0 {
                    self.reap(dev);
                }
                if self.gate.closing_hint() {
                    break 'session;
                }
                if Instant::now() >= deadline {
                    self.poll.missed();
                    break 'session;
                }
                std::hint::spin_loop();
            }
            passes += 1;
            if passes > POLL_PASSES || self.gate.closing() {
                // Notifications stay off: the next pass (through epoll) sees to them.
                return true;
            }
            let served;
            (*stalled, served) = self.pass(dev, true);
            if *stalled {
                return self.room() > 0;
            }
            if !served {
                break;
            }
        }
        lock(dev).rearm(0)
    }

    /// One pass: pop and parse (under the device's lock), run or submit (without it), complete
    /// what finished (under it again). `keep_off`: see [`Block::take_batch`]. Returns whether
    /// it stopped for want of room, and whether it took requests to serve.
    fn pass(&mut self, dev: &Arc<Mutex<Block>>, keep_off: bool) -> (bool, bool) {
        let room = self.room();
        let (batch, disk, stats, id) = {
            let mut b = lock(dev);
            (
                b.take_batch(0, room, keep_off),
                b.disk_arc(),
                b.stats_arc(),
                *b.id(),
            )
        };
        let Some(mut job) = batch.job else {
            return (batch.stalled, false);
        };
        let mut st = BlockStats::default();
        let mut done = Vec::with_capacity(job.requests.len());
        match &mut self.engine {
            Engine::Sync => {
                // Each request goes to the used ring as soon as it is done (a polling driver
                // resubmits meanwhile); one interrupt for the pass, below.
                for (head, request) in &job.requests {
                    let len = {
                        let mut disk = lock(&disk);
                        disk.set_write_through(job.write_through);
                        request.run(&job.mem, &mut disk, &id, &mut st)
                    };
                    lock(dev).publish(job.generation, *head, len);
                }
            }
            Engine::Uring(_) => {
                let requests = std::mem::take(&mut job.requests);
                self.submit_job(dev, requests, &job, &disk, &id, &mut st, &mut done)
            }
        }
        lock(&stats).add(&st);
        // The sync engine published its requests one by one: the interrupt is still due.
        let published = matches!(self.engine, Engine::Sync);
        if published || !done.is_empty() {
            lock(dev).finish(job.generation, &done);
        }
        // Reads of cached data complete within the submission: publish them now rather than
        // after another trip through epoll.
        self.reap(dev);
        (batch.stalled, true)
    }

    /// The io_uring half of a pass: reads and writes to the ring, the rest synchronously
    /// once the ring is empty (see [`super::uring`]).
    #[allow(clippy::too_many_arguments)]
    fn submit_job(
        &mut self,
        dev: &Arc<Mutex<Block>>,
        requests: Vec<(u16, Request)>,
        job: &Job,
        disk: &Arc<Mutex<DiskImage>>,
        id: &[u8; VIRTIO_BLK_ID_BYTES],
        st: &mut BlockStats,
        done: &mut Vec<(u16, u32)>,
    ) {
        let file = self.image_fd(disk);
        for (head, request) in requests {
            let back = match (&mut self.engine, &file) {
                (Engine::Uring(u), Some(file)) => {
                    let d = lock(disk);
                    u.push(
                        head,
                        request,
                        &job.mem,
                        job.generation,
                        job.write_through,
                        &d,
                        file,
                    )
                }
                _ => Err(request),
            };
            let Err(request) = back else {
                continue;
            };
            // Synchronously, after everything in flight (FLUSH covers the writes before it).
            self.wait_all(dev);
            let mut d = lock(disk);
            d.set_write_through(job.write_through);
            done.push((head, request.run(&job.mem, &mut d, id, st)));
        }
        if let Engine::Uring(u) = &mut self.engine {
            if let Err(e) = u.submit(0) {
                log::warn!("virtio-blk: io_uring submission failed: {e}");
                self.wait_all(dev);
            }
        }
    }

    /// A duplicate of the image's fd for the ring's requests, made once per open image (a
    /// `PATCH /drives` switch opens a new one); None if it cannot be made (the requests then
    /// run synchronously).
    fn image_fd(&mut self, disk: &Arc<Mutex<DiskImage>>) -> Option<Arc<File>> {
        let d = lock(disk);
        if let Some((id, f)) = &self.image {
            if *id == d.open_id() {
                return Some(f.clone());
            }
        }
        match d.file().try_clone() {
            Ok(f) => {
                let f = Arc::new(f);
                self.image = Some((d.open_id(), f.clone()));
                Some(f)
            }
            Err(e) => {
                log::warn!("virtio-blk: cannot duplicate the image fd, running synchronously: {e}");
                None
            }
        }
    }

    /// Submits what is queued and waits until nothing is in flight, completing it all.
    fn wait_all(&mut self, dev: &Arc<Mutex<Block>>) {
        loop {
            let Engine::Uring(u) = &mut self.engine else {
                return;
            };
            if u.in_flight() == 0 {
                return;
            }
            if let Err(e) = u.submit(1) {
                log::error!("virtio-blk: io_uring wait failed: {e}");
                return;
            }
            self.reap(dev);
        }
    }

    /// Completes what the ring finished: status bytes, used ring, interrupt. Returns whether
    /// anything completed.
    fn reap(&mut self, dev: &Arc<Mutex<Block>>) -> bool {
        let Engine::Uring(u) = &mut self.engine else {
            return false;
        };
        let mut completed = Vec::new();
        u.reap(&mut completed);
        if completed.is_empty() {
            return false;
        }
        let (disk, stats, id) = {
            let b = lock(dev);
            (b.disk_arc(), b.stats_arc(), *b.id())
        };
        let mut st = BlockStats::default();
        // In submission order, requests of one activation are together.
        let mut groups: Vec<(u64, Vec<(u16, u32)>)> = Vec::new();
        for c in completed {
            let generation = c.slot.generation;
            let d = c.finish(&disk, &id, &mut st);
            match groups.last_mut() {
                Some((g, v)) if *g == generation => v.push(d),
                _ => groups.push((generation, vec![d])),
            }
        }
        lock(&stats).add(&st);
        let mut b = lock(dev);
        for (generation, done) in &groups {
            b.finish(*generation, done);
        }
        true
    }

    /// At the end, waits (bounded) for requests still in flight: the kernel must be done with
    /// guest memory and the fds before they go.
    fn drain_at_stop(&mut self) {
        let deadline = Instant::now() + STOP_DRAIN;
        let mut events = [EpollEvent::default(); 8];
        loop {
            let Engine::Uring(u) = &mut self.engine else {
                return;
            };
            let mut completed = Vec::new();
            u.reap(&mut completed);
            if u.in_flight() == 0 {
                return;
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "virtio-blk: {} io_uring requests still in flight at the end",
                    u.in_flight()
                );
                return;
            }
            let _ = self.epoll.wait(10, &mut events);
            drain(&self.uring_evt);
        }
    }
}

/// Reads an eventfd's counter (nothing to read is fine: another pass took it).
fn drain(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            log::warn!("virtio-blk: cannot read an event fd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The poll window halves on each poll that found nothing, down to zero (no spinning for
    /// an idle guest or a host too busy to run it), and grows back, doubling up to its maximum,
    /// when the thread's sleeps are shorter than that maximum. Zero never polls.
    #[test]
    fn poll_window_shrinks_when_polls_miss_and_grows_when_sleeps_are_short() {
        let us = Duration::from_micros;
        let mut w = PollWindow::new(us(32));
        assert!(w.enabled());
        assert_eq!(w.window(), us(32));
        for want in [16, 8, 4, 2, 0, 0] {
            w.missed();
            assert_eq!(w.window(), us(want));
        }
        // Long sleeps: a poll would not have helped.
        w.woke_after(Duration::from_millis(5));
        assert_eq!(w.window(), Duration::ZERO);
        for want in [2, 4, 8, 16, 32, 32] {
            w.woke_after(us(10));
            assert_eq!(w.window(), us(want));
        }
        let mut off = PollWindow::new(Duration::ZERO);
        assert!(!off.enabled());
        off.woke_after(us(1));
        assert_eq!(off.window(), Duration::ZERO);
    }

    #[test]
    fn gate_close_waits_for_the_worker_inside() {
        let gate = Arc::new(IoGate::new());
        assert!(!gate.closing());
        gate.enter();
        assert!(!gate.close(Duration::from_millis(20)), "a worker is inside");
        let g = gate.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            g.exit();
        });
        assert!(gate.close(Duration::from_secs(5)));
        assert!(gate.closing(), "an I/O thread inside takes no new work now");
        t.join().unwrap();
        // Closed: a worker waits until it opens.
        let g = gate.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            g.enter();
            tx.send(()).unwrap();
            g.exit();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        gate.open();
        assert!(!gate.closing());
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        t.join().unwrap();
    }
}
