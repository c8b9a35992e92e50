use super::*;
use crate::virtio::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use crate::virtio::net::VIRTIO_NET_HDR_F_DATA_VALID;
use crate::virtio::Interrupt;
use crate::virtio::VirtioDevice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::sync::Mutex;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const MAC: MacAddr = [0x02, 0, 0, 0, 0, 0x0f];
const RXQ: u64 = 0;
const TXQ: u64 = 0x8000;
const MEM_SIZE: u64 = 0x20_0000;

/// One end of a SOCK_SEQPACKET socketpair standing in for the TAP (message boundaries are
/// kept, like a TAP's frames); records the offloads set.
#[derive(Debug)]
struct PairBackend {
    fd: OwnedFd,
    offload: Arc<AtomicU32>,
}

impl AsRawFd for PairBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for PairBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length; the fd is ours.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of its length; the fd is ours.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }
}

/// The host side of the pair.
struct Peer(OwnedFd);

impl Peer {
    fn send(&self, pkt: &[u8]) {
        // SAFETY: `pkt` is valid for reads of its length.
        let n = unsafe { libc::send(self.0.as_raw_fd(), pkt.as_ptr().cast(), pkt.len(), 0) };
        assert_eq!(
            n,
            isize::try_from(pkt.len()).unwrap(),
            "{}",
            io::Error::last_os_error()
        );
    }
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

fn pair() -> (PairBackend, Peer, Arc<AtomicU32>) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: socketpair just returned these two fds, owned by nobody else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Room for several 64 KiB frames in flight.
    for fd in [&a, &b] {
        let size: libc::c_int = 1 << 20;
        // SAFETY: setsockopt reads an int through the pointer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                4,
            )
        };
    }
    let offload = Arc::new(AtomicU32::new(u32::MAX));
    (
        PairBackend {
            fd: a,
            offload: offload.clone(),
        },
        Peer(b),
        offload,
    )
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn feat(bits: &[u32]) -> u64 {
    bits.iter()
        .fold(1u64 << VIRTIO_F_VERSION_1, |f, &b| f | (1u64 << b))
}

/// A header with `num_buffers` 0, and a frame of `len` bytes with a recognisable pattern.
fn packet(hdr: [u8; 12], len: usize, seed: u8) -> Vec<u8> {
    let mut p = hdr.to_vec();
    // Byte i of the frame is i mod 256, scrambled.
    p.extend(
        (0..=u8::MAX)
            .cycle()
            .take(len)
            .map(|i| i.wrapping_mul(7).wrapping_add(seed)),
    );
    p
}

/// Ring addresses of a test queue.
#[derive(Clone, Copy)]
struct Qa {
    desc: u64,
    avail: u64,
    used: u64,
}

fn qa(start: u64) -> (Qa, Queue) {
    // Our own layout (MockSplitQueue's puts the used ring over the avail ring's tail).
    let q = Qa {
        desc: start,
        avail: start + 0x100,
        used: start + 0x200,
    };
    let mut queue = Queue::new(16).unwrap();
    queue.set_size(16);
    queue.set_desc_table_address(Some(u32::try_from(q.desc).unwrap()), Some(0));
    queue.set_avail_ring_address(Some(u32::try_from(q.avail).unwrap()), Some(0));
    queue.set_used_ring_address(Some(u32::try_from(q.used).unwrap()), Some(0));
    queue.set_ready(true);
    (q, queue)
}

/// Put descriptors at table index `offset..` and publish each chain head.
fn add_chains(mem: &GuestMemoryMmap, q: Qa, descs: &[RawDescriptor], offset: u16) {
    let mut idx: u16 = mem.read_obj(GuestAddress(q.avail + 2)).unwrap();
    // A descriptor is a chain head unless the previous one links to it.
    let mut prev_next = false;
    for (i, raw) in descs.iter().enumerate() {
        let at = offset + u16::try_from(i).unwrap();
        mem.write_obj(*raw, GuestAddress(q.desc + 16 * u64::from(at)))
            .unwrap();
        if !prev_next {
            mem.write_obj(at, GuestAddress(q.avail + 4 + 2 * u64::from(idx % 16)))
                .unwrap();
            idx = idx.wrapping_add(1);
        }
        let desc = SplitDescriptor::from(*raw);
        prev_next = desc.flags() & F_NEXT != 0 && desc.next() == at + 1;
    }
    mem.write_obj(idx, GuestAddress(q.avail + 2)).unwrap();
}

