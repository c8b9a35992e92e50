//! cinder under `cinder-jailer` (issue 15 items 2, issue 19 item 5): the probe boots, and its
//! blk, net and vsock checks pass, with cinder jailed as uid/gid 65534, no capabilities, in a
//! chroot holding only what the jailer put there, in cgroups with limits; and each of
//! Firecracker's jailer flags does what it says or is refused with one line, leaving nothing
//! behind.
//!
//! Every jail has its own id, chroot base and parent cgroup (`cinder_tests::jail::Jail`), removed
//! when the test ends; a TAP is made per test in its own network namespace.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cinder_tests::cinder::{cinder_bin, require_kvm};
use cinder_tests::http::{request, wait_for_socket};
use cinder_tests::jail::{jailer_bin, status_field, tree, Jail, NOBODY};
use cinder_tests::linux::{fnv1a, pattern};
use cinder_tests::netns::{ping, sh, NetNs};
use cinder_tests::probe::{self, Status};
use cinder_tests::runner::run;
use cinder_tests::session::Session;
use cinder_tests::tmp::TempDir;

const STEP: Duration = Duration::from_secs(120);
const MEM_LIMIT: u64 = 512 << 20;

/// The probe ELF, linked into every jail as `/probe`.
fn probe_elf() -> String {
    probe::elf_path().to_string_lossy().into_owned()
}

/// The jailed process's view of the capability sets, ids and privileges.
fn assert_unprivileged(pid: u32) {
    let n = NOBODY.to_string();
    for key in ["Uid", "Gid"] {
        let v = status_field(pid, key);
        assert!(
            v.split_whitespace().all(|x| x == n) && v.split_whitespace().count() == 4,
            "{key}: {v}"
        );
    }
    assert_eq!(status_field(pid, "Groups"), "", "supplementary groups");
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, key), "0000000000000000", "{key}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    assert!(
        env.is_empty(),
        "environment: {}",
        String::from_utf8_lossy(&env)
    );
    let ours = std::fs::read_link("/proc/self/ns/mnt").expect("own mount ns");
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("mount ns");
    assert_ne!(ours, theirs, "a mount namespace of its own");
}

