//! The VMM half of the API adapter: [`Executor`] carries out the [`VmmAction`]s the API
//! controller lets through (start, pause, resume, flush metrics, Ctrl+Alt+Del, a drive's new
//! image, the logger) and returns domain results ([`VmmError`]); the api crate turns them into
//! answers ([`api::adapter::action_response`]) and records what they changed. It reaches the
//! running microVM through two small traits, [`MicroVm`] (implemented by [`Vmm`]) and
//! [`Parkable`] (by [`DeviceLoop`]), so the dispatch is tested below with a fake VM, without
//! KVM.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use api::adapter::{QueryAnswer, VmmAction, VmmError, VmmQuery};
use api::model::RateLimiter;
use serde_json::Value;

use devices::virtio::vsock::{VsockConfig, VsockListener};

use crate::device_loop::DeviceLoop;
use crate::error::VmError;
use crate::metrics::{open_sink, Metrics};
use crate::vm::{BalloonOpError, CtrlAltDelError, PatchDriveError, PatchNetError, Vmm};

/// A running microVM, as the API's actions use it.
pub trait MicroVm {
    /// Parks every vCPU between instructions; returns once all are parked (bounded).
    fn pause(&self) -> Result<(), VmError>;
    /// Lets the vCPUs run again.
    fn resume(&self);
    /// Presses Ctrl+Alt+Del on the guest's keyboard.
    fn send_ctrl_alt_del(&self) -> Result<(), CtrlAltDelError>;
    /// Switches drive `id` to the image at `path`.
    fn patch_drive(&self, id: &str, path: &Path) -> Result<(), PatchDriveError>;
    /// Replaces interface `id`'s receive and/or transmit rate limiters.
    fn patch_net(
        &self,
        id: &str,
        rx: Option<&RateLimiter>,
        tx: Option<&RateLimiter>,
    ) -> Result<(), PatchNetError>;
    /// Replaces drive `id`'s rate limiter.
    fn patch_drive_limiter(&self, id: &str, limiter: &RateLimiter) -> Result<(), PatchDriveError>;
    /// Per-device metrics sections (cumulative counters), as JSON objects.
    fn device_metrics(&self) -> Vec<(String, Value)>;
    /// Why guest memory can no longer be served (a page-fault handler gone), if so.
    fn memory_backend_lost(&self) -> Option<String> {
        None
    }
    /// Guest memory depends on a page-fault handler that [`Self::memory_backend_lost`] must
    /// look at now and then (the control loop then wakes every second; else only on events).
    fn memory_backend_polled(&self) -> bool {
        false
    }
    /// Writes a snapshot of the paused microVM.
    fn snapshot_create(
        &self,
        params: &api::model::SnapshotCreateParams,
    ) -> Result<(), crate::snapshot::SnapshotError>;
    /// Sets the balloon's target.
    fn patch_balloon(&self, _amount_mib: u32) -> Result<(), BalloonOpError> {
        Err(BalloonOpError::NoBalloon)
    }
    /// Sets the balloon's statistics interval.
    fn patch_balloon_stats(&self, _secs: u16) -> Result<(), BalloonOpError> {
        Err(BalloonOpError::NoBalloon)
    }
    /// The balloon's sizes and the guest's statistics.
    fn balloon_stats(&self) -> Result<api::model::BalloonStats, BalloonOpError> {
        Err(BalloonOpError::NoBalloon)
    }
}

impl MicroVm for Vmm {
    fn pause(&self) -> Result<(), VmError> {
        Vmm::pause(self)
    }

    fn resume(&self) {
        Vmm::resume(self);
    }

    fn send_ctrl_alt_del(&self) -> Result<(), CtrlAltDelError> {
        Vmm::send_ctrl_alt_del(self)
    }

    fn patch_drive(&self, id: &str, path: &Path) -> Result<(), PatchDriveError> {
        Vmm::patch_drive(self, id, path)
    }

    fn patch_drive_limiter(&self, id: &str, limiter: &RateLimiter) -> Result<(), PatchDriveError> {
        Vmm::patch_drive_limiter(self, id, limiter)
    }

    fn patch_net(
        &self,
        id: &str,
        rx: Option<&RateLimiter>,
        tx: Option<&RateLimiter>,
    ) -> Result<(), PatchNetError> {
        Vmm::patch_net_limiters(self, id, rx, tx)
    }

