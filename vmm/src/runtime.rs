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
    /// Set by SIGUSR1 (`--snapshot-on-signal`).
    snapshot_due: Arc<AtomicBool>,
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
                if sig == libc::SIGUSR1 {
                    // Only watched with --snapshot-on-signal.
                    self.snapshot_due.store(true, Ordering::Release);
                } else {
                    log::info!("signal {sig}: shutting down");
                    self.exit.request(ExitReason::Signal(sig));
                }
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
    /// A VM was built or restored: the control loop gives back what that took
    /// ([`crate::trim::give_back`]).
    trim_due: bool,
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
            Ok(devices) => {
                // Building the VM freed what it parsed and staged (kernel headers, tables,
                // the configuration's copies) and ran deep on this thread's stack: the
                // control loop gives those pages back (crate::trim) once it is back at its
                // own depth.
                self.trim_due = true;
                Ok(Machine { vm, devices })
            }
            Err(e) => {
                vm.shutdown();
                Err(e)
            }
        }
    }
}

/// Where a restore takes its state and memory from, and what it does once built.
#[derive(Clone, Debug)]
pub struct RestoreSpec {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub mem: PathBuf,
    /// Run the guest at once (otherwise it stays Paused).
    pub resume: bool,
    /// The vsock device's new socket (`vsock_override`), for clones.
    pub vsock_uds: Option<PathBuf>,
    /// New TAPs by interface id (`network_overrides`), for clones.
    pub net_overrides: Vec<(String, String)>,
    /// New backing files by drive id (`--restore ...,drive=ID:PATH`), for `cinder run`'s
    /// template: the drive keeps its read-only mode and features, the device is built on the
    /// new file, and once restored the guest is told its capacity (a config-change
    /// interrupt), as after `PATCH /drives/{id}`.
    pub drive_overrides: Vec<(String, PathBuf)>,
    /// Track dirty pages (for a later Diff snapshot).
    pub track_dirty: bool,
    /// `mem` is a page-fault handler's socket (`mem_backend` Uffd), not the memory file.
    pub uffd: bool,
    /// Advance the guest's KVM clock by the wall time since the snapshot (`clock_realtime`).
    pub clock_realtime: bool,
}

impl RestoreSpec {
    /// The restore `PUT /snapshot/load` asks for.
    pub fn from_load(l: &api::model::SnapshotLoadParams) -> Result<RestoreSpec, VmError> {
        let mem = l.memory().map_err(|e| {
            VmError::Snapshot(crate::snapshot::SnapshotError::Invalid(e.to_string()))
        })?;
        Ok(RestoreSpec {
            state: PathBuf::from(&l.snapshot_path),
            mem: PathBuf::from(&mem.backend_path),
            resume: l.resume_vm.unwrap_or(false),
            uffd: mem.backend_type == api::model::MemoryBackendType::Uffd,
            track_dirty: l.tracks_dirty_pages(),
            clock_realtime: l.clock_realtime.unwrap_or(false),
            vsock_uds: l
                .vsock_override
                .as_ref()
                .map(|v| PathBuf::from(&v.uds_path)),
            net_overrides: l
                .network_overrides
                .iter()
                .flatten()
                .map(|n| (n.iface_id.clone(), n.host_dev_name.clone()))
                .collect(),
            drive_overrides: Vec::new(),
        })
    }

    /// The snapshot's configuration (a config file) with this restore's overrides applied.
    fn apply_overrides(&self, config: &serde_json::Value) -> Result<String, VmError> {
        let bad = |why: String| VmError::Snapshot(crate::snapshot::SnapshotError::Invalid(why));
        let mut c = config.clone();
        if let Some(uds) = &self.vsock_uds {
            match c.get_mut("vsock").and_then(|v| v.as_object_mut()) {
                Some(v) => {
                    v.insert(
                        "uds_path".into(),
                        serde_json::Value::String(uds.display().to_string()),
                    );
                }
                None => {
                    return Err(bad(
                        "vsock_override: the snapshot has no vsock device".into()
                    ))
                }
            }
        }
        for (id, tap) in &self.net_overrides {
            let nets = c
                .get_mut("network-interfaces")
                .and_then(|n| n.as_array_mut());
            let found = nets.and_then(|n| {
                n.iter_mut()
                    .find(|i| i.get("iface_id").and_then(|x| x.as_str()) == Some(id.as_str()))
            });
            match found.and_then(|i| i.as_object_mut()) {
                Some(i) => {
                    i.insert(
                        "host_dev_name".into(),
                        serde_json::Value::String(tap.clone()),
                    );
                }
                None => {
                    return Err(bad(format!(
                        "network_overrides: the snapshot has no interface {id:?}"
                    )))
                }
            }
        }
        for (id, path) in &self.drive_overrides {
            let drives = c.get_mut("drives").and_then(|d| d.as_array_mut());
            let found = drives.and_then(|d| {
                d.iter_mut()
                    .find(|x| x.get("drive_id").and_then(|x| x.as_str()) == Some(id.as_str()))
            });
            match found.and_then(|d| d.as_object_mut()) {
                Some(d) => {
                    d.insert(
                        "path_on_host".into(),
                        serde_json::Value::String(path.display().to_string()),
                    );
                }
                None => return Err(bad(format!("drive={id}: the snapshot has no drive {id:?}"))),
            }
        }
        Ok(c.to_string())
    }
}

