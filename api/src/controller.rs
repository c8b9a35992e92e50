//! [`PreBootController`]: a pure state machine answering every request that
//! only touches the configuration, so the VMM implements only what needs a
//! running VM (InstanceStart, pause/resume, Ctrl+Alt+Del, flushing metrics,
//! live drive/interface updates).

use crate::config::VmConfig;
use crate::model::{ActionType, FirecrackerVersion, InstanceInfo, InstanceState};
use crate::routes::{ApiRequest, ApiResponse};

/// What the VMM must do with a request after the controller saw it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Send this answer; nothing else to do.
    Respond(ApiResponse),
    /// `InstanceStart` on a bootable configuration: boot from
    /// [`PreBootController::config`], call [`PreBootController::mark_started`]
    /// on success, and answer 204 (or the boot error as 400).
    Start,
    /// A request only the VMM can carry out (FlushMetrics, SendCtrlAltDel,
    /// PATCH /vm, PATCH drive or interface after boot). It was checked
    /// against the configuration; the VMM executes and answers it, and on
    /// success records a drive/interface patch with
    /// [`VmConfig::patch_drive`] / [`VmConfig::patch_net`] through
    /// [`PreBootController::config_mut`].
    Forward(ApiRequest),
}

/// Applies configuration requests to a [`VmConfig`] and enforces
/// Firecracker's before/after-boot rules.
#[derive(Debug, Clone)]
pub struct PreBootController {
    config: VmConfig,
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

    /// Records a successful boot.
    pub fn mark_started(&mut self) {
        self.info.state = InstanceState::Running;
    }

    /// Records a pause or resume done by the VMM.
    pub fn set_state(&mut self, state: InstanceState) {
        self.info.state = state;
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
                firecracker_version: self.version.clone(),
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
            ApiRequest::PutVsock(v) => applied(self.config.set_vsock(&v)),
            ApiRequest::PutEntropy(e) => {
                self.config.set_entropy(&e);
                Outcome::Respond(ApiResponse::no_content())
            }
            ApiRequest::PutLogger(l) => {
                self.config.logger = Some(l);
                Outcome::Respond(ApiResponse::no_content())
            }
            ApiRequest::PutMetrics(m) => {
                if self.config.metrics.is_some() {
                    return Outcome::Respond(ApiResponse::bad_request(
                        "metrics: already configured; the metrics destination can be set only once",
                    ));
                }
                applied(self.config.set_metrics(&m))
            }
            ApiRequest::Action(ActionType::InstanceStart) => {
                if self.config.boot_source.is_none() {
                    return Outcome::Respond(ApiResponse::bad_request(
                        "InstanceStart: boot-source is not configured; PUT /boot-source first",
                    ));
                }
                match self.config.validate() {
                    Ok(()) => Outcome::Start,
                    Err(e) => Outcome::Respond(ApiResponse::bad_request(e.to_string())),
                }
            }
            ApiRequest::Action(ActionType::FlushMetrics) if self.config.metrics.is_none() => {
                Outcome::Respond(ApiResponse::bad_request(
                    "FlushMetrics: metrics are not configured; PUT /metrics first",
                ))
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
            other => Outcome::Forward(other),
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
        ApiRequest::PutMetrics(_) => "PUT /metrics",
        ApiRequest::Action(ActionType::InstanceStart) => "InstanceStart",
        ApiRequest::Action(ActionType::SendCtrlAltDel) => "SendCtrlAltDel",
        ApiRequest::Action(ActionType::FlushMetrics) => "FlushMetrics",
        ApiRequest::PatchVm(_) => "PATCH /vm",
        ApiRequest::GetVmConfig => "GET /vm/config",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BootSource, PartialDrive, VmState};

    #[test]
    fn lifecycle() {
        let mut c = PreBootController::new(VmConfig::default(), "id", "1");
        let start = ApiRequest::Action(ActionType::InstanceStart);
        assert!(matches!(c.handle(start.clone()), Outcome::Respond(r) if r.status == 400));
        let boot = BootSource {
            kernel_image_path: "/k".into(),
            ..Default::default()
        };
        assert_eq!(
            c.handle(ApiRequest::PutBootSource(boot)),
            Outcome::Respond(ApiResponse::no_content())
        );
        assert_eq!(c.handle(start.clone()), Outcome::Start);
        c.mark_started();
        assert!(matches!(c.handle(start), Outcome::Respond(r) if r.status == 400));
        let pause = ApiRequest::PatchVm(VmState::Paused);
        assert_eq!(c.handle(pause.clone()), Outcome::Forward(pause));
        let patch = ApiRequest::PatchDrive(PartialDrive {
            drive_id: "nope".into(),
            ..Default::default()
        });
        assert!(matches!(c.handle(patch), Outcome::Respond(r) if r.status == 400));
        let flush = ApiRequest::Action(ActionType::FlushMetrics);
        assert!(matches!(c.handle(flush), Outcome::Respond(r) if r.status == 400));
    }
}