/// Used entries: (id, len).
fn used_of(mem: &GuestMemoryMmap, q: Qa) -> Vec<(u32, u32)> {
    let n: u16 = mem.read_obj(GuestAddress(q.used + 2)).unwrap();
    (0..u64::from(n))
        .map(|i| {
            let id: u32 = mem.read_obj(GuestAddress(q.used + 4 + 8 * i)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(q.used + 8 + 8 * i)).unwrap();
            (id, len)
        })
        .collect()
}

struct Rig {
    rx: Qa,
    tx: Qa,
    mem: GuestMemoryMmap,
    net: Net,
    peer: Peer,
    offload: Arc<AtomicU32>,
    irq: Arc<EventFd>,
}

impl Rig {
    fn new(features: u64, event_idx: bool) -> Rig {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())])
                .unwrap();
        let (backend, peer, offload) = pair();
        let mut net = Net::with_backend(Box::new(backend), MAC, 1500).unwrap();
        net.set_acked_features(features);
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let (rx_a, mut rx) = qa(RXQ);
        let (tx_a, mut tx) = qa(TXQ);
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        let queues = vec![rx, tx];
        net.activate(mem.clone(), queues, Arc::new(Interrupt::new(irq.clone())))
            .unwrap();
        Rig {
            rx: rx_a,
            tx: tx_a,
            mem,
            net,
            peer,
            offload,
            irq,
        }
    }
    fn add(&self, q: Qa, descs: &[RawDescriptor], offset: u16) {
        add_chains(&self.mem, q, descs, offset);
    }
    fn used(&self, q: Qa) -> Vec<(u32, u32)> {
        used_of(&self.mem, q)
    }
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

#[test]
fn features_and_config_space() {
    let (backend, _peer, offload) = pair();
    let net = Net::with_backend(Box::new(backend), MAC, 9000).unwrap();
    assert_eq!(net.device_type(), 1);
    let f = net.avail_features();
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature {bit}");
    }
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), VIRTIO_NET_S_LINK_UP);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
    let mut past = [0xffu8; 4];
    past.fill(0);
    net.read_config(12, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(net.queue_events().len(), 2);
    assert_eq!(
        offload.load(Ordering::SeqCst),
        u32::MAX,
        "untouched before activation"
    );

    let (backend, _peer, _) = pair();
    assert!(matches!(
        Net::with_backend(Box::new(backend), [1, 0, 0, 0, 0, 1], 1500),
        Err(NetError::MacNotUnicast(_))
    ));
    let (backend, _peer, _) = pair();
    assert!(matches!(
        Net::with_backend(Box::new(backend), MAC, 67),
        Err(NetError::Mtu(67))
    ));
}

#[test]
fn config_writes_ignored_and_reset() {
    let mut r = Rig::new(feat(&[VIRTIO_NET_F_MAC]), false);
    r.net.write_config(0, &[0xff; 6]);
    let mut mac = [0u8; 6];
    r.net.read_config(0, &mut mac);
    assert_eq!(mac, MAC);
    assert!(r.net.is_activated());
    r.net.reset();
    assert!(!r.net.is_activated());
    assert_eq!(r.net.acked_features(), 0);
    assert_eq!(r.net.process_rx(), RxState::Inactive);
    r.net.process_tx();
}

#[test]
fn offloads_follow_negotiation() {
    let r = Rig::new(feat(&[VIRTIO_NET_F_MAC]), false);
    assert_eq!(r.offload.load(Ordering::SeqCst), 0);
    let r = Rig::new(
        feat(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        ]),
        false,
    );
    assert_eq!(
        r.offload.load(Ordering::SeqCst),
        offload::TUN_F_CSUM | offload::TUN_F_TSO4 | offload::TUN_F_TSO6 | offload::TUN_F_UFO
    );
    // TSO without checksum offload is meaningless to the TAP: not applied.
    let r = Rig::new(feat(&[VIRTIO_NET_F_GUEST_TSO4]), false);
    assert_eq!(r.offload.load(Ordering::SeqCst), 0);
}

