//! The router: `(method, path, body)` to a typed [`ApiRequest`], and the
//! typed [`ApiResponse`] a handler answers with.
//!
//! [`ROUTES`] is the route table: every path of Firecracker's API document
//! (v1.16.1) with each of its methods, and whether cinder serves it. Routes
//! cinder lacks answer 400 "... is not supported by cinder yet"; paths or
//! methods outside the document answer 400 "Invalid request method and/or
//! path", as Firecracker does. Paths match as Firecracker matches them (see
//! `canonical_path`): `PUT /vsock/vsock0` and `PUT /boot-source/` are
//! `PUT /vsock` and `PUT /boot-source`.

use serde::Serialize;

use crate::model::{
    from_json, ActionType, Balloon, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive,
    EntropyDevice, ErrorBody, InstanceActionInfo, Logger, MachineConfiguration,
    MachineConfigurationUpdate, Metrics, NetworkInterface, PartialDrive, PartialNetworkInterface,
    SnapshotCreateParams, SnapshotLoadParams, Vm, VmState, Vsock,
};

/// One (method, path template) pair of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path template, `{name}` for a path parameter.
    pub path: &'static str,
    /// `None` when cinder serves the route, otherwise the missing feature.
    pub unsupported: Option<&'static str>,
}

const fn ok(method: &'static str, path: &'static str) -> Route {
    Route {
        method,
        path,
        unsupported: None,
    }
}

const fn no(method: &'static str, path: &'static str, feature: &'static str) -> Route {
    Route {
        method,
        path,
        unsupported: Some(feature),
    }
}

/// The route table.
pub const ROUTES: &[Route] = &[
    ok("GET", "/"),
    ok("PUT", "/actions"),
    ok("PUT", "/boot-source"),
    ok("PUT", "/drives/{drive_id}"),
    ok("PATCH", "/drives/{drive_id}"),
    ok("PUT", "/entropy"),
    ok("PUT", "/logger"),
    ok("GET", "/machine-config"),
    ok("PUT", "/machine-config"),
    ok("PATCH", "/machine-config"),
    ok("PUT", "/metrics"),
    ok("PUT", "/network-interfaces/{iface_id}"),
    ok("PATCH", "/network-interfaces/{iface_id}"),
    ok("GET", "/version"),
    ok("PATCH", "/vm"),
    ok("GET", "/vm/config"),
    ok("PUT", "/vsock"),
    ok("GET", "/balloon"),
    ok("PUT", "/balloon"),
    ok("PATCH", "/balloon"),
    ok("GET", "/balloon/statistics"),
    ok("PATCH", "/balloon/statistics"),
    no("PATCH", "/balloon/hinting/start", "free page hinting"),
    no("GET", "/balloon/hinting/status", "free page hinting"),
    no("PATCH", "/balloon/hinting/stop", "free page hinting"),
    no("PUT", "/cpu-config", "custom CPU templates"),
    no("PUT", "/pmem/{id}", "virtio-pmem"),
    no("PATCH", "/pmem/{id}", "virtio-pmem"),
    no("GET", "/mmds", "MMDS"),
    no("PUT", "/mmds", "MMDS"),
    no("PATCH", "/mmds", "MMDS"),
    no("PUT", "/mmds/config", "MMDS"),
    no("PUT", "/serial", "serial output configuration"),
    no("GET", "/hotplug/memory", "memory hotplug"),
    no("PUT", "/hotplug/memory", "memory hotplug"),
    no("PATCH", "/hotplug/memory", "memory hotplug"),
    ok("PUT", "/snapshot/create"),
    ok("PUT", "/snapshot/load"),
];

/// The route table, for documentation checks and tooling.
pub fn route_table() -> &'static [Route] {
    ROUTES
}

