//! The virtio-net device model: config space, feature negotiation, RX (TAP -> guest) and TX
//! (guest -> TAP).
//!
//! RX is driven by TAP readiness: one frame is read into a holding buffer and copied into
//! the guest's receive buffers (several with VIRTIO_NET_F_MRG_RXBUF). When the guest has no
//! (or not enough) buffers, the frame stays held, the device asks the guest for a kick and
//! [`RxState::NoBuffers`] tells the event loop to stop watching the TAP until that kick.
//! TX is driven by the queue kick: each chain is copied out, its virtio-net header checked
//! against the negotiated features, and written to the TAP as one frame.
//!
//! Everything the guest hands over is checked: a bad chain or header is dropped (and counted,
//! with a rate-limited warning), never passed on to the TAP and never a panic.

use std::io;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::features::*;
use super::tap::{offload, NetBackend, Tap};
use super::{
    check_unicast, MacAddr, NetConfig, NetError, MAX_FRAME_LEN, MIN_FRAME_LEN, MIN_MTU, QUEUE_SIZE,
    RX_QUEUE, TX_QUEUE, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_S_LINK_UP, VNET_HDR_LEN,
};
use crate::rate_limiter::{Cost, RateLimiter};
use crate::virtio::device_core::{CoreDevice, DeviceCore};
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::{device_type, COMMON_FEATURES};
use crate::GuestMemoryMmap;

/// Frames moved per RX pass before yielding to the event loop (the TAP stays readable, so
/// the loop comes back).
pub const RX_BUDGET: usize = 256;
/// Size of the config space: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;
/// Longest virtio-net header + frame the device handles.
const BUF_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// Counters of one device (cumulative since creation); serialised as its metrics section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (frames, headers excluded).
    pub rx_bytes: u64,
    /// Frames read from the TAP and dropped (too big for the guest's buffers, runt).
    pub rx_dropped: u64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_chains: u64,
    /// Frames written to the TAP.
    pub tx_frames: u64,
    /// Bytes written to the TAP (frames, headers excluded).
    pub tx_bytes: u64,
    /// Transmit chains dropped (malformed chain or header, oversized, TAP write error).
    pub tx_dropped: u64,
}

/// What an RX pass left behind, for the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend has no more frames: keep watching it.
    Drained,
    /// The pass stopped after [`RX_BUDGET`] frames: keep watching it.
    Budget,
    /// A frame is held and the guest has no room for it: stop watching the backend until the
    /// guest kicks the RX queue.
    NoBuffers,
    /// The backend failed (e.g. the TAP was deleted): stop watching it.
    BackendError,
    /// The device is not active: stop watching the backend.
    Inactive,
    /// The RX rate limiter is out of tokens (a frame may be held): stop watching the backend
    /// until the RX timer fires.
    Throttled,
}

impl RxState {
    /// Whether the event loop should watch the backend for readability.
    pub fn wants_backend_events(self) -> bool {
        matches!(self, RxState::Drained | RxState::Budget)
    }
}

/// A virtio-net device with one RX and one TX queue over a [`NetBackend`] (a TAP).
#[derive(Debug)]
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: MacAddr,
    pub(super) core: DeviceCore,
    rx_buf: Vec<u8>,
    /// Length of the frame (header included) held in `rx_buf`, not yet delivered.
    rx_held: Option<usize>,
    tx_buf: Vec<u8>,
    stats: NetStats,
    pub(super) backend_registered: bool,
    /// Rate limiters of received and sent frames (bytes without the virtio-net header, and
    /// frames), each with the timer armed while it is out of tokens.
    pub(super) rx_limit: Limited,
    pub(super) tx_limit: Limited,
}

/// One direction's rate limiter and its timer.
#[derive(Debug)]
pub(super) struct Limited {
    limiter: Option<RateLimiter>,
    pub(super) timer: TimerFd,
    /// The timer is armed: the direction waits for it.
    pub(super) throttled: bool,
    /// RX: the held frame was already charged.
    charged: bool,
}