#[test]
fn rx_one_buffer_per_frame() {
    let mut r = Rig::new(feat(&[VIRTIO_NET_F_MAC]), false);
    // Header and data in separate descriptors, like Linux without MRG_RXBUF.
    r.add(
        r.rx,
        &[
            d(0x10_0000, 12, F_WRITE | F_NEXT, 1),
            d(0x10_1000, 1514, F_WRITE, 0),
        ],
        0,
    );
    // DATA_VALID from the TAP means nothing to a driver without GUEST_CSUM: cleared.
    let pkt = packet(
        [VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        60,
        1,
    );
    r.peer.send(&pkt);
    assert_eq!(r.net.process_rx(), RxState::Drained);
    assert_eq!(r.used(r.rx), vec![(0, 72)]);
    let hdr = r.read(0x10_0000, 12);
    assert_eq!(hdr, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "num_buffers = 1");
    assert_eq!(r.read(0x10_1000, 60), pkt[12..]);
    assert_eq!(r.irq.read().unwrap(), 1);
    assert_eq!(r.net.stats().rx_frames, 1);
    assert_eq!(r.net.stats().rx_bytes, 60);
}

#[test]
fn rx_mergeable_buffers() {
    let mut r = Rig::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]), false);
    r.add(
        r.rx,
        &[
            d(0x10_0000, 1000, F_WRITE, 0),
            d(0x11_0000, 1000, F_WRITE, 0),
            d(0x12_0000, 1000, F_WRITE, 0),
            d(0x13_0000, 1000, F_WRITE, 0),
        ],
        0,
    );
    let pkt = packet([0; 12], 2500, 3);
    r.peer.send(&pkt);
    assert_eq!(r.net.process_rx(), RxState::Drained);
    assert_eq!(r.used(r.rx), vec![(0, 1000), (1, 1000), (2, 512)]);
    let mut got = r.read(0x10_0000, 1000);
    got.extend(r.read(0x11_0000, 1000));
    got.extend(r.read(0x12_0000, 512));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(got[12..], pkt[12..]);
    // The fourth buffer is still there for the next frame.
    let pkt2 = packet([0; 12], 100, 9);
    r.peer.send(&pkt2);
    assert_eq!(r.net.process_rx(), RxState::Drained);
    assert_eq!(r.used(r.rx)[3], (3, 112));
    assert_eq!(r.read(0x13_0000 + 12, 100), pkt2[12..]);
}

#[test]
fn rx_offload_header_passes_through() {
    let features = feat(&[
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_MRG_RXBUF,
    ]);
    let mut r = Rig::new(features, false);
    r.add(r.rx, &[d(0x10_0000, 65562, F_WRITE, 0)], 0);
    // NEEDS_CSUM, GSO TCPv4, hdr_len 66, gso_size 1448, csum_start 34, csum_offset 16.
    let mut hdr = [0u8; 12];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    hdr[1] = VIRTIO_NET_HDR_GSO_TCPV4;
    hdr[2..4].copy_from_slice(&66u16.to_le_bytes());
    hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    let pkt = packet(hdr, 60_000, 5);
    r.peer.send(&pkt);
    assert_eq!(r.net.process_rx(), RxState::Drained);
    assert_eq!(r.used(r.rx), vec![(0, 60_012)]);
    let got = r.read(0x10_0000, 60_012);
    assert_eq!(got[..10], hdr[..10]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(got[12..], pkt[12..]);
}

#[test]
fn rx_exhaustion_holds_the_frame_and_resumes() {
    for event_idx in [false, true] {
        let mut r = Rig::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]), event_idx);
        let p1 = packet([0; 12], 1500, 1);
        let p2 = packet([0; 12], 1500, 2);
        r.peer.send(&p1);
        r.peer.send(&p2);
        // No buffers: one frame read and held, the other left in the backend.
        assert_eq!(r.net.process_rx(), RxState::NoBuffers);
        assert!(r.net.rx_frame_held());
        assert_eq!(r.net.process_rx(), RxState::NoBuffers);
        assert!(r.irq.read().is_err(), "no interrupt without used buffers");
        if event_idx {
            // The guest is asked to kick when it adds the next buffer.
            let avail_event: u16 = r
                .mem
                .read_obj(GuestAddress(r.rx.used + 4 + 8 * 16))
                .unwrap();
            assert_eq!(avail_event, 0);
        } else {
            let flags: u16 = r.mem.read_obj(GuestAddress(r.rx.used)).unwrap();
            assert_eq!(flags, 0, "notifications enabled");
        }
        // A buffer too small for the 1512-byte frame: with MRG it stays posted.
        r.add(r.rx, &[d(0x10_0000, 1000, F_WRITE, 0)], 0);
        assert_eq!(r.net.process_rx(), RxState::NoBuffers);
        assert_eq!(r.used(r.rx), vec![], "partial buffers are put back");
        if event_idx {
            let avail_event: u16 = r
                .mem
                .read_obj(GuestAddress(r.rx.used + 4 + 8 * 16))
                .unwrap();
            assert_eq!(avail_event, 1, "kick wanted past the buffer already posted");
        }
        r.add(
            r.rx,
            &[
                d(0x11_0000, 1000, F_WRITE, 0),
                d(0x12_0000, 4096, F_WRITE, 0),
            ],
            1,
        );
        assert_eq!(r.net.process_rx(), RxState::Drained);
        assert!(!r.net.rx_frame_held());
        assert_eq!(r.used(r.rx), vec![(0, 1000), (1, 512), (2, 1512)]);
        let mut got = r.read(0x10_0000, 1000);
        got.extend(r.read(0x11_0000, 512));
        assert_eq!(got[12..], p1[12..], "the held frame comes first");
        assert_eq!(r.read(0x12_0000 + 12, 1500), p2[12..]);
        assert_eq!(r.net.stats().rx_dropped, 0);
        assert_eq!(r.net.stats().rx_frames, 2);
    }
}

