//! virtio-blk: request parsing and execution (IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES,
//! unknown types) over a 64 KiB image, through the transport and the event loop.

use devices::virtio::block::request::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use devices::virtio::block::{Block, BlockConfig};

use crate::host::memfd;
use crate::virtio::{self, NoHost, Program, BUFFERS, F_INDIRECT, F_NEXT, F_WRITE};

/// Size of the disk image.
pub const IMAGE_SIZE: usize = 64 * 1024;

/// Runs one input.
pub fn run(data: &[u8]) {
    let (_file, path) = memfd("cinder-fuzz-blk", &vec![0x5a; IMAGE_SIZE]);
    let config = BlockConfig {
        path,
        read_only: false,
        id: Some("fuzz".into()),
        allow_block_device: false,
    };
    let dev = Block::new(&config).expect("cannot open the fuzz image");
    virtio::run(dev, NoHost, data);
}

fn header(p: &mut Program, at: u32, kind: u32, sector: u64) {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    p.mem(at, &h);
}

/// A three-descriptor request at heads `3*slot`: header, data, status.
fn request(p: &mut Program, slot: u16, kind: u32, sector: u64, data_len: u32, data_write: bool) {
    let base = BUFFERS as u32 + u32::from(slot) * 0x800;
    header(p, base, kind, sector);
    let i = slot * 3;
    let dflags = if data_write { F_WRITE } else { 0 };
    p.desc(0, i, u64::from(base), 16, F_NEXT, i + 1)
        .desc(
            0,
            i + 1,
            0x2_0000 + u64::from(slot) * 0x2000,
            data_len,
            dflags | F_NEXT,
            i + 2,
        )
        .desc(0, i + 2, u64::from(base) + 0x100, 1, F_WRITE, 0)
        .avail(0, i);
}

/// Seeds: one of each request type, a read past the end, an indirect request.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut rw = Program::new();
    rw.setup(u64::MAX, 1, 5);
    request(&mut rw, 0, VIRTIO_BLK_T_OUT, 2, 1024, false);
    request(&mut rw, 1, VIRTIO_BLK_T_IN, 2, 1024, true);
    request(&mut rw, 2, VIRTIO_BLK_T_GET_ID, 0, 20, true);
    request(&mut rw, 3, VIRTIO_BLK_T_IN, 127, 1024, true);
    rw.kick(0);

    let mut ranges = Program::new();
    ranges.setup(u64::MAX, 1, 4);
    let mut range = Vec::new();
    range.extend_from_slice(&4u64.to_le_bytes());
    range.extend_from_slice(&8u32.to_le_bytes());
    range.extend_from_slice(&1u32.to_le_bytes());
    ranges.mem(0x2_0000, &range);
    header(&mut ranges, BUFFERS as u32, VIRTIO_BLK_T_DISCARD, 0);
    ranges
        .desc(0, 0, BUFFERS, 16, F_NEXT, 1)
        .desc(0, 1, 0x2_0000, 16, F_NEXT, 2)
        .desc(0, 2, BUFFERS + 0x100, 1, F_WRITE, 0)
        .avail(0, 0);
    header(
        &mut ranges,
        BUFFERS as u32 + 0x800,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
    );
    ranges
        .desc(0, 3, BUFFERS + 0x800, 16, F_NEXT, 4)
        .desc(0, 4, 0x2_0000, 16, F_NEXT, 5)
        .desc(0, 5, BUFFERS + 0x900, 1, F_WRITE, 0)
        .avail(0, 3)
        .kick(0);

    // An indirect table at 0x2_8000 holding header, data, status.
    let mut ind = Program::new();
    ind.setup(u64::MAX, 1, 4);
    header(&mut ind, BUFFERS as u32, VIRTIO_BLK_T_IN, 0);
    let mut table = Vec::new();
    for (addr, len, flags, next) in [
        (BUFFERS, 16u32, F_NEXT, 1u16),
        (0x2_1000, 512, F_WRITE | F_NEXT, 2),
        (BUFFERS + 0x100, 1, F_WRITE, 0),
    ] {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&next.to_le_bytes());
    }
    ind.mem(0x2_8000, &table)
        .desc(0, 0, 0x2_8000, 48, F_INDIRECT, 0)
        .avail(0, 0)
        .kick(0);
    vec![rw.build(), ranges.build(), ind.build()]
}

fn payload(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    let kinds = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        devices::virtio::block::request::VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        rng.next_u64() as u32,
    ];
    let kind = kinds[rng.below(kinds.len())];
    let sectors = [0u64, 1, 127, 128, 129, u64::MAX, u64::MAX / 512];
    let mut v = Vec::new();
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&sectors[rng.below(sectors.len())].to_le_bytes());
    // Discard / write-zeroes ranges, read when this lands in a data buffer.
    for _ in 0..rng.below(3) {
        v.extend_from_slice(&sectors[rng.below(sectors.len())].to_le_bytes());
        v.extend_from_slice(&(rng.next_u64() as u32 % 256).to_le_bytes());
        v.extend_from_slice(&(rng.next_u64() as u32 % 4).to_le_bytes());
    }
    v
}

/// A random plausible input.
pub fn generate(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    virtio::generate(rng, 1, payload, virtio::no_host)
}
