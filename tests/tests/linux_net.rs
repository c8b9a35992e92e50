//! virtio-net through Linux's own driver and TCP/IP stack: the test profile boots with eth0
//! configured by the kernel (`ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off`) on a TAP in a
//! test-owned network namespace (`cinder_tests::netns`). The host pings the guest, serves a
//! file over HTTP that the guest fetches with busybox `wget`, and receives a file the guest
//! sends with busybox `nc`; SHA-256 sums match both ways (the guest's `sha256sum`, the host's).
//! Only 10.0.2.0/24 inside the namespace; the namespace goes away with the test.
//!
//! QEMU microvm (TAP back-end, no vhost) is the oracle; the `_under_cinder` variant uses
//! `--net tap=NAME` and needs /dev/kvm.

use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cinder_tests::cinder::require_kvm;
use cinder_tests::guest::GuestDir;
use cinder_tests::linux::{cinder_vm, ok, pattern, profile_cmdline, qemu_vm, STEP};
use cinder_tests::netns::{ping, NetNs, GUEST_IP, HOST_IP};
use cinder_tests::session::Session;

/// One guest at a time (QEMU TCG takes both cores).
static SERIAL: Mutex<()> = Mutex::new(());

/// Bytes each way. Small: on the KVM test hosts the guest kernel copies at ~1 MB/s.
const BYTES: usize = 256 << 10;
const HTTP_PORT: u16 = 7080;
const NC_PORT: u16 = 7081;
const MAC: &str = "02:00:0a:00:02:0f";
/// How long the host side waits for the guest to connect.
const ACCEPT: Duration = Duration::from_secs(300);

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Accepts one connection on `l` within ACCEPT (the listener is non-blocking).
fn accept(l: &TcpListener) -> std::net::TcpStream {
    let until = Instant::now() + ACCEPT;
    loop {
        match l.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false).expect("blocking stream");
                c.set_read_timeout(Some(ACCEPT)).expect("read timeout");
                return c;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < until, "the guest did not connect");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn listener(port: u16) -> TcpListener {
    let l = TcpListener::bind(SocketAddrV4::new(HOST_IP, port))
        .unwrap_or_else(|e| panic!("bind {HOST_IP}:{port}: {e}"));
    l.set_nonblocking(true).expect("non-blocking listener");
    l
}

/// The sha256sum line for `path` in the console text `text` (`<hex>  <path>`).
fn guest_sum(text: &str, path: &str) -> String {
    text.lines()
        .rev()
        .find(|l| l.trim_end().ends_with(&format!("  {path}")))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

fn run(what: &str, ns: &NetNs, vmm: Command) {
    let mut s = Session::start(ns.wrap(&vmm));
    let (_, t_init) = ok(s.expect_line("CINDER-INIT ok", STEP));
    ok(s.expect("CINDER-INIT shell", STEP));

    // Ping (the first request also resolves the guest's MAC).
    let t = Instant::now();
    let replies = ns.run(|| {
        let mut got = 0;
        for _ in 0..20 {
            got = ping(GUEST_IP, 3, Duration::from_secs(3));
            if got == 3 {
                break;
            }
        }
        got
    });
    assert_eq!(replies, 3, "{what}: ping replies\n{}", s.log());
    let t_ping = t.elapsed();

    // Host -> guest: a one-shot HTTP server, the guest's wget.
    let to_guest = pattern(0x4e37, BYTES);
    let want_in = sha256(&to_guest);
    let data = to_guest.clone();
    let server = ns.spawn(move || {
        let l = listener(HTTP_PORT);
        let mut c = accept(&l);
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
            let n = c.read(&mut buf).expect("read the request");
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let head = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        );
        c.write_all(head.as_bytes()).expect("write the head");
        c.write_all(&data).expect("write the body");
        String::from_utf8_lossy(&req).into_owned()
    });
    let t = Instant::now();
    ok(s.send(&format!(
        "wget -q -O /tmp/in http://{HOST_IP}:{HTTP_PORT}/data; echo WGET\"\"-rc=$?; \
         sha256sum /tmp/in\n"
    )));
    let (text, _) = ok(s.expect_line("  /tmp/in", STEP));
    let request = server
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    let t_in = t.elapsed();
    assert!(
        request.starts_with("GET /data "),
        "{what}: request {request:?}"
    );
    assert!(text.contains("WGET-rc=0"), "{what}: wget\n{}", s.log());
    assert_eq!(
        guest_sum(&text, "/tmp/in"),
        want_in,
        "{what}: host->guest checksum\n{}",
        s.log()
    );

    // Guest -> host: the guest's nc sends a file and closes; the host reads to the end.
    let client = ns.spawn(|| {
        let l = listener(NC_PORT);
        let mut c = accept(&l);
        let mut got = Vec::new();
        c.read_to_end(&mut got).expect("read the guest's file");
        got
    });
    let t = Instant::now();
    ok(s.send(&format!(
        "head -c {BYTES} /dev/urandom > /tmp/out; sha256sum /tmp/out; \
         nc {HOST_IP} {NC_PORT} < /tmp/out; echo NC\"\"-rc=$?\n"
    )));
    let (text, _) = ok(s.expect_line("NC-rc=", STEP));
    let got = client
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    let t_out = t.elapsed();
    assert!(text.contains("NC-rc=0"), "{what}: nc\n{}", s.log());
    assert_eq!(got.len(), BYTES, "{what}: bytes from the guest");
    assert_eq!(
        guest_sum(&text, "/tmp/out"),
        sha256(&got),
        "{what}: guest->host checksum\n{}",
        s.log()
    );

    ok(s.send("reboot -f\n"));
    let st = ok(s.wait_exit(STEP));
    assert_eq!(st.code(), Some(0), "{what}: reboot -f\n{}", s.log());
    eprintln!(
        "{what}: init at {t_init:.2?}; ping {t_ping:.2?}; {} KiB host->guest (wget) {t_in:.2?}, \
         guest->host (nc, with head and sha256sum) {t_out:.2?}",
        BYTES >> 10
    );
}

fn cmdline(g: &GuestDir) -> String {
    format!(
        "{} ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off",
        profile_cmdline(g)
    )
}

#[test]
fn linux_net_ping_and_transfers_qemu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = GuestDir::test_profile();
    let ns = NetNs::new();
    let mut vm = qemu_vm(&g, &cmdline(&g), 1, 128);
    vm.extra.extend(
        [
            "-initrd",
            &g.file("initramfs.cpio").display().to_string(),
            "-netdev",
            &format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                ns.tap
            ),
            "-device",
            &format!("virtio-net-device,netdev=n0,mac={MAC}"),
        ]
        .map(String::from),
    );
    run(&format!("QEMU ({:?})", vm.accel), &ns, vm.command());
}

#[test]
fn linux_net_ping_and_transfers_under_cinder() {
    require_kvm();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = GuestDir::test_profile();
    let ns = NetNs::new();
    let mut c = cinder_vm(&g, &cmdline(&g), 1, 128);
    c.arg("--initrd")
        .arg(g.file("initramfs.cpio"))
        .args(["--net", &format!("tap={},mac={MAC}", ns.tap)]);
    run("cinder", &ns, c);
}
