//! The block device's I/O thread, so that a long request (128 MiB of data, a DISCARD of 32
//! ranges of `u32::MAX` sectors, a 64 MiB WRITE_ZEROES fallback, a slow fdatasync) never holds
//! the device loop, and with it the other devices, the vCPUs touching this device's registers
//! and the pause path.
//!
//! The device loop pops and parses descriptor chains (bounded per pass, like every queue) and
//! hands the valid requests to the worker in one `Job` per pass; the worker executes each
//! (the data moves directly between the image and guest memory, as before), writes its status
//! byte and sends back a `Done` with the used length; the device loop writes the used ring
//! and raises the interrupt. So the used ring and the interrupt stay on the device loop.
//!
//! Pause: the worker touches guest memory, so a paused VM must hold it too. Every request
//! runs inside the [`IoGate`]: the pause path closes the gate once the device loop is parked,
//! which waits for the request in progress (if any) to finish and keeps the worker from
//! starting another until resume.
//!
//! A plain thread rather than io_uring: the device's I/O is already synchronous file I/O
//! straight into guest memory, and a thread keeps every request path (fallocate fallbacks,
//! the sticky fdatasync failure, write-through) as it is, with no new kernel interface for the
//! seccomp filters. An io_uring engine (`io_engine: "Async"`) can replace this worker behind
//! the same Job/Done seam.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::DiskImage;
use super::request::{BlockStats, Request};
use super::VIRTIO_BLK_ID_BYTES;
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

/// What the device loop hands the worker: the valid requests of one pass.
pub(super) struct Job {
    pub(super) mem: GuestMemoryMmap,
    /// (descriptor head, request).
    pub(super) requests: Vec<(u16, Request)>,
    /// Sync every write-type request (no VIRTIO_BLK_F_FLUSH negotiated).
    pub(super) write_through: bool,
    /// The device's activation the requests belong to.
    pub(super) generation: u64,
}

/// One executed request, for the used ring.
pub(super) struct Done {
    pub(super) head: u16,
    pub(super) len: u32,
    pub(super) generation: u64,
}

/// The device loop's end of a worker thread.
#[derive(Debug)]
pub(super) struct Worker {
    jobs: Sender<Job>,
    done: Receiver<Done>,
    done_evt: EventFd,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("requests", &self.requests.len())
            .finish()
    }
}

impl std::fmt::Debug for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Done")
            .field("head", &self.head)
            .field("len", &self.len)
            .finish()
    }
}

/// What the worker thread needs.
pub(super) struct WorkerParts {
    pub(super) disk: Arc<Mutex<DiskImage>>,
    pub(super) stats: Arc<Mutex<BlockStats>>,
    pub(super) id: [u8; VIRTIO_BLK_ID_BYTES],
    pub(super) gate: Arc<IoGate>,
}

impl Worker {
    /// Spawns the thread `name` (at most 15 bytes), which runs `hook` first.
    pub(super) fn spawn(name: String, hook: StartHook, parts: WorkerParts) -> io::Result<Self> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel::<Done>();
        let done_evt = EventFd::new(EFD_NONBLOCK)?;
        let wake = done_evt.try_clone()?;
        std::thread::Builder::new().name(name).spawn(move || {
            hook();
            run(&job_rx, &done_tx, &wake, &parts);
        })?;
        Ok(Worker {
            jobs,
            done,
            done_evt,
        })
    }

    /// Hands a job over; false when the thread is gone.
    pub(super) fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }

    /// Readable when requests completed.
    pub(super) fn done_event(&self) -> &EventFd {
        &self.done_evt
    }

    /// The next completed request, if any.
    pub(super) fn next_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }
}

fn run(jobs: &Receiver<Job>, done: &Sender<Done>, wake: &EventFd, parts: &WorkerParts) {
    // Ends when the device (the sender) goes.
    while let Ok(job) = jobs.recv() {
        for (head, request) in &job.requests {
            let mut stats = BlockStats::default();
            parts.gate.enter();
            let len = {
                let mut disk = lock(&parts.disk);
                disk.set_write_through(job.write_through);
                request.run(&job.mem, &mut disk, &parts.id, &mut stats)
            };
            parts.gate.exit();
            lock(&parts.stats).add(&stats);
            let d = Done {
                head: *head,
                len,
                generation: job.generation,
            };
            if done.send(d).is_err() {
                return;
            }
            if let Err(e) = wake.write(1) {
                log::warn!("virtio-blk: cannot wake the device loop: {e}");
            }
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
        let (tx, rx) = mpsc::channel();
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
