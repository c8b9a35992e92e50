//! The control loop of a cinder process, in every mode: CLI flags, `--config-file`, and the
//! API socket. It owns the VM once started (through [`Executor`]), serves API requests that
//! arrive through the channel + EventFd from the API thread, handles signals, the guest's
//! reset, and metrics. The devices run on their own loop ([`crate::device_loop`]), which
//! pausing the VM parks.
//!
//! An API request goes to the controller (configuration, lifecycle, instance state); what it
//! hands over as a [`api::adapter::VmmAction`] the [`Executor`] carries out, and the domain
//! result goes back to the controller, which answers. Nothing here builds an HTTP answer.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use api::config::VmConfig;
use api::controller::{Outcome, PreBootController};
use api::handler::VmmEndpoint;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::actions::{Executor, Machine};
use crate::builder::VmBuilder;
use crate::console::{spawn_console_writer, RawTerminal};
use crate::device_loop::DeviceLoop;
use crate::error::VmError;
use crate::exit::{ExitReason, ExitSignal};
use crate::metrics::Metrics;
use crate::options::VmmOptions;
use crate::signal::SignalFd;
use crate::vm::{Subscriber, VmContext};
use devices::virtio::vsock::VsockListener;

pub use crate::cmdline::DEFAULT_CMDLINE;

/// How often metrics are written when a metrics path is configured.
pub const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// The API side of the runtime.
pub struct ApiState {
    /// Requests from the API thread.
    pub endpoint: VmmEndpoint,
    /// The configuration, the lifecycle rules and the instance state.
    pub controller: PreBootController,
}

/// The metrics file of a configuration.
fn metrics_path_of(cfg: &VmConfig) -> Option<PathBuf> {
    cfg.metrics.as_ref().map(|m| PathBuf::from(&m.metrics_path))
}

type Em = EventManager<Subscriber>;

/// Signals, the guest's reset, vCPU exit requests, the metrics timer and API wake-ups.
struct Control {
    signals: SignalFd,
    reset: Arc<EventFd>,
    exit: Arc<ExitSignal>,
    timer: TimerFd,
    metrics_due: Arc<AtomicBool>,
    api_evt: Option<(i32, Arc<AtomicBool>)>,
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds = vec![
            self.signals.as_raw_fd(),
            self.reset.as_raw_fd(),
            self.exit.evt.as_raw_fd(),
            self.timer.as_raw_fd(),
        ];
        if let Some((fd, _)) = &self.api_evt {
            fds.push(*fd);
        }
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                self.exit.request(ExitReason::VmmError(format!(
                    "cannot watch control events: {e:?}"
                )));
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.signals.as_raw_fd() {
            if let Some(sig) = self.signals.read() {
                log::info!("signal {sig}: shutting down");
                self.exit.request(ExitReason::Signal(sig));
            }
        } else if fd == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            log::info!("guest reset through the i8042");
            self.exit.request(ExitReason::Reset);
        } else if fd == self.exit.evt.as_raw_fd() {
            let _ = self.exit.evt.read();
        } else if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.metrics_due.store(true, Ordering::Release);
        } else if let Some((api_fd, flag)) = &self.api_evt {
            if fd == *api_fd {
                flag.store(true, Ordering::Release);
            }
        }
    }
}

/// What starting a microVM takes besides its configuration, and what the end hands back:
/// the options, the context the VM reports through, the console output and the terminal.
struct Launcher {
    opts: VmmOptions,
    ctx: VmContext,
    console_out: Option<Box<dyn Write + Send>>,
    console_thread: Option<JoinHandle<()>>,
    terminal: Option<RawTerminal>,
}

impl Launcher {
    /// Builds and starts the VM for `cfg` (validated) and its device loop, its vsock device on
    /// `vsock` when `PUT /vsock` bound the socket already.
    fn launch(&mut self, cfg: &VmConfig, vsock: Option<VsockListener>) -> Result<Machine, VmError> {
        let builder = VmBuilder::new(cfg, &self.opts)?.with_vsock_listener(vsock);
        let out = self
            .console_out
            .take()
            .unwrap_or_else(|| Box::new(std::io::stdout()));
        let (writer, handle) = spawn_console_writer(out).map_err(|source| VmError::Os {
            what: "starting the console writer",
            source,
        })?;
        self.console_thread = Some(handle);
        // Raw mode only when the guest's console reads this terminal.
        if self.opts.console.reads_stdin() && self.terminal.is_none() {
            let t = RawTerminal::enter();
            self.ctx.interactive = t.is_active();
            self.terminal = Some(t);
        }
        let mut vm = builder.build(Box::new(writer), self.ctx.clone())?;
        if let Err(e) = vm.start() {
            vm.shutdown();
            return Err(e);
        }
        match DeviceLoop::start(vm.subscribers(), vm.io_gate(), self.ctx.exit.clone()) {
            Ok(devices) => Ok(Machine { vm, devices }),
            Err(e) => {
                vm.shutdown();
                Err(e)
            }
        }
    }
}

/// A cinder process's event loop and state.
pub struct Runtime {
    em: Em,
    launcher: Launcher,
    vmm: Executor,
    api: Option<ApiState>,
    api_pending: Arc<AtomicBool>,
    metrics_due: Arc<AtomicBool>,
    /// The metrics path when no API controller holds the configuration.
    metrics_path: Option<PathBuf>,
}

