//! virtio-net: TX headers and frames (guest to host), RX delivery into any receive chains
//! (host frames of any size, mergeable buffers or not), through the transport and the event
//! loop. A SOCK_SEQPACKET pair stands in for the TAP, as in the device's unit tests.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use devices::virtio::net::{Net, NetBackend, MAX_FRAME_LEN, VNET_HDR_LEN};

use crate::host::{recv, send, seqpacket_pair};
use crate::input::Input;
use crate::virtio::{self, Host, Program, BUFFERS, F_NEXT, F_WRITE};

/// virtio-net header size with VERSION_1.
const HDR: usize = VNET_HDR_LEN;
/// The most a frame from the guest may be, header included.
const MAX_TX: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

#[derive(Debug)]
struct PairBackend(OwnedFd);

impl AsRawFd for PairBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for PairBackend {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        recv(&self.0, buf)
    }
    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        send(&self.0, buf)
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// The TAP's other end.
struct Peer {
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
}

impl Host for Peer {
    /// `0, blob`: the host sends a frame; `1`: the host closes its end; `2`: drain.
    fn op(&mut self, input: &mut Input<'_>) {
        match input.u8() % 3 {
            0 => {
                let frame = input.blob(usize::MAX);
                if let Some(fd) = &self.fd {
                    let _ = send(fd, frame);
                }
            }
            1 => self.fd = None,
            _ => self.after_dispatch(),
        }
    }

    fn after_dispatch(&mut self) {
        let Some(fd) = &self.fd else { return };
        for _ in 0..512 {
            match recv(fd, &mut self.buf) {
                Ok(n) => assert!(n <= MAX_TX, "a {n}-byte frame reached the TAP"),
                Err(_) => break,
            }
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (ours, theirs) = seqpacket_pair();
    let mac = [0x02, 0, 0, 0, 0, 0x0f];
    let dev = Net::with_backend(Box::new(PairBackend(ours)), mac, 1500)
        .expect("cannot build the net device");
    let peer = Peer {
        fd: Some(theirs),
        buf: vec![0; 70_000],
    };
    virtio::run(dev, peer, data);
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend((0..len).map(|i| i as u8));
    f
}

/// Seeds: TX of a header + frame in two buffers; RX into one buffer and into mergeable
/// buffers; an oversized host frame.
pub fn seeds() -> Vec<Vec<u8>> {
    let mrg = 1u64 << 15; // VIRTIO_NET_F_MRG_RXBUF
    let mut tx = Program::new();
    tx.setup(!mrg, 2, 4)
        .mem(BUFFERS as u32, &frame(60))
        .desc(1, 0, BUFFERS, 12, F_NEXT, 1)
        .desc(1, 1, BUFFERS + 12, 60, 0, 0)
        .avail(1, 0)
        .kick(1);

    let mut rx = Program::new();
    rx.setup(!mrg, 2, 4)
        .desc(0, 0, 0x2_0000, 2048, F_WRITE, 0)
        .desc(0, 1, 0x2_1000, 12, F_WRITE | F_NEXT, 2)
        .desc(0, 2, 0x2_2000, 1500, F_WRITE, 0)
        .avail(0, 0)
        .avail(0, 1)
        .kick(0)
        .host();
    rx.raw().u8(0).blob(&frame(100));
    rx.host();
    rx.raw().u8(0).blob(&frame(1000));
    rx.kick(0);

    let mut merge = Program::new();
    merge.setup(u64::MAX, 2, 4);
    for i in 0..4u16 {
        merge
            .desc(0, i, 0x2_0000 + 0x1000 * u64::from(i), 1024, F_WRITE, 0)
            .avail(0, i);
    }
    merge.kick(0).host();
    merge.raw().u8(0).blob(&frame(3000));
    merge.host();
    merge.raw().u8(0).blob(&frame(9000));
    merge.host();
    merge.raw().u8(1);
    merge.kick(0).kick(1);
    vec![tx.build(), rx.build(), merge.build()]
}

fn payload(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers.
    let mut v = vec![rng.below(4) as u8, [0u8, 1, 3, 4, 5, 0x80][rng.below(6)]];
    for _ in 0..5 {
        let w = [0u16, 14, 54, 1448, 0xffff][rng.below(5)];
        v.extend_from_slice(&w.to_le_bytes());
    }
    v.extend((0..rng.below(64)).map(|i| i as u8));
    v
}

fn host(rng: &mut crate::mutate::Rng, b: &mut crate::input::Builder) {
    match rng.below(10) {
        0 => {
            b.u8(1);
        }
        1 => {
            b.u8(2);
        }
        _ => {
            let lens = [0usize, 11, 12, 25, 26, 72, 1526, 9012, 65_547, 65_548];
            let len = lens[rng.below(lens.len())];
            let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
            b.u8(0).blob(&frame);
        }
    }
}

/// A random plausible input.
pub fn generate(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    virtio::generate(rng, 2, payload, host)
}