#[test]
fn rx_frame_larger_than_a_buffer_without_mrg_is_dropped() {
    let mut r = Rig::new(feat(&[]), false);
    r.add(r.rx, &[d(0x10_0000, 200, F_WRITE, 0)], 0);
    r.peer.send(&packet([0; 12], 500, 1));
    let small = packet([0; 12], 100, 2);
    r.peer.send(&small);
    assert_eq!(r.net.process_rx(), RxState::Drained);
    assert_eq!(
        r.used(r.rx),
        vec![(0, 112)],
        "buffer kept for the next frame"
    );
    assert_eq!(r.read(0x10_0000 + 12, 100), small[12..]);
    assert_eq!(r.net.stats().rx_dropped, 1);
}

#[test]
fn rx_hostile_chains_are_returned_unused() {
    let mut r = Rig::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]), false);
    r.add(
        r.rx,
        &[
            // head 0: device-readable
            d(0x10_0000, 2000, 0, 0),
            // head 1: outside guest memory
            d(MEM_SIZE - 100, 2000, F_WRITE, 0),
            // head 2: too small for the header
            d(0x11_0000, 8, F_WRITE, 0),
            // head 3: loops on itself
            d(0x12_0000, 2000, F_WRITE | F_NEXT, 3),
            // head 4: a good one
            d(0x13_0000, 2000, F_WRITE, 0),
        ],
        0,
    );
    let pkt = packet([0; 12], 1000, 4);
    r.peer.send(&pkt);
    assert_eq!(r.net.process_rx(), RxState::Drained);
    // The frame's buffers come first (merged buffers must be consecutive), then the bad ones.
    assert_eq!(
        r.used(r.rx),
        vec![(4, 1012), (0, 0), (1, 0), (2, 0), (3, 0)]
    );
    assert_eq!(r.read(0x13_0000 + 12, 1000), pkt[12..]);
    assert_eq!(r.net.stats().rx_bad_chains, 4);
    // Guest memory outside the good buffer untouched.
    assert!(r.read(0x10_0000, 2000).iter().all(|&b| b == 0));
    // A broken avail index (more than a ring ahead): no panic, RX waits for a kick.
    r.peer.send(&pkt);
    r.mem
        .write_obj(100u16, GuestAddress(r.rx.avail + 2))
        .unwrap();
    assert_eq!(r.net.process_rx(), RxState::NoBuffers);
}

#[test]
fn rx_runt_from_backend_is_dropped() {
    let mut r = Rig::new(feat(&[]), false);
    r.add(r.rx, &[d(0x10_0000, 2000, F_WRITE, 0)], 0);
    r.peer.send(&[0u8; 20]);
    assert_eq!(r.net.process_rx(), RxState::Drained);
    assert_eq!(r.used(r.rx), vec![]);
    assert_eq!(r.net.stats().rx_dropped, 1);
}

fn tx_hdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&off.to_le_bytes());
    h
}