impl Launcher {
    /// Builds the microVM a snapshot describes and starts it (paused unless `spec.resume`).
    /// Returns it with the configuration it was built from. `paths`: the rules for the
    /// configuration's host paths.
    fn restore(
        &mut self,
        spec: &RestoreSpec,
        paths: api::paths::PathPolicy,
    ) -> Result<(Machine, VmConfig), VmError> {
        let mut state = crate::snapshot::read_state(&spec.state)?;
        crate::snapshot::set_clock_realtime(&mut state.vm, spec.clock_realtime)?;
        let cfg = VmConfig::from_config_file_with(&spec.apply_overrides(&state.config)?, paths)
            .map_err(|e| {
                VmError::Snapshot(crate::snapshot::SnapshotError::Decode {
                    path: spec.state.clone(),
                    why: format!("its configuration: {e}"),
                })
            })?;
        let builder = VmBuilder::new(&cfg, &self.opts)?;
        let out = self
            .console_out
            .take()
            .unwrap_or_else(|| Box::new(std::io::stdout()));
        let (writer, handle) = spawn_console_writer(out).map_err(|source| VmError::Os {
            what: "starting the console writer",
            source,
        })?;
        self.console_thread = Some(handle);
        if self.opts.console.reads_stdin() && self.terminal.is_none() {
            let t = RawTerminal::enter();
            self.ctx.interactive = t.is_active();
            self.terminal = Some(t);
        }
        let mut vm = builder.restore(
            &state,
            &spec.mem,
            spec.uffd,
            spec.track_dirty || cfg.machine.track_dirty_pages,
            Box::new(writer),
            self.ctx.clone(),
        )?;
        for (id, _) in &spec.drive_overrides {
            // The device was built on the new file; the guest's driver still has the old size.
            if let Err(e) = vm.announce_drive_capacity(id) {
                vm.shutdown();
                return Err(VmError::Snapshot(crate::snapshot::SnapshotError::Invalid(
                    e.to_string(),
                )));
            }
        }
        if !spec.resume {
            // The vCPUs park before their first KVM_RUN.
            vm.control.request_pause();
        }
        if let Err(e) = vm.start() {
            vm.shutdown();
            return Err(e);
        }
        let devices = match DeviceLoop::start(vm.subscribers(), vm.io_gate(), self.ctx.exit.clone())
        {
            Ok(d) => d,
            Err(e) => {
                vm.shutdown();
                return Err(e);
            }
        };
        if !spec.resume {
            let paused = vm.pause().and_then(|_| devices.pause());
            if let Err(e) = paused {
                vm.shutdown();
                devices.stop();
                return Err(e);
            }
        }
        // The decoded state (every device's, every vCPU's) is dropped on the way out; it
        // and the stack the restore ran on are given back by the control loop (crate::trim).
        self.trim_due = true;
        Ok((Machine { vm, devices }, cfg))
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
    /// SIGUSR1 arrived: pause and write this snapshot (`--snapshot-on-signal`).
    snapshot_due: Arc<AtomicBool>,
    snapshot_on_signal: Option<api::model::SnapshotCreateParams>,
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
        // A handful of fds (signals, reset, exit, timer, API): 16 ready events per wait
        // rather than the default 256 (3 KiB of every VM's heap; issue 17 item 5).
        let mut em: Em = EventManager::new_with_capacity(16).map_err(|e| VmError::Os {
            what: "event loop",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        let api_pending = Arc::new(AtomicBool::new(false));
        let metrics_due = Arc::new(AtomicBool::new(false));
        let snapshot_due = Arc::new(AtomicBool::new(false));
        let control = Control {
            signals,
            reset: reset_evt.clone(),
            exit: exit.clone(),
            timer,
            metrics_due: metrics_due.clone(),
            snapshot_due: snapshot_due.clone(),
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
                trim_due: false,
            },
            vmm: Executor::new(metrics),
            api,
            api_pending,
            metrics_due,
            metrics_path,
            snapshot_due,
            snapshot_on_signal: None,
        })
    }

