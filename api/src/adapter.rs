//! The adapter between the API and the VMM: what the VMM is asked to do once
//! [`crate::PreBootController`] let a request through ([`VmmAction`]), why
//! the VMM can fail to do it ([`VmmError`], a domain error that knows
//! nothing of HTTP), and the one place a VMM result becomes an HTTP answer
//! ([`action_response`]: status code and `fault_message`).
//!
//! The VMM (the `vmm` crate's runtime) executes actions and returns
//! `Result<(), VmmError>`; it never builds an [`ApiResponse`]. The
//! controller records what a successful action changed (the instance state,
//! a patched drive) and answers through [`action_response`].

use std::path::PathBuf;

use crate::model::{
    BalloonStats, BalloonStatsUpdate, BalloonUpdate, Logger, Metrics, PartialDrive,
    PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams, Vsock,
};
use crate::routes::ApiResponse;

/// Any error, as the VMM side reports it (its own error types are out of
/// this crate's reach); the source chain is kept.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the VMM carries out for a request the controller accepted.
#[derive(Debug, Clone, PartialEq)]
pub enum VmmAction {
    /// `InstanceStart` on a configuration that passed validation: build and
    /// boot the microVM from [`crate::PreBootController::config`].
    Start,
    /// `PATCH /vm` `Paused`: park the vCPUs, then the device loop.
    Pause,
    /// `PATCH /vm` `Resumed`: release the device loop, then the vCPUs.
    Resume,
    /// `FlushMetrics` (metrics are configured).
    FlushMetrics,
    /// `SendCtrlAltDel`: press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
    /// `PATCH /drives/{drive_id}` of a configured drive: a new backing image.
    PatchDrive(PartialDrive),
    /// `PATCH /network-interfaces/{iface_id}` of a configured interface.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /logger`: apply the logger configuration to the process.
    ConfigureLogger(Logger),
    /// `PUT /vsock` (already checked against the configuration's rules): bind its Unix socket
    /// now, as Firecracker does, so a client can wait for the socket before `InstanceStart`.
    ConfigureVsock(Vsock),
    /// `PUT /metrics` (checked against the configuration's rules, none configured yet): open
    /// the destination now, as Firecracker does, so a path that cannot be opened is refused at
    /// the `PUT` and can be corrected.
    ConfigureMetrics(Metrics),
    /// `PUT /snapshot/create` of a paused microVM.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load` before any configuration: build the microVM from the snapshot.
    LoadSnapshot(SnapshotLoadParams),
    /// `PATCH /balloon` (the balloon is configured, the target fits): the new target.
    PatchBalloon(BalloonUpdate),
    /// `PATCH /balloon/statistics` (the statistics stay on): the new polling interval.
    PatchBalloonStats(BalloonStatsUpdate),
}

/// What the VMM is asked to look up for a request that reads the running microVM's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmQuery {
    /// `GET /balloon/statistics` (statistics are enabled).
    BalloonStats,
}

/// What a [`VmmQuery`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryAnswer {
    /// The balloon's sizes and the guest's latest statistics.
    BalloonStats(BalloonStats),
}

/// The answer to a query: 200 with the value, or the error as [`action_response`] maps it.
pub fn query_response(result: Result<QueryAnswer, VmmError>) -> ApiResponse {
    match result {
        Ok(QueryAnswer::BalloonStats(s)) => ApiResponse::ok(&s),
        Err(e) => ApiResponse::error(e.status(), e.to_string()),
    }
}