    fn device_metrics(&self) -> Vec<(String, Value)> {
        Vmm::device_metrics(self)
    }

    fn snapshot_create(
        &self,
        params: &api::model::SnapshotCreateParams,
    ) -> Result<(), crate::snapshot::SnapshotError> {
        Vmm::snapshot_create(self, params)
    }

    fn memory_backend_lost(&self) -> Option<String> {
        Vmm::memory_backend_lost(self)
    }

    fn memory_backend_polled(&self) -> bool {
        self.uffd.is_some()
    }

    fn patch_balloon(&self, amount_mib: u32) -> Result<(), BalloonOpError> {
        Vmm::patch_balloon(self, amount_mib)
    }

    fn patch_balloon_stats(&self, secs: u16) -> Result<(), BalloonOpError> {
        Vmm::patch_balloon_stats(self, secs)
    }

    fn balloon_stats(&self) -> Result<api::model::BalloonStats, BalloonOpError> {
        Vmm::balloon_stats(self)
    }
}

/// The loop running a microVM's devices, which a pause parks.
pub trait Parkable {
    /// Parks the loop between two dispatches; returns once it is parked (bounded).
    fn pause(&self) -> Result<(), VmError>;
    /// Lets the loop run again.
    fn resume(&self);
}

impl Parkable for DeviceLoop {
    fn pause(&self) -> Result<(), VmError> {
        DeviceLoop::pause(self)
    }

    fn resume(&self) {
        DeviceLoop::resume(self);
    }
}

/// A started microVM: the VM and the loop running its devices.
pub struct Machine<V = Vmm, D = DeviceLoop> {
    /// Memory, devices and vCPUs.
    pub vm: V,
    /// The device loop.
    pub devices: D,
}

/// Carries out [`VmmAction`]s. Owns the started microVM (none before `InstanceStart`) and the
/// open metrics destination.
pub struct Executor<V = Vmm, D = DeviceLoop> {
    machine: Option<Machine<V, D>>,
    metrics: Arc<Metrics>,
    sink: Option<(PathBuf, File)>,
    /// The vsock socket `PUT /vsock` bound, waiting for the device at `InstanceStart`.
    vsock: Option<VsockListener>,
}

/// A failure of the running microVM, with its typed error as the source.
fn vm_error(e: impl std::error::Error + Send + Sync + 'static) -> VmmError {
    VmmError::Vm(Box::new(e))
}

/// A failed start: a configuration that cannot boot, a second start, or a build failure.
fn start_error(e: VmError) -> VmmError {
    match e {
        VmError::NoBootSource => VmmError::BootConfig(Box::new(e)),
        VmError::AlreadyRunning => VmmError::AlreadyRunning,
        e => VmmError::Boot(Box::new(e)),
    }
}

