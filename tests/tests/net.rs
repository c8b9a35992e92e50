//! virtio-net: the probe's `net` check on a TAP device in a private network namespace, under
//! QEMU microvm (the oracle) and under cinder (`--net tap=NAME`).
//!
//! Each test makes its own namespace (`cinder_tests::netns::NetNs`) holding a TAP with
//! 10.0.2.2/24 and runs the VMM inside it (`ip netns exec`); the host side (ping, UDP echo, bulk
//! transfers both ways) runs on a thread that entered the namespace with setns(2). The
//! namespace (and the TAP) is deleted by a Drop guard. All traffic stays on 10.0.2.0/24 inside
//! that namespace.
//!
//! The protocol (resources/probe/README.md, "net protocol"): UDP datagrams to the probe's
//! port, first byte a type. Bulk data is `CHUNK`-byte chunks with sequence numbers, go-back-N
//! with cumulative ACKs; the checksum is FNV-1a over 64-bit little-endian words.

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder_bin, require_kvm};
use cinder_tests::http::{request, wait_for_socket};
use cinder_tests::netns::{ping, NetNs};
use cinder_tests::probe::{self, Status};
use cinder_tests::qemu::{Microvm, DEFAULT_MACHINE};
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir;

/// QEMU under TCG takes both cores: one guest at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Bytes moved each way. 64 MiB; lower it if TCG is too slow on a machine.
const TRANSFER_BYTES: u64 = 64 << 20;
const CHUNK: usize = 1400;
const PORT: u16 = 7777;
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Host -> probe datagrams in flight.
const WINDOW: u32 = 32;
const RTO: Duration = Duration::from_millis(200);

const HASH_INIT: u64 = 0xcbf2_9ce4_8422_2325;

