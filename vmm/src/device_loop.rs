//! The device event loop: one thread ("devices") that runs every device's event-loop half
//! (queue kicks through ioeventfds, TAP readiness, vsock sockets, console input). It is apart
//! from the control loop (signals, the guest's reset, the API, metrics) so that pausing the VM
//! can hold it: while the VM is paused this loop is parked, so no device reads a queue, writes
//! guest memory or raises an interrupt until resume; whatever arrives meanwhile (frames on a
//! TAP, bytes on a vsock socket, a queue kick) waits in its fd and is served after resume.
//! The control loop, and so the API and SIGTERM, keep running while it is parked.
//!
//! The block devices' I/O threads own their queues and run each pass through an [`IoGate`]: a
//! pause closes it once the loop is parked (waiting for the pass in progress to finish), so they
//! are held too; resume opens it before the loop runs again.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::virtio::block::IoGate;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{os, VmError};
use crate::exit::{ExitReason, ExitSignal};
use crate::vm::Subscriber;

/// How long `pause` and `stop` wait for the loop to get there.
const HANDSHAKE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    PauseRequested,
    Paused,
    Stopping,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Wakes the loop out of its epoll wait to look at `state`.
    wake: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn set(&self, s: State) {
        *self.lock() = s;
        self.changed.notify_all();
        let _ = self.wake.write(1);
    }

    /// Waits (bounded) until `done` holds for the state; returns whether it did.
    fn wait_for(&self, done: impl Fn(State) -> bool) -> bool {
        let deadline = Instant::now() + HANDSHAKE;
        let mut st = self.lock();
        while !done(*st) {
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
}

/// Drains the wake-up EventFd (the loop then looks at its state).
struct Waker(Arc<Shared>);

impl MutEventSubscriber for Waker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.wake, EventSet::IN)) {
            log::error!("device loop: cannot watch its wake-up fd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.wake.read();
    }
}

/// The running device loop; dropping it without [`DeviceLoop::stop`] stops it too.
pub struct DeviceLoop {
    shared: Arc<Shared>,
    io_gate: Arc<IoGate>,
    thread: Option<JoinHandle<()>>,
}

impl DeviceLoop {
    /// Starts the loop on its own thread with `subscribers` (a VM's devices). A failure of the
    /// loop itself ends the VM through `exit`.
    /// `io_gate` holds the devices' I/O threads while the loop is parked.
    pub fn start(
        subscribers: Vec<Subscriber>,
        io_gate: Arc<IoGate>,
        exit: Arc<ExitSignal>,
    ) -> Result<Self, VmError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::Running),
            changed: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os("eventfd"))?,
        });
        // 64 ready events per wait (the default 256 is 3 KiB of every VM's heap); more wait
        // for the next pass.
        let mut em: EventManager<Subscriber> =
            EventManager::new_with_capacity(64).map_err(|e| VmError::Os {
                what: "device event loop",
                source: std::io::Error::other(format!("{e:?}")),
            })?;
        em.add_subscriber(Arc::new(Mutex::new(Waker(shared.clone()))));
        for s in subscribers {
            em.add_subscriber(s);
        }
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                // Its own filter first, before any device event (vmm/src/seccomp).
                if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Devices) {
                    exit.request(ExitReason::VmmError(e.to_string()));
                    return;
                }
                run(em, &sh, &exit)
            })
            .map_err(os("starting the device thread"))?;
        Ok(DeviceLoop {
            shared,
            io_gate,
            thread: Some(thread),
        })
    }

    /// Parks the loop between two dispatches and holds the I/O threads; returns once both are
    /// still (at most 5 s each).
    pub fn pause(&self) -> Result<(), VmError> {
        self.shared.set(State::PauseRequested);
        if self
            .shared
            .wait_for(|s| s == State::Paused || s == State::Stopping)
        {
            if self.io_gate.close(HANDSHAKE) {
                Ok(())
            } else {
                // Not paused after all: the devices go on (the request finishes, is completed).
                self.resume();
                Err(VmError::Os {
                    what: "pausing the devices",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "a block request did not finish within 5 s",
                    ),
                })
            }
        } else {
            Err(VmError::Os {
                what: "pausing the devices",
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the device loop did not park within 5 s",
                ),
            })
        }
    }

    /// Lets the loop run again.
    pub fn resume(&self) {
        self.io_gate.open();
        let mut st = self.shared.lock();
        if *st != State::Stopping {
            *st = State::Running;
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Stops the loop and joins its thread (at most 5 s: a thread stuck in a device is left
    /// behind, the process is about to exit). The loop's references to the devices go with it.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.set(State::Stopping);
        let Some(t) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + HANDSHAKE;
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.is_finished() {
            if t.join().is_err() {
                log::error!("the device thread panicked");
            }
        } else {
            log::error!("the device thread did not stop within 5 s; leaving it");
        }
    }
}

impl Drop for DeviceLoop {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn run(mut em: EventManager<Subscriber>, shared: &Shared, exit: &ExitSignal) {
    loop {
        {
            let mut st = shared.lock();
            if *st == State::PauseRequested {
                *st = State::Paused;
                shared.changed.notify_all();
            }
            while *st == State::Paused {
                st = match shared.changed.wait(st) {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
            }
            if *st == State::Stopping {
                break;
            }
        }
        // Pause and stop write the wake-up fd; every device's work arrives on its own fds (no
        // periodic wake-up: an idle microVM costs no CPU).
        if let Err(e) = em.run_with_timeout(-1) {
            exit.request(ExitReason::VmmError(format!(
                "device event loop failed: {e:?}"
            )));
            break;
        }
    }
    // Dropping `em` drops the loop's references to the devices.
}
