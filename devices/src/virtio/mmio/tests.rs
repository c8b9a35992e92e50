use super::*;
use crate::virtio::features::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::virtio::{
    ActivateError, COMMON_FEATURES, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

const DEVICE_FEATURE_BIT: u64 = 1 << 3;

#[derive(Default)]
struct Record {
    acked: u64,
    activations: usize,
    resets: usize,
    queues: Vec<(u16, bool, bool)>, // (size, ready, event_idx)
    config_writes: Vec<(u64, Vec<u8>)>,
}

struct Dummy {
    sizes: Vec<u16>,
    evts: Vec<EventFd>,
    config: Vec<u8>,
    fail_activate: bool,
    active: bool,
    rec: Arc<Mutex<Record>>,
}

impl Dummy {
    fn new(sizes: &[u16]) -> (Self, Arc<Mutex<Record>>) {
        let rec = Arc::new(Mutex::new(Record::default()));
        let d = Dummy {
            sizes: sizes.to_vec(),
            evts: sizes
                .iter()
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            config: (0u8..16).collect(),
            fail_activate: false,
            active: false,
            rec: rec.clone(),
        };
        (d, rec)
    }
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn avail_features(&self) -> u64 {
        COMMON_FEATURES | DEVICE_FEATURE_BIT
    }
    fn set_acked_features(&mut self, features: u64) {
        self.rec.lock().unwrap().acked = features;
    }
    fn acked_features(&self) -> u64 {
        self.rec.lock().unwrap().acked
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.evts
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.rec
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::QueueNotReady(0));
        }
        let mut rec = self.rec.lock().unwrap();
        rec.activations += 1;
        rec.queues = queues
            .iter()
            .map(|q| (q.size(), q.ready(), q.event_idx_enabled()))
            .collect();
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.rec.lock().unwrap().resets += 1;
        self.active = false;
    }
    fn is_activated(&self) -> bool {
        self.active
    }
}

