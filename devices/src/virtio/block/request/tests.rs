use super::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::GuestAddress;
use vmm_sys_util::tempfile::TempFile;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

const MEM_SIZE: u64 = 0x10_0000;
const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const INDIRECT: u64 = 0x4_0000;
const SECTORS: u64 = 16;
const ID: [u8; VIRTIO_BLK_ID_BYTES] = *b"cinder-test-serial-1";

struct Fx {
    mem: GuestMemoryMmap,
    file: TempFile,
    disk: DiskImage,
    original: Vec<u8>,
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
}

fn fx(read_only: bool) -> Fx {
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM_SIZE).unwrap())])
            .unwrap();
    let file = TempFile::new().unwrap();
    let original = pattern(usize::try_from(SECTORS * SECTOR_SIZE).unwrap());
    std::fs::write(file.as_path(), &original).unwrap();
    let disk = DiskImage::open(file.as_path(), read_only).unwrap();
    // Status byte starts as garbage so that "untouched" is observable.
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    Fx {
        mem,
        file,
        disk,
        original,
    }
}

impl Fx {
    fn file_bytes(&self) -> Vec<u8> {
        std::fs::read(self.file.as_path()).unwrap()
    }
    fn assert_file_untouched(&self) {
        assert_eq!(self.file_bytes(), self.original, "file changed");
    }
    fn header(&self, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&ty.to_le_bytes());
        h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }
    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }
    /// Run one chain built from `descs` (NEXT flags/indices are set by the mock).
    fn run(&mut self, descs: &[RawDescriptor]) -> u32 {
        let vq = MockSplitQueue::new(&self.mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        handle_chain(chain, &self.mem, &mut self.disk, &ID)
    }
    /// Run the first chain of a descriptor table written as-is (flags and next untouched).
    fn run_raw(&mut self, descs: &[RawDescriptor], queue_size: u16) -> u32 {
        let vq = MockSplitQueue::new(&self.mem, queue_size);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&self.mem).unwrap().next().unwrap();
        handle_chain(chain, &self.mem, &mut self.disk, &ID)
    }
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn dn(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn hdr() -> RawDescriptor {
    d(HDR, 16, 0)
}

fn status_desc() -> RawDescriptor {
    d(STATUS, 1, F_WRITE)
}

#[test]
fn read_happy_path() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_IN, 1);
    let len = f.run(&[hdr(), d(DATA, 1024, F_WRITE), status_desc()]);
    assert_eq!(len, 1025);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    let mut buf = vec![0u8; 1024];
    f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, f.original[512..1536]);
    f.assert_file_untouched();
}

#[test]
fn read_scattered_segments_and_zero_length_segment() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_IN, 2);
    let len = f.run(&[
        hdr(),
        d(DATA + 0x3000, 512, F_WRITE),
        d(DATA + 0x5000, 0, F_WRITE),
        d(DATA, 1024, F_WRITE),
        status_desc(),
    ]);
    assert_eq!(len, 1537);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    let mut a = vec![0u8; 512];
    f.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x3000))
        .unwrap();
    assert_eq!(a, f.original[1024..1536]);
    let mut b = vec![0u8; 1024];
    f.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert_eq!(b, f.original[1536..2560]);
}

#[test]
fn read_last_sector() {
    let mut f = fx(true);
    f.header(VIRTIO_BLK_T_IN, SECTORS - 1);
    assert_eq!(f.run(&[hdr(), d(DATA, 512, F_WRITE), status_desc()]), 513);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
}