    /// `--snapshot-on-signal`: SIGUSR1 (which the caller's signalfd must watch) pauses the VM
    /// and writes `params`; the VM stays Paused (resume it with `PATCH /vm`, or end cinder).
    pub fn set_snapshot_on_signal(&mut self, params: api::model::SnapshotCreateParams) {
        self.snapshot_on_signal = Some(params);
    }

    /// Pauses the VM and writes the `--snapshot-on-signal` snapshot; says how it went on
    /// stderr (one line).
    fn snapshot_now(&mut self) {
        use api::adapter::VmmAction;
        let Some(params) = self.snapshot_on_signal.clone() else {
            return;
        };
        let no_launch =
            |_: Option<VsockListener>| -> Result<Machine, VmError> { Err(VmError::AlreadyRunning) };
        let paused = self.vmm.execute(&VmmAction::Pause, None, no_launch);
        if let Some(a) = self.api.as_mut() {
            let _ = a.controller.complete(
                VmmAction::Pause,
                paused
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| api::adapter::VmmError::Vm(e.to_string().into())),
            );
        }
        let result = paused.and_then(|_| {
            self.vmm
                .execute(&VmmAction::CreateSnapshot(params.clone()), None, no_launch)
        });
        match result {
            Ok(()) => crate::logger::print_stderr(&format!(
                "cinder: snapshot written (SIGUSR1): state {}, memory {}; the VM stays Paused",
                params.snapshot_path, params.mem_file_path
            )),
            Err(e) => {
                crate::logger::print_stderr(&format!("cinder: snapshot on SIGUSR1 failed: {e}"))
            }
        }
    }

    /// Builds and starts the VM for `cfg` (validated) with this runtime's options.
    pub fn start_vm(&mut self, cfg: &VmConfig) -> Result<(), VmError> {
        let launcher = &mut self.launcher;
        self.vmm.start(|vsock| launcher.launch(cfg, vsock))
    }

    /// Restores the microVM of a snapshot (`--restore`).
    pub fn restore_vm(&mut self, spec: &RestoreSpec) -> Result<(), VmError> {
        let launcher = &mut self.launcher;
        let mut cfg = None;
        let policy = match &self.api {
            Some(a) => a.controller.config().paths.clone(),
            None => api::paths::PathPolicy::default(),
        };
        self.vmm.start(|_| {
            let (m, c) = launcher.restore(spec, policy)?;
            cfg = Some(c);
            Ok(m)
        })?;
        if let (Some(a), Some(c)) = (self.api.as_mut(), cfg) {
            a.controller.mark_restored(c, !spec.resume);
        }
        Ok(())
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
            // Everything that ends or feeds this loop (signals, the guest's reset, the vCPUs'
            // exit, the metrics timer, the API) wakes it through its fd: no periodic wake-up,
            // so a thousand idle microVMs cost no CPU. Only a page-fault handler's death is
            // looked for, every second, while one serves guest memory.
            if std::mem::take(&mut self.launcher.trim_due) {
                // A VM was built or restored: give back the heap and stack it no longer
                // needs (issue 17 item 5).
                crate::trim::give_back();
            }
            let timeout = if self.vmm.memory_backend_polled() {
                1000
            } else {
                -1
            };
            if let Err(e) = self.em.run_with_timeout(timeout) {
                break ExitReason::VmmError(format!("event loop failed: {e:?}"));
            }
            if let Some(why) = self.vmm.memory_backend_lost() {
                break ExitReason::VmmError(why);
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
            if self.snapshot_due.swap(false, Ordering::AcqRel) {
                self.snapshot_now();
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
                    let mut restored = None;
                    let result =
                        self.vmm
                            .execute(
                                &action,
                                metrics_path_of(cfg).as_deref(),
                                |vsock| match &action {
                                    api::adapter::VmmAction::LoadSnapshot(l) => {
                                        let spec = RestoreSpec::from_load(l)?;
                                        let (m, c) = launcher.restore(&spec, cfg.paths.clone())?;
                                        restored = Some(c);
                                        Ok(m)
                                    }
                                    _ => launcher.launch(cfg, vsock),
                                },
                            );
                    if let Some(c) = restored {
                        *api.controller.config_mut() = c;
                    }
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
