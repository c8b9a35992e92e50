use super::*;
use std::os::unix::net::UnixStream;

fn hdr(op: u16, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> GuestHeader {
    GuestHeader {
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    }
}

fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    out
}

#[test]
fn guest_initiated_data_both_ways() {
    let (ours, mut host) = pair();
    let mut c = Connection::from_guest(ours, 5000, 1234, &hdr(OP_REQUEST, 0, 1000, 0));
    let mut buf = [0u8; 4096];
    assert!(c.has_rx());
    assert_eq!(c.next_rx(&mut buf).map(|p| p.op), Some(OP_RESPONSE));
    assert!(!c.has_rx());
    // Guest -> host.
    c.on_guest_packet(&hdr(OP_RW, 0, 1000, 0), b"hello")
        .unwrap();
    assert_eq!(read_all(&mut host), b"hello");
    // Host -> guest, limited by the guest's credit (1000).
    host.write_all(&[7u8; 3000]).unwrap();
    assert!(c.wants_host_read());
    c.set_host_readable();
    assert!(c.has_rx());
    let p = c.next_rx(&mut buf).unwrap();
    assert_eq!(
        (p.op, p.len, p.fwd_cnt, p.buf_alloc),
        (OP_RW, 1000, 5, CONN_BUF_SIZE)
    );
    assert_eq!(c.peer_credit(), 0);
    assert!(!c.wants_host_read(), "no credit: the socket is not watched");
    assert!(!c.has_rx());
    // The guest consumed it and says so.
    c.on_guest_packet(&hdr(OP_CREDIT_UPDATE, 0, 1000, 1000), &[])
        .unwrap();
    assert_eq!(c.peer_credit(), 1000);
    let p = c.next_rx(&mut buf[..600]).unwrap();
    assert_eq!((p.op, p.len), (OP_RW, 600));
}

#[test]
fn host_initiated_request_response_ok_line() {
    let (ours, mut host) = pair();
    let mut c = Connection::from_host(ours, 1 << 30, 52);
    let mut buf = [0u8; 16];
    assert_eq!(c.state(), State::LocalInit);
    assert_eq!(c.next_rx(&mut buf).map(|p| p.op), Some(OP_REQUEST));
    // Data before RESPONSE is a protocol error: reset.
    let mut c2 = Connection::from_host(pair().0, 1, 52);
    assert!(c2.on_guest_packet(&hdr(OP_RW, 0, 0, 0), b"x").is_err());
    assert_eq!(c2.next_rx(&mut buf).map(|p| p.op), Some(OP_RST));
    assert!(c2.is_done());

    c.on_guest_packet(&hdr(OP_RESPONSE, 0, 4096, 0), &[])
        .unwrap();
    assert_eq!(c.state(), State::Established);
    assert_eq!(
        read_all(&mut host),
        format!("OK {}\n", 1u32 << 30).as_bytes()
    );
}

#[test]
fn credit_lie_resets() {
    let (ours, _host) = pair();
    let mut c = Connection::from_guest(ours, 1, 2, &hdr(OP_REQUEST, 0, 0, 0));
    let big = vec![0u8; CONN_BUF_SIZE as usize + 1];
    let err = c.on_guest_packet(&hdr(OP_RW, 0, 0, 0), &big).unwrap_err();
    assert!(matches!(err, ConnError::CreditExceeded { .. }));
    let mut buf = [0u8; 16];
    assert_eq!(c.next_rx(&mut buf).map(|p| p.op), Some(OP_RST));
    assert!(c.is_done());
}

/// A host peer that stops reading: the buffer fills to exactly buf_alloc, then the guest is
/// out of credit; more is a credit lie. Memory stays bounded.
#[test]
fn slow_host_bounds_the_buffer() {
    let (ours, mut host) = pair();
    let mut c = Connection::from_guest(ours, 1, 2, &hdr(OP_REQUEST, 0, 0, 0));
    let chunk = vec![1u8; 64 * 1024];
    let mut sent = 0usize;
    while c.our_free() as usize >= chunk.len() {
        c.on_guest_packet(&hdr(OP_RW, 0, 0, 0), &chunk).unwrap();
        sent += chunk.len();
        assert!(sent < 64 << 20, "the free space never ran out");
    }
    assert!(c.tx_pending() <= CONN_BUF_SIZE as usize);
    assert!(c.wants_host_write());
    assert!(c
        .on_guest_packet(&hdr(OP_RW, 0, 0, 0), &vec![0u8; c.our_free() as usize + 1])
        .is_err());
    // Reading on the host side lets a fresh connection drain (fwd_cnt grows).
    let got = read_all(&mut host);
    assert!(!got.is_empty());
}

#[test]
fn credit_request_is_answered_and_threshold_updates() {
    let (ours, mut host) = pair();
    let mut c = Connection::from_guest(ours, 1, 2, &hdr(OP_REQUEST, 0, 0, 0));
    let mut buf = [0u8; 16];
    c.next_rx(&mut buf);
    c.on_guest_packet(&hdr(OP_CREDIT_REQUEST, 0, 0, 0), &[])
        .unwrap();
    let p = c.next_rx(&mut buf).unwrap();
    assert_eq!(
        (p.op, p.buf_alloc, p.fwd_cnt),
        (OP_CREDIT_UPDATE, CONN_BUF_SIZE, 0)
    );
    // Forward a quarter of the buffer: an unprompted CREDIT_UPDATE follows.
    let data = vec![3u8; CREDIT_UPDATE_THRESHOLD as usize];
    c.on_guest_packet(&hdr(OP_RW, 0, 0, 0), &data).unwrap();
    let _ = read_all(&mut host);
    c.flush_host().unwrap();
    let p = c.next_rx(&mut buf).unwrap();
    assert_eq!(
        (p.op, p.fwd_cnt),
        (OP_CREDIT_UPDATE, CREDIT_UPDATE_THRESHOLD)
    );
}