impl Limited {
    fn new() -> Result<Self, NetError> {
        Ok(Limited {
            limiter: None,
            timer: TimerFd::new().map_err(|e| NetError::TimerFd(e.into()))?,
            throttled: false,
            charged: false,
        })
    }

    /// Charges one frame of `bytes`; out of tokens, arms the timer and says so.
    fn admit(&mut self, bytes: u64, what: &str) -> bool {
        let Some(l) = self.limiter.as_mut() else {
            return true;
        };
        match l.consume(Cost { bytes, ops: 1 }) {
            Ok(()) => true,
            Err(w) => {
                match self.timer.reset(w, None) {
                    Ok(()) => self.throttled = true,
                    // Without a timer the next kick or TAP event retries: late, never lost.
                    Err(e) => warn_ratelimited!("virtio-net: cannot arm the {what} timer: {e}"),
                }
                false
            }
        }
    }

    /// Replaces the limiter (new buckets start full); a waiting direction is re-checked at once.
    fn set(&mut self, limiter: Option<RateLimiter>) {
        let throttled = self.throttled_events();
        self.limiter = limiter.filter(|l| !l.is_unlimited());
        if let Some(l) = &mut self.limiter {
            l.add_throttled(throttled);
        }
        if self.throttled {
            if let Err(e) = self.timer.reset(std::time::Duration::from_nanos(1), None) {
                warn_ratelimited!("virtio-net: cannot arm a rate limiter timer: {e}");
            }
        }
    }

    fn throttled_events(&self) -> u64 {
        self.limiter.as_ref().map_or(0, RateLimiter::throttled)
    }

    /// The timer fired.
    pub(super) fn fired(&mut self) {
        if let Err(e) = self.timer.wait() {
            warn_ratelimited!("virtio-net: cannot read a rate limiter timer: {e}");
        }
        self.throttled = false;
    }
}

/// One receive chain, popped from the avail ring.
struct RxChain {
    head: u16,
    /// Writable segments, all inside guest memory; None if the chain is unusable.
    segs: Option<Vec<(GuestAddress, u32)>>,
    cap: u64,
}

enum Delivery {
    Delivered,
    /// Not enough buffers yet; every popped chain was put back.
    NoBuffers,
    /// The avail ring is broken (e.g. its index is more than a ring ahead).
    BrokenRing,
    /// The frame can never fit (chains put back).
    TooBig,
}

