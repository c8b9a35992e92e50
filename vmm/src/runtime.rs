//! The control loop of a cinder process, in every mode: CLI flags, `--config-file`, and the
//! API socket. It owns the VM once started, serves API requests that arrive through the
//! channel + EventFd from the API thread, handles signals, the guest's reset, and metrics.
//! The devices run on their own loop ([`crate::device_loop`]), which pausing the VM parks.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::config::VmConfig;
use api::controller::{Outcome, PreBootController};
use api::handler::VmmEndpoint;
use api::model::{ActionType, InstanceState, VmState};
use api::routes::{ApiRequest, ApiResponse};
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::builder::VmBuilder;
use crate::console::{spawn_console_writer, RawTerminal};
use crate::device_loop::DeviceLoop;
use crate::error::VmError;
use crate::exit::{ExitReason, ExitSignal};
use crate::metrics::open_sink;
use crate::metrics::Metrics;
use crate::options::VmmOptions;
use crate::signal::SignalFd;
use crate::vm::{Subscriber, VmContext, Vmm};

pub use crate::cmdline::DEFAULT_CMDLINE;

/// How often metrics are written when a metrics path is configured.
pub const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// The API side of the runtime.
pub struct ApiState {
    /// Requests from the API thread.
    pub endpoint: VmmEndpoint,
    /// The configuration and the lifecycle rules.
    pub controller: PreBootController,
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

/// A cinder process's event loop and state.
pub struct Runtime {
    em: Em,
    ctx: VmContext,
    opts: VmmOptions,
    vm: Option<Vmm>,
    console_out: Option<Box<dyn Write + Send>>,
    api: Option<ApiState>,
    api_pending: Arc<AtomicBool>,
    metrics_due: Arc<AtomicBool>,
    /// The metrics path when no API controller holds the configuration.
    metrics_path: Option<PathBuf>,
    metrics_sink: Option<(PathBuf, std::fs::File)>,
    console_thread: Option<std::thread::JoinHandle<()>>,
    devices: Option<DeviceLoop>,
    terminal: Option<RawTerminal>,
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
        let ctx = VmContext {
            reset_evt,
            exit,
            metrics: Arc::new(Metrics::default()),
            interactive: false,
        };
        Ok(Runtime {
            em,
            ctx,
            opts,
            vm: None,
            console_out: Some(console_out),
            api,
            api_pending,
            metrics_due,
            metrics_path,
            metrics_sink: None,
            console_thread: None,
            devices: None,
            terminal: None,
        })
    }

