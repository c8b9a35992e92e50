//! [`PreBootController`]: a pure state machine answering every request that
//! only touches the configuration, so the VMM implements only what needs a
//! running VM (InstanceStart, pause/resume, Ctrl+Alt+Del, flushing metrics,
//! live drive/interface updates), as a [`VmmAction`]. It owns the instance
//! state (`Not started` / `Running` / `Paused`): the VMM reports each
//! action's result to [`PreBootController::complete`], which records what a
//! success changed and answers.

use crate::adapter::{action_response, query_response, QueryAnswer, VmmAction, VmmError, VmmQuery};
use crate::config::{ConfigError, VmConfig};
use crate::model::{ActionType, FirecrackerVersion, InstanceInfo, InstanceState, VmState};
use crate::routes::{ApiRequest, ApiResponse};

/// What the VMM must do with a request after the controller saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Send this answer; nothing else to do.
    Respond(ApiResponse),
    /// A request only the VMM can carry out, checked against the
    /// configuration and the lifecycle: the VMM executes the action and
    /// hands its result to [`PreBootController::complete`], which answers.
    Execute(VmmAction),
    /// A request that reads the running microVM's state: the VMM looks it up and hands the
    /// result to [`PreBootController::answer`].
    Query(VmmQuery),
}

/// Applies configuration requests to a [`VmConfig`] and enforces
/// Firecracker's before/after-boot rules.
#[derive(Debug, Clone)]
pub struct PreBootController {
    config: VmConfig,
    /// The configuration before any request: `PUT /snapshot/load` only on this one.
    initial: VmConfig,
    info: InstanceInfo,
    version: String,
}

const BEFORE_BOOT: &str = "The requested operation is not supported before starting the microVM";
const AFTER_BOOT: &str = "The requested operation is not supported after starting the microVM";

impl PreBootController {
    /// A controller for a microVM that has not started, with the initial
    /// configuration (from the CLI or config file, or the default).
    pub fn new(config: VmConfig, id: impl Into<String>, version: impl Into<String>) -> Self {
        let version = version.into();
        PreBootController {
            initial: config.clone(),
            config,
            info: InstanceInfo {
                app_name: "cinder".to_string(),
                id: id.into(),
                state: InstanceState::NotStarted,
                vmm_version: version.clone(),
            },
            version,
        }
    }

    /// The configuration built so far.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Mutable access, for the VMM to record runtime changes.
    pub fn config_mut(&mut self) -> &mut VmConfig {
        &mut self.config
    }

    /// Consumes the controller.
    pub fn into_config(self) -> VmConfig {
        self.config
    }

    /// Current state, as `GET /` reports it.
    pub fn state(&self) -> InstanceState {
        self.info.state
    }

    /// Whether `InstanceStart` succeeded.
    pub fn is_started(&self) -> bool {
        self.info.state != InstanceState::NotStarted
    }

    /// Records a microVM restored from a snapshot outside the API (`--restore`), with the
    /// configuration it was built from.
    pub fn mark_restored(&mut self, config: VmConfig, paused: bool) {
        self.config = config;
        self.info.state = if paused {
            InstanceState::Paused
        } else {
            InstanceState::Running
        };
    }

    /// Records a successful boot.
    pub fn mark_started(&mut self) {
        self.info.state = InstanceState::Running;
    }

