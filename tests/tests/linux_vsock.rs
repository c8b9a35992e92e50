//! virtio-vsock through Linux's own driver, with the guest agent (`resources/guest-agent`,
//! `/bin/cinder-agent` in `rootfs.ext4`, booted as the root drive).
//!
//! Under cinder (`--vsock cid=3,uds=PATH`, Firecracker's hybrid vsock): a host process
//! connects to PATH, asks for guest port 5000 with `CONNECT 5000\n`, gets `OK <n>\n`, and sends
//! a framed message (`N\n` + N bytes) that `cinder-agent listen 5000` checksums; then
//! `cinder-agent connect 2 6000 N` sends N bytes of its fixed pattern to host port 6000, which
//! cinder forwards to the host's listener at `PATH_6000`. Checksums (64-bit FNV-1a) match both
//! ways. QEMU cannot be the oracle here (its vsock needs vhost), so the agent itself is checked
//! under QEMU over the guest's vsock loopback (CID 1), which needs no device.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cinder_tests::cinder::require_kvm;
use cinder_tests::guest::GuestDir;
use cinder_tests::linux::{
    agent_pattern, cinder_vm, fnv1a, ok, pattern, profile_cmdline, qemu_vm, RootFs, TempDir, STEP,
};
use cinder_tests::session::Session;

/// One guest at a time (QEMU TCG takes both cores).
static SERIAL: Mutex<()> = Mutex::new(());

const GUEST_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
/// Bytes each way (the guest kernel copies at ~1 MB/s on the KVM test hosts).
const BYTES: usize = 200_000;

/// Reads one `\n`-terminated line (at most 128 bytes) from `r`.
fn line(r: &mut impl Read) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while out.len() < 128 {
        match r.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => out.push(b[0]),
            Ok(_) => break,
            Err(e) => panic!(
                "read a line: {e} (so far {:?})",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Host -> guest: CONNECT to the guest's listening agent (the hybrid handshake of
/// `cinder_tests::vsock`), send a framed message, return the agent's reply line; Err with the
/// CONNECT answer when it was not `OK <port>`.
fn host_to_guest(uds: &Path, data: &[u8]) -> Result<String, String> {
    let mut c = cinder_tests::vsock::connect(uds, GUEST_PORT, STEP)?;
    let mut msg = format!("{}\n", data.len()).into_bytes();
    msg.extend_from_slice(data);
    c.write_all(&msg).expect("send the message");
    Ok(line(&mut c))
}

/// Guest -> host: accept the agent's connection on `PATH_<port>`, read its framed message and
/// answer with the count and checksum; returns the bytes.
fn accept_from_guest(l: &UnixListener) -> Vec<u8> {
    l.set_nonblocking(true).expect("non-blocking listener");
    let until = Instant::now() + STEP;
    let c = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < until, "the guest agent did not connect");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    c.set_nonblocking(false).expect("blocking stream");
    c.set_read_timeout(Some(STEP)).expect("read timeout");
    let mut r = BufReader::new(c.try_clone().expect("clone"));
    let mut head = String::new();
    r.read_line(&mut head).expect("read the length line");
    let n: usize = head
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("length line {head:?}"));
    assert!(n <= 64 << 20, "absurd length {n}");
    let mut data = vec![0u8; n];
    r.read_exact(&mut data).expect("read the message");
    let mut w = c;
    w.write_all(format!("bytes={n} sum={:016x}\n", fnv1a(&data)).as_bytes())
        .expect("reply");
    data
}

