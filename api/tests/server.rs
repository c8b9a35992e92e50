//! The API server against real clients on a Unix socket in a temp dir.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use api::{ApiError, ApiRequest, ApiResponse, ApiServer, ServerConfig};
use common::{test_config, Client, TempDir, TestServer};

const MACHINE: &str = r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#;
const BOOT: &str = r#"{"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"}"#;
const ROOTFS: &str = r#"{"drive_id": "rootfs", "path_on_host": "/d/root.ext4", "is_root_device": true, "is_read_only": false}"#;
const ETH0: &str =
    r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#;

#[test]
fn every_route_happy_path() {
    let srv = TestServer::start();
    let mut c = srv.connect();

    let r = c.request("GET", "/", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "Not started");
    assert_eq!(r.json()["app_name"], "cinder");
    assert_eq!(r.json()["id"], "test-vm");

    let r = c.request("GET", "/version", None);
    assert_eq!(r.status, 200);
    // The Firecracker API version cinder implements; cinder's own version apart.
    assert_eq!(r.json()["firecracker_version"], "1.16.1");
    assert_eq!(r.json()["cinder_version"], "0.1.0");

    let r = c.request("GET", "/machine-config", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["vcpu_count"], 1);
    assert_eq!(r.json()["mem_size_mib"], 128);

    for (m, p, b) in [
        ("PUT", "/machine-config", MACHINE),
        ("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#),
        ("PUT", "/boot-source", BOOT),
        ("PUT", "/drives/rootfs", ROOTFS),
        ("PUT", "/network-interfaces/eth0", ETH0),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#,
        ),
        (
            "PUT",
            "/entropy",
            // A limiter that limits is refused (not enforced yet): tests/tests/ratelimit.rs.
            r#"{"rate_limiter": {}}"#,
        ),
        (
            "PUT",
            "/logger",
            r#"{"level": "debug", "log_path": "/tmp/log", "show_level": true}"#,
        ),
        ("PUT", "/metrics", r#"{"metrics_path": "/tmp/metrics"}"#),
    ] {
        let r = c.request(m, p, Some(b));
        assert_eq!(r.status, 204, "{m} {p}: {}", r.body);
        assert!(r.body.is_empty());
    }

    // Post-boot-only requests before boot.
    for (m, p, b) in [
        (
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/d/new"}"#,
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0"}"#,
        ),
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
        ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
    ] {
        let r = c.request(m, p, Some(b));
        assert_eq!(r.status, 400, "{m} {p}");
        assert!(r.fault().contains("before starting"), "{}", r.fault());
    }

    let r = c.request("GET", "/vm/config", None);
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["machine-config"]["vcpu_count"], 2);
    assert_eq!(v["machine-config"]["mem_size_mib"], 512);
    assert_eq!(v["boot-source"]["kernel_image_path"], "/k/vmlinux");
    assert_eq!(v["drives"][0]["drive_id"], "rootfs");
    assert_eq!(v["network-interfaces"][0]["guest_mac"], "06:00:ac:10:00:02");
    assert_eq!(v["vsock"]["guest_cid"], 3);
    assert!(v["entropy"]["rate_limiter"].is_object(), "{v}");
    assert_eq!(v["logger"]["level"], "Debug");
    assert_eq!(v["metrics"]["metrics_path"], "/tmp/metrics");

    let r = c.request(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(c.request("GET", "/", None).json()["state"], "Running");

    for (m, p, b) in [
        (
            "PATCH",
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/d/new"}"#,
        ),
        (
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 1000, "one_time_burst": 5}}}"#,
        ),
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
    ] {
        assert_eq!(c.request(m, p, Some(b)).status, 204, "{m} {p}");
    }
    assert_eq!(c.request("GET", "/", None).json()["state"], "Paused");
    assert_eq!(
        c.request("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#))
            .status,
        204
    );
    assert_eq!(c.request("GET", "/", None).json()["state"], "Running");
    for action in ["SendCtrlAltDel", "FlushMetrics"] {
        let body = format!(r#"{{"action_type": "{action}"}}"#);
        assert_eq!(c.request("PUT", "/actions", Some(&body)).status, 204);
    }
    let v = c.request("GET", "/vm/config", None).json();
    assert_eq!(v["drives"][0]["path_on_host"], "/d/new");

    // Pre-boot-only requests after boot.
    for (m, p, b) in [
        ("PUT", "/machine-config", MACHINE),
        ("PUT", "/boot-source", BOOT),
        ("PUT", "/drives/rootfs", ROOTFS),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        let r = c.request(m, p, Some(b));
        assert_eq!(r.status, 400, "{m} {p}");
        assert!(r.fault().contains("after starting"), "{}", r.fault());
    }

    let seen = srv.seen.lock().unwrap();
    assert!(seen.contains(&ApiRequest::Action(api::model::ActionType::InstanceStart)));
    assert!(seen.contains(&ApiRequest::PatchVm(api::model::VmState::Paused)));
}

#[test]
fn unsupported_routes_answer_400() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    for r in api::route_table()
        .iter()
        .filter(|r| r.unsupported.is_some())
    {
        let path = r.path.replace("{id}", "p0");
        let body = if r.method == "GET" { None } else { Some("{}") };
        let resp = c.request(r.method, &path, body);
        assert_eq!(resp.status, 400, "{} {}", r.method, r.path);
        assert!(
            resp.fault().contains("not supported by cinder yet"),
            "{}",
            resp.fault()
        );
    }
    assert!(srv.seen.lock().unwrap().is_empty());
}