struct Fixture {
    t: MmioTransport,
    rec: Arc<Mutex<Record>>,
    irq: Arc<EventFd>,
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn fixture_with(dummy: Dummy, rec: Arc<Mutex<Record>>) -> Fixture {
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let t = MmioTransport::new(mem(), Arc::new(Mutex::new(dummy)), irq.clone()).unwrap();
    Fixture { t, rec, irq }
}

fn fixture() -> Fixture {
    let (d, rec) = Dummy::new(&[16, 8]);
    fixture_with(d, rec)
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn features_ok(t: &mut MmioTransport, features: u64) {
    w32(t, reg::STATUS, ACKNOWLEDGE);
    w32(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    w32(t, reg::DRIVER_FEATURES_SEL, 0);
    w32(t, reg::DRIVER_FEATURES, (features & 0xffff_ffff) as u32);
    w32(t, reg::DRIVER_FEATURES_SEL, 1);
    w32(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
    w32(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

/// Configure queue `sel` with valid rings in the 1 MiB of guest memory.
fn setup_queue(t: &mut MmioTransport, sel: u32, size: u32) {
    let base = 0x1_0000 * (sel + 1);
    w32(t, reg::QUEUE_SEL, sel);
    w32(t, reg::QUEUE_NUM, size);
    w32(t, reg::QUEUE_DESC_LOW, base);
    w32(t, reg::QUEUE_DESC_HIGH, 0);
    w32(t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
    w32(t, reg::QUEUE_DRIVER_HIGH, 0);
    w32(t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
    w32(t, reg::QUEUE_DEVICE_HIGH, 0);
    w32(t, reg::QUEUE_READY, 1);
}

const ALL_OK: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

fn bring_up(t: &mut MmioTransport, features: u64) {
    features_ok(t, features);
    setup_queue(t, 0, 16);
    setup_queue(t, 1, 4);
    w32(t, reg::STATUS, ALL_OK);
}

#[test]
fn identity_registers() {
    let mut f = fixture();
    assert_eq!(r32(&mut f.t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(r32(&mut f.t, reg::VERSION), 2);
    assert_eq!(r32(&mut f.t, reg::DEVICE_ID), 42);
    assert_eq!(r32(&mut f.t, reg::VENDOR_ID), VENDOR_ID);
    assert_eq!(r32(&mut f.t, reg::STATUS), 0);
    assert_eq!(r32(&mut f.t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(r32(&mut f.t, reg::SHM_LEN_HIGH), u32::MAX);
    assert_eq!(r32(&mut f.t, reg::CONFIG_GENERATION), 0);
}

#[test]
fn device_features_by_selector() {
    let mut f = fixture();
    let feats = COMMON_FEATURES | DEVICE_FEATURE_BIT;
    w32(&mut f.t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        r32(&mut f.t, reg::DEVICE_FEATURES),
        (feats & 0xffff_ffff) as u32
    );
    w32(&mut f.t, reg::DEVICE_FEATURES_SEL, 1);
    let high = r32(&mut f.t, reg::DEVICE_FEATURES);
    assert_eq!(high, (feats >> 32) as u32);
    assert_eq!(high & 1, 1, "VIRTIO_F_VERSION_1 offered");
    w32(&mut f.t, reg::DEVICE_FEATURES_SEL, 0);
    let low = r32(&mut f.t, reg::DEVICE_FEATURES);
    assert_ne!(low & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    assert_ne!(low & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    w32(&mut f.t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r32(&mut f.t, reg::DEVICE_FEATURES), 0);
    w32(&mut f.t, reg::DEVICE_FEATURES_SEL, u32::MAX);
    assert_eq!(r32(&mut f.t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn full_bring_up_activates_device() {
    let mut f = fixture();
    let feats = COMMON_FEATURES | DEVICE_FEATURE_BIT;
    bring_up(&mut f.t, feats);
    assert_eq!(r32(&mut f.t, reg::STATUS), ALL_OK);
    let rec = f.rec.lock().unwrap();
    assert_eq!(rec.acked, feats);
    assert_eq!(rec.activations, 1);
    assert_eq!(rec.queues, vec![(16, true, true), (4, true, true)]);
    drop(rec);
    assert!(f.t.device().lock().unwrap().is_activated());
    w32(&mut f.t, reg::QUEUE_SEL, 1);
    assert_eq!(r32(&mut f.t, reg::QUEUE_READY), 1);
    assert_eq!(r32(&mut f.t, reg::QUEUE_NUM_MAX), 8);
}

#[test]
fn event_idx_follows_negotiation() {
    let mut f = fixture();
    bring_up(&mut f.t, 1 << VIRTIO_F_VERSION_1);
    assert_eq!(
        f.rec.lock().unwrap().queues,
        vec![(16, true, false), (4, true, false)]
    );
}

#[test]
fn unused_queue_is_passed_not_ready() {
    let mut f = fixture();
    features_ok(&mut f.t, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut f.t, 0, 16);
    w32(&mut f.t, reg::STATUS, ALL_OK);
    assert_eq!(r32(&mut f.t, reg::STATUS), ALL_OK);
    assert_eq!(
        f.rec.lock().unwrap().queues,
        vec![(16, true, false), (8, false, false)]
    );
}

#[test]
fn legacy_driver_is_refused() {
    let mut f = fixture();
    features_ok(&mut f.t, DEVICE_FEATURE_BIT);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(f.rec.lock().unwrap().acked, 0);
    // DRIVER_OK without FEATURES_OK is not a valid transition either.
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(f.rec.lock().unwrap().activations, 0);
}

#[test]
fn unoffered_feature_is_refused() {
    let mut f = fixture();
    features_ok(&mut f.t, (1 << VIRTIO_F_VERSION_1) | (1 << 20));
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | DRIVER);
    // The driver may retry with a correct set.
    w32(&mut f.t, reg::DRIVER_FEATURES_SEL, 0);
    w32(&mut f.t, reg::DRIVER_FEATURES, 0);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(
        r32(&mut f.t, reg::STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
    assert_eq!(f.rec.lock().unwrap().acked, 1 << VIRTIO_F_VERSION_1);
}

#[test]
fn driver_features_only_written_in_driver_state() {
    let mut f = fixture();
    // Before DRIVER: ignored.
    w32(&mut f.t, reg::DRIVER_FEATURES_SEL, 1);
    w32(&mut f.t, reg::DRIVER_FEATURES, 1);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(
        r32(&mut f.t, reg::STATUS),
        ACKNOWLEDGE | DRIVER,
        "no VERSION_1"
    );
    // Unknown selector: ignored.
    w32(&mut f.t, reg::DRIVER_FEATURES_SEL, 7);
    w32(&mut f.t, reg::DRIVER_FEATURES, u32::MAX);
    w32(&mut f.t, reg::DRIVER_FEATURES_SEL, 1);
    w32(&mut f.t, reg::DRIVER_FEATURES, 1);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(
        r32(&mut f.t, reg::STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
    // After FEATURES_OK: ignored.
    w32(&mut f.t, reg::DRIVER_FEATURES_SEL, 0);
    w32(&mut f.t, reg::DRIVER_FEATURES, u32::MAX);
    assert_eq!(f.rec.lock().unwrap().acked, 1 << VIRTIO_F_VERSION_1);
    setup_queue(&mut f.t, 0, 16);
    w32(&mut f.t, reg::STATUS, ALL_OK);
    assert_eq!(f.rec.lock().unwrap().queues[0], (16, true, false));
}

#[test]
fn invalid_status_transitions_are_ignored() {
    let mut f = fixture();
    // Skipping ACKNOWLEDGE.
    w32(&mut f.t, reg::STATUS, DRIVER);
    assert_eq!(r32(&mut f.t, reg::STATUS), 0);
    w32(&mut f.t, reg::STATUS, DEVICE_NEEDS_RESET);
    assert_eq!(r32(&mut f.t, reg::STATUS), 0);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | FEATURES_OK);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    // Clearing a bit without reset.
    w32(&mut f.t, reg::STATUS, DRIVER);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | DRIVER);
    // Rewriting the same status is a no-op.
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | DRIVER);
    // Garbage high bits.
    w32(&mut f.t, reg::STATUS, 0xffff_ff03);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | DRIVER);
}

#[test]
fn several_steps_in_one_write() {
    let mut f = fixture();
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | DRIVER);
}

#[test]
fn failed_blocks_progress_until_reset() {
    let mut f = fixture();
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | FAILED);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | FAILED);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER | FAILED);
    assert_eq!(r32(&mut f.t, reg::STATUS), ACKNOWLEDGE | FAILED);
    w32(&mut f.t, reg::STATUS, 0);
    assert_eq!(r32(&mut f.t, reg::STATUS), 0);
    features_ok(&mut f.t, 1 << VIRTIO_F_VERSION_1);
    assert_eq!(
        r32(&mut f.t, reg::STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK
    );
}

#[test]
fn reset_releases_queues_and_device() {
    let mut f = fixture();
    bring_up(&mut f.t, COMMON_FEATURES);
    f.t.interrupt().signal_used_queue().unwrap();
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    w32(&mut f.t, reg::STATUS, 0);
    assert_eq!(r32(&mut f.t, reg::STATUS), 0);
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(f.rec.lock().unwrap().resets, 1);
    assert!(!f.t.device().lock().unwrap().is_activated());
    for sel in 0..2 {
        w32(&mut f.t, reg::QUEUE_SEL, sel);
        assert_eq!(r32(&mut f.t, reg::QUEUE_READY), 0);
    }
    // Linux tears queues down after reset: QueueReady=0 in status 0 is fine.
    w32(&mut f.t, reg::QUEUE_READY, 0);
    // And the device can be brought up again.
    bring_up(&mut f.t, COMMON_FEATURES);
    assert_eq!(r32(&mut f.t, reg::STATUS), ALL_OK);
    assert_eq!(f.rec.lock().unwrap().activations, 2);
}

#[test]
fn reset_of_fresh_device_does_not_reset_device() {
    let mut f = fixture();
    w32(&mut f.t, reg::STATUS, 0);
    assert_eq!(f.rec.lock().unwrap().resets, 0);
}

#[test]
fn queue_config_rejected_in_wrong_state() {
    let mut f = fixture();
    // Before FEATURES_OK.
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    w32(&mut f.t, reg::QUEUE_SEL, 0);
    w32(&mut f.t, reg::QUEUE_READY, 1);
    assert_eq!(r32(&mut f.t, reg::QUEUE_READY), 0);
    // After DRIVER_OK.
    let mut f = fixture();
    bring_up(&mut f.t, COMMON_FEATURES);
    w32(&mut f.t, reg::QUEUE_SEL, 1);
    w32(&mut f.t, reg::QUEUE_NUM, 8);
    w32(&mut f.t, reg::QUEUE_DESC_LOW, 0x8_0000);
    w32(&mut f.t, reg::QUEUE_READY, 0);
    assert_eq!(r32(&mut f.t, reg::QUEUE_READY), 1);
    assert_eq!(f.t.queues[1].size(), 4);
    assert_eq!(f.t.queues[1].desc_table(), 0x2_0000);
}

#[test]
fn queue_num_validation() {
    let mut f = fixture();
    features_ok(&mut f.t, COMMON_FEATURES);
    w32(&mut f.t, reg::QUEUE_SEL, 1);
    assert_eq!(r32(&mut f.t, reg::QUEUE_NUM_MAX), 8);
    for bad in [0, 3, 16, 0x1_0000, u32::MAX] {
        w32(&mut f.t, reg::QUEUE_NUM, bad);
        assert_eq!(f.t.queues[1].size(), 8, "QueueNum {bad}");
    }
    w32(&mut f.t, reg::QUEUE_NUM, 2);
    assert_eq!(f.t.queues[1].size(), 2);
}

#[test]
fn queue_sel_out_of_range() {
    let mut f = fixture();
    features_ok(&mut f.t, COMMON_FEATURES);
    for sel in [2, 100, u32::MAX] {
        w32(&mut f.t, reg::QUEUE_SEL, sel);
        assert_eq!(r32(&mut f.t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(r32(&mut f.t, reg::QUEUE_READY), 0);
        w32(&mut f.t, reg::QUEUE_NUM, 4);
        w32(&mut f.t, reg::QUEUE_DESC_LOW, 0x1000);
        w32(&mut f.t, reg::QUEUE_READY, 1);
        w32(&mut f.t, reg::QUEUE_READY, 0);
        assert_eq!(r32(&mut f.t, reg::QUEUE_READY), 0);
    }
    assert!(f.t.queues.iter().all(|q| !q.ready()));
}

#[test]
fn queue_address_alignment_and_ready_lock() {
    let mut f = fixture();
    features_ok(&mut f.t, COMMON_FEATURES);
    w32(&mut f.t, reg::QUEUE_SEL, 0);
    w32(&mut f.t, reg::QUEUE_DESC_LOW, 0x1008); // must be 16-aligned
    w32(&mut f.t, reg::QUEUE_DRIVER_LOW, 0x2001); // must be 2-aligned
    w32(&mut f.t, reg::QUEUE_DEVICE_LOW, 0x3002); // must be 4-aligned
    let q = &f.t.queues[0];
    assert_ne!(q.desc_table(), 0x1008);
    assert_ne!(q.avail_ring(), 0x2001);
    assert_ne!(q.used_ring(), 0x3002);
    w32(&mut f.t, reg::QUEUE_DESC_LOW, 0x1010);
    w32(&mut f.t, reg::QUEUE_DESC_HIGH, 0x1);
    assert_eq!(f.t.queues[0].desc_table(), 0x1_0000_1010);
    // Once ready, the queue's configuration is frozen.
    w32(&mut f.t, reg::QUEUE_READY, 1);
    w32(&mut f.t, reg::QUEUE_DESC_HIGH, 0);
    w32(&mut f.t, reg::QUEUE_NUM, 2);
    assert_eq!(f.t.queues[0].desc_table(), 0x1_0000_1010);
    assert_eq!(f.t.queues[0].size(), 16);
    w32(&mut f.t, reg::QUEUE_READY, 7);
    assert_eq!(r32(&mut f.t, reg::QUEUE_READY), 1);
}

#[test]
fn invalid_queue_rings_fail_activation() {
    let mut f = fixture();
    features_ok(&mut f.t, COMMON_FEATURES);
    w32(&mut f.t, reg::QUEUE_SEL, 0);
    w32(&mut f.t, reg::QUEUE_DESC_LOW, 0);
    w32(&mut f.t, reg::QUEUE_DESC_HIGH, 0x10); // far outside guest memory
    w32(&mut f.t, reg::QUEUE_DRIVER_LOW, 0x1000);
    w32(&mut f.t, reg::QUEUE_DEVICE_LOW, 0x2000);
    w32(&mut f.t, reg::QUEUE_READY, 1);
    w32(&mut f.t, reg::STATUS, ALL_OK);
    let status = r32(&mut f.t, reg::STATUS);
    assert_eq!(status & DRIVER_OK, 0);
    assert_ne!(status & DEVICE_NEEDS_RESET, 0);
    assert_eq!(f.rec.lock().unwrap().activations, 0);
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(f.irq.read().unwrap(), 1);
    // Stuck until reset.
    w32(&mut f.t, reg::STATUS, status | DRIVER_OK);
    assert_eq!(r32(&mut f.t, reg::STATUS), status);
    w32(&mut f.t, reg::STATUS, 0);
    bring_up(&mut f.t, COMMON_FEATURES);
    assert_eq!(r32(&mut f.t, reg::STATUS), ALL_OK);
}

#[test]
fn device_activation_error_sets_needs_reset() {
    let (mut d, rec) = Dummy::new(&[16]);
    d.fail_activate = true;
    let mut f = fixture_with(d, rec);
    features_ok(&mut f.t, COMMON_FEATURES);
    setup_queue(&mut f.t, 0, 16);
    w32(&mut f.t, reg::STATUS, ALL_OK);
    let status = r32(&mut f.t, reg::STATUS);
    assert_eq!(
        status,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DEVICE_NEEDS_RESET
    );
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let mut f = fixture();
    bring_up(&mut f.t, COMMON_FEATURES);
    w32(&mut f.t, reg::QUEUE_NOTIFY, 1);
    assert!(f.t.queue_evts()[0].read().is_err(), "queue 0 not kicked");
    assert_eq!(f.t.queue_evts()[1].read().unwrap(), 1);
    // The device's own fd is the same eventfd.
    w32(&mut f.t, reg::QUEUE_NOTIFY, 0);
    let dev = f.t.device();
    assert_eq!(dev.lock().unwrap().queue_events()[0].read().unwrap(), 1);
    // Unknown queue: ignored.
    w32(&mut f.t, reg::QUEUE_NOTIFY, 2);
    w32(&mut f.t, reg::QUEUE_NOTIFY, u32::MAX);
    assert!(f.t.queue_evts()[0].read().is_err());
    assert!(f.t.queue_evts()[1].read().is_err());
    assert_eq!(NOTIFY_REG_OFFSET, reg::QUEUE_NOTIFY);
}

#[test]
fn interrupt_status_and_ack() {
    let mut f = fixture();
    bring_up(&mut f.t, COMMON_FEATURES);
    let irq = f.t.interrupt();
    irq.signal_used_queue().unwrap();
    irq.signal_config_change().unwrap();
    assert_eq!(f.irq.read().unwrap(), 2);
    assert_eq!(
        r32(&mut f.t, reg::INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(r32(&mut f.t, reg::CONFIG_GENERATION), 1);
    w32(&mut f.t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    w32(&mut f.t, reg::INTERRUPT_ACK, u32::MAX);
    assert_eq!(r32(&mut f.t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn config_space_access() {
    let mut f = fixture();
    let mut b1 = [0u8; 1];
    f.t.read(0x103, &mut b1);
    assert_eq!(b1, [3]);
    let mut b2 = [0u8; 2];
    f.t.read(0x102, &mut b2);
    assert_eq!(b2, [2, 3]);
    let mut b8 = [0u8; 8];
    f.t.read(0x104, &mut b8);
    assert_eq!(b8, [4, 5, 6, 7, 8, 9, 10, 11]);
    // Past the device's config: zeros.
    let mut b4 = [0xffu8; 4];
    f.t.read(0x10c, &mut b4);
    assert_eq!(b4, [12, 13, 14, 15]);
    f.t.read(0x110, &mut b4);
    assert_eq!(b4, [0; 4]);
    b4 = [0xff; 4];
    f.t.read(0xffc, &mut b4);
    assert_eq!(b4, [0; 4]);
    // Bad width, misalignment, out of window: zeros.
    let mut b3 = [0xffu8; 3];
    f.t.read(0x100, &mut b3);
    assert_eq!(b3, [0; 3]);
    b2 = [0xff; 2];
    f.t.read(0x101, &mut b2);
    assert_eq!(b2, [0; 2]);
    b4 = [0xff; 4];
    f.t.read(0x1000, &mut b4);
    assert_eq!(b4, [0; 4]);
    f.t.read(u64::MAX - 1, &mut b4);
    assert_eq!(b4, [0; 4]);

    // Writes: only once the driver is known, with a valid width.
    f.t.write(0x100, &[1]);
    w32(&mut f.t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    f.t.write(0x104, &[1, 2, 3, 4]);
    f.t.write(0x101, &[1, 2]);
    f.t.write(0x100, &[1, 2, 3]);
    f.t.write(0x1000, &[1]);
    assert_eq!(
        f.rec.lock().unwrap().config_writes,
        vec![(4, vec![1, 2, 3, 4])]
    );
}

#[test]
fn register_width_and_alignment() {
    let mut f = fixture();
    // Narrow, wide and unaligned register reads read zero.
    let mut b2 = [0xffu8; 2];
    f.t.read(reg::MAGIC_VALUE, &mut b2);
    assert_eq!(b2, [0, 0]);
    let mut b8 = [0xffu8; 8];
    f.t.read(reg::MAGIC_VALUE, &mut b8);
    assert_eq!(b8, [0; 8]);
    let mut b4 = [0xffu8; 4];
    f.t.read(0x2, &mut b4);
    assert_eq!(b4, [0; 4]);
    f.t.read(0x0, &mut []);
    // Write-only and unknown registers read zero.
    for off in [
        reg::QUEUE_NOTIFY,
        reg::INTERRUPT_ACK,
        reg::QUEUE_DESC_LOW,
        0x18,
        0xf8,
    ] {
        assert_eq!(r32(&mut f.t, off), 0, "offset {off:#x}");
    }
    // Narrow / unaligned writes are ignored.
    f.t.write(reg::STATUS, &[u8::try_from(ACKNOWLEDGE).unwrap()]);
    f.t.write(reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    f.t.write(reg::STATUS + 1, &[1, 0, 0, 0]);
    f.t.write(reg::STATUS, &[]);
    assert_eq!(r32(&mut f.t, reg::STATUS), 0);
    // Read-only registers ignore writes.
    w32(&mut f.t, reg::MAGIC_VALUE, 0);
    w32(&mut f.t, reg::INTERRUPT_STATUS, 3);
    w32(&mut f.t, reg::CONFIG_GENERATION, 3);
    assert_eq!(r32(&mut f.t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(r32(&mut f.t, reg::CONFIG_GENERATION), 0);
}

#[test]
fn random_accesses_never_panic() {
    // A deterministic xorshift "fuzzer" over the whole window, every width.
    let mut f = fixture();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200_000 {
        let r = next();
        let offset = if r & 1 == 0 {
            r >> 1 & 0x1ff
        } else {
            r >> 1 & 0x1fff
        };
        let width = [0usize, 1, 2, 3, 4, 8][(r >> 20) as usize % 6];
        let mut data = [0u8; 8];
        if r & (1 << 40) == 0 {
            f.t.read(offset, &mut data[..width]);
        } else {
            // Bias status writes towards the valid sequence so that deep states are reached.
            let value = match r >> 44 & 3 {
                0 => STATUS_SEQUENCE[(r >> 50) as usize % 4],
                1 => (r >> 32) as u32 & 0x1f,
                _ => (r >> 32) as u32,
            };
            data[..4].copy_from_slice(&value.to_le_bytes());
            f.t.write(offset, &data[..width]);
        }
    }
}

#[test]
fn constructor_rejects_bad_queue_sizes() {
    for sizes in [&[0u16][..], &[3], &[65535]] {
        let (d, _) = Dummy::new(sizes);
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let err = MmioTransport::new(mem(), Arc::new(Mutex::new(d)), irq)
            .err()
            .unwrap();
        assert!(
            matches!(err, MmioError::InvalidQueueMaxSize { .. }),
            "{err}"
        );
    }
    let (mut d, _) = Dummy::new(&[4]);
    d.evts.clear();
    let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let err = MmioTransport::new(mem(), Arc::new(Mutex::new(d)), irq)
        .err()
        .unwrap();
    assert!(matches!(err, MmioError::QueueEventCount { .. }), "{err}");
}