/// Every path in the jail's root, as the jailed process sees it, is one the jailer (or cinder)
/// made: the binary, its loader and libraries (copies of the host's), the device nodes, and
/// `extra`.
fn assert_root_holds_only(pid: u32, extra: &[&str]) {
    let root = format!("/proc/{pid}/root");
    let entries = tree(Path::new(&root));
    let mut allowed: Vec<String> = ["cinder", "dev", "dev/kvm", "dev/net", "dev/net/tun"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if Path::new("/dev/userfaultfd").exists() {
        allowed.push("dev/userfaultfd".into());
    }
    allowed.extend(extra.iter().map(|s| s.to_string()));
    for e in &entries {
        if allowed.contains(e) {
            continue;
        }
        // The loader and libraries: copies of the host's files at the same paths, and the
        // directories holding them.
        let is_lib = e.contains(".so") && Path::new("/").join(e).is_file();
        let holds_lib = entries
            .iter()
            .any(|x| x.starts_with(&format!("{e}/")) && x.contains(".so"));
        assert!(
            is_lib || holds_lib,
            "unexpected {e} in the jail's root; it holds: {entries:?}"
        );
    }
    for want in ["cinder", "dev/kvm", "dev/net/tun"].iter().chain(extra) {
        assert!(
            entries.iter().any(|e| e == want),
            "no {want} in {entries:?}"
        );
    }
    let kvm = std::fs::metadata(format!("{root}/dev/kvm")).expect("dev/kvm");
    assert_eq!((kvm.uid(), kvm.gid()), (NOBODY, NOBODY), "/dev/kvm's owner");
    assert_eq!(kvm.mode() & 0o777, 0o600);
    assert_eq!(
        kvm.rdev(),
        std::fs::metadata("/dev/kvm").expect("host kvm").rdev()
    );
}

fn cgroup_value(jail: &Jail, hierarchy: &str, file: &str) -> String {
    let p = jail.cgroup_dir(hierarchy).join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

/// The probe boots in a jail: cinder runs as 65534 with no capabilities, in cgroup v1 memory,
/// cpu and pids cgroups with their limits, with the resource limits given, an empty
/// environment, none of the jailer's inherited descriptors, the id from `--id`, and a root
/// holding only what the jail put there; then the probe is configured over the API socket in
/// the jail, boots and passes.
#[test]
fn probe_boots_jailed_as_nobody_under_cinder() {
    require_kvm();
    let jail = Jail::new("boot");
    // A descriptor the jailer inherits without close-on-exec: cinder must not have it.
    let marker = jail.base.file("inherited-marker", b"x");
    let marker_file = std::fs::File::open(&marker).expect("marker");
    let mut c = jail.command(
        &[
            "--link-file",
            &probe_elf(),
            "--cgroup",
            &format!("memory.limit_in_bytes={MEM_LIMIT}"),
            "--cgroup",
            "cpu.cfs_quota_us=150000",
            "--cgroup",
            "pids.max=64",
            "--cgroup",
            "cpuset.cpus=0",
            "--resource-limit",
            "no-file=1000",
            "--resource-limit",
            "fsize=1073741824",
        ],
        &["--api-sock", "/api.sock"],
    );
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = marker_file.as_raw_fd();
        // SAFETY: dup2 is async-signal-safe; it copies a descriptor this process holds to 50,
        // without close-on-exec, for the jailer to inherit.
        unsafe {
            c.pre_exec(move || {
                if libc::dup2(fd, 50) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c.env("CINDER_JAIL_SECRET", "leak");
    let mut s = Session::start(c);
    let sock = jail.host_path("/api.sock");
    wait_for_socket(&sock, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    let pid = s.pid();

    assert_unprivileged(pid);
    assert_root_holds_only(pid, &["probe", "api.sock"]);
    // Descriptors: none is the inherited marker.
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .flatten()
    {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        assert!(
            !target.to_string_lossy().contains("inherited-marker"),
            "fd {:?} is the jailer's inherited descriptor",
            e.file_name()
        );
    }
    // Cgroups, v1.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let want = format!("/{}/{}", jail.parent, jail.id);
    for controller in ["memory", "cpu", "pids", "cpuset"] {
        assert!(
            cg.lines()
                .any(|l| l.ends_with(&format!(":{controller}:{want}"))),
            "{controller} not at {want}:\n{cg}"
        );
        let procs = cgroup_value(&jail, controller, "cgroup.procs");
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{controller}/cgroup.procs: {procs}"
        );
    }
    assert_eq!(
        cgroup_value(&jail, "memory", "memory.limit_in_bytes"),
        MEM_LIMIT.to_string()
    );
    assert_eq!(cgroup_value(&jail, "cpu", "cpu.cfs_quota_us"), "150000");
    assert_eq!(cgroup_value(&jail, "pids", "pids.max"), "64");
    assert_eq!(cgroup_value(&jail, "cpuset", "cpuset.cpus"), "0");
    assert_eq!(status_field(pid, "Cpus_allowed_list"), "0");
    // Resource limits.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let limit = |name: &str| -> Vec<String> {
        let l = limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{limits}"));
        l[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(limit("Max open files"), ["1000", "1000"]);
    assert_eq!(limit("Max file size"), ["1073741824", "1073741824"]);
    // The id after `--id` reached cinder.
    let r = request(&sock, "GET", "/", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], jail.id.as_str(), "{}", r.body);

    // Boot the probe from inside the jail.
    let r = request(
        &sock,
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/probe", "boot_args": "probe.run=boot,mem"}"#),
    );
    assert_eq!(r.status, 204, "{}\n{}", r.body, s.log());
    let r = request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(r.status, 204, "{}\n{}", r.body, s.log());
    s.expect_line("PROBE DONE", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    let log = probe::parse(&s.console());
    assert!(log.all_passed(), "{}", s.log());
    assert_eq!(log.done, Some((2, 2)), "{}", s.log());
    let st = s
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.code(), Some(0), "{}", s.log());
    drop(s);
}

/// A pattern word of the probe's `blk` check (tests/tests/blk.rs has the definition).
fn blk_word(seed: u64, lba: u64, i: u64) -> u64 {
    let mut x = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(lba.wrapping_mul(64))
        .wrapping_add(i);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// virtio-blk in a jail: a writable drive owned by 65534 and a read-only one, both linked into
/// the jail; the probe writes and reads them, and the image holds what it wrote.
#[test]
fn blk_jailed_under_cinder() {
    require_kvm();
    let jail = Jail::new("blk");
    let scratch = TempDir::new("jail-blk-img");
    let w = scratch.file("w.img", &vec![0u8; 16 << 20]);
    std::os::unix::fs::chown(&w, Some(NOBODY), Some(NOBODY)).expect("chown w.img");
    let r_content = pattern(0xabcd, 8 << 20);
    let r = scratch.file("r.img", &r_content);
    let seed = 0x1234_5678u64;
    let cmdline = format!("probe.run=blk probe.blk_seed={seed}");
    let c = jail.command(
        &[
            "--link-file",
            &probe_elf(),
            "--link-file",
            &w.to_string_lossy(),
            "--link-file",
            &r.to_string_lossy(),
        ],
        &[
            "--kernel",
            "/probe",
            "--cmdline",
            &cmdline,
            "--drive",
            "path=/w.img,id=probe_w",
            "--drive",
            "path=/r.img,id=probe_r,ro",
        ],
    );
    let res = run(c, STEP, |_| false);
    let log = probe::parse(&res.stdout);
    assert_eq!(res.code(), Some(0), "{}", res.log());
    let blk = log
        .check("blk")
        .unwrap_or_else(|| panic!("no blk line\n{}", res.log()));
    assert_eq!(blk.status, Status::Ok, "{}", res.log());
    assert_eq!(blk.num("devs"), Some(2), "{}", res.log());
    assert!(
        blk.details
            .contains(&format!("hash={:#018x}", fnv1a(&r_content))),
        "the read-only disk's hash: {}",
        blk.details
    );
    // What the probe wrote, read through the jail's view of the image.
    let got = std::fs::read(jail.host_path("/w.img")).expect("w.img");
    for (lba, sector) in got.chunks(512).enumerate().step_by(997) {
        let lba = lba as u64;
        for (i, word) in sector.chunks(8).enumerate() {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            assert_eq!(w, blk_word(seed, lba, i as u64), "sector {lba} word {i}");
        }
    }
    assert_eq!(
        std::fs::read(jail.host_path("/r.img")).expect("r.img"),
        r_content
    );
}

/// Ping, UDP echo, then STOP: the probe's `net` check over a TAP the jailed cinder opens in
/// the network namespace it joined with `--netns`.
fn net_host_side() -> (u16, usize) {
    let probe_ip = Ipv4Addr::new(10, 0, 2, 15);
    let mut replies = 0;
    for _ in 0..5 {
        replies = ping(probe_ip, 3, Duration::from_secs(3));
        if replies == 3 {
            break;
        }
    }
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 0)).expect("bind");
    sock.connect(SocketAddrV4::new(probe_ip, 7777))
        .expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut echo_ok = 0;
    let mut buf = [0u8; 2048];
    for len in [1usize, 100, 1400] {
        let mut msg = vec![b'E'];
        msg.extend((0..len).map(|j| u8::try_from(j % 251).expect("below 251")));
        for _ in 0..10 {
            sock.send(&msg).expect("send");
            if let Ok(n) = sock.recv(&mut buf) {
                if n == msg.len() && buf[0] == b'e' && buf[1..n] == msg[1..] {
                    echo_ok += 1;
                    break;
                }
            }
        }
    }
    for _ in 0..3 {
        let _ = sock.send(b"X");
    }
    (replies, echo_ok)
}

/// virtio-net in a jail: cinder joins the test's network namespace (`--netns`) and opens a TAP
/// made for uid 65534 there, with no capability.
#[test]
fn net_jailed_under_cinder() {
    require_kvm();
    let jail = Jail::new("net");
    let ns = NetNs::new();
    // The TAP again, for 65534: an unprivileged TUNSETIFF.
    let x = |cmd: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", &ns.name];
        v.extend_from_slice(cmd);
        sh(&v);
    };
    x(&["ip", "link", "del", &ns.tap]);
    x(&[
        "ip", "tuntap", "add", "dev", &ns.tap, "mode", "tap", "user", "65534",
    ]);
    x(&["ip", "addr", "add", "10.0.2.2/24", "dev", &ns.tap]);
    x(&["ip", "link", "set", &ns.tap, "up"]);
    let netns = format!("/var/run/netns/{}", ns.name);
    let c = jail.command(
        &["--link-file", &probe_elf(), "--netns", &netns],
        &[
            "--kernel",
            "/probe",
            "--cmdline",
            "probe.run=net probe.net_ip=10.0.2.15 probe.net_peer=10.0.2.2 probe.udp_port=7777 \
             probe.net_ms=120000",
            "--net",
            &format!("tap={},mac=02:00:0a:00:02:0f", ns.tap),
        ],
    );
    let mut s = Session::start(c);
    s.expect("PROBE net ready", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = s.pid();
    assert_unprivileged(pid);
    let ns_ino = std::fs::metadata(&netns).expect("netns").ino();
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("ns/net")
        .ino();
    assert_eq!(
        ns_ino, theirs,
        "cinder is in the namespace given by --netns"
    );
    let (replies, echo_ok) = ns.run(net_host_side);
    s.expect_line("PROBE DONE", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    let log = probe::parse(&s.console());
    let net = log
        .check("net")
        .unwrap_or_else(|| panic!("no net line\n{}", s.log()));
    assert_eq!(net.status, Status::Ok, "{}", s.log());
    assert_eq!(replies, 3, "ping replies\n{}", s.log());
    assert_eq!(echo_ok, 3, "UDP echoes\n{}", s.log());
    let st = s
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(st.code(), Some(0), "{}", s.log());
}

/// virtio-vsock in a jail: the hybrid socket is made by cinder inside the jail; the host
/// connects to it through the jail's path and gets its bytes echoed.
#[test]
fn vsock_jailed_under_cinder() {
    require_kvm();
    let jail = Jail::new("vsock");
    let c = jail.command(
        &["--link-file", &probe_elf()],
        &[
            "--kernel",
            "/probe",
            "--vsock",
            "cid=3,uds=/v.sock",
            "--cmdline",
            "probe.run=vsock probe.vsock_mode=echo",
        ],
    );
    let mut s = Session::start(c);
    s.expect_line("PROBE vsock ready", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_unprivileged(s.pid());
    let uds = jail.host_path("/v.sock");
    let md = std::fs::metadata(&uds).expect("v.sock");
    assert_eq!(md.uid(), NOBODY, "the socket is cinder's, made as 65534");
    let data = pattern(42, 256 << 10);
    let conn = cinder_tests::vsock::connect(&uds, 5000, STEP)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    let mut w = conn.try_clone().expect("clone");
    let to_send = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&to_send));
    let mut back = vec![0u8; data.len()];
    let mut r = conn;
    r.read_exact(&mut back).expect("the echo");
    writer.join().expect("writer").expect("write");
    assert!(back == data, "the echo differs");
    r.shutdown(Shutdown::Both).expect("close");
    drop(r);
    s.expect_line("PROBE DONE", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    let log = probe::parse(&s.console());
    let v = log
        .check("vsock")
        .unwrap_or_else(|| panic!("no vsock line\n{}", s.log()));
    assert_eq!(v.status, Status::Ok, "{}", s.log());
    assert_eq!(v.num("tx_sum"), Some(fnv1a(&data)), "{}", v.details);
}

/// vsock from the guest to the host in a jail: the probe connects to host port 6000, which
/// cinder (as 65534) reaches as `/v.sock_6000` inside the jail, where the host listens.
#[test]
fn vsock_guest_to_host_jailed_under_cinder() {
    require_kvm();
    let jail = Jail::new("vsockg2h");
    let bytes = 256 << 10;
    let c = jail.command(
        &["--link-file", &probe_elf()],
        &[
            "--kernel",
            "/probe",
            "--vsock",
            "cid=3,uds=/v.sock",
            "--cmdline",
            &format!("probe.run=vsock probe.vsock_host_port=6000 probe.vsock_bytes={bytes}"),
        ],
    );
    // The orchestrator's way: the root exists before the jailer runs, with the host's
    // listener in it (the jailer keeps what it finds there).
    std::fs::create_dir_all(jail.root()).expect("the jail's root");
    let path = jail.host_path("/v.sock_6000");
    let l = std::os::unix::net::UnixListener::bind(&path).expect("listen in the jail");
    std::os::unix::fs::chown(&path, Some(NOBODY), Some(NOBODY)).expect("chown the listener");
    let mut s = Session::start(c);
    l.set_nonblocking(true).expect("non-blocking");
    let until = Instant::now() + STEP;
    let mut conn = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the probe did not connect: {e}\n{}", s.log()),
        }
    };
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(STEP)).expect("timeout");
    let mut got = Vec::new();
    conn.read_to_end(&mut got)
        .expect("read until the guest closes");
    s.expect_line("PROBE DONE", STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    let log = probe::parse(&s.console());
    let v = log
        .check("vsock")
        .unwrap_or_else(|| panic!("no vsock line\n{}", s.log()));
    assert_eq!(v.status, Status::Ok, "{}", s.log());
    assert_eq!(got.len(), bytes, "{}", v.details);
    assert_eq!(v.num("tx_sum"), Some(fnv1a(&got)), "{}", v.details);
}

/// `--new-pid-ns`: the jailer forks, writes the child's host pid to `<root>/cinder.pid` and
/// exits 0; the child is PID 1 of its namespace, jailed and unprivileged.
#[test]
fn new_pid_ns_jailed_under_cinder() {
    require_kvm();
    let jail = Jail::new("pidns");
    let mut c = jail.command(&["--new-pid-ns"], &["--api-sock", "/api.sock"]);
    // Files, not pipes: the jailed child keeps what it inherits open after the jailer exits.
    let scratch = TempDir::new("jail-pidns-out");
    let err_path = scratch.join("stderr");
    let err_file = std::fs::File::create(&err_path).expect("stderr file");
    c.stdout(std::process::Stdio::null()).stderr(err_file);
    let mut child = c.spawn().expect("spawn the jailer");
    let until = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the jailer did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(status.success(), "jailer: {status:?} {err}");
    let pid: u32 = std::fs::read_to_string(jail.host_path("/cinder.pid"))
        .expect("cinder.pid")
        .trim()
        .parse()
        .expect("a pid");
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let pid = libc::pid_t::try_from(self.0).expect("pid");
            // SAFETY: kill(2) of the jailed cinder this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let until = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{}", self.0)).exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let _kill = Kill(pid);
    wait_for_socket(&jail.host_path("/api.sock"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let nspid = status_field(pid, "NSpid");
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "NSpid: {nspid}"
    );
    assert_unprivileged(pid);
    let ours = std::fs::read_link("/proc/self/ns/pid").expect("pid ns");
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/pid")).expect("pid ns");
    assert_ne!(ours, theirs);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--parent-cpu-time-us"), "{cmdline}");
    let r = request(&jail.host_path("/api.sock"), "GET", "/", None);
    assert_eq!(r.status, 200, "{}", r.body);
}

/// `--daemonize`: cinder leads a new session with stdin, stdout and stderr on /dev/null.
#[test]
fn daemonize_jailed_under_cinder() {
    require_kvm();
    let jail = Jail::new("daemon");
    let c = jail.command(&["--daemonize"], &["--api-sock", "/api.sock"]);
    let s = Session::start(c);
    wait_for_socket(&jail.host_path("/api.sock"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    let pid = s.pid();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // state ppid pgrp session
    let session: u32 = after
        .split_whitespace()
        .nth(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("stat: {stat}"));
    assert_eq!(session, pid, "a session of its own");
    for fd in 0..3 {
        let t = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("fd");
        assert_eq!(t, Path::new("/dev/null"), "fd {fd}");
    }
    assert_unprivileged(pid);
}

/// `--cgroup-version 2`: the VM's cgroup in the unified hierarchy, with its file written.
/// (On these hosts the unified hierarchy has no memory, cpu or pids controller: the core
/// `cgroup.*` files are what it can limit.)
#[test]
fn cgroup_v2_jailed_under_cinder() {
    require_kvm();
    let jail = Jail::new("cgv2");
    let c = jail.command(
        &[
            "--cgroup-version",
            "2",
            "--cgroup",
            "cgroup.max.descendants=3",
        ],
        &["--api-sock", "/api.sock"],
    );
    let s = Session::start(c);
    wait_for_socket(&jail.host_path("/api.sock"), Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", s.log()));
    let pid = s.pid();
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let want = format!("0::/{}/{}", jail.parent, jail.id);
    assert!(cg.lines().any(|l| l == want), "{want} not in\n{cg}");
    assert_eq!(
        cgroup_value(&jail, "unified", "cgroup.max.descendants"),
        "3"
    );
    assert_unprivileged(pid);
}

// ---------------------------------------------------------------------------------------------
// Refusals: one line, a non-zero exit, nothing left behind.

/// Runs the jailer with `jailer` flags (after the jail's own, or instead of them with
/// `raw`), and checks the refusal: exit code `code`, one line on stderr naming `says`, no
/// chroot and no cgroup left.
fn refused(jail: &Jail, out: Output, code: i32, says: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("cinder-jailer: "), "{err}");
    assert!(err.contains(says), "{err:?} does not say {says:?}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let left: Vec<_> = std::fs::read_dir(jail.base.path())
        .expect("base")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "inherited-marker" && n != "link" && n != "real")
        .collect();
    assert!(left.is_empty(), "left in the chroot base: {left:?}");
    assert!(
        jail.leftover_cgroups().is_empty(),
        "cgroups left: {:?}",
        jail.leftover_cgroups()
    );
}

fn output(mut c: Command) -> Output {
    c.output().expect("run the jailer")
}

/// A jail command with `--cgroup memory.limit_in_bytes` (so a cgroup would be made) and
/// `flags` added.
fn jail_with(jail: &Jail, flags: &[&str]) -> Command {
    let mut all = vec!["--cgroup", "memory.limit_in_bytes=268435456"];
    all.extend_from_slice(flags);
    jail.command(&all, &["--no-api"])
}

#[test]
fn jailer_refuses_a_bad_id() {
    for id in ["a/b", "../x", "a_b", "", &"x".repeat(65)] {
        let jail = Jail::new("badid");
        let mut c = Command::new(jailer_bin());
        c.args(["--id", id, "--exec-file"])
            .arg(cinder_bin())
            .args(["--uid", "65534", "--gid", "65534", "--chroot-base-dir"])
            .arg(jail.base.path())
            .args(["--parent-cgroup", &jail.parent])
            .args(["--cgroup", "memory.limit_in_bytes=268435456"]);
        refused(&jail, output(c), 1, "invalid --id");
    }
}

#[test]
fn jailer_refuses_a_missing_or_odd_exec_file() {
    let jail = Jail::new("noexec");
    let mut c = Command::new(jailer_bin());
    c.args(["--id", &jail.id, "--exec-file", "/nonexistent/cinder"])
        .args(["--uid", "65534", "--gid", "65534", "--chroot-base-dir"])
        .arg(jail.base.path())
        .args(["--parent-cgroup", &jail.parent]);
    refused(
        &jail,
        output(c),
        1,
        "--exec-file /nonexistent/cinder: No such file",
    );
    let mut c = Command::new(jailer_bin());
    c.args(["--id", &jail.id, "--exec-file", "/tmp"])
        .args(["--uid", "65534", "--gid", "65534", "--chroot-base-dir"])
        .arg(jail.base.path());
    refused(&jail, output(c), 1, "not a regular file");
    // A file that is not an ELF binary.
    let scratch = TempDir::new("jail-notelf");
    let script = scratch.file("cinder", b"#!/bin/sh\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut c = Command::new(jailer_bin());
    c.args(["--id", &jail.id, "--exec-file"])
        .arg(&script)
        .args(["--uid", "65534", "--gid", "65534", "--chroot-base-dir"])
        .arg(jail.base.path());
    refused(&jail, output(c), 1, "is not an ELF executable");
}

#[test]
fn jailer_refuses_a_chroot_base_that_is_a_symlink() {
    let jail = Jail::new("symlink");
    let real = jail.base.join("real");
    std::fs::create_dir(&real).expect("real");
    let link = jail.base.join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    for base in [link.clone(), link.join("below")] {
        let mut c = Command::new(jailer_bin());
        c.args(["--id", &jail.id, "--exec-file"])
            .arg(cinder_bin())
            .args(["--uid", "65534", "--gid", "65534", "--chroot-base-dir"])
            .arg(&base)
            .args(["--parent-cgroup", &jail.parent])
            .args(["--cgroup", "memory.limit_in_bytes=268435456"]);
        refused(&jail, output(c), 1, "is a symlink");
        assert_eq!(std::fs::read_dir(&real).expect("real").count(), 0);
    }
    let mut c = Command::new(jailer_bin());
    c.args(["--id", &jail.id, "--exec-file"])
        .arg(cinder_bin())
        .args([
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--chroot-base-dir",
            "relative/dir",
        ]);
    refused(&jail, output(c), 1, "not an absolute path");
}

#[test]
fn jailer_refuses_uid_or_gid_that_are_not_numbers() {
    for (flag, v) in [
        ("--uid", "nobody"),
        ("--gid", "65534x"),
        ("--uid", "4294967296"),
    ] {
        let jail = Jail::new("baduid");
        let mut c = Command::new(jailer_bin());
        c.args(["--id", &jail.id, "--exec-file"])
            .arg(cinder_bin())
            .args(["--chroot-base-dir"])
            .arg(jail.base.path());
        if flag == "--uid" {
            c.args(["--uid", v, "--gid", "65534"]);
        } else {
            c.args(["--uid", "65534", "--gid", v]);
        }
        refused(
            &jail,
            output(c),
            2,
            &format!("invalid value '{v}' for '{flag}"),
        );
    }
    let jail = Jail::new("nouid");
    let mut c = Command::new(jailer_bin());
    c.args(["--id", &jail.id, "--exec-file"])
        .arg(cinder_bin())
        .args(["--gid", "1"]);
    refused(&jail, output(c), 2, "--uid <UID>");
}

/// An unknown cgroup file is found only once the cgroup exists: it (and the chroot already
/// built) is removed again.
#[test]
fn jailer_refuses_an_unknown_cgroup_file() {
    let jail = Jail::new("badcg");
    refused(
        &jail,
        output(jail_with(&jail, &["--cgroup", "memory.no_such_file=1"])),
        1,
        "unknown cgroup file memory.no_such_file",
    );
    refused(
        &jail,
        output(jail_with(&jail, &["--cgroup", "nosuchctl.max=1"])),
        1,
        "no cgroup v1 hierarchy is mounted with the nosuchctl controller",
    );
    refused(
        &jail,
        output(jail_with(&jail, &["--cgroup", "memory.limit_in_bytes"])),
        1,
        "invalid --cgroup",
    );
    // A value the kernel refuses.
    refused(
        &jail,
        output(jail_with(&jail, &["--cgroup", "pids.max=lots"])),
        1,
        "cannot write \"lots\"",
    );
    // The unified hierarchy here has no memory controller.
    let mut c = jail.command(
        &["--cgroup-version", "2", "--cgroup", "memory.max=1000000"],
        &[],
    );
    c.stdout(std::process::Stdio::piped());
    let out = output(c);
    let controllers =
        std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers").unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        // A host whose unified hierarchy has memory: accepted there; nothing to check here.
        return;
    }
    refused(&jail, out, 1, "has no memory controller");
}

#[test]
fn jailer_refuses_other_bad_flags() {
    let jail = Jail::new("badflags");
    for (flags, code, says) in [
        (
            &["--cgroup-version", "3"][..],
            1,
            "invalid --cgroup-version \"3\"",
        ),
        (
            &["--resource-limit", "nofile=3"][..],
            1,
            "invalid --resource-limit",
        ),
        (
            &["--resource-limit", "fsize=big"][..],
            1,
            "invalid --resource-limit",
        ),
        (
            &["--netns", "/nonexistent/netns"][..],
            1,
            "--netns /nonexistent/netns",
        ),
        (
            &["--link-file", "/nonexistent/vmlinux"][..],
            1,
            "--link-file /nonexistent",
        ),
        (
            &["--no-such-flag"][..],
            2,
            "unexpected argument '--no-such-flag'",
        ),
    ] {
        refused(&jail, output(jail_with(&jail, flags)), code, says);
    }
    for parent in ["../up", "/abs", "a//b"] {
        let mut c = Command::new(jailer_bin());
        c.args(["--id", &jail.id, "--exec-file"])
            .arg(cinder_bin())
            .args(["--uid", "65534", "--gid", "65534", "--chroot-base-dir"])
            .arg(jail.base.path())
            .args(["--parent-cgroup", parent])
            .args(["--cgroup", "memory.limit_in_bytes=268435456"]);
        refused(&jail, output(c), 1, "invalid --parent-cgroup");
    }
}

/// A network namespace path that is not a network namespace: refused by setns, after the
/// chroot and cgroup were made, and both are removed.
#[test]
fn jailer_refuses_a_netns_that_is_not_one() {
    let jail = Jail::new("badns");
    let not_ns = jail.base.file("inherited-marker", b"not a namespace");
    refused(
        &jail,
        output(jail_with(&jail, &["--netns", &not_ns.to_string_lossy()])),
        1,
        "--netns",
    );
}