impl Runtime {
    /// Sets up the event loop, watching `signals` (created before any thread, so that every
    /// thread inherits the blocked mask) and (optionally) the API endpoint.
    pub fn new(
        signals: SignalFd,
        opts: VmmOptions,
        console_out: Box<dyn Write + Send>,
        api: Option<ApiState>,
        metrics_path: Option<PathBuf>,
    ) -> Result<Runtime, VmError> {
        let os = |what: &'static str| move |source| VmError::Os { what, source };
        let exit = Arc::new(ExitSignal::new().map_err(os("eventfd"))?);
        let reset_evt =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(os("eventfd"))?);
        let mut timer = TimerFd::new().map_err(|e| VmError::Os {
            what: "timerfd",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let _ = timer.reset(METRICS_PERIOD, Some(METRICS_PERIOD));
        let mut em: Em = EventManager::new().map_err(|e| VmError::Os {
            what: "event loop",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        let api_pending = Arc::new(AtomicBool::new(false));
        let metrics_due = Arc::new(AtomicBool::new(false));
        let control = Control {
            signals,
            reset: reset_evt.clone(),
            exit: exit.clone(),
            timer,
            metrics_due: metrics_due.clone(),
            api_evt: api
                .as_ref()
                .map(|a| (a.endpoint.event.as_raw_fd(), api_pending.clone())),
        };
        em.add_subscriber(Arc::new(Mutex::new(control)));
        let metrics = Arc::new(Metrics::default());
        let ctx = VmContext {
            reset_evt,
            exit,
            metrics: metrics.clone(),
            interactive: false,
        };
        Ok(Runtime {
            em,
            launcher: Launcher {
                opts,
                ctx,
                console_out: Some(console_out),
                console_thread: None,
                terminal: None,
            },
            vmm: Executor::new(metrics),
            api,
            api_pending,
            metrics_due,
            metrics_path,
        })
    }

    /// Builds and starts the VM for `cfg` (validated) with this runtime's options.
    pub fn start_vm(&mut self, cfg: &VmConfig) -> Result<(), VmError> {
        let launcher = &mut self.launcher;
        self.vmm.start(|vsock| launcher.launch(cfg, vsock))
    }

    /// The metrics this runtime writes (for what `main` records before the loop runs, such as
    /// the process start-up times).
    pub fn metrics(&self) -> &Metrics {
        &self.launcher.ctx.metrics
    }

    /// Tells the API controller the VM was started outside the API (config file / flags).
    pub fn mark_api_started(&mut self) {
        if let Some(a) = self.api.as_mut() {
            a.controller.mark_started();
        }
    }

    /// The metrics file, from the API configuration or the config file.
    fn metrics_path(&self) -> Option<PathBuf> {
        match &self.api {
            Some(a) => metrics_path_of(a.controller.config()),
            None => self.metrics_path.clone(),
        }
    }

    /// Runs until the VM (or, before a VM exists, a signal) ends the process; returns why.
    pub fn run(mut self) -> ExitReason {
        let reason = loop {
            if let Some(r) = self.launcher.ctx.exit.reason() {
                break r;
            }
            if let Err(e) = self.em.run_with_timeout(1000) {
                break ExitReason::VmmError(format!("event loop failed: {e:?}"));
            }
            if self.metrics_due.swap(false, Ordering::AcqRel) {
                if let Some(path) = self.metrics_path() {
                    if let Err(e) = self.vmm.flush_metrics(&path) {
                        log::warn!("{e}");
                    }
                }
            }
            if self.api_pending.swap(false, Ordering::AcqRel) {
                self.serve_api();
            }
        };
        if let Some(path) = self.metrics_path() {
            let _ = self.vmm.flush_metrics(&path);
        }
        if let Some(Machine { vm, devices }) = self.vmm.take_machine() {
            vm.shutdown();
            // Stopping the device loop drops its references to the devices, so the UART's end
            // of the console channel goes away with them.
            devices.stop();
        }
        // The VM is gone, so is the UART's end of the console channel: let the writer finish
        // what the guest printed last (bounded: 2 s, the reader may be stalled).
        if let Some(h) = self.launcher.console_thread.take() {
            for _ in 0..200 {
                if h.is_finished() {
                    let _ = h.join();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        reason
    }

    fn serve_api(&mut self) {
        let Some(api) = self.api.as_mut() else {
            return;
        };
        let _ = api.endpoint.event.read();
        // Bounded: at most what is queued now (the API thread waits for each reply).
        for _ in 0..64 {
            let Some(req) = api.endpoint.next_request() else {
                break;
            };
            self.launcher.ctx.metrics.api.requests.inc();
            let resp = match api.controller.handle(req) {
                Outcome::Respond(r) => r,
                Outcome::Execute(action) => {
                    let cfg = api.controller.config();
                    let launcher = &mut self.launcher;
                    let result =
                        self.vmm
                            .execute(&action, metrics_path_of(cfg).as_deref(), |vsock| {
                                launcher.launch(cfg, vsock)
                            });
                    api.controller.complete(action, result)
                }
                Outcome::Query(q) => api.controller.answer(q, self.vmm.query(q)),
            };
            if resp.status >= 400 {
                self.launcher.ctx.metrics.api.errors.inc();
            }
            api.endpoint.reply(resp);
        }
    }
}