fn expect_400_and_close(srv: &TestServer, raw: &[u8], needle: &str) {
    let mut c = srv.connect();
    c.send_raw(raw);
    let r = c.read_response().expect("an answer");
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(raw));
    assert!(
        r.fault().contains(needle),
        "`{}` lacks `{needle}`",
        r.fault()
    );
    assert!(r.headers.contains("Connection: close"));
    assert!(c.is_closed());
}

fn expect_400_keep(c: &mut Client, m: &str, p: &str, b: Option<&str>, needle: &str) {
    let r = c.request(m, p, b);
    assert_eq!(r.status, 400, "{m} {p} {b:?}");
    assert!(
        r.fault().contains(needle),
        "`{}` lacks `{needle}`",
        r.fault()
    );
}

#[test]
fn hostile_framing_gets_400_and_server_carries_on() {
    let srv = TestServer::start();
    expect_400_and_close(&srv, b"HELLO\r\n\r\n", "malformed HTTP request");
    expect_400_and_close(&srv, b"GET /\r\n\r\n", "malformed HTTP request");
    expect_400_and_close(&srv, b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", "malformed");
    expect_400_and_close(
        &srv,
        b"GET machine-config HTTP/1.1\r\n\r\n",
        "absolute path",
    );
    expect_400_and_close(
        &srv,
        b"PUT /machine-config HTTP/1.1\r\n\r\n{\"vcpu_count\":1}",
        "missing Content-Length",
    );
    expect_400_and_close(
        &srv,
        b"PUT /vm HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
        "invalid Content-Length",
    );
    expect_400_and_close(
        &srv,
        b"PUT /vm HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
        "request body too large",
    );
    expect_400_and_close(
        &srv,
        b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "Transfer-Encoding",
    );
    // Content-Length shorter than the body: the rest is garbage as the next
    // request.
    {
        let mut c = srv.connect();
        c.send_raw(b"PUT /vm HTTP/1.1\r\nContent-Length: 3\r\n\r\n{\"state\":\"Paused\"}");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 400);
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("malformed"), "{}", r.fault());
    }
    // Headers over the limit.
    {
        let mut c = srv.connect();
        let mut raw = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        raw.extend(vec![b'a'; 9000]);
        c.send_raw(&raw);
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("headers too large"));
    }
    // The server is fine.
    assert_eq!(srv.connect().request("GET", "/", None).status, 200);
}