    /// Records what `action` changed when it succeeded (the instance state,
    /// a patched drive or interface) and answers the request: 204, or the
    /// VMM's error as [`action_response`] maps it.
    pub fn complete(&mut self, action: VmmAction, result: Result<(), VmmError>) -> ApiResponse {
        if result.is_ok() {
            match &action {
                VmmAction::Start | VmmAction::Resume => self.info.state = InstanceState::Running,
                VmmAction::Pause => self.info.state = InstanceState::Paused,
                VmmAction::PatchDrive(d) => {
                    if let Err(e) = self.config.patch_drive(d) {
                        log::warn!("drive {} changed but not recorded: {e}", d.drive_id);
                    }
                }
                VmmAction::PatchNetworkInterface(n) => {
                    if let Err(e) = self.config.patch_net(n) {
                        log::warn!("interface {} changed but not recorded: {e}", n.iface_id);
                    }
                }
                // Recorded only once applied: a refused PUT /logger changes nothing.
                VmmAction::ConfigureLogger(l) => self.config.logger = Some(l.clone()),
                VmmAction::ConfigureVsock(v) => {
                    if let Err(e) = self.config.set_vsock(v) {
                        log::warn!("vsock socket bound but not recorded: {e}");
                    }
                }
                VmmAction::ConfigureMetrics(m) => {
                    if let Err(e) = self.config.set_metrics(m) {
                        log::warn!("metrics destination opened but not recorded: {e}");
                    }
                }
                VmmAction::LoadSnapshot(l) => {
                    self.info.state = if l.resume_vm.unwrap_or(false) {
                        InstanceState::Running
                    } else {
                        InstanceState::Paused
                    }
                }
                VmmAction::PatchBalloon(b) => {
                    if let Err(e) = self.config.patch_balloon(b.amount_mib) {
                        log::warn!("balloon target changed but not recorded: {e}");
                    }
                }
                VmmAction::PatchBalloonStats(b) => {
                    if let Err(e) = self.config.patch_balloon_stats(b.stats_polling_interval_s) {
                        log::warn!("balloon statistics interval changed but not recorded: {e}");
                    }
                }
                VmmAction::FlushMetrics
                | VmmAction::SendCtrlAltDel
                | VmmAction::CreateSnapshot(_) => {}
            }
        }
        action_response(&action, result)
    }

    /// Answers a [`VmmQuery`] with what the VMM found.
    pub fn answer(&self, _query: VmmQuery, result: Result<QueryAnswer, VmmError>) -> ApiResponse {
        query_response(result)
    }

