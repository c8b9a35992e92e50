//! The API's parsers (from `api/fuzz`, now also run on stable): HTTP framing and routing of
//! pipelined requests, and the config file with its validation.

/// The parser, not the host's files: a fuzzed path is never opened (the host-path rules have
/// their own tests in `api::paths`).
const UNCHECKED: api::paths::PathPolicy = api::paths::PathPolicy::UNCHECKED;

/// HTTP requests, pipelined as the server reads them, each routed.
pub fn http(data: &[u8]) {
    let mut buf = data;
    for _ in 0..16 {
        match api::http::parse_request(buf, api::http::DEFAULT_MAX_BODY_BYTES) {
            Ok(api::http::Parsed::Complete(req, used)) => {
                let _ = api::parse_api_request(&req.method, &req.path, &req.body);
                match buf.get(used..) {
                    Some(rest) if used > 0 => buf = rest,
                    _ => break,
                }
            }
            _ => break,
        }
    }
}

/// A config file: parsed, validated and turned back into the full configuration.
pub fn config_file(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(cfg) = api::VmConfig::from_config_file_with(s, UNCHECKED) {
            let _ = cfg.validate();
            let _ = cfg.to_full_config();
        }
    }
}

/// HTTP seeds: the requests a manager sends.
pub fn http_seeds() -> Vec<Vec<u8>> {
    let req = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let mut pipelined = req("GET", "/", "");
    pipelined.extend(req(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count":2,"mem_size_mib":256}"#,
    ));
    pipelined.extend(req("PATCH", "/vm", r#"{"state":"Paused"}"#));
    vec![
        req(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#,
        ),
        req(
            "PUT",
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/r.ext4","is_root_device":true,"is_read_only":false}"#,
        ),
        req(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"02:00:00:00:00:01"}"#,
        ),
        req(
            "PUT",
            "/vsock",
            r#"{"guest_cid":3,"uds_path":"/tmp/v.sock"}"#,
        ),
        req("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
        pipelined,
    ]
}

/// Config-file seeds: a full one and a minimal one.
pub fn config_seeds() -> Vec<Vec<u8>> {
    vec![
        br#"{"boot-source":{"kernel_image_path":"/k","boot_args":"console=ttyS0"},
"drives":[{"drive_id":"rootfs","path_on_host":"/r.ext4","is_root_device":true,"is_read_only":false}],
"machine-config":{"vcpu_count":2,"mem_size_mib":256},
"network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0"}],
"vsock":{"guest_cid":3,"uds_path":"/tmp/v.sock"},
"logger":{"log_path":"/tmp/l","level":"Info"},
"metrics":{"metrics_path":"/tmp/m"}}"#
            .to_vec(),
        br#"{"boot-source":{"kernel_image_path":"/k"}}"#.to_vec(),
    ]
}

#[cfg(test)]
mod tests {
    /// The seeds are inputs the parsers accept, so mutations start deep inside them.
    #[test]
    fn seeds_are_accepted() {
        for seed in super::config_seeds() {
            let text = std::str::from_utf8(&seed).unwrap();
            if let Err(e) = api::VmConfig::from_config_file_with(text, super::UNCHECKED) {
                panic!("config seed refused: {e}\n{text}");
            }
        }
        for seed in super::http_seeds() {
            match api::http::parse_request(&seed, api::http::DEFAULT_MAX_BODY_BYTES) {
                Ok(api::http::Parsed::Complete(req, _)) => {
                    assert!(api::parse_api_request(&req.method, &req.path, &req.body).is_ok());
                }
                other => panic!("http seed not parsed: {other:?}"),
            }
        }
    }
}