#[test]
fn tx_frames_and_offload_headers_pass_through() {
    let mut r = Rig::new(feat(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]), false);
    let plain = packet([0; 12], 60, 1);
    let hdr = tx_hdr(
        VIRTIO_NET_HDR_F_NEEDS_CSUM,
        VIRTIO_NET_HDR_GSO_TCPV4,
        66,
        1448,
        34,
        16,
    );
    let tso = packet(hdr, 30_000, 2);
    r.mem.write_slice(&plain, GuestAddress(0x10_0000)).unwrap();
    r.mem
        .write_slice(&tso[..12], GuestAddress(0x11_0000))
        .unwrap();
    r.mem
        .write_slice(&tso[12..], GuestAddress(0x12_0000))
        .unwrap();
    r.add(
        r.tx,
        &[
            d(0x10_0000, 72, 0, 0),
            d(0x11_0000, 12, F_NEXT, 2),
            d(0x12_0000, 30_000, 0, 0),
        ],
        0,
    );
    r.net.process_tx();
    assert_eq!(r.peer.recv().unwrap(), plain);
    assert_eq!(r.peer.recv().unwrap(), tso);
    assert!(r.peer.recv().is_none());
    assert_eq!(r.used(r.tx), vec![(0, 0), (1, 0)]);
    assert_eq!(r.irq.read().unwrap(), 1);
    assert_eq!(r.net.stats().tx_frames, 2);
    assert_eq!(r.net.stats().tx_bytes, 30_060);
}

#[test]
fn tx_hostile_chains_never_reach_the_backend() {
    let mut r = Rig::new(feat(&[VIRTIO_NET_F_CSUM]), false);
    let good = packet([0; 12], 100, 1);
    r.mem.write_slice(&good, GuestAddress(0x10_0000)).unwrap();
    let put = |at: u64, hdr: [u8; 12]| {
        r.mem
            .write_slice(&packet(hdr, 100, 0), GuestAddress(at))
            .unwrap();
    };
    put(
        0x11_0000,
        tx_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 90, 16),
    ); // csum past end
    put(0x11_1000, tx_hdr(0x04, 0, 0, 0, 0, 0)); // RX-only flag
    put(
        0x11_2000,
        tx_hdr(
            VIRTIO_NET_HDR_F_NEEDS_CSUM,
            VIRTIO_NET_HDR_GSO_TCPV4,
            54,
            1448,
            34,
            16,
        ),
    ); // TSO not acked
    put(0x11_3000, tx_hdr(0, 9, 0, 0, 0, 0)); // unknown gso type
    put(0x11_4000, tx_hdr(0, VIRTIO_NET_HDR_GSO_ECN, 0, 0, 0, 0)); // ECN
    let descs = [
        d(0x10_0000, 8, 0, 0),           // 0: short header
        d(0x10_0000, 112, F_WRITE, 0),   // 1: device-writable
        d(MEM_SIZE - 50, 112, 0, 0),     // 2: outside guest memory
        d(0x10_0000, 0xffff_ffff, 0, 0), // 3: absurd length
        d(0x10_0000, 40_000, F_NEXT, 5), // 4: > 64 KiB in total
        d(0x10_0000, 40_000, 0, 0),
        d(0x10_0000, 12, F_NEXT, 6), // 6: loops on itself
        d(0x11_0000, 112, 0, 0),     // 7..11: bad headers
        d(0x11_1000, 112, 0, 0),
        d(0x11_2000, 112, 0, 0),
        d(0x11_3000, 112, 0, 0),
        d(0x11_4000, 112, 0, 0),
        d(0x10_0000, 20, 0, 0),  // 12: header + 8 bytes: runt
        d(0x10_0000, 112, 0, 0), // 13: good
    ];
    r.add(r.tx, &descs, 0);
    r.net.process_tx();
    assert_eq!(r.peer.recv().unwrap(), good);
    assert!(
        r.peer.recv().is_none(),
        "only the good frame reached the backend"
    );
    assert_eq!(r.used(r.tx).len(), 13);
    assert_eq!(r.net.stats().tx_dropped, 12);
    assert_eq!(r.net.stats().tx_frames, 1);
}