impl Net {
    /// Attach to the TAP of `config` and build the device.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        check_unicast(&config.mac)?;
        if config.mtu < MIN_MTU {
            return Err(NetError::Mtu(config.mtu));
        }
        let tap = Tap::open(&config.tap)?;
        Self::with_backend(Box::new(tap), config.mac, config.mtu)
    }

    /// Build the device over any backend (tests use a socketpair).
    pub fn with_backend(
        backend: Box<dyn NetBackend>,
        mac: MacAddr,
        mtu: u16,
    ) -> Result<Self, NetError> {
        check_unicast(&mac)?;
        if mtu < MIN_MTU {
            return Err(NetError::Mtu(mtu));
        }
        let avail_features = COMMON_FEATURES
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_UFO)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_UFO)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_STATUS);
        let mut config_space = [0u8; CONFIG_LEN];
        config_space[..6].copy_from_slice(&mac);
        config_space[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config_space[8..10].copy_from_slice(&1u16.to_le_bytes());
        config_space[10..12].copy_from_slice(&mtu.to_le_bytes());
        let core = DeviceCore::new(
            "virtio-net",
            avail_features,
            config_space.to_vec(),
            &[QUEUE_SIZE, QUEUE_SIZE],
        )
        .map_err(NetError::EventFd)?;
        Ok(Net {
            backend,
            mac,
            core,
            rx_buf: vec![0; BUF_LEN],
            rx_held: None,
            tx_buf: vec![0; BUF_LEN],
            stats: NetStats::default(),
            backend_registered: false,
            rx_limit: Limited::new()?,
            tx_limit: Limited::new()?,
        })
    }

    /// Sets or replaces the receive and transmit rate limiters (a `PATCH
    /// /network-interfaces/{id}` of a running VM; `None` leaves that one as it is). Each frame
    /// is charged its bytes (without the virtio-net header) and one op: out of tokens, TX
    /// leaves its chains on the avail ring and RX holds the frame it read and stops reading
    /// the TAP (the kernel queues or drops there, as for a slow guest) until the direction's
    /// timer fires.
    pub fn set_rate_limiters(
        &mut self,
        rx: Option<Option<RateLimiter>>,
        tx: Option<Option<RateLimiter>>,
    ) {
        if let Some(rx) = rx {
            self.rx_limit.set(rx);
        }
        if let Some(tx) = tx {
            self.tx_limit.set(tx);
        }
    }

    /// Frames the (receive, transmit) rate limiters held back so far.
    pub fn throttled_events(&self) -> (u64, u64) {
        (
            self.rx_limit.throttled_events(),
            self.tx_limit.throttled_events(),
        )
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Counters since creation.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    /// Written once per activation; the event loop reacts by watching the queues and TAP.
    pub fn activate_event(&self) -> &EventFd {
        self.core.activate_event()
    }

    /// The backend (its fd is what the event loop watches for RX).
    pub fn backend(&self) -> &dyn NetBackend {
        self.backend.as_ref()
    }

    /// Whether a frame read from the backend waits for guest buffers.
    pub fn rx_frame_held(&self) -> bool {
        self.rx_held.is_some()
    }

    fn tun_offload_flags(&self) -> u32 {
        let mut flags = 0;
        if self.core.acked(VIRTIO_NET_F_GUEST_CSUM) {
            flags |= offload::TUN_F_CSUM;
            if self.core.acked(VIRTIO_NET_F_GUEST_TSO4) {
                flags |= offload::TUN_F_TSO4;
            }
            if self.core.acked(VIRTIO_NET_F_GUEST_TSO6) {
                flags |= offload::TUN_F_TSO6;
            }
            if self.core.acked(VIRTIO_NET_F_GUEST_UFO) {
                flags |= offload::TUN_F_UFO;
            }
        }
        flags
    }

    /// On activation: apply the offloads the driver accepted to the TAP.
    fn set_tap_offloads(&mut self) {
        let flags = self.tun_offload_flags();
        if let Err(e) = self.backend.set_offload(flags) {
            // Without them the host sends complete frames, which every driver accepts.
            error_ratelimited!("virtio-net: cannot set TAP offloads {flags:#x}: {e}; using none");
            if let Err(e) = self.backend.set_offload(0) {
                error_ratelimited!("virtio-net: cannot clear TAP offloads: {e}");
            }
        }
    }

    /// On reset: a frame held for the old queues is dropped.
    fn drop_held_frame(&mut self) {
        self.rx_held = None;
        self.rx_limit.charged = false;
    }

    /// Move frames from the backend into the guest until the backend is drained, the guest
    /// runs out of buffers or [`RX_BUDGET`] frames went through. Interrupts the guest if
    /// needed.
    pub fn process_rx(&mut self) -> RxState {
        let mrg = self.core.acked(VIRTIO_NET_F_MRG_RXBUF);
        let guest_csum = self.core.acked(VIRTIO_NET_F_GUEST_CSUM);
        let Some(active) = self.core.active_mut() else {
            return RxState::Inactive;
        };
        let Some(queue) = active.queues.get_mut(RX_QUEUE) else {
            return RxState::Inactive;
        };
        if !queue.ready() {
            return RxState::Inactive;
        }
        if self.rx_limit.throttled {
            return RxState::Throttled;
        }
        let mem = &active.mem;
        let mut used_any = false;
        let mut state = RxState::Budget;
        let mut frames = 0;
        while frames < RX_BUDGET {
            let len = match self.rx_held {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        state = RxState::Drained;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        error_ratelimited!(
                            "virtio-net: cannot read from the backend, RX stops: {e}"
                        );
                        state = RxState::BackendError;
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN + MIN_FRAME_LEN || len > self.rx_buf.len() {
                self.rx_held = None;
                self.stats.rx_dropped += 1;
                warn_ratelimited!("virtio-net: dropped a {len}-byte frame from the backend");
                frames += 1;
                continue;
            }
            self.rx_held = Some(len);
            if !self
                .rx_limit
                .admit((len - VNET_HDR_LEN) as u64, "RX rate limiter")
            {
                // Held: delivered (and charged again) when the timer fires.
                state = RxState::Throttled;
                break;
            }
            let frame = &mut self.rx_buf[..len];
            if !guest_csum {
                // Only meaningful to a driver that accepted VIRTIO_NET_F_GUEST_CSUM.
                frame[0] = 0;
            }
            match deliver(queue, mem, frame, mrg, &mut self.stats, &mut used_any) {
                Delivery::Delivered => {
                    self.rx_held = None;
                    self.rx_limit.charged = false;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += (len - VNET_HDR_LEN) as u64;
                    frames += 1;
                }
                Delivery::TooBig => {
                    self.rx_held = None;
                    self.rx_limit.charged = false;
                    self.stats.rx_dropped += 1;
                    warn_ratelimited!(
                        "virtio-net: dropped a {}-byte frame: larger than the guest's receive buffers",
                        len - VNET_HDR_LEN
                    );
                    frames += 1;
                }
                Delivery::BrokenRing => {
                    state = RxState::NoBuffers;
                    break;
                }
                Delivery::NoBuffers => match arm_rx_notification(queue, mem) {
                    // Buffers arrived meanwhile: try again.
                    Ok(true) => frames += 1,
                    Ok(false) => {
                        state = RxState::NoBuffers;
                        break;
                    }
                    Err(e) => {
                        warn_ratelimited!("virtio-net: RX queue: {e}");
                        state = RxState::NoBuffers;
                        break;
                    }
                },
            }
        }
        if state != RxState::NoBuffers {
            // The TAP drives RX; kicks only matter while waiting for buffers.
            let _ = queue.disable_notification(mem);
        }
        if used_any {
            active.signal_used(RX_QUEUE);
        }
        state
    }

    /// Send every available TX chain to the backend, then notify the guest if needed.
    pub fn process_tx(&mut self) {
        let features = self.core.acked_features();
        let Some(active) = self.core.active_mut() else {
            return;
        };
        if self.tx_limit.throttled {
            // The timer brings the loop back; until then kicks change nothing.
            return;
        }
        let (tx_buf, backend, stats) = (&mut self.tx_buf, &mut self.backend, &mut self.stats);
        let tx_limit = &mut self.tx_limit;
        active.drain_queue_until(TX_QUEUE, |chain, mem| {
            let head = chain.head_index();
            match read_tx_chain(chain, mem, tx_buf)
                .and_then(|len| check_tx_header(&tx_buf[..len], features).map(|_| len))
            {
                Ok(len) => {
                    if !tx_limit.admit((len - VNET_HDR_LEN) as u64, "TX rate limiter") {
                        // Back on the avail ring: read again when the timer fires.
                        return None;
                    }
                    // num_buffers means nothing on TX.
                    tx_buf[10] = 0;
                    tx_buf[11] = 0;
                    match backend.send(&tx_buf[..len]) {
                        Ok(_) => {
                            stats.tx_frames += 1;
                            stats.tx_bytes += (len - VNET_HDR_LEN) as u64;
                        }
                        Err(e) => {
                            stats.tx_dropped += 1;
                            warn_ratelimited!("virtio-net: TX: backend write failed: {e}");
                        }
                    }
                }
                Err(reason) => {
                    stats.tx_dropped += 1;
                    warn_ratelimited!("virtio-net: TX chain {head} dropped: {reason}");
                }
            }
            Some(0)
        });
    }
}

/// Ask the guest to kick the RX queue when it adds a buffer beyond those already posted
/// (with EVENT_IDX: avail_event = the current avail index, not our position, since a partial
/// set of merge buffers may already be posted). True if buffers arrived meanwhile.
fn arm_rx_notification(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, String> {
    let saved = queue.next_avail();
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| e.to_string())?;
    queue.set_next_avail(avail.0);
    let more = queue.enable_notification(mem).map_err(|e| e.to_string());
    queue.set_next_avail(saved);
    more
}

fn put_back(queue: &mut Queue, n: usize) {
    for _ in 0..n {
        queue.go_to_previous_position();
    }
}

/// Writable segments of an RX chain, or None if it has a readable descriptor, a descriptor
/// outside guest memory, or is malformed.
fn rx_segments<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &GuestMemoryMmap,
) -> Option<(Vec<(GuestAddress, u32)>, u64)>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut segs = Vec::new();
    let mut cap = 0u64;
    let mut last_has_next = true;
    let mut ok = true;
    for desc in chain {
        last_has_next = desc.has_next();
        if !desc.is_write_only() {
            ok = false;
            continue;
        }
        if desc.len() == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write) {
            ok = false;
            continue;
        }
        cap += u64::from(desc.len());
        segs.push((desc.addr(), desc.len()));
    }
    (ok && !last_has_next).then_some((segs, cap))
}