    /// Builds and starts the VM for `cfg` (validated) with this runtime's options.
    pub fn start_vm(&mut self, cfg: &VmConfig) -> Result<(), VmError> {
        if self.vm.is_some() {
            return Err(VmError::AlreadyRunning);
        }
        let builder = VmBuilder::new(cfg, &self.opts)?;
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
        match DeviceLoop::start(vm.subscribers(), self.ctx.exit.clone()) {
            Ok(d) => self.devices = Some(d),
            Err(e) => {
                vm.shutdown();
                return Err(e);
            }
        }
        self.vm = Some(vm);
        Ok(())
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
            Some(a) => a
                .controller
                .config()
                .metrics
                .as_ref()
                .map(|m| PathBuf::from(&m.metrics_path)),
            None => self.metrics_path.clone(),
        }
    }

    fn flush_metrics(&mut self) -> Result<(), String> {
        let Some(path) = self.metrics_path() else {
            return Err("metrics are not configured".into());
        };
        if self.metrics_sink.as_ref().map(|(p, _)| p) != Some(&path) {
            let f = open_sink(&path)
                .map_err(|e| format!("cannot open metrics path {}: {e}", path.display()))?;
            self.metrics_sink = Some((path.clone(), f));
        }
        let devices = self
            .vm
            .as_ref()
            .map(|v| v.device_metrics())
            .unwrap_or_default();
        let Some((_, sink)) = self.metrics_sink.as_mut() else {
            return Err("metrics are not configured".into());
        };
        self.ctx
            .metrics
            .flush_to(sink, &devices)
            .map_err(|e| format!("cannot write metrics to {}: {e}", path.display()))
    }

    /// Runs until the VM (or, before a VM exists, a signal) ends the process; returns why.
    pub fn run(mut self) -> ExitReason {
        let reason = loop {
            if let Some(r) = self.ctx.exit.reason() {
                break r;
            }
            if let Err(e) = self.em.run_with_timeout(1000) {
                break ExitReason::VmmError(format!("event loop failed: {e:?}"));
            }
            if self.metrics_due.swap(false, Ordering::AcqRel) && self.metrics_path().is_some() {
                if let Err(e) = self.flush_metrics() {
                    log::warn!("{e}");
                }
            }
            if self.api_pending.swap(false, Ordering::AcqRel) {
                self.serve_api();
            }
        };
        if self.metrics_path().is_some() {
            let _ = self.flush_metrics();
        }
        if let Some(vm) = self.vm.take() {
            vm.shutdown();
        }
        // Stopping the device loop drops its references to the devices, so the UART's end of
        // the console channel goes away with them.
        if let Some(d) = self.devices.take() {
            d.stop();
        }
        // The VM is gone, so is the UART's end of the console channel: let the writer finish
        // what the guest printed last (bounded: 2 s, the reader may be stalled).
        if let Some(h) = self.console_thread.take() {
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
        let Some(api) = self.api.as_ref() else {
            return;
        };
        let _ = api.endpoint.event.read();
        // Bounded: at most what is queued now (the API thread waits for each reply).
        for _ in 0..64 {
            let Some(req) = self.api.as_ref().and_then(|a| a.endpoint.next_request()) else {
                break;
            };
            self.ctx.metrics.api.requests.inc();
            let resp = self.handle_api(req);
            if resp.status >= 400 {
                self.ctx.metrics.api.errors.inc();
            }
            if let Some(a) = self.api.as_ref() {
                a.endpoint.reply(resp);
            }
        }
    }

    fn handle_api(&mut self, req: ApiRequest) -> ApiResponse {
        let logger = match &req {
            ApiRequest::PutLogger(l) => Some(l.clone()),
            _ => None,
        };
        let outcome = match self.api.as_mut() {
            Some(a) => a.controller.handle(req),
            None => return ApiResponse::error(500, "no API state"),
        };
        match outcome {
            Outcome::Respond(r) => {
                if let (Some(l), true) = (logger, r.status < 300) {
                    if let Err(e) = crate::logger::apply(&l) {
                        return ApiResponse::error(400, e);
                    }
                }
                r
            }
            Outcome::Start => {
                let Some(cfg) = self.api.as_ref().map(|a| a.controller.config().clone()) else {
                    return ApiResponse::error(500, "no API state");
                };
                match self.start_vm(&cfg) {
                    Ok(()) => {
                        if let Some(a) = self.api.as_mut() {
                            a.controller.mark_started();
                        }
                        ApiResponse::no_content()
                    }
                    Err(e @ VmError::NoBootSource) => {
                        ApiResponse::error(400, format!("InstanceStart: {e}"))
                    }
                    Err(e) => ApiResponse::error(400, format!("InstanceStart failed: {e}")),
                }
            }
            Outcome::Forward(req) => self.runtime_request(req),
        }
    }

    fn runtime_request(&mut self, req: ApiRequest) -> ApiResponse {
        match req {
            ApiRequest::PatchVm(state) => {
                let Some(vm) = self.vm.as_ref() else {
                    return ApiResponse::error(400, "the microVM is not running");
                };
                // Paused: the vCPUs first (no new queue kicks), then the device loop, so no
                // device touches guest memory until Resumed (devices first, then vCPUs).
                let devices = self.devices.as_ref();
                let (res, new_state) = match state {
                    VmState::Paused => (
                        vm.pause()
                            .and_then(|()| devices.map_or(Ok(()), DeviceLoop::pause))
                            .map_err(|e| e.to_string()),
                        InstanceState::Paused,
                    ),
                    VmState::Resumed => {
                        if let Some(d) = devices {
                            d.resume();
                        }
                        vm.resume();
                        (Ok(()), InstanceState::Running)
                    }
                };
                match res {
                    Ok(()) => {
                        if let Some(a) = self.api.as_mut() {
                            a.controller.set_state(new_state);
                        }
                        ApiResponse::no_content()
                    }
                    Err(e) => ApiResponse::error(400, e),
                }
            }
            ApiRequest::Action(ActionType::FlushMetrics) => match self.flush_metrics() {
                Ok(()) => ApiResponse::no_content(),
                Err(e) => ApiResponse::error(400, format!("FlushMetrics: {e}")),
            },
            ApiRequest::Action(ActionType::SendCtrlAltDel) => match self.vm.as_ref() {
                Some(vm) => match vm.send_ctrl_alt_del() {
                    Ok(()) => ApiResponse::no_content(),
                    Err(e) => ApiResponse::error(400, e),
                },
                None => ApiResponse::error(400, "SendCtrlAltDel: the microVM is not running"),
            },
            ApiRequest::PatchDrive(d) => {
                if d.rate_limiter.is_some() {
                    return ApiResponse::error(
                        400,
                        format!(
                            "PATCH /drives/{}: rate limiters are not supported by cinder yet",
                            d.drive_id
                        ),
                    );
                }
                let (Some(vm), Some(path)) = (self.vm.as_ref(), d.path_on_host.as_ref()) else {
                    return ApiResponse::error(
                        400,
                        format!("PATCH /drives/{}: nothing to change", d.drive_id),
                    );
                };
                if let Err(e) = vm.patch_drive(&d.drive_id, std::path::Path::new(path)) {
                    return ApiResponse::error(400, format!("PATCH /drives/{}: {e}", d.drive_id));
                }
                if let Some(a) = self.api.as_mut() {
                    if let Err(e) = a.controller.config_mut().patch_drive(&d) {
                        log::warn!("drive {} changed but not recorded: {e}", d.drive_id);
                    }
                }
                ApiResponse::no_content()
            }
            ApiRequest::PatchNetworkInterface(n) => ApiResponse::error(
                400,
                format!(
                    "PATCH /network-interfaces/{}: rate limiters are not supported by cinder yet",
                    n.iface_id
                ),
            ),
            other => ApiResponse::error(
                400,
                format!(
                    "{} is not supported at this point",
                    api::controller::describe(&other)
                ),
            ),
        }
    }
}