/// Why the VMM could not carry out a [`VmmAction`]. The `Display` text is the
/// reason; [`action_response`] puts the request's name in front of it.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The action needs a running microVM and there is none yet.
    #[error("the microVM is not running")]
    NotRunning,
    /// `InstanceStart` on a microVM that already runs.
    #[error("the microVM is already running")]
    AlreadyRunning,
    /// A feature cinder lacks (a plural noun: "rate limiters").
    #[error("{0} are not supported by cinder yet")]
    NotSupported(&'static str),
    /// The request asks for no change the VMM can make.
    #[error("nothing to change")]
    NothingToChange,
    /// `FlushMetrics` with no metrics destination.
    #[error("metrics are not configured")]
    MetricsNotConfigured,
    /// The configuration cannot be booted (found while building the VM).
    #[error("{0}")]
    BootConfig(#[source] BoxError),
    /// Building or booting the microVM failed.
    #[error("{0}")]
    Boot(#[source] BoxError),
    /// The running microVM failed the operation (vCPUs or devices that did
    /// not park, a guest not taking keyboard input, a drive image that
    /// cannot be opened).
    #[error("{0}")]
    Vm(#[source] BoxError),
    /// A file the VMM writes or opens.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot open metrics path").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The logger configuration cannot be applied.
    #[error("{0}")]
    Logger(String),
    /// Creating or loading a snapshot failed.
    #[error("{0}")]
    Snapshot(#[source] BoxError),
    /// The vsock device's socket cannot be bound.
    #[error("vsock.uds_path: {0}")]
    VsockSocket(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The balloon device refused a runtime change ("Device not activated yet.").
    #[error("Balloon update error: Balloon: {0}")]
    Balloon(#[source] BoxError),
    /// The balloon device could not answer a query.
    #[error("Internal VMM error: Balloon: {0}")]
    BalloonQuery(#[source] BoxError),
}

impl VmmError {
    /// The HTTP status answering this error (400 for every VMM failure, as
    /// Firecracker).
    pub fn status(&self) -> u16 {
        match self {
            VmmError::NotRunning
            | VmmError::AlreadyRunning
            | VmmError::NotSupported(_)
            | VmmError::NothingToChange
            | VmmError::MetricsNotConfigured
            | VmmError::BootConfig(_)
            | VmmError::Boot(_)
            | VmmError::Vm(_)
            | VmmError::Io { .. }
            | VmmError::Logger(_)
            | VmmError::Snapshot(_)
            | VmmError::VsockSocket(_)
            | VmmError::Balloon(_)
            | VmmError::BalloonQuery(_) => 400,
        }
    }
}

/// The `fault_message` of `action` failing with `e`: the request's name,
/// then the reason (`PATCH /vm` and `PUT /logger` give the reason alone).
fn fault_message(action: &VmmAction, e: &VmmError) -> String {
    match action {
        VmmAction::Start => match e {
            VmmError::BootConfig(_) => format!("InstanceStart: {e}"),
            _ => format!("InstanceStart failed: {e}"),
        },
        VmmAction::Pause
        | VmmAction::Resume
        | VmmAction::ConfigureLogger(_)
        | VmmAction::ConfigureVsock(_)
        | VmmAction::ConfigureMetrics(_)
        | VmmAction::PatchBalloon(_)
        | VmmAction::PatchBalloonStats(_) => e.to_string(),
        VmmAction::FlushMetrics => format!("FlushMetrics: {e}"),
        VmmAction::CreateSnapshot(_) => format!("snapshot/create: {e}"),
        VmmAction::LoadSnapshot(_) => format!("snapshot/load: {e}"),
        VmmAction::SendCtrlAltDel => format!("SendCtrlAltDel: {e}"),
        VmmAction::PatchDrive(d) => format!("PATCH /drives/{}: {e}", d.drive_id),
        VmmAction::PatchNetworkInterface(n) => {
            format!("PATCH /network-interfaces/{}: {e}", n.iface_id)
        }
    }
}

/// The answer to `action`'s result: 204 on success, otherwise the error's
/// status with `{"fault_message": ...}`.
pub fn action_response(action: &VmmAction, result: Result<(), VmmError>) -> ApiResponse {
    match result {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => ApiResponse::error(e.status(), fault_message(action, &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(action: &VmmAction, e: VmmError) -> (u16, String) {
        let r = action_response(action, Err(e));
        (r.status, r.fault_message().unwrap_or_default())
    }

    fn drive(id: &str) -> VmmAction {
        VmmAction::PatchDrive(PartialDrive {
            drive_id: id.into(),
            ..Default::default()
        })
    }

    #[test]
    fn success_is_204_without_a_body() {
        for a in [VmmAction::Start, VmmAction::Pause, drive("d1")] {
            assert_eq!(action_response(&a, Ok(())), ApiResponse::no_content());
        }
    }

    /// Each error, under the action that reports it, with today's exact text.
    #[test]
    fn each_error_maps_to_its_status_and_message() {
        let io = || std::io::Error::other("gone");
        let cases: Vec<(VmmAction, VmmError, &str)> = vec![
            (
                VmmAction::Pause,
                VmmError::NotRunning,
                "the microVM is not running",
            ),
            (
                VmmAction::Resume,
                VmmError::NotRunning,
                "the microVM is not running",
            ),
            (
                VmmAction::SendCtrlAltDel,
                VmmError::NotRunning,
                "SendCtrlAltDel: the microVM is not running",
            ),
            (
                VmmAction::Start,
                VmmError::AlreadyRunning,
                "InstanceStart failed: the microVM is already running",
            ),
            (
                VmmAction::Start,
                VmmError::BootConfig("no boot source: configure boot-source".into()),
                "InstanceStart: no boot source: configure boot-source",
            ),
            (
                VmmAction::Start,
                VmmError::Boot("cannot open /nonexistent/vmlinux".into()),
                "InstanceStart failed: cannot open /nonexistent/vmlinux",
            ),
            (
                drive("d1"),
                VmmError::NotSupported("rate limiters"),
                "PATCH /drives/d1: rate limiters are not supported by cinder yet",
            ),
            (
                VmmAction::PatchNetworkInterface(PartialNetworkInterface {
                    iface_id: "eth0".into(),
                    ..Default::default()
                }),
                VmmError::NotSupported("rate limiters"),
                "PATCH /network-interfaces/eth0: rate limiters are not supported by cinder yet",
            ),
            (
                drive("d1"),
                VmmError::NothingToChange,
                "PATCH /drives/d1: nothing to change",
            ),
            (
                drive("d1"),
                VmmError::Vm("drive d1 does not exist".into()),
                "PATCH /drives/d1: drive d1 does not exist",
            ),
            (
                VmmAction::SendCtrlAltDel,
                VmmError::Vm("the guest is not taking keyboard input (x)".into()),
                "SendCtrlAltDel: the guest is not taking keyboard input (x)",
            ),
            (
                VmmAction::Pause,
                VmmError::Vm("pausing the vCPUs: vCPUs did not park within 5 s".into()),
                "pausing the vCPUs: vCPUs did not park within 5 s",
            ),
            (
                VmmAction::FlushMetrics,
                VmmError::MetricsNotConfigured,
                "FlushMetrics: metrics are not configured",
            ),
            (
                VmmAction::FlushMetrics,
                VmmError::Io {
                    what: "cannot open metrics path",
                    path: "/m/x".into(),
                    source: io(),
                },
                "FlushMetrics: cannot open metrics path /m/x: gone",
            ),
            (
                VmmAction::FlushMetrics,
                VmmError::Io {
                    what: "cannot write metrics to",
                    path: "/m/x".into(),
                    source: io(),
                },
                "FlushMetrics: cannot write metrics to /m/x: gone",
            ),
            (
                VmmAction::ConfigureLogger(Logger::default()),
                VmmError::Logger("logger: cannot open log_path /l: denied".into()),
                "logger: cannot open log_path /l: denied",
            ),
        ];
        for (action, e, want) in cases {
            assert_eq!(fault(&action, e), (400, want.to_string()), "{action:?}");
        }
    }

    #[test]
    fn sources_are_kept() {
        use std::error::Error;
        let e = VmmError::Boot(Box::new(std::io::Error::other("inner")));
        assert_eq!(e.source().map(|s| s.to_string()), Some("inner".into()));
    }
}