fn hash_words(mut h: u64, data: &[u8]) -> u64 {
    for w in data.chunks_exact(8) {
        let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Chunk `seq` of a stream: word k is mix(seq * 175 + k + salt). The probe sends salt 0x7e57;
/// the host sends salt 0x4057 (the probe only hashes what it gets).
fn chunk(seq: u32, salt: u64, out: &mut [u8]) {
    for (k, w) in out.chunks_exact_mut(8).enumerate() {
        let x = u64::from(seq)
            .wrapping_mul((CHUNK / 8) as u64)
            .wrapping_add(k as u64)
            .wrapping_add(salt);
        w.copy_from_slice(&mix(x).to_le_bytes());
    }
}

fn chunks() -> u32 {
    u32::try_from(TRANSFER_BYTES.div_ceil(CHUNK as u64)).expect("chunk count fits u32")
}

/// What the host side measured.
#[derive(Debug)]
struct HostResult {
    ping_replies: u16,
    echo_ok: usize,
    to_probe_sum: u64,
    to_probe_secs: f64,
    from_probe_sum: u64,
    from_probe_secs: f64,
    from_probe_retx: u64,
}

fn recv_timeout(sock: &UdpSocket, buf: &mut [u8], t: Duration) -> Option<usize> {
    sock.set_read_timeout(Some(t.max(Duration::from_millis(1))))
        .ok()?;
    sock.recv(buf).ok()
}

/// Everything the host does against a ready probe, inside the namespace; ends with STOP.
fn host_side() -> HostResult {
    let replies = {
        // The first request also resolves the probe's MAC (ARP).
        let mut got = 0;
        for _ in 0..5 {
            got = ping(PROBE_IP, 3, Duration::from_secs(3));
            if got == 3 {
                break;
            }
        }
        got
    };
    let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).expect("bind 10.0.2.2");
    sock.connect(SocketAddrV4::new(PROBE_IP, PORT))
        .expect("connect");
    let mut buf = vec![0u8; 2048];

    // UDP echo.
    let mut echo_ok = 0;
    for (i, len) in [1usize, 100, 1400].into_iter().enumerate() {
        let mut msg = vec![b'E'];
        // reason: `% 256` keeps the value below 256, so the cast to u8 cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        msg.extend((0..len).map(|j| ((j + i) % 256) as u8));
        for _ in 0..10 {
            sock.send(&msg).expect("send echo");
            if let Some(n) = recv_timeout(&sock, &mut buf, Duration::from_secs(2)) {
                if n == msg.len() && buf[0] == b'e' && buf[1..n] == msg[1..] {
                    echo_ok += 1;
                    break;
                }
            }
        }
    }

    // Host -> probe: go-back-N.
    let count = chunks();
    let start = Instant::now();
    let mut expected = HASH_INIT;
    let mut hashed = 0u32;
    let mut base = 0u32;
    let mut next = 0u32;
    let mut pkt = vec![0u8; 6 + CHUNK];
    let mut last_progress = Instant::now();
    let limit = Instant::now() + Duration::from_secs(1800);
    while base < count {
        assert!(
            Instant::now() < limit,
            "host->probe transfer stuck at {base}/{count}"
        );
        let end = count.min(base + WINDOW);
        while next < end {
            pkt[0] = b'D';
            pkt[1] = u8::from(next + 1 == end);
            pkt[2..6].copy_from_slice(&next.to_le_bytes());
            chunk(next, 0x4057, &mut pkt[6..]);
            if next == hashed {
                expected = hash_words(expected, &pkt[6..]);
                hashed += 1;
            }
            if sock.send(&pkt).is_err() {
                // ENOBUFS or a refused port: back off and go back.
                std::thread::sleep(Duration::from_millis(1));
                break;
            }
            next += 1;
        }
        match recv_timeout(&sock, &mut buf, RTO.saturating_sub(last_progress.elapsed())) {
            Some(n) if n >= 5 && buf[0] == b'A' => {
                let acked = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
                if acked > base && acked <= next {
                    base = acked;
                    last_progress = Instant::now();
                }
            }
            Some(_) => {}
            None => {
                if last_progress.elapsed() >= RTO {
                    next = base;
                    last_progress = Instant::now();
                }
            }
        }
    }
    let to_probe_secs = start.elapsed().as_secs_f64();
    // The probe's view.
    let mut to_probe_sum = 0;
    for _ in 0..20 {
        sock.send(b"Q").expect("send Q");
        if let Some(n) = recv_timeout(&sock, &mut buf, Duration::from_secs(1)) {
            if n >= 25 && buf[0] == b'q' {
                let got = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
                assert_eq!(got, count, "probe received {got} of {count} chunks");
                to_probe_sum = u64::from_le_bytes(buf[5..13].try_into().expect("8"));
                break;
            }
        }
    }
    assert_eq!(
        to_probe_sum, expected,
        "the probe's checksum of the host->probe stream"
    );

    // Probe -> host.
    let start = Instant::now();
    let mut get = vec![b'G'];
    get.extend(count.to_le_bytes());
    sock.send(&get).expect("send G");
    let mut next = 0u32;
    let mut sum = HASH_INIT;
    let mut want = vec![0u8; CHUNK];
    let mut retx = 0u64;
    let limit = Instant::now() + Duration::from_secs(1800);
    let ack = |next: u32| {
        let mut k = vec![b'K'];
        k.extend(next.to_le_bytes());
        let _ = sock.send(&k);
    };
    while next < count {
        assert!(
            Instant::now() < limit,
            "probe->host transfer stuck at {next}/{count}"
        );
        let Some(n) = recv_timeout(&sock, &mut buf, Duration::from_secs(1)) else {
            // Nothing: the GET may have been lost.
            if next == 0 {
                sock.send(&get).expect("send G");
            } else {
                ack(next);
            }
            continue;
        };
        if n != 6 + CHUNK || buf[0] != b'T' {
            continue;
        }
        let seq = u32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]);
        if seq == next {
            chunk(seq, 0x7e57, &mut want);
            assert!(
                buf[6..n] == want[..],
                "probe->host chunk {seq} has the wrong content"
            );
            sum = hash_words(sum, &buf[6..n]);
            next += 1;
            if buf[1] & 1 != 0 || next & 15 == 0 || next == count {
                ack(next);
            }
        } else {
            retx += 1;
            ack(next);
        }
    }
    let from_probe_secs = start.elapsed().as_secs_f64();
    // Make sure the probe saw the last ACK.
    for _ in 0..50 {
        ack(next);
        sock.send(b"Q").expect("send Q");
        if let Some(n) = recv_timeout(&sock, &mut buf, Duration::from_millis(500)) {
            if n >= 25 && buf[0] == b'q' {
                let acked = u32::from_le_bytes([buf[13], buf[14], buf[15], buf[16]]);
                if acked == count {
                    break;
                }
            }
        }
    }
    for _ in 0..3 {
        let _ = sock.send(b"X");
    }
    HostResult {
        ping_replies: replies,
        echo_ok,
        to_probe_sum: expected,
        to_probe_secs,
        from_probe_sum: sum,
        from_probe_secs,
        from_probe_retx: retx,
    }
}