    /// Handles one request.
    pub fn handle(&mut self, req: ApiRequest) -> Outcome {
        let started = self.is_started();
        if !started && !req.allowed_before_boot() {
            return Outcome::Respond(ApiResponse::bad_request(format!(
                "{BEFORE_BOOT}: {}",
                describe(&req)
            )));
        }
        if started && !req.allowed_after_boot() {
            return Outcome::Respond(ApiResponse::bad_request(format!(
                "{AFTER_BOOT}: {}",
                describe(&req)
            )));
        }
        let applied = |r: Result<(), crate::config::ConfigError>| match r {
            Ok(()) => Outcome::Respond(ApiResponse::no_content()),
            Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
        };
        match req {
            ApiRequest::GetInstanceInfo => Outcome::Respond(ApiResponse::ok(&self.info)),
            ApiRequest::GetVersion => Outcome::Respond(ApiResponse::ok(&FirecrackerVersion {
                firecracker_version: crate::model::FIRECRACKER_API_VERSION.to_string(),
                cinder_version: Some(self.version.clone()),
            })),
            ApiRequest::GetMachineConfig => {
                Outcome::Respond(ApiResponse::ok(&self.config.machine.to_model()))
            }
            ApiRequest::GetVmConfig => {
                Outcome::Respond(ApiResponse::ok(&self.config.to_full_config()))
            }
            ApiRequest::PutMachineConfig(m) => applied(self.config.set_machine_config(&m)),
            ApiRequest::PatchMachineConfig(m) => applied(self.config.update_machine_config(&m)),
            ApiRequest::PutBootSource(b) => applied(self.config.set_boot_source(&b)),
            ApiRequest::PutDrive(d) => applied(self.config.upsert_drive(&d)),
            ApiRequest::PutNetworkInterface(n) => applied(self.config.upsert_net(&n)),
            ApiRequest::PutVsock(v) => {
                // The configuration's rules first (on a copy: nothing changes on a refusal),
                // then the VMM binds the socket; `complete` records it once bound.
                match self.config.clone().set_vsock(&v) {
                    Ok(()) => Outcome::Execute(VmmAction::ConfigureVsock(v)),
                    Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
                }
            }
            ApiRequest::PutEntropy(e) => applied(self.config.set_entropy(&e)),
            ApiRequest::PutBalloon(b) => applied(self.config.set_balloon(&b)),
            ApiRequest::GetBalloon => Outcome::Respond(match &self.config.balloon {
                Some(b) => ApiResponse::ok(&b.to_model()),
                None => ApiResponse::bad_request(ConfigError::NoBalloon.to_string()),
            }),
            ApiRequest::PatchBalloon(u) => match self.config.clone().patch_balloon(u.amount_mib) {
                // The configuration's rules first (on a copy), then the device.
                Ok(()) => Outcome::Execute(VmmAction::PatchBalloon(u)),
                // Firecracker words a refused update so.
                Err(ConfigError::BalloonTooLarge {
                    amount_mib,
                    mem_size_mib,
                }) => Outcome::Respond(ApiResponse::bad_request(format!(
                    "Balloon update error: Balloon: Amount of pages requested is too large. \
                     (balloon.amount_mib {amount_mib} is above machine-config.mem_size_mib \
                     {mem_size_mib})"
                ))),
                Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
            },
            ApiRequest::PatchBalloonStats(u) => {
                match self
                    .config
                    .clone()
                    .patch_balloon_stats(u.stats_polling_interval_s)
                {
                    Ok(()) => Outcome::Execute(VmmAction::PatchBalloonStats(u)),
                    Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
                }
            }
            ApiRequest::GetBalloonStats => match &self.config.balloon {
                None => Outcome::Respond(ApiResponse::bad_request(
                    ConfigError::NoBalloon.to_string(),
                )),
                Some(b) if b.stats_polling_interval_s == 0 => {
                    Outcome::Respond(ApiResponse::bad_request(
                        "Internal VMM error: Balloon: Received stats query when stats are disabled.",
                    ))
                }
                Some(_) => Outcome::Query(VmmQuery::BalloonStats),
            },
            // Recorded by `complete` once the VMM applied it.
            ApiRequest::PutLogger(l) => {
                if let Some(p) = &l.log_path {
                    if let Err(e) = self
                        .config
                        .paths
                        .check_beneath("log file", std::path::Path::new(p))
                    {
                        return Outcome::Respond(ApiResponse::bad_request(format!(
                            "logger.log_path: {e}"
                        )));
                    }
                }
                Outcome::Execute(VmmAction::ConfigureLogger(l))
            }
            ApiRequest::PutMetrics(m) => {
                if self.config.metrics.is_some() {
                    return Outcome::Respond(ApiResponse::bad_request(
                        "metrics: already configured; the metrics destination can be set only once",
                    ));
                }
                // The rules first (on a copy), then the VMM opens the destination now, as
                // Firecracker does: one that cannot be opened is a 400 that records nothing,
                // so a corrected PUT /metrics is taken. `complete` records it once open.
                match self.config.clone().set_metrics(&m) {
                    Ok(()) => Outcome::Execute(VmmAction::ConfigureMetrics(m)),
                    Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
                }
            }
            ApiRequest::Action(ActionType::InstanceStart) => {
                if self.config.boot_source.is_none() {
                    return Outcome::Respond(ApiResponse::bad_request(
                        "InstanceStart: boot-source is not configured; PUT /boot-source first",
                    ));
                }
                match self.config.validate() {
                    Ok(()) => Outcome::Execute(VmmAction::Start),
                    Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
                }
            }
            ApiRequest::Action(ActionType::FlushMetrics) if self.config.metrics.is_none() => {
                // Nothing to flush: 204, as Firecracker answers.
                Outcome::Respond(ApiResponse::no_content())
            }
            ApiRequest::PatchDrive(ref p)
                if !self.config.drives.iter().any(|d| d.drive_id == p.drive_id) =>
            {
                Outcome::Respond(ApiResponse::bad_request(format!(
                    "drive_id: `{}` is not configured",
                    p.drive_id
                )))
            }
            ApiRequest::PatchNetworkInterface(ref p)
                if !self.config.net.iter().any(|n| n.iface_id == p.iface_id) =>
            {
                Outcome::Respond(ApiResponse::bad_request(format!(
                    "iface_id: `{}` is not configured",
                    p.iface_id
                )))
            }
            ApiRequest::Action(ActionType::FlushMetrics) => {
                Outcome::Execute(VmmAction::FlushMetrics)
            }
            ApiRequest::Action(ActionType::SendCtrlAltDel) => {
                Outcome::Execute(VmmAction::SendCtrlAltDel)
            }
            ApiRequest::CreateSnapshot(c) => {
                if self.info.state != InstanceState::Paused {
                    return Outcome::Respond(ApiResponse::bad_request(
                        "snapshot/create: the microVM must be Paused (PATCH /vm {\"state\": \"Paused\"})",
                    ));
                }
                if c.snapshot_path.is_empty() || c.mem_file_path.is_empty() {
                    return Outcome::Respond(ApiResponse::bad_request(
                        "snapshot/create: snapshot_path and mem_file_path must not be empty",
                    ));
                }
                Outcome::Execute(VmmAction::CreateSnapshot(c))
            }
            ApiRequest::LoadSnapshot(l) => {
                if self.config != self.initial {
                    return Outcome::Respond(ApiResponse::bad_request(
                        "snapshot/load: loading a snapshot is not allowed after configuring the microVM",
                    ));
                }
                if let Err(e) = l.memory() {
                    return Outcome::Respond(ApiResponse::bad_request(e));
                }
                Outcome::Execute(VmmAction::LoadSnapshot(l))
            }
            ApiRequest::PatchVm(VmState::Paused) => Outcome::Execute(VmmAction::Pause),
            ApiRequest::PatchVm(VmState::Resumed) => Outcome::Execute(VmmAction::Resume),
            ApiRequest::PatchDrive(p) => match self.config.clone().patch_drive(&p) {
                // The configuration's rules first (on a copy), then the VMM opens the image.
                Ok(()) => Outcome::Execute(VmmAction::PatchDrive(p)),
                Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
            },
            ApiRequest::PatchNetworkInterface(p) => match self.config.clone().patch_net(&p) {
                // The configuration's rules first (on a copy), then the VMM.
                Ok(()) => Outcome::Execute(VmmAction::PatchNetworkInterface(p)),
                Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
            },
        }
    }
}