#[test]
fn write_happy_path() {
    let mut f = fx(false);
    f.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    f.mem
        .write_slice(&[0xcd; 1024], GuestAddress(DATA + 0x1000))
        .unwrap();
    f.header(VIRTIO_BLK_T_OUT, 3);
    let len = f.run(&[
        hdr(),
        d(DATA, 512, 0),
        d(DATA + 0x1000, 1024, 0),
        status_desc(),
    ]);
    assert_eq!(len, 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    let mut expected = f.original.clone();
    expected[1536..2048].fill(0xab);
    expected[2048..3072].fill(0xcd);
    assert_eq!(f.file_bytes(), expected);
}

#[test]
fn flush_ok() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(f.run(&[hdr(), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    // On a read-only disk too, and any data attached is ignored.
    let mut f = fx(true);
    f.header(VIRTIO_BLK_T_FLUSH, 12345);
    assert_eq!(f.run(&[hdr(), d(DATA, 512, 0), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    f.assert_file_untouched();
}

#[test]
fn get_id() {
    let mut f = fx(true);
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(f.run(&[hdr(), d(DATA, 20, F_WRITE), status_desc()]), 21);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(id, ID);

    // A smaller buffer gets a prefix; a larger one exactly 20 bytes.
    f.mem.write_slice(&[0u8; 64], GuestAddress(DATA)).unwrap();
    assert_eq!(f.run(&[hdr(), d(DATA, 8, F_WRITE), status_desc()]), 9);
    let mut got = [0u8; 9];
    f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..8], &ID[..8]);
    assert_eq!(got[8], 0);
    assert_eq!(
        f.run(&[
            hdr(),
            d(DATA, 4, F_WRITE),
            d(DATA + 0x100, 64, F_WRITE),
            status_desc()
        ]),
        21
    );

    // No buffer, or a readable one: IOERR.
    assert_eq!(f.run(&[hdr(), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(f.run(&[hdr(), d(DATA, 20, 0), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
}

#[test]
fn read_only_refuses_writes() {
    let mut f = fx(true);
    f.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(f.run(&[hdr(), d(DATA, 512, 0), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    f.assert_file_untouched();
}

#[test]
fn past_the_end_is_ioerr() {
    for (ty, flags) in [(VIRTIO_BLK_T_IN, F_WRITE), (VIRTIO_BLK_T_OUT, 0)] {
        for (sector, len) in [
            (SECTORS, 512),
            (SECTORS - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512, 512),
            (1 << 55, 0),
        ] {
            let mut f = fx(false);
            f.mem
                .write_slice(&[0xab; 1024], GuestAddress(DATA))
                .unwrap();
            f.header(ty, sector);
            assert_eq!(f.run(&[hdr(), d(DATA, len, flags), status_desc()]), 1);
            assert_eq!(f.status(), VIRTIO_BLK_S_IOERR, "type {ty} sector {sector}");
            f.assert_file_untouched();
        }
    }
}

#[test]
fn zero_length_read_in_range_is_ok() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_IN, SECTORS);
    assert_eq!(f.run(&[hdr(), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
}

#[test]
fn bad_header() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_OUT, 0);
    for header in [
        d(HDR, 8, 0),            // short: the header runs into the data, which is then 504 bytes
        d(HDR, 0, 0),            // empty: ditto, the "header" is data bytes (bad sector)
        d(HDR, 32, 0),           // header plus 16 data bytes: 528 bytes is not whole sectors
        d(HDR, 16, F_WRITE),     // device-writable
        d(MEM_SIZE - 8, 16, 0),  // straddles the end of memory
        d(u64::MAX - 7, 16, 0),  // wraps around
        d(0x1_0000_0000, 16, 0), // far outside memory
    ] {
        f.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(f.run(&[header, d(DATA, 512, 0), status_desc()]), 1);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    }
    // No header at all.
    f.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(f.run(&[status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    f.assert_file_untouched();
}

/// VIRTIO_F_VERSION_1 implies ANY_LAYOUT: the header may span descriptors, data may share a
/// descriptor with the header, and the status is the last byte of the last descriptor.
#[test]
fn any_layout_framing() {
    let mut f = fx(false);
    // Write: the header split 4 + 12 over two descriptors, the second also holding the
    // 512 data bytes.
    f.header(VIRTIO_BLK_T_OUT, 2);
    let data = vec![0x5au8; 512];
    f.mem.write_slice(&data, GuestAddress(HDR + 16)).unwrap();
    let len = f.run(&[d(HDR, 4, 0), d(HDR + 4, 12 + 512, 0), status_desc()]);
    assert_eq!(len, 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    assert_eq!(&f.file_bytes()[1024..1536], &data[..]);

    // Read: data and status in one device-writable descriptor (status = its last byte).
    f.header(VIRTIO_BLK_T_IN, 0);
    f.mem.write_obj(0xeeu8, GuestAddress(DATA + 512)).unwrap();
    let len = f.run(&[hdr(), d(DATA, 513, F_WRITE)]);
    assert_eq!(len, 513);
    let status: u8 = f.mem.read_obj(GuestAddress(DATA + 512)).unwrap();
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let mut buf = vec![0u8; 512];
    f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, f.original[..512]);

    // A readable descriptor after a writable one is refused.
    f.header(VIRTIO_BLK_T_IN, 0);
    f.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(
        f.run(&[
            hdr(),
            d(DATA, 512, F_WRITE),
            d(DATA + 512, 512, 0),
            status_desc()
        ]),
        1
    );
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
}

#[test]
fn unknown_type_is_unsupp() {
    let mut f = fx(false);
    for ty in [2, 3, 5, 12, 42, u32::MAX] {
        f.header(ty, 0);
        f.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(f.run(&[hdr(), d(DATA, 512, 0), status_desc()]), 1);
        assert_eq!(f.status(), VIRTIO_BLK_S_UNSUPP, "type {ty}");
    }
    f.assert_file_untouched();
}

#[test]
fn unusable_status_descriptor_drops_request() {
    let mut f = fx(false);
    f.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 0);
    for status in [
        d(STATUS, 1, 0),         // read-only
        d(STATUS, 0, F_WRITE),   // too small
        d(MEM_SIZE, 1, F_WRITE), // outside memory
        d(u64::MAX, 1, F_WRITE), // outside memory, at the top
    ] {
        assert_eq!(f.run(&[hdr(), d(DATA, 512, 0), status]), 0);
        assert_eq!(f.status(), 0xee, "status byte untouched");
    }
    // A single read-only descriptor.
    assert_eq!(f.run(&[hdr()]), 0);
    f.assert_file_untouched();
}

/// A status descriptor whose end wraps around the 64-bit address space names no byte of
/// guest memory: the request is dropped. (Found by the virtio_blk fuzz target: the status
/// address was computed with a wrapping add, so a 0xffff-byte status descriptor at
/// 0xffff_ffff_ffff_a100 put the status byte at 0xa0fe, a guest address the driver never
/// handed to the device: fuzz/corpus/virtio_blk/crash-status-wraps.)
#[test]
fn status_descriptor_wrapping_the_address_space_drops_request() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    // 1 MiB whose last byte, wrapped, would be STATUS.
    let len: u32 = 0x10_0000;
    let start = STATUS.wrapping_sub(u64::from(len) - 1);
    let status = d(start, len, F_WRITE);
    assert!(start > MEM_SIZE);
    assert_eq!(f.run(&[hdr(), d(DATA, 512, F_WRITE), status]), 0);
    assert_eq!(f.status(), 0xee, "status byte untouched");
    f.assert_file_untouched();
}

#[test]
fn wrong_data_direction() {
    let mut f = fx(false);
    f.mem
        .write_slice(&[0x55; 1024], GuestAddress(DATA))
        .unwrap();
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(f.run(&[hdr(), d(DATA, 512, 0), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    // Mixed directions.
    assert_eq!(
        f.run(&[
            hdr(),
            d(DATA, 512, F_WRITE),
            d(DATA + 512, 512, 0),
            status_desc()
        ]),
        1
    );
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    let mut buf = [0u8; 1024];
    f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, [0x55; 1024], "guest memory untouched");

    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(f.run(&[hdr(), d(DATA, 512, F_WRITE), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    assert_eq!(
        f.run(&[
            hdr(),
            d(DATA, 512, 0),
            d(DATA + 512, 512, F_WRITE),
            status_desc()
        ]),
        1
    );
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    f.assert_file_untouched();
}

#[test]
fn length_not_sector_multiple() {
    let mut f = fx(false);
    for (ty, flags) in [(VIRTIO_BLK_T_IN, F_WRITE), (VIRTIO_BLK_T_OUT, 0)] {
        f.header(ty, 0);
        for lens in [&[511u32][..], &[1], &[513], &[256, 512]] {
            let mut descs = vec![hdr()];
            let mut addr = DATA;
            for &len in lens {
                descs.push(d(addr, len, flags));
                addr += 0x1000;
            }
            descs.push(status_desc());
            assert_eq!(f.run(&descs), 1);
            assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
        }
    }
    // Segments need not be whole sectors, only the total.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[
            hdr(),
            d(DATA, 256, F_WRITE),
            d(DATA + 0x1000, 256, F_WRITE),
            status_desc()
        ]),
        513
    );
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    f.assert_file_untouched();
}

#[test]
fn data_outside_guest_memory() {
    for (ty, flags) in [(VIRTIO_BLK_T_IN, F_WRITE), (VIRTIO_BLK_T_OUT, 0)] {
        for (addr, len) in [
            (MEM_SIZE - 256, 512),
            (MEM_SIZE, 512),
            (u64::MAX - 511, 512),
            (u64::MAX, 512),
            (1 << 40, 512),
        ] {
            let mut f = fx(false);
            f.header(ty, 0);
            // A valid first segment, then the bad one: nothing may be transferred.
            let len_used = f.run(&[
                hdr(),
                d(DATA, 512, flags),
                d(addr, len, flags),
                status_desc(),
            ]);
            assert_eq!(len_used, 1);
            assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
            f.assert_file_untouched();
            if ty == VIRTIO_BLK_T_IN {
                let mut buf = [0u8; 512];
                f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
                assert_eq!(buf, [0u8; 512], "no partial read");
            }
        }
    }
}

#[test]
fn enormous_lengths() {
    let mut f = fx(false);
    for len in [SIZE_MAX + 512, u32::MAX - 511] {
        for (ty, flags) in [(VIRTIO_BLK_T_IN, F_WRITE), (VIRTIO_BLK_T_OUT, 0)] {
            f.header(ty, 0);
            assert_eq!(f.run(&[hdr(), d(DATA, len, flags), status_desc()]), 1);
            assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
        }
    }
    // Within size_max but past the disk (and past guest memory).
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(f.run(&[hdr(), d(0, SIZE_MAX, F_WRITE), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    // Chains whose lengths sum past u32::MAX are cut by virtio-queue: dropped, no status.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[hdr(), d(DATA, u32::MAX, F_WRITE), status_desc()]),
        0
    );
    assert_eq!(
        f.run(&[
            hdr(),
            d(DATA, u32::MAX, F_WRITE),
            d(DATA, u32::MAX, F_WRITE),
            status_desc()
        ]),
        0
    );
    f.assert_file_untouched();
}

#[test]
fn descriptor_loop_is_dropped() {
    let mut f = fx(false);
    f.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_OUT, 0);
    // 0 -> 1 -> 2 -> 1 -> ...
    let descs = [
        dn(HDR, 16, F_NEXT, 1),
        dn(DATA, 512, F_NEXT, 2),
        dn(STATUS, 1, F_WRITE | F_NEXT, 1),
    ];
    assert_eq!(f.run_raw(&descs, 16), 0);
    assert_eq!(f.status(), 0xee);
    // Self loop on the head.
    assert_eq!(f.run_raw(&[dn(HDR, 16, F_NEXT, 0)], 16), 0);
    f.assert_file_untouched();
}

#[test]
fn chain_longer_than_queue_is_dropped() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    // Every one of the 8 descriptors chains on; the last points past the table.
    let mut descs = vec![dn(HDR, 16, F_NEXT, 1)];
    for i in 1..7u16 {
        descs.push(dn(DATA + u64::from(i) * 512, 512, F_WRITE | F_NEXT, i + 1));
    }
    descs.push(dn(STATUS, 1, F_WRITE | F_NEXT, 8));
    assert_eq!(f.run_raw(&descs, 8), 0);
    // Next index far out of range.
    assert_eq!(
        f.run_raw(&[dn(HDR, 16, F_NEXT, 500), dn(STATUS, 1, F_WRITE, 0)], 8),
        0
    );
    assert_eq!(f.status(), 0xee);
}

fn write_indirect_table(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) {
    for (i, desc) in descs.iter().enumerate() {
        mem.write_obj(*desc, GuestAddress(INDIRECT + 16 * i as u64))
            .unwrap();
    }
}

/// Length in bytes of an indirect descriptor table.
fn table_bytes(table: &[RawDescriptor]) -> u32 {
    16 * u32::try_from(table.len()).unwrap()
}

fn chained(descs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    let n = descs.len();
    descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            if i + 1 < n {
                dn(addr, len, flags | F_NEXT, u16::try_from(i + 1).unwrap())
            } else {
                dn(addr, len, flags, 0)
            }
        })
        .collect()
}

#[test]
fn indirect_read() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_IN, 4);
    let table = chained(&[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)]);
    write_indirect_table(&f.mem, &table);
    let len = f.run(&[d(INDIRECT, 16 * 3, F_INDIRECT)]);
    assert_eq!(len, 513);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    let mut buf = vec![0u8; 512];
    f.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(buf, f.original[2048..2560]);
}

#[test]
fn too_many_descriptors_via_indirect() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let mut spec = vec![(HDR, 16, 0)];
    spec.extend((0..200).map(|_| (DATA, 0, F_WRITE)));
    spec.push((STATUS, 1, F_WRITE));
    let table = chained(&spec);
    write_indirect_table(&f.mem, &table);
    let len = f.run(&[d(INDIRECT, table_bytes(&table), F_INDIRECT)]);
    assert_eq!(len, 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);

    // Exactly the limit is fine.
    let mut spec = vec![(HDR, 16, 0)];
    spec.extend((0..SEG_MAX).map(|i| (DATA + u64::from(i) * 512, 512, F_WRITE)));
    spec.push((STATUS, 1, F_WRITE));
    let table = chained(&spec);
    assert_eq!(table.len(), MAX_DESCRIPTORS);
    // The disk has 16 sectors, so read them 8 times over is past the end: IOERR, but parsed.
    f.header(VIRTIO_BLK_T_IN, 0);
    write_indirect_table(&f.mem, &table);
    assert_eq!(f.run(&[d(INDIRECT, table_bytes(&table), F_INDIRECT)]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
}

#[test]
fn bad_indirect_tables_are_dropped() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    // Nested indirect descriptor.
    let table = chained(&[
        (HDR, 16, 0),
        (INDIRECT, 32, F_INDIRECT),
        (STATUS, 1, F_WRITE),
    ]);
    write_indirect_table(&f.mem, &table);
    assert_eq!(f.run(&[d(INDIRECT, 48, F_INDIRECT)]), 0);
    // Table length not a multiple of 16, table outside memory, loop inside the table.
    assert_eq!(f.run(&[d(INDIRECT, 47, F_INDIRECT)]), 0);
    assert_eq!(f.run(&[d(MEM_SIZE, 48, F_INDIRECT)]), 0);
    write_indirect_table(
        &f.mem,
        &[dn(HDR, 16, F_NEXT, 1), dn(STATUS, 1, F_WRITE | F_NEXT, 0)],
    );
    assert_eq!(f.run(&[d(INDIRECT, 32, F_INDIRECT)]), 0);
    assert_eq!(f.status(), 0xee);
}

#[test]
fn parse_reports_fields() {
    let f = fx(false);
    f.header(VIRTIO_BLK_T_OUT, 7);
    let vq = MockSplitQueue::new(&f.mem, 16);
    let chain = vq
        .build_desc_chain(&[
            hdr(),
            d(DATA, 512, 0),
            d(DATA + 0x1000, 0, 0),
            status_desc(),
        ])
        .unwrap();
    let req = Request::parse(chain, &f.mem).unwrap();
    assert_eq!(req.kind, RequestType::Out);
    assert_eq!(req.sector, 7);
    assert_eq!(req.data, vec![(GuestAddress(DATA), 512)]);
    assert_eq!(req.data_len, 512);
    assert_eq!(req.status_addr, GuestAddress(STATUS));
}

/// Writes DISCARD / WRITE_ZEROES ranges (sector, num_sectors, flags) at DATA; returns their
/// byte length.
fn ranges(f: &Fx, ranges: &[(u64, u32, u32)]) -> u32 {
    let mut raw = Vec::new();
    for &(sector, count, flags) in ranges {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&count.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    f.mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
    u32::try_from(raw.len()).unwrap()
}

fn sectors(a: u64, b: u64) -> std::ops::Range<usize> {
    usize::try_from(a * SECTOR_SIZE).unwrap()..usize::try_from(b * SECTOR_SIZE).unwrap()
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let mut f = fx(false);
    let mut want = f.original.clone();
    for (sector, count, flags) in [(2, 2, 0), (6, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)] {
        f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let len = ranges(&f, &[(sector, count, flags)]);
        assert_eq!(f.run(&[hdr(), d(DATA, len, 0), status_desc()]), 1);
        assert_eq!(f.status(), VIRTIO_BLK_S_OK);
        want[sectors(sector, sector + u64::from(count))].fill(0);
    }
    assert_eq!(f.file_bytes(), want);
}

#[test]
fn discard_several_ranges() {
    let mut f = fx(false);
    f.header(VIRTIO_BLK_T_DISCARD, 0);
    let len = ranges(&f, &[(8, 8, 0), (1, 1, 0), (3, 0, 0)]);
    assert_eq!(f.run(&[hdr(), d(DATA, len, 0), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK);
    // A discarded sector reads as zeroes or keeps its data; the others are unchanged.
    let got = f.file_bytes();
    for s in 0..SECTORS {
        let r = sectors(s, s + 1);
        if s == 1 || s >= 8 {
            assert!(got[r.clone()] == f.original[r.clone()] || got[r].iter().all(|&b| b == 0));
        } else {
            assert_eq!(got[r.clone()], f.original[r], "sector {s} changed");
        }
    }
}

#[test]
fn discard_and_write_zeroes_bad_requests_change_nothing() {
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let max_wz = MAX_WRITE_ZEROES_SECTORS;
    let discard = VIRTIO_BLK_T_DISCARD;
    let zeroes = VIRTIO_BLK_T_WRITE_ZEROES;
    type Case<'a> = (&'a str, u32, &'a [(u64, u32, u32)], u8);
    let cases: &[Case] = &[
        (
            "discard with UNMAP",
            discard,
            &[(0, 1, unmap)],
            VIRTIO_BLK_S_UNSUPP,
        ),
        ("unknown flag", zeroes, &[(0, 1, 2)], VIRTIO_BLK_S_UNSUPP),
        (
            "unknown flag on discard",
            discard,
            &[(0, 1, 1 << 31)],
            VIRTIO_BLK_S_UNSUPP,
        ),
        (
            "past the end",
            zeroes,
            &[(SECTORS, 1, 0)],
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "straddling the end",
            discard,
            &[(SECTORS - 1, 2, 0)],
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "sector overflow",
            zeroes,
            &[(u64::MAX, 1, 0)],
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "over max sectors",
            zeroes,
            &[(0, max_wz + 1, 0)],
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "two zero ranges",
            zeroes,
            &[(0, 1, 0), (2, 1, 0)],
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "good range then bad",
            discard,
            &[(0, 4, 0), (SECTORS, 1, 0)],
            VIRTIO_BLK_S_IOERR,
        ),
        (
            "good range then bad flags",
            discard,
            &[(0, 4, 0), (5, 1, 4)],
            VIRTIO_BLK_S_UNSUPP,
        ),
    ];
    let mut f = fx(false);
    for &(what, ty, rs, want) in cases {
        f.header(ty, 0);
        f.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let len = ranges(&f, rs);
        assert_eq!(f.run(&[hdr(), d(DATA, len, 0), status_desc()]), 1, "{what}");
        assert_eq!(f.status(), want, "{what}");
        f.assert_file_untouched();
    }
    // More ranges than max_discard_seg.
    f.header(discard, 0);
    let many: Vec<_> = (0..=MAX_DISCARD_SEG).map(|_| (0u64, 1u32, 0u32)).collect();
    let len = ranges(&f, &many);
    assert_eq!(f.run(&[hdr(), d(DATA, len, 0), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    // No ranges, a partial range, ranges in a device-writable buffer.
    for (what, descs) in [
        ("no data", vec![hdr(), status_desc()]),
        ("15 bytes", vec![hdr(), d(DATA, 15, 0), status_desc()]),
        (
            "writable ranges",
            vec![hdr(), d(DATA, 16, F_WRITE), status_desc()],
        ),
    ] {
        for ty in [discard, zeroes] {
            f.header(ty, 0);
            f.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
            ranges(&f, &[(0, 1, 0)]);
            assert!(f.run(&descs) >= 1, "{what}");
            assert_eq!(f.status(), VIRTIO_BLK_S_IOERR, "{what}");
        }
    }
    // Ranges outside guest memory.
    f.header(zeroes, 0);
    assert_eq!(f.run(&[hdr(), d(MEM_SIZE - 8, 16, 0), status_desc()]), 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    f.assert_file_untouched();
}

#[test]
fn discard_and_write_zeroes_refused_on_read_only_disk() {
    let mut f = fx(true);
    for ty in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        f.header(ty, 0);
        f.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let len = ranges(&f, &[(0, 4, 0)]);
        assert_eq!(f.run(&[hdr(), d(DATA, len, 0), status_desc()]), 1);
        assert_eq!(f.status(), VIRTIO_BLK_S_IOERR);
    }
    f.assert_file_untouched();
}