fn net_run(what: &str, ns: &NetNs, vmm: Command) {
    let mut s = Session::start(ns.wrap(&vmm));
    let (_, t_ready) = s
        .expect("PROBE net ready", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let host = ns.run(host_side);
    let (_, t_done) = s
        .expect_line("PROBE DONE", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let log = probe::parse(&s.console());
    let fail = |msg: &str| -> ! { panic!("{what}: {msg}\nhost: {host:?}\n{}", s.log()) };
    let Some(c) = log.check("net") else {
        fail("no PROBE net line")
    };
    if c.status != Status::Ok {
        fail("net not ok");
    }
    let bytes = u64::from(chunks()) * CHUNK as u64;
    eprintln!(
        "{what}: ready at {t_ready:.2?}, done at {t_done:.2?}; {} MiB host->probe in {:.2}s, \
         probe->host in {:.2}s (host saw {} out-of-order); probe: {}",
        bytes >> 20,
        host.to_probe_secs,
        host.from_probe_secs,
        host.from_probe_retx,
        c.details
    );
    if host.ping_replies != 3 {
        fail("ping: 3 replies expected");
    }
    if host.echo_ok != 3 {
        fail("UDP echo: 3 replies expected");
    }
    if c.num("rx_bytes") != Some(bytes) || c.num("tx_bytes") != Some(bytes) {
        fail("byte counts");
    }
    if c.field("sum") != Some(&format!("{:#018x}", host.to_probe_sum)) {
        fail("host->probe checksum");
    }
    if c.field("tx_sum") != Some(&format!("{:#018x}", host.from_probe_sum)) {
        fail("probe->host checksum");
    }
    if log.done != Some((1, 1)) {
        fail("PROBE DONE 1/1 expected");
    }
}

const CMDLINE: &str = "probe.run=net probe.net_ip=10.0.2.15 probe.net_peer=10.0.2.2 \
                       probe.udp_port=7777 probe.net_ms=1800000";

#[test]
fn net_probe_qemu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new();
    let mut vm = Microvm::new(&probe::elf_path(), CMDLINE, 1, 128);
    vm.machine = format!("{DEFAULT_MACHINE},acpi=off");
    vm.extra = [
        "-global",
        "virtio-mmio.force-legacy=false",
        "-netdev",
        &format!(
            "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
            ns.tap
        ),
        "-device",
        "virtio-net-device,netdev=n0,mac=02:00:0a:00:02:0f",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    net_run(&format!("QEMU ({:?})", vm.accel), &ns, vm.command());
}

#[test]
fn net_probe_under_cinder() {
    require_kvm();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new();
    let mut c = Command::new(cinder_bin());
    c.arg("--kernel")
        .arg(probe::elf_path())
        .args(["--cmdline", CMDLINE])
        .args(["--net", &format!("tap={},mac=02:00:0a:00:02:0f", ns.tap)]);
    net_run("cinder", &ns, c);
}

/// cinder refuses a TAP that does not exist, and one another process holds, with one line.
#[test]
fn net_tap_errors() {
    // cinder opens taps before it touches /dev/kvm: these hold on any host.
    let ns = NetNs::new();
    let run = |tap: &str| {
        let mut c = Command::new(cinder_bin());
        c.arg("--kernel")
            .arg(probe::elf_path())
            .args(["--cmdline", "probe.run="])
            .args(["--net", &format!("tap={tap}")]);
        let out = ns
            .wrap(&c)
            .output()
            .unwrap_or_else(|e| panic!("run cinder: {e}"));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run("nosuchtap0");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("tap nosuchtap0 does not exist"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // Hold the TAP from this process (inside the namespace), then ask cinder for it.
    let tap = ns.tap.clone();
    let holder = ns.run(move || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("open /dev/net/tun");
        let mut req = [0u8; 40];
        let name = CString::new(tap).expect("name");
        req[..name.as_bytes().len()].copy_from_slice(name.as_bytes());
        req[16..18].copy_from_slice(&(0x0002u16 | 0x1000).to_ne_bytes());
        // SAFETY: TUNSETIFF with a 40-byte ifreq buffer valid for the call.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x4004_54ca, req.as_mut_ptr()) };
        assert_eq!(r, 0, "TUNSETIFF: {}", io::Error::last_os_error());
        f
    });
    let (code, err) = run(&ns.tap);
    drop(holder);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("tap {} is in use by another process", ns.tap)),
        "{err}"
    );
    // Bad values: one line, exit 1, before anything is opened, with the API's messages
    // (PUT /network-interfaces); a malformed spec is a usage error (clap, exit 2).
    let spec_err = |args: &[&str], code: i32, want: &str| {
        let out = Command::new(cinder_bin())
            .arg("--kernel")
            .arg(probe::elf_path())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run cinder: {e}"));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        if code == 1 {
            assert_eq!(err.trim().lines().count(), 1, "{err}");
        }
        assert!(err.contains(want), "{args:?}: {err} lacks {want:?}");
    };
    spec_err(
        &["--net", "tap=x,mac=02:00:00:00:00"],
        1,
        "network-interfaces[net0].guest_mac: `02:00:00:00:00` is not a MAC address",
    );
    spec_err(
        &["--net", "tap=x,mac=zz:00:00:00:00:01"],
        1,
        "network-interfaces[net0].guest_mac: `zz:00:00:00:00:01` is not a MAC address",
    );
    spec_err(
        &["--net", "mac=02:00:00:00:00:01"],
        2,
        "tap=NAME is required",
    );
    spec_err(
        &["--net", "tap=a,id=n", "--net", "tap=b,id=n"],
        1,
        "network-interfaces.iface_id: `n` appears more than once",
    );
    spec_err(
        &["--net", "tap=a,id=x-y"],
        1,
        "network-interfaces.iface_id: `x-y` is not a valid id",
    );
}