/// `METHOD /path` of a request, for messages.
pub fn describe(req: &ApiRequest) -> &'static str {
    match req {
        ApiRequest::GetInstanceInfo => "GET /",
        ApiRequest::GetVersion => "GET /version",
        ApiRequest::GetMachineConfig => "GET /machine-config",
        ApiRequest::PutMachineConfig(_) => "PUT /machine-config",
        ApiRequest::PatchMachineConfig(_) => "PATCH /machine-config",
        ApiRequest::PutBootSource(_) => "PUT /boot-source",
        ApiRequest::PutDrive(_) => "PUT /drives",
        ApiRequest::PatchDrive(_) => "PATCH /drives",
        ApiRequest::PutNetworkInterface(_) => "PUT /network-interfaces",
        ApiRequest::PatchNetworkInterface(_) => "PATCH /network-interfaces",
        ApiRequest::PutVsock(_) => "PUT /vsock",
        ApiRequest::PutEntropy(_) => "PUT /entropy",
        ApiRequest::PutLogger(_) => "PUT /logger",
        ApiRequest::GetBalloon => "GET /balloon",
        ApiRequest::PutBalloon(_) => "PUT /balloon",
        ApiRequest::PatchBalloon(_) => "PATCH /balloon",
        ApiRequest::GetBalloonStats => "GET /balloon/statistics",
        ApiRequest::PatchBalloonStats(_) => "PATCH /balloon/statistics",
        ApiRequest::PutMetrics(_) => "PUT /metrics",
        ApiRequest::Action(ActionType::InstanceStart) => "InstanceStart",
        ApiRequest::Action(ActionType::SendCtrlAltDel) => "SendCtrlAltDel",
        ApiRequest::Action(ActionType::FlushMetrics) => "FlushMetrics",
        ApiRequest::PatchVm(_) => "PATCH /vm",
        ApiRequest::GetVmConfig => "GET /vm/config",
        ApiRequest::CreateSnapshot(_) => "PUT /snapshot/create",
        ApiRequest::LoadSnapshot(_) => "PUT /snapshot/load",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BootSource, Drive, PartialDrive, VmState};

    fn unchecked() -> VmConfig {
        VmConfig::with_paths(crate::paths::PathPolicy::UNCHECKED)
    }

    fn booted() -> PreBootController {
        let mut c = PreBootController::new(unchecked(), "id", "1");
        let boot = BootSource {
            kernel_image_path: "/k".into(),
            ..Default::default()
        };
        assert_eq!(
            c.handle(ApiRequest::PutBootSource(boot)),
            Outcome::Respond(ApiResponse::no_content())
        );
        c
    }

    #[test]
    fn lifecycle() {
        let mut c = PreBootController::new(unchecked(), "id", "1");
        let start = ApiRequest::Action(ActionType::InstanceStart);
        assert!(matches!(c.handle(start.clone()), Outcome::Respond(r) if r.status == 400));
        let mut c = booted();
        assert_eq!(c.handle(start.clone()), Outcome::Execute(VmmAction::Start));
        // A failed boot leaves the microVM not started.
        let r = c.complete(VmmAction::Start, Err(VmmError::Boot("no kvm".into())));
        assert_eq!(r.status, 400);
        assert_eq!(
            r.fault_message().as_deref(),
            Some("InstanceStart failed: no kvm")
        );
        assert_eq!(c.state(), InstanceState::NotStarted);
        assert_eq!(
            c.complete(VmmAction::Start, Ok(())),
            ApiResponse::no_content()
        );
        assert_eq!(c.state(), InstanceState::Running);
        assert!(matches!(c.handle(start), Outcome::Respond(r) if r.status == 400));
        let pause = ApiRequest::PatchVm(VmState::Paused);
        assert_eq!(c.handle(pause), Outcome::Execute(VmmAction::Pause));
        c.complete(VmmAction::Pause, Ok(()));
        assert_eq!(c.state(), InstanceState::Paused);
        // A failed resume leaves it paused.
        c.complete(VmmAction::Resume, Err(VmmError::Vm("stuck".into())));
        assert_eq!(c.state(), InstanceState::Paused);
        let resume = ApiRequest::PatchVm(VmState::Resumed);
        assert_eq!(c.handle(resume), Outcome::Execute(VmmAction::Resume));
        c.complete(VmmAction::Resume, Ok(()));
        assert_eq!(c.state(), InstanceState::Running);
        let patch = ApiRequest::PatchDrive(PartialDrive {
            drive_id: "nope".into(),
            ..Default::default()
        });
        assert!(matches!(c.handle(patch), Outcome::Respond(r) if r.status == 400));
        let flush = ApiRequest::Action(ActionType::FlushMetrics);
        assert!(matches!(c.handle(flush), Outcome::Respond(r) if r.status == 204));
    }

    /// The balloon's before/after-boot rules, and a PATCH recorded only once applied.
    #[test]
    fn balloon_rules() {
        use crate::model::{Balloon, BalloonStatsUpdate, BalloonUpdate};
        let mut c = booted();
        let b = Balloon {
            amount_mib: 16,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            ..Default::default()
        };
        assert_eq!(
            c.handle(ApiRequest::PutBalloon(b)),
            Outcome::Respond(ApiResponse::no_content())
        );
        assert!(matches!(c.handle(ApiRequest::GetBalloon), Outcome::Respond(r) if r.status == 200));
        assert!(matches!(
            c.handle(ApiRequest::GetBalloonStats),
            Outcome::Respond(r) if r.status == 400
        ));
        c.mark_started();
        assert!(matches!(
            c.handle(ApiRequest::PutBalloon(b)),
            Outcome::Respond(r) if r.status == 400
        ));
        assert_eq!(
            c.handle(ApiRequest::GetBalloonStats),
            Outcome::Query(VmmQuery::BalloonStats)
        );
        let to = BalloonUpdate { amount_mib: 32 };
        let Outcome::Execute(action) = c.handle(ApiRequest::PatchBalloon(to)) else {
            panic!("PATCH /balloon goes to the VMM");
        };
        let r = c.complete(
            action.clone(),
            Err(VmmError::Balloon("Device not activated yet.".into())),
        );
        assert_eq!(
            r.fault_message().as_deref(),
            Some("Balloon update error: Balloon: Device not activated yet.")
        );
        assert_eq!(c.config().balloon.map(|b| b.amount_mib), Some(16));
        c.complete(action, Ok(()));
        assert_eq!(c.config().balloon.map(|b| b.amount_mib), Some(32));
        let off = BalloonStatsUpdate {
            stats_polling_interval_s: 0,
        };
        assert!(matches!(
            c.handle(ApiRequest::PatchBalloonStats(off)),
            Outcome::Respond(r) if r.status == 400
        ));
        let big = BalloonUpdate { amount_mib: 4096 };
        assert!(matches!(
            c.handle(ApiRequest::PatchBalloon(big)),
            Outcome::Respond(r) if r.status == 400
        ));
    }

    #[test]
    fn a_refused_metrics_path_changes_nothing_and_can_be_corrected() {
        let mut c = booted();
        let m = |p: &str| crate::model::Metrics {
            metrics_path: p.into(),
        };
        let Outcome::Execute(action) = c.handle(ApiRequest::PutMetrics(m("/no/dir/m"))) else {
            panic!("PUT /metrics goes to the VMM, which opens the destination");
        };
        let r = c.complete(
            action,
            Err(VmmError::Io {
                what: "metrics.metrics_path: cannot open",
                path: "/no/dir/m".into(),
                source: std::io::ErrorKind::NotFound.into(),
            }),
        );
        assert_eq!(r.status, 400);
        assert_eq!(
            r.fault_message().as_deref(),
            Some("metrics.metrics_path: cannot open /no/dir/m: entity not found")
        );
        assert_eq!(
            c.config().metrics,
            None,
            "the refused metrics path was recorded"
        );
        let Outcome::Execute(action) = c.handle(ApiRequest::PutMetrics(m("/m"))) else {
            panic!("the corrected PUT /metrics was refused");
        };
        assert_eq!(c.complete(action, Ok(())), ApiResponse::no_content());
        assert_eq!(c.config().metrics, Some(m("/m")));
        // Once set, it stays set (as in Firecracker).
        assert!(matches!(
            c.handle(ApiRequest::PutMetrics(m("/other"))),
            Outcome::Respond(r) if r.status == 400
        ));
    }

    #[test]
    fn a_refused_logger_changes_nothing() {
        let mut c = booted();
        let bad = crate::model::Logger {
            log_path: Some("/nonexistent/dir/log".into()),
            ..Default::default()
        };
        let Outcome::Execute(action) = c.handle(ApiRequest::PutLogger(bad)) else {
            panic!("PUT /logger goes to the VMM");
        };
        let r = c.complete(action, Err(VmmError::Logger("cannot open it".into())));
        assert_eq!(r.status, 400);
        assert_eq!(c.config().logger, None, "the refused logger was recorded");
        let good = crate::model::Logger::default();
        let Outcome::Execute(action) = c.handle(ApiRequest::PutLogger(good.clone())) else {
            panic!("PUT /logger goes to the VMM");
        };
        assert_eq!(c.complete(action, Ok(())), ApiResponse::no_content());
        assert_eq!(c.config().logger, Some(good));
    }

    #[test]
    fn a_drive_patch_is_recorded_only_when_it_succeeded() {
        let mut c = booted();
        let drive = Drive {
            drive_id: "d1".into(),
            path_on_host: Some("/a.img".into()),
            ..Default::default()
        };
        assert_eq!(
            c.handle(ApiRequest::PutDrive(drive)),
            Outcome::Respond(ApiResponse::no_content())
        );
        c.mark_started();
        let to = |p: &str| PartialDrive {
            drive_id: "d1".into(),
            path_on_host: Some(p.into()),
            ..Default::default()
        };
        let req = ApiRequest::PatchDrive(to("/b.img"));
        let Outcome::Execute(action) = c.handle(req) else {
            panic!("a patch of a configured drive goes to the VMM");
        };
        assert_eq!(action, VmmAction::PatchDrive(to("/b.img")));
        let r = c.complete(
            VmmAction::PatchDrive(to("/c.img")),
            Err(VmmError::Vm("drive d1: cannot open /c.img".into())),
        );
        assert_eq!(
            r.fault_message().as_deref(),
            Some("PATCH /drives/d1: drive d1: cannot open /c.img")
        );
        assert_eq!(
            c.config().drives[0].path_on_host,
            std::path::Path::new("/a.img")
        );
        assert_eq!(c.complete(action, Ok(())), ApiResponse::no_content());
        assert_eq!(
            c.config().drives[0].path_on_host,
            std::path::Path::new("/b.img")
        );
    }
}
