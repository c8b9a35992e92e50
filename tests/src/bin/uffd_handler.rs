//! A page-fault handler for cinder's `mem_backend` Uffd (Firecracker's handshake), for the
//! snapshot tests: `uffd_handler SOCKET MEMFILE [--die-after N]`.
//!
//! It listens on SOCKET, prints `READY`, takes one connection, receives the userfaultfd
//! (SCM_RIGHTS) with the JSON region list, maps MEMFILE read-only and serves each missing
//! page with UFFDIO_COPY from its place in the file. It ends when cinder closes the socket.
//! `--die-after N` exits abruptly after serving N faults (a handler that dies). Every wait is
//! bounded (100 ms polls; 600 s without a connection ends it).

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const PAGE: u64 = 4096;

fn fail(msg: String) -> ! {
    eprintln!("uffd_handler: {msg}");
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        fail("usage: uffd_handler SOCKET MEMFILE [--die-after N]".into());
    }
    let die_after: Option<u64> = match (args.get(3).map(String::as_str), args.get(4)) {
        (Some("--die-after"), Some(n)) => n.parse().ok(),
        _ => None,
    };
    let listener = UnixListener::bind(&args[1]).unwrap_or_else(|e| fail(format!("bind: {e}")));
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| fail(format!("{e}")));
    println!("READY");
    let _ = std::io::stdout().flush();
    let deadline = Instant::now() + Duration::from_secs(600);
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    fail("no connection within 600 s".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => fail(format!("accept: {e}")),
        }
    };
    stream
        .set_nonblocking(false)
        .unwrap_or_else(|e| fail(format!("{e}")));
    let mut buf = vec![0u8; 64 << 10];
    let (n, file) = stream
        .recv_with_fd(&mut buf)
        .unwrap_or_else(|e| fail(format!("recvmsg: {e}")));
    let fd = file.unwrap_or_else(|| fail("no uffd in the message".into()));
    // SAFETY: the fd came with SCM_RIGHTS from cinder: a userfaultfd we now own.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    let regions: Vec<serde_json::Value> =
        serde_json::from_slice(&buf[..n]).unwrap_or_else(|e| fail(format!("region list: {e}")));
    let regions: Vec<(u64, u64, u64)> = regions
        .iter()
        .map(|r| {
            let f = |k: &str| {
                r.get(k)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or_else(|| fail(format!("region without {k}: {r}")))
            };
            (f("base_host_virt_addr"), f("size"), f("offset"))
        })
        .collect();
    let mem = std::fs::File::open(&args[2]).unwrap_or_else(|e| fail(format!("memfile: {e}")));
    let len = mem.metadata().map(|m| m.len()).unwrap_or(0);
    let map_len = usize::try_from(len).unwrap_or_else(|e| fail(format!("{e}")));
    // SAFETY: a read-only private mapping of a whole regular file; checked below.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            mem.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        fail(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let mut served = 0u64;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds on the stack.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if r < 0 {
            continue;
        }
        if fds[1].revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLIN) != 0 {
            // cinder went away (it sends nothing after the handshake).
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        while let Ok(Some(ev)) = uffd.read_event() {
            let Event::Pagefault { addr, .. } = ev else {
                continue;
            };
            let page = (addr as u64) & !(PAGE - 1);
            let Some(&(base, size, offset)) =
                regions.iter().find(|&&(b, s, _)| page >= b && page < b + s)
            else {
                fail(format!("fault at {page:#x} outside every region"));
            };
            let src = offset + (page - base);
            if src + PAGE > len {
                fail(format!(
                    "fault at {page:#x}: file offset {src:#x} past the file"
                ));
            }
            let _ = size;
            let src = usize::try_from(src).unwrap_or_else(|e| fail(format!("{e}")));
            // SAFETY: `src` is within the file mapping (checked), `page` is a missing page of
            // a region registered with this uffd; UFFDIO_COPY copies one page.
            let _ = unsafe {
                uffd.copy(
                    map.cast::<u8>().add(src).cast(),
                    page as *mut libc::c_void,
                    4096,
                    true,
                )
            };
            served += 1;
            if die_after.is_some_and(|n| served >= n) {
                eprintln!("uffd_handler: dying after {served} faults");
                std::process::exit(1);
            }
        }
    }
}