impl<V: MicroVm, D: Parkable> Executor<V, D> {
    /// An executor with no microVM yet, counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Executor {
            machine: None,
            metrics,
            sink: None,
            vsock: None,
        }
    }

    /// Takes the started microVM out, to shut it down.
    pub fn take_machine(&mut self) -> Option<Machine<V, D>> {
        self.machine.take()
    }

    /// Starts the microVM `launch` builds, unless one was started already (then `launch` is not
    /// called).
    /// `launch` gets the vsock socket `PUT /vsock` bound, if any.
    pub fn start(
        &mut self,
        launch: impl FnOnce(Option<VsockListener>) -> Result<Machine<V, D>, VmError>,
    ) -> Result<(), VmError> {
        if self.machine.is_some() {
            return Err(VmError::AlreadyRunning);
        }
        self.machine = Some(launch(self.vsock.take())?);
        Ok(())
    }

    /// Why the running microVM's memory can no longer be served, if so.
    pub fn memory_backend_lost(&self) -> Option<String> {
        self.machine.as_ref()?.vm.memory_backend_lost()
    }

    /// Whether the control loop must look at [`Self::memory_backend_lost`] every second.
    pub fn memory_backend_polled(&self) -> bool {
        self.machine
            .as_ref()
            .is_some_and(|m| m.vm.memory_backend_polled())
    }

    fn running(&self) -> Result<&Machine<V, D>, VmmError> {
        self.machine.as_ref().ok_or(VmmError::NotRunning)
    }

    /// Carries out `action`. `metrics_path` is the configured metrics destination; `launch`
    /// builds the microVM for [`VmmAction::Start`].
    pub fn execute(
        &mut self,
        action: &VmmAction,
        metrics_path: Option<&Path>,
        launch: impl FnOnce(Option<VsockListener>) -> Result<Machine<V, D>, VmError>,
    ) -> Result<(), VmmError> {
        match action {
            VmmAction::Start => self.start(launch).map_err(start_error),
            // `launch` restores the snapshot (the runtime gives the right one).
            VmmAction::LoadSnapshot(_) => self
                .start(launch)
                .map_err(|e| VmmError::Snapshot(Box::new(e))),
            VmmAction::CreateSnapshot(p) => self
                .running()?
                .vm
                .snapshot_create(p)
                .map_err(|e| VmmError::Snapshot(Box::new(e))),
            VmmAction::Pause => {
                // The vCPUs first (no new queue kicks), then the device loop, so no device
                // touches guest memory until Resumed.
                let m = self.running()?;
                m.vm.pause().map_err(vm_error)?;
                m.devices.pause().map_err(vm_error)
            }
            VmmAction::Resume => {
                // The devices first, then the vCPUs.
                let m = self.running()?;
                m.devices.resume();
                m.vm.resume();
                Ok(())
            }
            VmmAction::FlushMetrics => {
                self.flush_metrics(metrics_path.ok_or(VmmError::MetricsNotConfigured)?)
            }
            VmmAction::SendCtrlAltDel => self.running()?.vm.send_ctrl_alt_del().map_err(vm_error),
            VmmAction::PatchDrive(d) => {
                let Ok(m) = self.running() else {
                    return Err(VmmError::NothingToChange);
                };
                if d.path_on_host.is_none() && d.rate_limiter.is_none() {
                    return Err(VmmError::NothingToChange);
                }
                if let Some(path) = &d.path_on_host {
                    m.vm.patch_drive(&d.drive_id, Path::new(path))
                        .map_err(vm_error)?;
                }
                if let Some(l) = &d.rate_limiter {
                    m.vm.patch_drive_limiter(&d.drive_id, l).map_err(vm_error)?;
                }
                Ok(())
            }
            VmmAction::PatchNetworkInterface(n) => {
                let Ok(m) = self.running() else {
                    return Err(VmmError::NothingToChange);
                };
                if n.rx_rate_limiter.is_none() && n.tx_rate_limiter.is_none() {
                    return Err(VmmError::NothingToChange);
                }
                m.vm.patch_net(
                    &n.iface_id,
                    n.rx_rate_limiter.as_ref(),
                    n.tx_rate_limiter.as_ref(),
                )
                .map_err(vm_error)
            }
            VmmAction::PatchBalloon(b) => self
                .running()?
                .vm
                .patch_balloon(b.amount_mib)
                .map_err(|e| VmmError::Balloon(Box::new(e))),
            VmmAction::PatchBalloonStats(b) => self
                .running()?
                .vm
                .patch_balloon_stats(b.stats_polling_interval_s)
                .map_err(|e| VmmError::Balloon(Box::new(e))),
            VmmAction::ConfigureLogger(l) => {
                crate::logger::apply(l).map_err(|e| VmmError::Logger(e.to_string()))
            }
            VmmAction::ConfigureMetrics(m) => self.configure_metrics(Path::new(&m.metrics_path)),
            VmmAction::ConfigureVsock(v) => {
                if self.machine.is_some() {
                    return Err(VmmError::AlreadyRunning);
                }
                // A second PUT /vsock replaces the first: its socket goes before the new one
                // is bound (the same path would otherwise be "in use" by ourselves).
                self.vsock = None;
                let cfg = VsockConfig {
                    guest_cid: u64::from(v.guest_cid),
                    uds_path: PathBuf::from(&v.uds_path),
                };
                self.vsock = Some(
                    VsockListener::bind(&cfg).map_err(|e| VmmError::VsockSocket(Box::new(e)))?,
                );
                Ok(())
            }
        }
    }

    /// Looks up what `query` asks for in the running microVM.
    pub fn query(&self, query: VmmQuery) -> Result<QueryAnswer, VmmError> {
        match query {
            VmmQuery::BalloonStats => self
                .running()?
                .vm
                .balloon_stats()
                .map(QueryAnswer::BalloonStats)
                .map_err(|e| VmmError::BalloonQuery(Box::new(e))),
        }
    }

    /// Opens the metrics destination `path` (`PUT /metrics`): a refusal changes nothing.
    pub fn configure_metrics(&mut self, path: &Path) -> Result<(), VmmError> {
        let f = open_sink(path).map_err(|source| VmmError::Io {
            what: "metrics.metrics_path: cannot open",
            path: path.to_path_buf(),
            source,
        })?;
        self.sink = Some((path.to_path_buf(), f));
        Ok(())
    }

    /// Appends one metrics line to `path` (opened on first use, or when the path changes), with
    /// the running microVM's device sections.
    pub fn flush_metrics(&mut self, path: &Path) -> Result<(), VmmError> {
        let sink = match &mut self.sink {
            Some((open, f)) if open == path => f,
            slot => {
                let f = open_sink(path).map_err(|source| VmmError::Io {
                    what: "cannot open metrics path",
                    path: path.to_path_buf(),
                    source,
                })?;
                &mut slot.insert((path.to_path_buf(), f)).1
            }
        };
        let devices = self
            .machine
            .as_ref()
            .map(|m| m.vm.device_metrics())
            .unwrap_or_default();
        self.metrics
            .flush_to(sink, &devices)
            .map_err(|source| VmmError::Io {
                what: "cannot write metrics to",
                path: path.to_path_buf(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use api::adapter::action_response;
    use api::model::{PartialDrive, PartialNetworkInterface};
    use devices::i8042::I8042Error;

    use super::*;

    /// What the fakes were asked to do, in order.
    type Calls = Rc<RefCell<Vec<&'static str>>>;

    /// A VM without KVM: records calls; refuses Ctrl+Alt+Del unless `keyboard`; knows `drives`.
    struct FakeVm {
        calls: Calls,
        keyboard: bool,
        stuck: bool,
        drives: Vec<&'static str>,
    }

    impl MicroVm for FakeVm {
        fn pause(&self) -> Result<(), VmError> {
            self.calls.borrow_mut().push("vcpus pause");
            if self.stuck {
                return Err(VmError::Os {
                    what: "pausing the vCPUs",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "vCPUs did not park within 5 s",
                    ),
                });
            }
            Ok(())
        }
        fn resume(&self) {
            self.calls.borrow_mut().push("vcpus resume");
        }
        fn send_ctrl_alt_del(&self) -> Result<(), CtrlAltDelError> {
            self.calls.borrow_mut().push("ctrl+alt+del");
            if self.keyboard {
                Ok(())
            } else {
                Err(CtrlAltDelError {
                    source: I8042Error::KeyboardDisabled {
                        ctr: 0x10,
                        scanning: true,
                    },
                })
            }
        }
        fn patch_drive(&self, id: &str, path: &Path) -> Result<(), PatchDriveError> {
            self.calls.borrow_mut().push("patch drive");
            if !self.drives.contains(&id) {
                return Err(PatchDriveError::NotFound(id.to_string()));
            }
            if !path.exists() {
                return Err(PatchDriveError::Backing {
                    id: id.to_string(),
                    source: devices::virtio::block::BlockError::ImageNotFound(path.into()),
                });
            }
            Ok(())
        }
        fn patch_net(
            &self,
            id: &str,
            _rx: Option<&RateLimiter>,
            _tx: Option<&RateLimiter>,
        ) -> Result<(), PatchNetError> {
            self.calls.borrow_mut().push("patch net");
            if id != "eth0" {
                return Err(PatchNetError::NotFound(id.to_string()));
            }
            Ok(())
        }
        fn patch_drive_limiter(
            &self,
            id: &str,
            _limiter: &RateLimiter,
        ) -> Result<(), PatchDriveError> {
            self.calls.borrow_mut().push("patch drive limiter");
            if !self.drives.contains(&id) {
                return Err(PatchDriveError::NotFound(id.to_string()));
            }
            Ok(())
        }
        fn device_metrics(&self) -> Vec<(String, Value)> {
            vec![("block_d1".into(), serde_json::json!({"reads": 7}))]
        }
        fn snapshot_create(
            &self,
            _params: &api::model::SnapshotCreateParams,
        ) -> Result<(), crate::snapshot::SnapshotError> {
            self.calls.borrow_mut().push("snapshot create");
            Ok(())
        }
    }

    struct FakeDevices(Calls);

    impl Parkable for FakeDevices {
        fn pause(&self) -> Result<(), VmError> {
            self.0.borrow_mut().push("devices pause");
            Ok(())
        }
        fn resume(&self) {
            self.0.borrow_mut().push("devices resume");
        }
    }

    type Fake = Executor<FakeVm, FakeDevices>;

    fn fake_machine(calls: &Calls) -> Machine<FakeVm, FakeDevices> {
        Machine {
            vm: FakeVm {
                calls: calls.clone(),
                keyboard: false,
                stuck: false,
                drives: vec!["d1"],
            },
            devices: FakeDevices(calls.clone()),
        }
    }

    /// An executor whose microVM is started, and the calls its fakes see.
    fn started() -> (Fake, Calls) {
        let calls = Calls::default();
        let mut x = Fake::new(Arc::new(Metrics::default()));
        x.start(|_| Ok(fake_machine(&calls))).unwrap();
        (x, calls)
    }

    fn no_launch(_: Option<VsockListener>) -> Result<Machine<FakeVm, FakeDevices>, VmError> {
        panic!("only Start builds a microVM")
    }

    /// Runs `action` and answers it as the API does: (status, fault_message).
    fn run(x: &mut Fake, action: VmmAction, metrics: Option<&Path>) -> (u16, Option<String>) {
        let r = action_response(&action, x.execute(&action, metrics, no_launch));
        (r.status, r.fault_message())
    }

    fn patch(id: &str, path: Option<&str>) -> VmmAction {
        VmmAction::PatchDrive(PartialDrive {
            drive_id: id.into(),
            path_on_host: path.map(String::from),
            rate_limiter: None,
        })
    }

    fn refused(msg: &str) -> (u16, Option<String>) {
        (400, Some(msg.to_string()))
    }

    #[test]
    fn pause_parks_vcpus_then_devices_and_resume_releases_devices_first() {
        let (mut x, calls) = started();
        assert_eq!(run(&mut x, VmmAction::Pause, None), (204, None));
        assert_eq!(*calls.borrow(), ["vcpus pause", "devices pause"]);
        calls.borrow_mut().clear();
        assert_eq!(run(&mut x, VmmAction::Resume, None), (204, None));
        assert_eq!(*calls.borrow(), ["devices resume", "vcpus resume"]);
    }

    #[test]
    fn vcpus_that_do_not_park_leave_the_devices_alone() {
        let (mut x, calls) = started();
        if let Some(m) = x.machine.as_mut() {
            m.vm.stuck = true;
        }
        assert_eq!(
            run(&mut x, VmmAction::Pause, None),
            refused("pausing the vCPUs: vCPUs did not park within 5 s")
        );
        assert_eq!(*calls.borrow(), ["vcpus pause"]);
    }

    #[test]
    fn ctrl_alt_del_refused_by_the_guest() {
        let (mut x, _) = started();
        assert_eq!(
            run(&mut x, VmmAction::SendCtrlAltDel, None),
            refused(
                "SendCtrlAltDel: the guest is not taking keyboard input (the guest has disabled \
                 its keyboard (i8042 command byte 0x10, scanning true): keys would be lost, try \
                 again later)"
            )
        );
        if let Some(m) = x.machine.as_mut() {
            m.vm.keyboard = true;
        }
        assert_eq!(run(&mut x, VmmAction::SendCtrlAltDel, None), (204, None));
    }

    #[test]
    fn drive_patches() {
        let (mut x, calls) = started();
        assert_eq!(
            run(&mut x, patch("nosuch", Some("/x")), None),
            refused("PATCH /drives/nosuch: drive nosuch does not exist")
        );
        assert_eq!(
            run(&mut x, patch("d1", Some("/nonexistent/img")), None),
            refused(
                "PATCH /drives/d1: drive d1: block image /nonexistent/img does not exist: \
                 check the path"
            )
        );
        assert_eq!(run(&mut x, patch("d1", Some("/")), None), (204, None));
        calls.borrow_mut().clear();
        // Refused before the VM is asked.
        assert_eq!(
            run(&mut x, patch("d1", None), None),
            refused("PATCH /drives/d1: nothing to change")
        );
        let limited = VmmAction::PatchDrive(PartialDrive {
            drive_id: "d1".into(),
            path_on_host: Some("/".into()),
            rate_limiter: Some(RateLimiter::default()),
        });
        assert_eq!(run(&mut x, limited, None), (204, None));
        assert_eq!(
            *calls.borrow(),
            vec!["patch drive", "patch drive limiter"],
            "the image, then the limiter"
        );
        calls.borrow_mut().clear();
        let iface = VmmAction::PatchNetworkInterface(PartialNetworkInterface {
            iface_id: "eth0".into(),
            ..Default::default()
        });
        assert_eq!(
            run(&mut x, iface, None),
            refused("PATCH /network-interfaces/eth0: nothing to change")
        );
        assert!(calls.borrow().is_empty());
        let iface = VmmAction::PatchNetworkInterface(PartialNetworkInterface {
            iface_id: "eth0".into(),
            tx_rate_limiter: Some(RateLimiter::default()),
            ..Default::default()
        });
        assert_eq!(run(&mut x, iface, None), (204, None));
        assert_eq!(*calls.borrow(), vec!["patch net"]);
    }

    #[test]
    fn flush_metrics() {
        let (mut x, _) = started();
        assert_eq!(
            run(&mut x, VmmAction::FlushMetrics, None),
            refused("FlushMetrics: metrics are not configured")
        );
        let bad = Path::new("/nonexistent/cinder/metrics.json");
        assert_eq!(
            run(&mut x, VmmAction::FlushMetrics, Some(bad)),
            refused(
                "FlushMetrics: cannot open metrics path /nonexistent/cinder/metrics.json: \
                 No such file or directory (os error 2)"
            )
        );
        let dir = std::env::temp_dir().join(format!("cinder-actions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.json");
        for _ in 0..2 {
            assert_eq!(
                run(&mut x, VmmAction::FlushMetrics, Some(&path)),
                (204, None)
            );
        }
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text.lines().count(), 2);
        let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["block_d1"]["reads"], 7, "the VM's device sections");
        assert_eq!(last["metrics"]["flushes"], 2);
    }

    #[test]
    fn actions_before_start() {
        let calls = Calls::default();
        let mut x = Fake::new(Arc::new(Metrics::default()));
        let not_running = refused("the microVM is not running");
        assert_eq!(run(&mut x, VmmAction::Pause, None), not_running);
        assert_eq!(run(&mut x, VmmAction::Resume, None), not_running);
        assert_eq!(
            run(&mut x, VmmAction::SendCtrlAltDel, None),
            refused("SendCtrlAltDel: the microVM is not running")
        );
        assert_eq!(
            run(&mut x, patch("d1", Some("/")), None),
            refused("PATCH /drives/d1: nothing to change")
        );
        // FlushMetrics needs no VM: no device sections then.
        let dir = std::env::temp_dir().join(format!("cinder-actions-pre-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.json");
        assert_eq!(
            run(&mut x, VmmAction::FlushMetrics, Some(&path)),
            (204, None)
        );
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!text.contains("block_d1"), "{text}");

        // Start: a failed build leaves nothing started; the second start is refused without
        // building.
        let start = VmmAction::Start;
        let r = x.execute(&start, None, |_| Err(VmError::NoBootSource));
        assert_eq!(
            action_response(&start, r).fault_message().as_deref(),
            Some("InstanceStart: no boot source: configure boot-source (kernel_image_path)")
        );
        let r = x.execute(&start, None, |_| Err(VmError::NoMemory));
        assert_eq!(
            action_response(&start, r).fault_message().as_deref(),
            Some("InstanceStart failed: --memory 0: the guest needs memory")
        );
        assert!(x.machine.is_none());
        assert!(x
            .execute(&start, None, |_| Ok(fake_machine(&calls)))
            .is_ok());
        let r = x.execute(&start, None, no_launch);
        assert_eq!(
            action_response(&start, r).fault_message().as_deref(),
            Some("InstanceStart failed: the microVM is already running")
        );
        assert_eq!(run(&mut x, VmmAction::Pause, None), (204, None));
        assert!(x.take_machine().is_some());
        assert_eq!(run(&mut x, VmmAction::Resume, None), not_running);
    }
}