/// A typed API request, handed to a [`crate::RequestHandler`].
#[derive(Debug, Clone, PartialEq)]
pub enum ApiRequest {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfiguration),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigurationUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{drive_id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{iface_id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `GET /balloon`.
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(Balloon),
    /// `PATCH /balloon`.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(BalloonStatsUpdate),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmState),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
}

impl ApiRequest {
    /// Whether Firecracker accepts this request before `InstanceStart`.
    pub fn allowed_before_boot(&self) -> bool {
        !matches!(
            self,
            ApiRequest::PatchDrive(_)
                | ApiRequest::PatchNetworkInterface(_)
                | ApiRequest::PatchVm(_)
                | ApiRequest::CreateSnapshot(_)
                | ApiRequest::PatchBalloon(_)
                | ApiRequest::GetBalloonStats
                | ApiRequest::PatchBalloonStats(_)
                | ApiRequest::Action(ActionType::SendCtrlAltDel)
        )
    }

    /// Whether Firecracker accepts this request after `InstanceStart`.
    pub fn allowed_after_boot(&self) -> bool {
        !matches!(
            self,
            ApiRequest::PutMachineConfig(_)
                | ApiRequest::PatchMachineConfig(_)
                | ApiRequest::PutBootSource(_)
                | ApiRequest::PutDrive(_)
                | ApiRequest::PutNetworkInterface(_)
                | ApiRequest::PutVsock(_)
                | ApiRequest::PutEntropy(_)
                | ApiRequest::PutBalloon(_)
                | ApiRequest::PutLogger(_)
                | ApiRequest::PutMetrics(_)
                | ApiRequest::LoadSnapshot(_)
                | ApiRequest::Action(ActionType::InstanceStart)
        )
    }
}

/// The answer to an [`ApiRequest`]: a status and, except for 204, a JSON
/// body (`{"fault_message": ...}` for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status code.
    pub status: u16,
    /// JSON body.
    pub body: Option<String>,
}

impl ApiResponse {
    /// 204 No Content.
    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: None,
        }
    }

    /// 200 with `value` as JSON.
    pub fn ok<T: Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => ApiResponse {
                status: 200,
                body: Some(body),
            },
            Err(e) => Self::error(500, format!("cannot serialize the answer: {e}")),
        }
    }

    /// An error status with `{"fault_message": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = ErrorBody {
            fault_message: message.into(),
        };
        ApiResponse {
            status,
            body: Some(
                serde_json::to_string(&body)
                    .unwrap_or_else(|_| r#"{"fault_message":"error"}"#.to_string()),
            ),
        }
    }

    /// 400 with `{"fault_message": message}`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::error(400, message)
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `fault_message` of an error answer.
    pub fn fault_message(&self) -> Option<String> {
        let body = self.body.as_deref()?;
        serde_json::from_str::<ErrorBody>(body)
            .ok()
            .map(|e| e.fault_message)
    }
}

/// Why a request was refused before reaching the handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No such route.
    #[error("Invalid request method and/or path: {method} {path}")]
    InvalidPathMethod {
        /// Method sent.
        method: String,
        /// Path sent.
        path: String,
    },
    /// Known path, other method.
    #[error("Invalid request method and/or path: {method} {path} (allowed: {allowed})")]
    MethodNotAllowed {
        /// Method sent.
        method: String,
        /// Path sent.
        path: String,
        /// Methods of the path.
        allowed: String,
    },
    /// A route of Firecracker's API that cinder lacks.
    #[error("{method} {path}: {feature} is not supported by cinder yet")]
    NotSupported {
        /// Method sent.
        method: String,
        /// Path sent.
        path: String,
        /// The missing feature.
        feature: &'static str,
    },
    /// Path parameter missing (`/drives/`).
    #[error("Required path parameter '{0}' is missing")]
    MissingPathParam(&'static str),
    /// Path and body ids differ.
    #[error(
        "the {key} of the path (`{path_id}`) does not match the {key} of the body (`{body_id}`)"
    )]
    IdMismatch {
        /// `drive_id` or `iface_id`.
        key: &'static str,
        /// Id in the path.
        path_id: String,
        /// Id in the body.
        body_id: String,
    },
    /// PUT/PATCH without a body.
    #[error("{method} {path}: a JSON body is required")]
    EmptyBody {
        /// Method sent.
        method: String,
        /// Path sent.
        path: String,
    },
    /// GET with a body.
    #[error("GET {0}: GET requests take no body")]
    UnexpectedBody(String),
    /// Body does not deserialize.
    #[error("invalid body of {method} {path}: {reason}")]
    InvalidBody {
        /// Method sent.
        method: String,
        /// Path sent.
        path: String,
        /// serde's reason, with the field path.
        reason: String,
    },
}