/// `PATCH /vm Paused` holds the devices, not only the vCPUs: frames that reach the TAP while
/// the VM is paused stay out of guest memory (the device's `rx_frames` does not move) and are
/// delivered, in order, after `Resumed` (the probe then answers them).
#[test]
fn net_frames_wait_while_paused_under_cinder() {
    require_kvm();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ns = NetNs::new();
    let d = TempDir::new("netpause");
    let sock = d.join("api.sock");
    let metrics = d.join("metrics.json");
    let cfg = d.file(
        "vm.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "{CMDLINE}"}},
                "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{}",
                                         "guest_mac": "02:00:0a:00:02:0f"}}],
                "metrics": {{"metrics_path": "{}"}}}}"#,
            probe::elf_path().display(),
            ns.tap,
            metrics.display()
        )
        .as_bytes(),
    );
    let mut c = Command::new(cinder_bin());
    c.arg("--config-file")
        .arg(&cfg)
        .arg("--api-sock")
        .arg(&sock);
    let mut s = Session::start(ns.wrap(&c));
    s.expect("PROBE net ready", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    let rx_frames = || -> u64 {
        let body = r#"{"action_type": "FlushMetrics"}"#;
        let r = request(&sock, "PUT", "/actions", Some(body));
        assert_eq!(r.status, 204, "FlushMetrics: {r:?}");
        let text = std::fs::read_to_string(&metrics).unwrap_or_default();
        let last = text.lines().last().unwrap_or("{}");
        let v: serde_json::Value = serde_json::from_str(last).unwrap_or_default();
        v["net_eth0"]["rx_frames"]
            .as_u64()
            .unwrap_or_else(|| panic!("no net_eth0.rx_frames in {last}"))
    };
    let patch = |state: &str| {
        let body = format!(r#"{{"state": "{state}"}}"#);
        let r = request(&sock, "PATCH", "/vm", Some(&body));
        assert_eq!(r.status, 204, "PATCH /vm {state}: {r:?}");
    };

    patch("Paused");
    let before = rx_frames();
    // The paused probe cannot answer ARP: the namespace gets a static entry for it.
    let tap = ns.tap.clone();
    let (udp, answered) = ns.run(move || {
        cinder_tests::netns::sh(&[
            "ip",
            "neigh",
            "replace",
            "10.0.2.15",
            "lladdr",
            "02:00:0a:00:02:0f",
            "dev",
            &tap,
        ]);
        let udp = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).expect("bind 10.0.2.2");
        udp.connect(SocketAddrV4::new(PROBE_IP, PORT))
            .expect("connect");
        for i in 0..5u8 {
            udp.send(&[b'E', b'p', i]).expect("send while paused");
        }
        let mut buf = [0u8; 64];
        let answered = recv_timeout(&udp, &mut buf, Duration::from_millis(700));
        (udp, answered)
    });
    assert_eq!(answered, None, "the paused probe answered\n{}", s.log());
    assert_eq!(
        rx_frames(),
        before,
        "frames reached guest memory while the VM was paused\n{}",
        s.log()
    );

    patch("Resumed");
    let replies = ns.run(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Some(n) = recv_timeout(&udp, &mut buf, Duration::from_secs(5)) {
            got.push(buf[..n].to_vec());
            if got.len() == 5 {
                break;
            }
        }
        let _ = udp.send(b"X");
        got
    });
    let want: Vec<Vec<u8>> = (0..5u8).map(|i| vec![b'e', b'p', i]).collect();
    assert_eq!(
        replies,
        want,
        "after Resumed the probe answers what waited\n{}",
        s.log()
    );
    assert!(rx_frames() >= before + 5, "frames delivered after resume");
    s.expect_line("PROBE DONE", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
}