/// Copy `frame` (virtio-net header first) into the guest's receive buffers.
fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mrg: bool,
    stats: &mut NetStats,
    used_any: &mut bool,
) -> Delivery {
    let need = frame.len() as u64;
    let mut popped: Vec<RxChain> = Vec::new();
    let mut have = 0u64;
    let mut good = 0usize;
    let max = usize::from(queue.size());
    while have < need && (mrg || good == 0) {
        if popped.len() >= max {
            put_back(queue, popped.len());
            return Delivery::TooBig;
        }
        let chain = match queue.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                warn_ratelimited!("virtio-net: RX queue: {e}");
                put_back(queue, popped.len());
                return Delivery::BrokenRing;
            }
        };
        let Some(chain) = chain else {
            put_back(queue, popped.len());
            return Delivery::NoBuffers;
        };
        let head = chain.head_index();
        let mut entry = match rx_segments(chain, mem) {
            Some((segs, cap)) => RxChain {
                head,
                segs: Some(segs),
                cap,
            },
            None => RxChain {
                head,
                segs: None,
                cap: 0,
            },
        };
        // The first buffer of a frame must hold the whole header.
        if good == 0 && entry.cap < VNET_HDR_LEN as u64 {
            entry.segs = None;
        }
        if entry.segs.is_some() {
            good += 1;
            have += entry.cap;
        }
        popped.push(entry);
    }
    if have < need {
        // Without MRG_RXBUF one buffer must hold the frame.
        put_back(queue, popped.len());
        return Delivery::TooBig;
    }
    let Ok(num_buffers) = u16::try_from(good) else {
        put_back(queue, popped.len());
        return Delivery::TooBig;
    };
    frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    let mut off = 0usize;
    for entry in popped.iter().filter(|e| e.segs.is_some()) {
        let mut written = 0u32;
        for &(addr, len) in entry.segs.iter().flatten() {
            if off == frame.len() {
                break;
            }
            // The buffer's length, or less when the rest of the frame is shorter.
            let n = u32::try_from(frame.len() - off).map_or(len, |rest| rest.min(len));
            let end = off + n as usize;
            if let Err(e) = mem.write_slice(&frame[off..end], addr) {
                warn_ratelimited!("virtio-net: RX: cannot write a guest buffer: {e}");
            }
            off = end;
            written += n;
        }
        if let Err(e) = queue.add_used(mem, entry.head, written) {
            warn_ratelimited!("virtio-net: RX queue: cannot add used entry: {e}");
        }
    }
    for entry in popped.iter().filter(|e| e.segs.is_none()) {
        stats.rx_bad_chains += 1;
        warn_ratelimited!(
            "virtio-net: RX chain {} returned unused: readable, outside guest memory, malformed or too small for the header",
            entry.head
        );
        if let Err(e) = queue.add_used(mem, entry.head, 0) {
            warn_ratelimited!("virtio-net: RX queue: cannot add used entry: {e}");
        }
    }
    *used_any = true;
    Delivery::Delivered
}