#[test]
fn bad_bodies_and_routes_keep_the_connection() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    expect_400_keep(
        &mut c,
        "PUT",
        "/machine-config",
        Some("{not json"),
        "invalid body",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 128, "vcpus": 4}"#),
        "unknown field `vcpus`",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": "2", "mem_size_mib": 128}"#),
        "vcpu_count",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2}"#),
        "missing field `mem_size_mib`",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 255, "mem_size_mib": 128}"#),
        "machine-config.vcpu_count: 255 is out of range; it must be 1..=254",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 300, "mem_size_mib": 128}"#),
        "vcpu_count",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/drives/a",
        Some(r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#),
        "does not match",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}"#),
        "guest_mac",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 2, "uds_path": "/v"}"#),
        "vsock.guest_cid",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
        "action_type",
    );
    expect_400_keep(&mut c, "PATCH", "/vm", Some(r#"{"state": 1}"#), "state");
    expect_400_keep(
        &mut c,
        "PUT",
        "/boot-source",
        Some(""),
        "a JSON body is required",
    );
    expect_400_keep(
        &mut c,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/k"} {}"#),
        "trailing",
    );
    expect_400_keep(
        &mut c,
        "GET",
        "/nowhere",
        None,
        "Invalid request method and/or path",
    );
    expect_400_keep(
        &mut c,
        "DELETE",
        "/machine-config",
        None,
        "Invalid request method",
    );
    expect_400_keep(
        &mut c,
        "POST",
        "/actions",
        Some("{}"),
        "Invalid request method",
    );
    expect_400_keep(&mut c, "PUT", "/drives/", Some("{}"), "drive_id");
    expect_400_keep(&mut c, "GET", "/version", Some("x"), "take no body");
    expect_400_keep(
        &mut c,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "boot-source",
    );
    // Still the same connection, still served.
    assert_eq!(c.request("GET", "/", None).status, 200);
    // Rejected requests never reach the handler, except the ones that are
    // well-formed but refused by the controller.
    let seen = srv.seen.lock().unwrap();
    assert!(seen.iter().all(|r| matches!(
        r,
        ApiRequest::PutMachineConfig(_)
            | ApiRequest::PutNetworkInterface(_)
            | ApiRequest::PutVsock(_)
            | ApiRequest::Action(_)
            | ApiRequest::GetInstanceInfo
    )));
}

#[test]
fn stalled_client_times_out_while_others_are_served() {
    let timeout = Duration::from_millis(1500);
    let srv = TestServer::start_with(ServerConfig {
        request_timeout: timeout,
        ..test_config()
    });
    let start = Instant::now();
    // Half a request line, then silence.
    let mut stalled = srv.connect();
    stalled.send_raw(b"PUT /machine-config HTTP/1.1\r\nContent-Le");
    // A lying Content-Length: announces more than it sends.
    let mut liar = srv.connect();
    liar.send_raw(b"PUT /vm HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"state\":");
    let mut other = srv.connect();
    for _ in 0..20 {
        assert_eq!(other.request("GET", "/machine-config", None).status, 200);
    }
    // The others were served while the stalled clients still wait.
    for c in [&stalled, &liar] {
        c.stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let r = (&c.stream).read(&mut byte);
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "stalled client already answered: {r:?}"
        );
        c.stream.set_nonblocking(false).unwrap();
    }
    for c in [&mut stalled, &mut liar] {
        let r = c.read_response().expect("a timeout answer");
        assert_eq!(r.status, 408);
        assert!(r.fault().contains("timed out"), "{}", r.fault());
        assert!(c.is_closed());
    }
    assert!(start.elapsed() >= timeout);
    assert_eq!(other.request("GET", "/", None).status, 200);
}