#[test]
fn event_loop_stops_watching_the_backend_without_buffers() {
    use event_manager::{EventManager, SubscriberOps};
    let r = Rig::new(feat(&[VIRTIO_NET_F_MRG_RXBUF]), false);
    let Rig {
        mem, net, peer, rx, ..
    } = r;
    let activate = net.activate_event().try_clone().unwrap();
    let rx_kick = net.queue_events()[RX_QUEUE].try_clone().unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());
    // Activation (the activate fd was written by `activate`).
    assert!(activate.as_raw_fd() >= 0);
    assert_eq!(em.run_with_timeout(0).unwrap(), 1);
    peer.send(&packet([0; 12], 100, 1));
    peer.send(&packet([0; 12], 100, 2));
    // The tap fires once; the frame is held and the tap unwatched.
    assert_eq!(em.run_with_timeout(50).unwrap(), 1);
    assert!(net.lock().unwrap().rx_frame_held());
    for _ in 0..5 {
        assert_eq!(em.run_with_timeout(10).unwrap(), 0, "no busy loop");
    }
    // The guest posts buffers and kicks.
    add_chains(
        &mem,
        rx,
        &[
            d(0x10_0000, 2048, F_WRITE, 0),
            d(0x11_0000, 2048, F_WRITE, 0),
        ],
        0,
    );
    rx_kick.write(1).unwrap();
    assert_eq!(em.run_with_timeout(50).unwrap(), 1);
    assert_eq!(used_of(&mem, rx).len(), 2);
    assert!(!net.lock().unwrap().rx_frame_held());
    // Watching the tap again: a new frame is picked up without a kick... once buffers exist.
    add_chains(&mem, rx, &[d(0x12_0000, 2048, F_WRITE, 0)], 2);
    peer.send(&packet([0; 12], 100, 3));
    assert_eq!(em.run_with_timeout(50).unwrap(), 1);
    assert_eq!(used_of(&mem, rx).len(), 3);
}

/// A backend whose TAP has failed: every read is an error.
#[derive(Debug)]
struct FailedBackend(OwnedFd);

impl AsRawFd for FailedBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for FailedBackend {
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EBADFD))
    }
    fn send(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::from_raw_os_error(libc::EBADFD))
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EBADFD))
    }
}

/// Counts the log lines of this test binary that mention the failed TAP.
struct CountingLogger(std::sync::atomic::AtomicUsize);

impl log::Log for CountingLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let msg = record.args().to_string();
        if msg.contains("cannot read from the backend")
            || msg.contains("the tap failed")
            || msg.contains("TAP offloads")
        {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn flush(&self) {}
}

static TAP_FAILURE_LINES: CountingLogger = CountingLogger(std::sync::atomic::AtomicUsize::new(0));

/// Issue 18 item 10: after a TAP failure, each RX kick (and each activation) logged an
/// error line, at the rate the guest kicks. Now at most a burst per call site and window.
#[test]
fn tap_failure_lines_are_rate_limited() {
    use event_manager::{EventManager, SubscriberOps};
    // Only this test installs a logger in this binary; the count is of its own lines.
    let _ = log::set_logger(&TAP_FAILURE_LINES);
    log::set_max_level(log::LevelFilter::Trace);
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())])
            .unwrap();
    let (backend, _peer, _) = pair();
    let mut net = Net::with_backend(Box::new(FailedBackend(backend.fd)), MAC, 1500).unwrap();
    net.set_acked_features(feat(&[VIRTIO_NET_F_GUEST_CSUM]));
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let (rx_a, rx) = qa(RXQ);
    let (_, tx) = qa(TXQ);
    net.activate(mem.clone(), vec![rx, tx], Arc::new(Interrupt::new(irq)))
        .unwrap();
    add_chains(&mem, rx_a, &[d(0x10_0000, 2048, F_WRITE, 0)], 0);
    let rx_kick = net.queue_events()[RX_QUEUE].try_clone().unwrap();
    let net = Arc::new(Mutex::new(net));
    let mut em = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
    em.add_subscriber(net.clone());
    // The guest kicks the RX queue 500 times (bounded: one event-loop pass each).
    for _ in 0..500 {
        rx_kick.write(1).unwrap();
        em.run_with_timeout(50).unwrap();
    }
    for _ in 0..500 {
        assert_eq!(net.lock().unwrap().process_rx(), RxState::BackendError);
    }
    let lines = TAP_FAILURE_LINES.0.load(Ordering::SeqCst);
    // Three call sites (offloads, read error, "tap failed"), a burst each in one window
    // (the test runs well within one), plus the clear-offloads line.
    let most = 4 * crate::virtio::log_limit::BURST as usize;
    assert!(lines > 0, "no line about the failed TAP");
    assert!(
        lines <= most,
        "{lines} lines about one TAP failure (at most {most})"
    );
}

