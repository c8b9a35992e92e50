//! virtio-rng: request chains of any shape, through the transport and the event loop.

use devices::virtio::rng::Rng;

use crate::virtio::{self, NoHost, Program, BUFFERS, F_NEXT, F_WRITE};

/// Runs one input.
pub fn run(data: &[u8]) {
    let dev = Rng::new().expect("cannot create the rng device");
    virtio::run(dev, NoHost, data);
}

/// Seeds: a good two-buffer request, a read-only buffer, a loop, and a buffer past memory.
pub fn seeds() -> Vec<Vec<u8>> {
    let b = BUFFERS;
    let mut good = Program::new();
    good.setup(u64::MAX, 1, 4)
        .desc(0, 0, b, 64, F_WRITE | F_NEXT, 1)
        .desc(0, 1, 0x2_0000, 4096, F_WRITE, 0)
        .avail(0, 0)
        .kick(0);
    let mut bad = Program::new();
    bad.setup(u64::MAX, 1, 3)
        .desc(0, 0, b, 64, 0, 0)
        .desc(0, 1, b, 64, F_WRITE | F_NEXT, 1)
        .desc(0, 2, 0xfff0, 64, F_WRITE, 0)
        .avail(0, 0)
        .avail(0, 1)
        .avail(0, 2)
        .kick(0)
        .avail_idx(0, 40)
        .kick(0);
    vec![good.build(), bad.build()]
}

/// A random plausible input.
pub fn generate(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    virtio::generate(rng, 1, virtio::random_payload, virtio::no_host)
}