impl RequestError {
    /// The status code answering this error (400, as Firecracker).
    pub fn status(&self) -> u16 {
        400
    }

    /// The error as an [`ApiResponse`].
    pub fn to_response(&self) -> ApiResponse {
        ApiResponse::error(self.status(), self.to_string())
    }
}

fn matches_template(template: &str, path: &str) -> Option<Option<String>> {
    let mut param = None;
    let mut t = template.split('/');
    let mut p = path.split('/');
    loop {
        match (t.next(), p.next()) {
            (None, None) => return Some(param),
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return None;
                }
                param = Some(ps.to_string());
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return None,
        }
    }
}

/// The route template `path` stands for under `method`, matched as Firecracker matches paths:
/// the first segment names the resource (a trailing `/` adds no segment); a route without more
/// segments ignores whatever follows (`PUT /vsock/vsock0`, `PUT /machine-config/x`,
/// `PUT /boot-source/`); a route with more takes the next segments as its fixed parts or its
/// parameter (`GET /vm/config`, `PUT /drives/{drive_id}`) and ignores what follows those.
/// `None` when no route of `method` starts with that resource.
fn canonical_path(method: &str, path: &str) -> Option<String> {
    let mut toks = path.trim_start_matches('/').split_terminator('/');
    let first = toks.next().unwrap_or("");
    let rest: Vec<&str> = toks.collect();
    let mut short = None;
    for r in ROUTES.iter().filter(|r| r.method == method) {
        let mut t = r.path.trim_start_matches('/').split_terminator('/');
        if t.next().unwrap_or("") != first {
            continue;
        }
        let tail: Vec<&str> = t.collect();
        if tail.is_empty() {
            short = Some(format!("/{first}"));
            continue;
        }
        let fits = tail.len() <= rest.len()
            && tail
                .iter()
                .zip(&rest)
                .all(|(t, p)| (t.starts_with('{') && !p.is_empty()) || t == p);
        if fits {
            return Some(format!("/{first}/{}", rest[..tail.len()].join("/")));
        }
    }
    short
}

fn missing_param(path: &str) -> Option<&'static str> {
    match path {
        "/drives" | "/drives/" => Some("drive_id"),
        "/network-interfaces" | "/network-interfaces/" => Some("iface_id"),
        "/pmem" | "/pmem/" => Some("id"),
        _ => None,
    }
}

