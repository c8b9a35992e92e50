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

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::Block;
use super::request::{BlockStats, Request};
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

    /// Opens the gate: waiting workers go on.
    pub fn open(&self) {
        lock(&self.state).closed = false;
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

impl IoThread {
    /// Spawns the thread `name` (at most 15 bytes), which runs `hook` first, then serves
    /// `dev`'s queue until the device goes (see [`Block::start_io_thread`]).
    pub(super) fn spawn(
        name: String,
        hook: StartHook,
        dev: Weak<Mutex<Block>>,
        fds: ThreadFds,
        gate: Arc<IoGate>,
    ) -> io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let their_stop = stop.try_clone()?;
        let epoll = Epoll::new()?;
        for (fd, tag) in [
            (fds.queue.as_raw_fd(), TAG_QUEUE),
            (fds.activate.as_raw_fd(), TAG_ACTIVATE),
            (fds.timer.as_raw_fd(), TAG_TIMER),
            (their_stop.as_raw_fd(), TAG_STOP),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, tag),
            )?;
        }
        std::thread::Builder::new().name(name).spawn(move || {
            hook();
            let t = Thread {
                dev,
                fds,
                _stop: their_stop,
                epoll,
                gate,
            };
            t.run();
        })?;
        Ok(IoThread { stop })
    }
}

struct Thread {
    dev: Weak<Mutex<Block>>,
    fds: ThreadFds,
    _stop: EventFd,
    epoll: Epoll,
    gate: Arc<IoGate>,
}

impl Thread {
    fn run(&self) {
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-blk: the I/O thread cannot wait for events: {e}");
                    return;
                }
            };
            let mut timer = false;
            for ev in &events[..n] {
                match ev.data() {
                    TAG_STOP => return,
                    TAG_QUEUE => drain(&self.fds.queue),
                    TAG_ACTIVATE => drain(&self.fds.activate),
                    TAG_TIMER => timer = true,
                    _ => {}
                }
            }
            // Inside the gate for the whole pass: a pause waits for it, and holds the next.
            self.gate.enter();
            let alive = self.pass(timer);
            self.gate.exit();
            if !alive {
                return;
            }
        }
    }

    /// One pass: pop and parse (under the device's lock), execute (without it), complete
    /// (under it again). Returns false once the device is gone.
    fn pass(&self, timer: bool) -> bool {
        let Some(dev) = self.dev.upgrade() else {
            return false;
        };
        let (batch, disk, stats, id) = {
            let mut b = lock(&dev);
            if timer {
                b.timer_fired();
            }
            (
                b.take_batch(0, DRAIN_BUDGET),
                b.disk_arc(),
                b.stats_arc(),
                *b.id(),
            )
        };
        let Some(job) = batch.job else {
            return true;
        };
        let mut st = BlockStats::default();
        let mut done = Vec::with_capacity(job.requests.len());
        {
            let mut disk = lock(&disk);
            disk.set_write_through(job.write_through);
            for (head, request) in &job.requests {
                done.push((*head, request.run(&job.mem, &mut disk, &id, &mut st)));
            }
        }
        lock(&stats).add(&st);
        lock(&dev).finish(job.generation, &done);
        true
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

    #[test]
    fn gate_close_waits_for_the_worker_inside() {
        let gate = Arc::new(IoGate::new());
        gate.enter();
        assert!(!gate.close(Duration::from_millis(20)), "a worker is inside");
        let g = gate.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            g.exit();
        });
        assert!(gate.close(Duration::from_secs(5)));
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
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        t.join().unwrap();
    }
}