/// One frame per minute: the second waits for the limiter.
fn one_frame_a_minute() -> Option<crate::rate_limiter::RateLimiter> {
    Some(crate::rate_limiter::RateLimiter::new(None, Some((1, 0, 60_000))).unwrap())
}

/// Waits (bounded) for a limiter's timer to fire.
fn wait_fired(t: &vmm_sys_util::timerfd::TimerFd) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: t.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for at most 2 s.
    let n = unsafe { libc::poll(&mut p, 1, 2000) };
    assert_eq!(n, 1, "the timer did not fire within 2 s");
}

/// Issue 16 item 1: out of TX tokens the device stops taking frames and leaves the rest on
/// the avail ring (none dropped, none sent twice); a new limiter (PATCH) re-checks at once
/// through the timer, and the frames follow in order.
#[test]
fn tx_rate_limiter_holds_frames_on_the_ring_and_resumes() {
    let mut r = Rig::new(feat(&[]), false);
    r.net.set_rate_limiters(None, Some(one_frame_a_minute()));
    let frames: Vec<Vec<u8>> = (0..3).map(|i| packet([0; 12], 100, i)).collect();
    for (i, f) in frames.iter().enumerate() {
        r.mem
            .write_slice(f, GuestAddress(0x10_0000 + 0x1000 * i as u64))
            .unwrap();
    }
    let descs: Vec<_> = (0..3)
        .map(|i| d(0x10_0000 + 0x1000 * i, 112, 0, 0))
        .collect();
    r.add(r.tx, &descs, 0);
    r.net.process_tx();
    assert_eq!(r.peer.recv().unwrap(), frames[0]);
    assert!(
        r.peer.recv().is_none(),
        "the limiter let a second frame through"
    );
    assert_eq!(r.used(r.tx), vec![(0, 0)]);
    assert!(r.net.tx_limit.throttled);
    assert_eq!(r.net.throttled_events(), (0, 1));
    // Kicks change nothing while throttled.
    r.net.process_tx();
    assert!(r.peer.recv().is_none());
    // PATCH: no limit; the timer is re-armed to fire at once.
    r.net.set_rate_limiters(None, Some(None));
    wait_fired(&r.net.tx_limit.timer);
    r.net.tx_limit.fired();
    r.net.process_tx();
    assert_eq!(r.peer.recv().unwrap(), frames[1]);
    assert_eq!(r.peer.recv().unwrap(), frames[2]);
    assert!(r.peer.recv().is_none());
    assert_eq!(r.used(r.tx), vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(r.net.stats().tx_frames, 3);
    assert_eq!(r.net.stats().tx_dropped, 0);
}

/// Out of RX tokens the device holds the frame it read, stops reading the backend
/// (RxState::Throttled: the TAP is unwatched) and delivers it, charged once, when the timer
/// fires; nothing is dropped or delivered twice.
#[test]
fn rx_rate_limiter_holds_the_frame_and_resumes() {
    let mut r = Rig::new(feat(&[]), false);
    r.net.set_rate_limiters(Some(one_frame_a_minute()), None);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| packet([0; 12], 100, i)).collect();
    for f in &frames {
        r.peer.send(f);
    }
    let descs: Vec<_> = (0..4)
        .map(|i| d(0x10_0000 + 0x1000 * i, 2048, F_WRITE, 0))
        .collect();
    r.add(r.rx, &descs, 0);
    assert_eq!(r.net.process_rx(), RxState::Throttled);
    assert!(!RxState::Throttled.wants_backend_events());
    assert_eq!(r.used(r.rx), vec![(0, 112)]);
    assert!(r.net.rx_frame_held());
    assert_eq!(
        r.net.process_rx(),
        RxState::Throttled,
        "a kick while throttled"
    );
    assert_eq!(r.net.throttled_events(), (1, 0));
    r.net.set_rate_limiters(Some(None), None);
    wait_fired(&r.net.rx_limit.timer);
    r.net.rx_limit.fired();
    assert_eq!(r.net.process_rx(), RxState::Drained);
    assert_eq!(r.used(r.rx), vec![(0, 112), (1, 112), (2, 112)]);
    for (i, f) in frames.iter().enumerate() {
        // After the header (whose num_buffers the device sets).
        assert_eq!(
            r.read(0x10_0000 + 0x1000 * i as u64 + 12, 100),
            f[12..],
            "frame {i}"
        );
    }
    assert_eq!(r.net.stats().rx_frames, 3);
    assert_eq!(r.net.stats().rx_dropped, 0);
}