#[test]
fn hundred_clients_at_once() {
    let srv = TestServer::start();
    let barrier = Arc::new(Barrier::new(100));
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let sock = srv.sock.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock);
                barrier.wait();
                for _ in 0..5 {
                    let r = c.request("GET", "/machine-config", None);
                    assert_eq!(r.status, 200);
                }
                let body = format!(r#"{{"metrics_path": "/m{i}"}}"#);
                let r = c.request("PUT", "/metrics", Some(&body));
                r.status
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Exactly one client configured metrics; the others were told it is done.
    assert_eq!(statuses.iter().filter(|&&s| s == 204).count(), 1);
    assert_eq!(statuses.iter().filter(|&&s| s == 400).count(), 99);
}

#[test]
fn pipelined_requests_and_expect_continue() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.send_raw(
        b"GET /version HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.1\r\n\r\n",
    );
    for _ in 0..3 {
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    c.send_raw(b"PUT /boot-source HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 31\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 100);
    c.send_raw(br#"{"kernel_image_path": "/k/vm1"}"#);
    assert_eq!(c.read_response().unwrap().status, 204);
    // HTTP/1.0 and Connection: close end the connection after the answer.
    c.send_raw(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("Connection: close"));
    assert!(c.is_closed());
    // A client that half-closes after its request still gets the answer.
    let mut c = srv.connect();
    c.send_raw(b"GET /version HTTP/1.1\r\n\r\n");
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.read_response().unwrap().status, 200);
    assert!(c.is_closed());
}

#[test]
fn connection_limit_answers_503_after_reading_the_request() {
    let srv = TestServer::start_with(ServerConfig {
        max_connections: 2,
        ..test_config()
    });
    // Both slots mid-request (a request head begun, not finished): none is idle.
    let mut a = srv.connect();
    let mut b = srv.connect();
    a.send_raw(b"GET / HTTP/1.1\r\n");
    b.send_raw(b"GET / HTTP/1.1\r\n");
    std::thread::sleep(Duration::from_millis(100));
    // The third client is not closed on arrival: it sends its request (no EPIPE) and reads
    // the 503 (no ECONNRESET).
    let mut c = srv.connect();
    std::thread::sleep(Duration::from_millis(100));
    c.stream
        .write_all(b"GET / HTTP/1.1\r\n\r\n")
        .expect("the server closed a client over the limit before reading its request");
    let r = c.read_response().expect("a 503, not a reset");
    assert_eq!(r.status, 503);
    assert!(r.fault().contains("too many"), "{}", r.fault());
    assert!(c.is_closed());
    // The busy ones finish their requests and are served.
    a.send_raw(b"\r\n");
    assert_eq!(a.read_response().unwrap().status, 200);
    b.send_raw(b"\r\n");
    assert_eq!(b.read_response().unwrap().status, 200);
    drop(a);
    // The freed slot is reusable (the server notices the close).
    let start = Instant::now();
    loop {
        let mut d = srv.connect();
        d.send_raw(b"GET / HTTP/1.1\r\n\r\n");
        let r = d.read_response().unwrap();
        if r.status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.request("GET", "/", None).status, 200);
}

/// Whether the server closed `c` (EOF within 2 s; a read timeout is not a close).
fn closed_by_server(c: &mut Client) -> bool {
    c.stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut b = [0u8; 1];
    matches!(c.stream.read(&mut b), Ok(0))
}

/// Issue 18 item 8: 256 idle keep-alive connections no longer lock a new client out: the
/// longest-idle one makes room.
#[test]
fn idle_connections_make_room_for_a_new_client() {
    let srv = TestServer::start();
    let mut idle: Vec<Client> = (0..api::server::DEFAULT_MAX_CONNECTIONS)
        .map(|_| {
            let mut c = srv.connect();
            assert_eq!(c.request("GET", "/", None).status, 200);
            c
        })
        .collect();
    let mut fresh = srv.connect();
    let r = fresh.request("GET", "/", None);
    assert_eq!(r.status, 200, "{}", r.body);
    // The one evicted is the oldest: the first client.
    assert!(
        closed_by_server(&mut idle[0]),
        "the longest-idle connection was not the one closed"
    );
    assert_eq!(idle[1].request("GET", "/", None).status, 200);
    idle.clear();
}

/// Issue 18 item 8: an idle keep-alive connection is closed after the idle timeout.
#[test]
fn idle_connection_is_closed_after_the_idle_timeout() {
    let srv = TestServer::start_with(ServerConfig {
        idle_timeout: Duration::from_millis(300),
        ..test_config()
    });
    let mut c = srv.connect();
    assert_eq!(c.request("GET", "/", None).status, 200);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        closed_by_server(&mut c),
        "an idle connection outlived the idle timeout"
    );
    // A connection in use is not cut: requests 100 ms apart for a second.
    let mut d = srv.connect();
    for _ in 0..10 {
        assert_eq!(d.request("GET", "/", None).status, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bind_rules() {
    let dir = TempDir::new("bind");
    // Missing directory.
    let err = ApiServer::bind(&dir.path().join("nope/api.sock"))
        .err()
        .unwrap();
    assert!(matches!(err, ApiError::MissingDirectory { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"));
    // Not a socket.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = ApiServer::bind(&file).err().unwrap();
    assert!(matches!(err, ApiError::NotASocket(_)), "{err}");
    // Stale socket of a dead listener: replaced.
    let sock = dir.path().join("stale.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let server = ApiServer::bind(&sock).unwrap();
    // Live socket: refused.
    let err = ApiServer::bind(&sock).err().unwrap();
    assert!(matches!(err, ApiError::InUse(_)), "{err}");
    assert!(err.to_string().contains("already in use"));
    // Shutdown removes the socket file.
    let stop = server.shutdown_handle().unwrap();
    let t = std::thread::spawn(move || server.run(|_req| ApiResponse::no_content()));
    stop.shutdown().unwrap();
    t.join().unwrap().unwrap();
    assert!(!sock.exists());
}

#[test]
fn channel_handler_reaches_the_event_loop() {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let dir = TempDir::new("chan");
    let sock = dir.path().join("api.sock");
    let server = ApiServer::bind_with_config(&sock, test_config()).unwrap();
    let stop = server.shutdown_handle().unwrap();
    let (handler, endpoint) = api::api_channel().unwrap();
    let api_thread = std::thread::spawn(move || server.run(handler));
    // The "VMM event loop": epoll on the EventFd, a controller behind it.
    let vmm = std::thread::spawn(move || {
        use std::os::unix::io::AsRawFd;
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                endpoint.event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 7),
            )
            .unwrap();
        let mut ctl = api::PreBootController::new(
            api::VmConfig::with_paths(api::paths::PathPolicy::UNCHECKED),
            "chan",
            "v",
        );
        let mut handled = 0;
        let mut events = [EpollEvent::default(); 4];
        let deadline = Instant::now() + Duration::from_secs(10);
        while handled < 3 && Instant::now() < deadline {
            let n = epoll.wait(100, &mut events).unwrap();
            if n == 0 {
                continue;
            }
            while let Some(req) = endpoint.next_request() {
                let resp = match ctl.handle(req) {
                    api::Outcome::Respond(r) => r,
                    _ => ApiResponse::no_content(),
                };
                assert!(endpoint.reply(resp));
                handled += 1;
            }
        }
        handled
    });
    let mut c = Client::connect(&sock);
    assert_eq!(
        c.request("PUT", "/machine-config", Some(MACHINE)).status,
        204
    );
    let r = c.request("GET", "/machine-config", None);
    assert_eq!(r.json()["vcpu_count"], 2);
    assert_eq!(c.request("GET", "/", None).json()["id"], "chan");
    assert_eq!(vmm.join().unwrap(), 3);
    // The VMM is gone: the API answers 500 instead of hanging.
    let r = c.request("GET", "/", None);
    assert_eq!(r.status, 500);
    stop.shutdown().unwrap();
    api_thread.join().unwrap().unwrap();
}

#[test]
fn client_that_never_reads_is_dropped() {
    let srv = TestServer::start();
    // Many requests without reading a single answer: the server stops
    // reading once an answer is pending, and drops the client after the
    // timeout; memory stays bounded.
    let mut s = UnixStream::connect(&srv.sock).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let req = b"GET /vm/config HTTP/1.1\r\n\r\n".repeat(200);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if s.write_all(&req).is_err() {
            break;
        }
    }
    assert_eq!(srv.connect().request("GET", "/", None).status, 200);
}

/// Issue 18 item 2 (API part): a control loop that does not answer (it was stuck opening a
/// FIFO given as the kernel) leaves the client with a 503 after the reply timeout, not a
/// hang; the late reply is discarded, never delivered to the next request.
#[test]
fn slow_vmm_gets_503_and_late_reply_is_not_misdelivered() {
    use std::os::unix::io::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let dir = TempDir::new("slowvmm");
    let sock = dir.path().join("api.sock");
    let server = ApiServer::bind_with_config(&sock, test_config()).unwrap();
    let stop = server.shutdown_handle().unwrap();
    let (mut handler, endpoint) = api::api_channel().unwrap();
    let timeout = Duration::from_millis(300);
    handler.reply_timeout = Some(timeout);
    let api_thread = std::thread::spawn(move || server.run(handler));
    // The "VMM": answers each request with its own sequence number; the first answer comes
    // 450 ms late (after its request timed out, while the second request waits).
    let vmm = std::thread::spawn(move || {
        let epoll = Epoll::new().unwrap();
        epoll
            .ctl(
                ControlOperation::Add,
                endpoint.event.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 7),
            )
            .unwrap();
        let mut n = 0u32;
        let mut events = [EpollEvent::default(); 4];
        let deadline = Instant::now() + Duration::from_secs(10);
        while n < 3 && Instant::now() < deadline {
            if epoll.wait(100, &mut events).unwrap() == 0 {
                continue;
            }
            while let Some(_req) = endpoint.next_request() {
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(450));
                }
                let resp = ApiResponse {
                    status: 200,
                    body: Some(format!(r#"{{"seq": {n}}}"#)),
                };
                if !endpoint.reply(resp) {
                    return n;
                }
                n += 1;
            }
        }
        n
    });
    let mut c = Client::connect(&sock);
    let start = Instant::now();
    let r = c.request("GET", "/", None);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.fault().contains("did not answer"), "{}", r.fault());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // The next request is sent while the first one's reply is still due: it must get its
    // own answer (seq 1), never the late one (seq 0).
    let r = c.request("GET", "/", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["seq"],
        1,
        "the late reply went to the wrong request"
    );
    let r = c.request("GET", "/", None);
    assert_eq!(r.json()["seq"], 2);
    assert_eq!(vmm.join().unwrap(), 3);
    stop.shutdown().unwrap();
    api_thread.join().unwrap().unwrap();
}

/// Issue 18 item 2 (API part): while the control loop stays stuck on one request, each
/// further request gets its 503 after a short grace, not a whole reply timeout in turn.
#[test]
fn stuck_vmm_answers_each_request_503_quickly() {
    let dir = TempDir::new("stuckvmm");
    let sock = dir.path().join("api.sock");
    let server = ApiServer::bind_with_config(&sock, test_config()).unwrap();
    let stop = server.shutdown_handle().unwrap();
    let (mut handler, endpoint) = api::api_channel().unwrap();
    handler.reply_timeout = Some(Duration::from_secs(3));
    let api_thread = std::thread::spawn(move || server.run(handler));
    let mut c = Client::connect(&sock);
    let start = Instant::now();
    let r = c.request("GET", "/", None);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(start.elapsed() >= Duration::from_secs(3));
    for _ in 0..2 {
        let start = Instant::now();
        let r = c.request("GET", "/", None);
        assert_eq!(r.status, 503, "{}", r.body);
        assert!(r.fault().contains("still busy"), "{}", r.fault());
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(2500),
            "a request behind a stuck one waited {took:?}"
        );
    }
    // The VMM never answered: only the first request reached it.
    assert!(endpoint.next_request().is_some());
    assert!(endpoint.next_request().is_none());
    stop.shutdown().unwrap();
    api_thread.join().unwrap().unwrap();
}