/// Finds the route of `(method, path)` and parses the body into an
/// [`ApiRequest`].
pub fn parse_api_request(
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<ApiRequest, RequestError> {
    let canonical = canonical_path(method, path);
    let matched = canonical.as_deref().unwrap_or(path);
    let mut template = None;
    let mut param = None;
    let mut allowed = Vec::new();
    for r in ROUTES {
        if let Some(p) = matches_template(r.path, matched) {
            allowed.push(r.method);
            if r.method == method {
                template = Some(r);
                param = p;
            }
        }
    }
    let route = match template {
        Some(r) => r,
        None if allowed.is_empty() => {
            if let Some(name) = missing_param(path) {
                return Err(RequestError::MissingPathParam(name));
            }
            return Err(RequestError::InvalidPathMethod {
                method: method.to_string(),
                path: path.to_string(),
            });
        }
        None => {
            return Err(RequestError::MethodNotAllowed {
                method: method.to_string(),
                path: path.to_string(),
                allowed: allowed.join(", "),
            })
        }
    };
    if let Some(feature) = route.unsupported {
        return Err(RequestError::NotSupported {
            method: method.to_string(),
            path: path.to_string(),
            feature,
        });
    }
    if method == "GET" {
        if !body.is_empty() {
            return Err(RequestError::UnexpectedBody(path.to_string()));
        }
    } else if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::EmptyBody {
            method: method.to_string(),
            path: path.to_string(),
        });
    }
    macro_rules! body {
        ($t:ty) => {
            from_json::<$t>(body).map_err(|reason| RequestError::InvalidBody {
                method: method.to_string(),
                path: path.to_string(),
                reason,
            })?
        };
    }
    let check_id = |key: &'static str, body_id: &str| -> Result<(), RequestError> {
        let path_id = param.clone().unwrap_or_default();
        if path_id == body_id {
            Ok(())
        } else {
            Err(RequestError::IdMismatch {
                key,
                path_id,
                body_id: body_id.to_string(),
            })
        }
    };
    Ok(match (route.method, route.path) {
        ("GET", "/") => ApiRequest::GetInstanceInfo,
        ("GET", "/version") => ApiRequest::GetVersion,
        ("GET", "/machine-config") => ApiRequest::GetMachineConfig,
        ("GET", "/vm/config") => ApiRequest::GetVmConfig,
        ("PUT", "/machine-config") => ApiRequest::PutMachineConfig(body!(MachineConfiguration)),
        ("PATCH", "/machine-config") => {
            let update = body!(MachineConfigurationUpdate);
            if update == MachineConfigurationUpdate::default() {
                // As Firecracker: a PATCH that sets nothing is a client error.
                return Err(RequestError::InvalidBody {
                    method: method.to_string(),
                    path: path.to_string(),
                    reason: "the body sets no field".into(),
                });
            }
            ApiRequest::PatchMachineConfig(update)
        }
        ("PUT", "/boot-source") => ApiRequest::PutBootSource(body!(BootSource)),
        ("PUT", "/drives/{drive_id}") => {
            let d = body!(Drive);
            check_id("drive_id", &d.drive_id)?;
            ApiRequest::PutDrive(d)
        }
        ("PATCH", "/drives/{drive_id}") => {
            let d = body!(PartialDrive);
            check_id("drive_id", &d.drive_id)?;
            ApiRequest::PatchDrive(d)
        }
        ("PUT", "/network-interfaces/{iface_id}") => {
            let n = body!(NetworkInterface);
            check_id("iface_id", &n.iface_id)?;
            ApiRequest::PutNetworkInterface(n)
        }
        ("PATCH", "/network-interfaces/{iface_id}") => {
            let n = body!(PartialNetworkInterface);
            check_id("iface_id", &n.iface_id)?;
            ApiRequest::PatchNetworkInterface(n)
        }
        ("PUT", "/vsock") => ApiRequest::PutVsock(body!(Vsock)),
        ("PUT", "/entropy") => ApiRequest::PutEntropy(body!(EntropyDevice)),
        ("GET", "/balloon") => ApiRequest::GetBalloon,
        ("PUT", "/balloon") => ApiRequest::PutBalloon(body!(Balloon)),
        ("PATCH", "/balloon") => ApiRequest::PatchBalloon(body!(BalloonUpdate)),
        ("GET", "/balloon/statistics") => ApiRequest::GetBalloonStats,
        ("PATCH", "/balloon/statistics") => {
            ApiRequest::PatchBalloonStats(body!(BalloonStatsUpdate))
        }
        ("PUT", "/logger") => ApiRequest::PutLogger(body!(Logger)),
        ("PUT", "/metrics") => ApiRequest::PutMetrics(body!(Metrics)),
        ("PUT", "/actions") => ApiRequest::Action(body!(InstanceActionInfo).action_type),
        ("PATCH", "/vm") => ApiRequest::PatchVm(body!(Vm).state),
        ("PUT", "/snapshot/create") => ApiRequest::CreateSnapshot(body!(SnapshotCreateParams)),
        ("PUT", "/snapshot/load") => ApiRequest::LoadSnapshot(body!(SnapshotLoadParams)),
        _ => {
            return Err(RequestError::InvalidPathMethod {
                method: method.to_string(),
                path: path.to_string(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_route_dispatches() {
        for r in ROUTES.iter().filter(|r| r.unsupported.is_none()) {
            let path = r
                .path
                .replace("{drive_id}", "d1")
                .replace("{iface_id}", "d1");
            let err =
                parse_api_request(r.method, &path, if r.method == "GET" { b"" } else { b"{}" });
            // Bodies of `{}` fail on missing fields for most routes, but never
            // with a routing error.
            if let Err(e) = err {
                assert!(
                    matches!(
                        e,
                        RequestError::InvalidBody { .. } | RequestError::IdMismatch { .. }
                    ),
                    "{} {}: {e}",
                    r.method,
                    r.path
                );
            }
        }
    }

    #[test]
    fn paths_match_as_firecracker_matches_them() {
        let vsock = br#"{"guest_cid": 3, "uds_path": "/v.sock"}"#;
        for path in ["/vsock", "/vsock/", "/vsock/vsock0", "/vsock/a/b"] {
            assert!(
                matches!(
                    parse_api_request("PUT", path, vsock),
                    Ok(ApiRequest::PutVsock(_))
                ),
                "{path}"
            );
        }
        let m = br#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
        assert!(matches!(
            parse_api_request("PUT", "/machine-config/x", m),
            Ok(ApiRequest::PutMachineConfig(_))
        ));
        assert!(matches!(
            parse_api_request("PUT", "/boot-source/", br#"{"kernel_image_path": "/k"}"#),
            Ok(ApiRequest::PutBootSource(_))
        ));
        assert!(matches!(
            parse_api_request("GET", "/vm/config/", b""),
            Ok(ApiRequest::GetVmConfig)
        ));
        assert!(matches!(
            parse_api_request("PATCH", "/vm/x", br#"{"state": "Paused"}"#),
            Ok(ApiRequest::PatchVm(VmState::Paused))
        ));
        assert!(matches!(
            parse_api_request("GET", "/", b""),
            Ok(ApiRequest::GetInstanceInfo)
        ));
        // A route with a parameter takes the next segment and ignores what follows.
        let d = br#"{"drive_id": "d1", "is_root_device": false}"#;
        assert!(matches!(
            parse_api_request("PUT", "/drives/d1/extra", d),
            Ok(ApiRequest::PutDrive(x)) if x.drive_id == "d1"
        ));
        // Fixed segments still have to be there.
        assert!(parse_api_request("GET", "/vm", b"").is_err());
        assert!(parse_api_request("GET", "/vm/other", b"").is_err());
        assert!(matches!(
            parse_api_request("PUT", "/drives", b"{}"),
            Err(RequestError::MissingPathParam("drive_id"))
        ));
    }

    #[test]
    fn routing_errors() {
        assert!(matches!(
            parse_api_request("GET", "/nope", b""),
            Err(RequestError::InvalidPathMethod { .. })
        ));
        assert!(matches!(
            parse_api_request("DELETE", "/machine-config", b""),
            Err(RequestError::MethodNotAllowed { .. })
        ));
        assert!(matches!(
            parse_api_request("PUT", "/drives/", b"{}"),
            Err(RequestError::MissingPathParam("drive_id"))
        ));
        assert!(matches!(
            parse_api_request("PATCH", "/balloon/hinting/start", b"{}"),
            Err(RequestError::NotSupported { .. })
        ));
        assert!(matches!(
            parse_api_request(
                "PUT",
                "/drives/a",
                br#"{"drive_id":"b","is_root_device":false}"#
            ),
            Err(RequestError::IdMismatch { .. })
        ));
    }

    #[test]
    fn bodies_firecracker_refuses() {
        // A JSON array is not an object, even where serde could read it as a struct.
        for (path, body) in [
            ("/logger", &b"[]"[..]),
            ("/entropy", b" [ ]"),
            ("/machine-config", b"[2, 128]"),
        ] {
            let e = parse_api_request("PUT", path, body)
                .unwrap_err()
                .to_string();
            assert!(e.contains("JSON object"), "{path}: {e}");
        }
        // A PATCH that sets nothing.
        let e = parse_api_request("PATCH", "/machine-config", b"{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sets no field"), "{e}");
        assert!(parse_api_request("PATCH", "/machine-config", br#"{"smt": false}"#).is_ok());
        assert!(parse_api_request("PUT", "/logger", b"{}").is_ok());
    }

    #[test]
    fn field_named_in_errors() {
        let e = parse_api_request(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":"2","mem_size_mib":128}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vcpu_count"), "{e}");
        let e = parse_api_request(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count":2,"mem_size_mib":128,"bogus":1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse_api_request(
            "PUT",
            "/drives/a",
            br#"{"drive_id":"a","is_root_device":false,"rate_limiter":{"ops":{"size":"x","refill_time":1}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rate_limiter.ops.size"), "{e}");
    }
}