#[test]
fn shutdown_and_host_eof() {
    let (ours, host) = pair();
    let mut c = Connection::from_guest(ours, 1, 2, &hdr(OP_REQUEST, 0, 100, 0));
    let mut buf = [0u8; 16];
    c.next_rx(&mut buf);
    // Host closes: the guest gets SHUTDOWN(both).
    drop(host);
    c.set_host_readable();
    let p = c.next_rx(&mut buf).unwrap();
    assert_eq!((p.op, p.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
    assert!(!c.wants_host_read());
    // The guest answers RST: done.
    c.on_guest_packet(&hdr(OP_RST, 0, 0, 0), &[]).unwrap();
    assert!(c.is_done());

    // Guest full shutdown: we reset.
    let (ours, _host) = pair();
    let mut c = Connection::from_guest(ours, 1, 2, &hdr(OP_REQUEST, 0, 100, 0));
    c.next_rx(&mut buf);
    c.on_guest_packet(&hdr(OP_SHUTDOWN, 0, 0, 0), &[]).unwrap();
    assert_eq!(c.state(), State::Established);
    c.on_guest_packet(&hdr(OP_SHUTDOWN, 3, 0, 0), &[]).unwrap();
    assert_eq!(c.next_rx(&mut buf).map(|p| p.op), Some(OP_RST));
    assert!(c.is_done());
}

#[test]
fn unknown_op_resets_and_wrapping_counters() {
    let (ours, _host) = pair();
    let mut c = Connection::from_guest(ours, 1, 2, &hdr(OP_REQUEST, 0, 10, u32::MAX - 5));
    // A fwd_cnt ahead of what we sent (a lie) wraps: the credit never exceeds buf_alloc.
    assert_eq!(c.peer_credit(), 4);
    let mut honest = Connection::from_guest(pair().0, 1, 2, &hdr(OP_REQUEST, 0, 10, 0));
    honest.rx_cnt = Wrapping(u32::MAX - 2);
    honest.peer_fwd_cnt = Wrapping(u32::MAX - 2);
    assert_eq!(honest.peer_credit(), 10, "counters about to wrap");
    honest.rx_cnt += Wrapping(8);
    assert_eq!(honest.peer_credit(), 2, "and after they wrapped");
    let mut buf = [0u8; 16];
    c.next_rx(&mut buf);
    assert!(c.on_guest_packet(&hdr(99, 0, 10, 0), &[]).is_err());
    assert_eq!(c.next_rx(&mut buf).map(|p| p.op), Some(OP_RST));
    // Packets after close are ignored.
    c.on_guest_packet(&hdr(OP_RW, 0, 10, 0), b"late").unwrap();
    assert!(c.is_done());
}

/// Shutdown timers (issue 18 item 7): after the guest's full SHUTDOWN, the deadline runs while
/// guest bytes wait for a host that does not read, and starts again whenever the host takes
/// some; after the host's EOF (SHUTDOWN to the guest) it runs until the guest's RST.
#[test]
fn shutdown_deadlines() {
    let (ours, mut host) = pair();
    let mut c = Connection::from_guest(ours, 1, 2, &hdr(OP_REQUEST, 0, 100, 0));
    c.set_shutdown_timeout(std::time::Duration::from_secs(60));
    let mut buf = [0u8; 16];
    c.next_rx(&mut buf);
    assert_eq!(c.deadline(), None, "an open connection has no timer");
    // Fill the host socket, then more: it stays in tx_buf.
    let chunk = vec![1u8; 64 * 1024];
    while c.tx_pending() < 128 * 1024 {
        c.on_guest_packet(&hdr(OP_RW, 0, 100, 0), &chunk).unwrap();
    }
    c.on_guest_packet(&hdr(OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0), &[])
        .unwrap();
    let first = c.deadline().expect("a shutdown timer");
    assert!(first > std::time::Instant::now() + std::time::Duration::from_secs(50));
    std::thread::sleep(std::time::Duration::from_millis(20));
    // The host takes some: the timer starts again.
    let mut sink = vec![0u8; 64 * 1024];
    let _ = host.read(&mut sink).unwrap();
    assert!(c.flush_host().unwrap() > 0);
    let second = c.deadline().expect("still running");
    assert!(second > first, "progress restarts the timer");
    // A reset ends the timer and frees the buffer.
    c.kill();
    assert_eq!(c.deadline(), None);
    assert_eq!(c.tx_pending(), 0);

    // Host EOF: SHUTDOWN to the guest starts the timer; the guest's RST ends the connection.
    let (ours, host) = pair();
    let mut c = Connection::from_guest(ours, 1, 2, &hdr(OP_REQUEST, 0, 100, 0));
    c.next_rx(&mut buf);
    drop(host);
    c.set_host_readable();
    assert_eq!(c.next_rx(&mut buf).map(|p| p.op), Some(OP_SHUTDOWN));
    assert!(c.deadline().is_some());
    c.on_guest_packet(&hdr(OP_RST, 0, 0, 0), &[]).unwrap();
    assert_eq!(c.deadline(), None);
}