/// Copy a TX chain into `buf`; its length (header included).
fn read_tx_chain<M>(
    chain: virtio_queue::DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, String>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut len = 0usize;
    let mut last_has_next = true;
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            return Err("device-writable descriptor in a TX chain".into());
        }
        let dlen = desc.len() as usize;
        if dlen > buf.len() - len {
            return Err(format!(
                "chain longer than {} bytes (header and {MAX_FRAME_LEN}-byte frame)",
                buf.len()
            ));
        }
        if let Err(e) = mem.read_slice(&mut buf[len..len + dlen], desc.addr()) {
            return Err(format!(
                "buffer {:#x}+{dlen:#x} is outside guest memory: {e}",
                desc.addr().0
            ));
        }
        len += dlen;
    }
    if count == 0 || last_has_next {
        return Err(
            "malformed descriptor chain (loop, bad next index or bad indirect table)".into(),
        );
    }
    Ok(len)
}

/// Check a TX header + frame against the negotiated features; the TAP only gets frames that
/// pass.
fn check_tx_header(pkt: &[u8], features: u64) -> Result<(), String> {
    let acked = |bit: u32| features & (1u64 << bit) != 0;
    if pkt.len() < VNET_HDR_LEN + MIN_FRAME_LEN {
        return Err(format!(
            "{} bytes: shorter than the {VNET_HDR_LEN}-byte header and an Ethernet header",
            pkt.len()
        ));
    }
    let frame_len = pkt.len() - VNET_HDR_LEN;
    let flags = pkt[0];
    let gso_type = pkt[1];
    let hdr_len = u16::from_le_bytes([pkt[2], pkt[3]]) as usize;
    let gso_size = u16::from_le_bytes([pkt[4], pkt[5]]);
    let csum_start = u16::from_le_bytes([pkt[6], pkt[7]]) as usize;
    let csum_offset = u16::from_le_bytes([pkt[8], pkt[9]]) as usize;
    if flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return Err(format!("header flags {flags:#x} not allowed on TX"));
    }
    let needs_csum = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    if needs_csum {
        if !acked(VIRTIO_NET_F_CSUM) {
            return Err("NEEDS_CSUM without VIRTIO_NET_F_CSUM".into());
        }
        if csum_start + csum_offset + 2 > frame_len {
            return Err(format!(
                "checksum at {csum_start}+{csum_offset} is past the {frame_len}-byte frame"
            ));
        }
    }
    if gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 {
        return Err("GSO with ECN (VIRTIO_NET_F_HOST_ECN is not offered)".into());
    }
    let needed = match gso_type {
        VIRTIO_NET_HDR_GSO_NONE => None,
        VIRTIO_NET_HDR_GSO_TCPV4 => Some(VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => Some(VIRTIO_NET_F_HOST_TSO6),
        VIRTIO_NET_HDR_GSO_UDP => Some(VIRTIO_NET_F_HOST_UFO),
        other => return Err(format!("unknown gso_type {other}")),
    };
    if let Some(bit) = needed {
        if !acked(bit) {
            return Err(format!("gso_type {gso_type} without its feature"));
        }
        if !needs_csum {
            return Err("GSO without NEEDS_CSUM".into());
        }
        if gso_size == 0 {
            return Err("GSO with gso_size 0".into());
        }
        if hdr_len > frame_len {
            return Err(format!(
                "hdr_len {hdr_len} is past the {frame_len}-byte frame"
            ));
        }
    }
    Ok(())
}

impl CoreDevice for Net {
    const DEVICE_TYPE: u32 = device_type::NET;

    fn core(&self) -> &DeviceCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut DeviceCore {
        &mut self.core
    }

    fn before_activate(&mut self) {
        self.set_tap_offloads();
    }

    fn on_reset(&mut self) {
        self.drop_held_frame();
    }
}

#[cfg(test)]
mod tests;