#[test]
fn linux_vsock_agent_both_ways_under_cinder() {
    require_kvm();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = GuestDir::test_profile();
    let rootfs = RootFs::get();
    let dir = TempDir::new("linux-vsock");
    let root = rootfs.copy_to(&dir, "root.ext4");
    let uds = dir.join("v.sock");
    let mut c = cinder_vm(&g, &profile_cmdline(&g), 1, 128);
    c.args(["--drive", &format!("path={},root", root.display())])
        .args(["--vsock", &format!("cid=3,uds={}", uds.display())]);
    let mut s = Session::start(c);
    let (_, t_init) = ok(s.expect_line("CINDER-INIT ok", STEP));
    ok(s.expect("CINDER-INIT shell", STEP));

    // Host -> guest.
    ok(s.send(&format!("cinder-agent listen {GUEST_PORT}\n")));
    ok(s.expect_line("AGENT listening", STEP));
    let data = pattern(0x7654_3210, BYTES);
    let t = Instant::now();
    let reply =
        host_to_guest(&uds, &data).unwrap_or_else(|e| panic!("CONNECT answer: {e}\n{}", s.log()));
    let t_in = t.elapsed();
    let want = format!("bytes={BYTES} sum={:016x}", fnv1a(&data));
    assert_eq!(reply, want, "the agent's reply\n{}", s.log());
    let (got, _) = ok(s.expect_line("AGENT received", STEP));
    assert!(got.contains(&want), "agent: {got:?}\n{}", s.log());

    // Guest -> host: cinder forwards the guest's connection to host port P to `PATH_P`.
    let host_sock = dir.join(&format!("v.sock_{HOST_PORT}"));
    let l = UnixListener::bind(&host_sock)
        .unwrap_or_else(|e| panic!("bind {}: {e}", host_sock.display()));
    let t = Instant::now();
    let rx = std::thread::spawn(move || accept_from_guest(&l));
    ok(s.send(&format!("cinder-agent connect 2 {HOST_PORT} {BYTES}\n")));
    let (sent, _) = ok(s.expect_line("AGENT sent", STEP));
    let got = rx.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    let t_out = t.elapsed();
    assert!(got == agent_pattern(BYTES), "guest->host bytes differ");
    let want = format!("bytes={BYTES} sum={:016x} reply-ok", fnv1a(&got));
    assert!(sent.contains(&want), "agent: {sent:?}\n{}", s.log());

    ok(s.send("reboot -f\n"));
    let st = ok(s.wait_exit(STEP));
    assert_eq!(st.code(), Some(0), "reboot -f\n{}", s.log());
    eprintln!("cinder: init at {t_init:.2?}; host->guest {t_in:.2?}, guest->host {t_out:.2?}");
}

/// The agent against itself over the guest's vsock loopback (no vsock device), under QEMU.
#[test]
fn linux_vsock_agent_loopback_qemu() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = GuestDir::test_profile();
    let rootfs = RootFs::get();
    let dir = TempDir::new("linux-vsock");
    let root = rootfs.copy_to(&dir, "root.ext4");
    let run = format!(
        "cinder-agent listen {GUEST_PORT} & i=0; \
         until cinder-agent connect 1 {GUEST_PORT} {BYTES}; do i=$((i+1)); \
         [ $i -gt 30 ] && break; sleep 1; done; wait"
    );
    let cmdline = format!(
        "{} root=/dev/vda rw cinder.run=\"{run}\"",
        profile_cmdline(&g)
    );
    let mut vm = qemu_vm(&g, &cmdline, 1, 128);
    vm.extra.extend(
        [
            "-drive",
            &format!("id=d0,file={},format=raw,if=none", root.display()),
            "-device",
            "virtio-blk-device,drive=d0",
        ]
        .map(String::from),
    );
    let mut s = Session::start(vm.command());
    let (_, t_init) = ok(s.expect_line("CINDER-INIT ok", STEP));
    let (_, _) = ok(s.expect("CINDER-RUN end", STEP));
    let st = ok(s.wait_exit(STEP));
    let out = s.console();
    let want = format!("bytes={BYTES} sum={:016x}", fnv1a(&agent_pattern(BYTES)));
    assert!(
        out.contains(&format!("AGENT received {want} peer_cid=1")),
        "listener line\n{}",
        s.log()
    );
    assert!(
        out.contains(&format!("AGENT sent {want} reply-ok")),
        "connect line\n{}",
        s.log()
    );
    assert_eq!(st.code(), Some(0), "reboot -f\n{}", s.log());
    eprintln!(
        "QEMU ({:?}): init at {t_init:.2?}, agent loopback done at {:.2?}",
        vm.accel,
        s.elapsed()
    );
}
