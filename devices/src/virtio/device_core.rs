//! The plumbing every cinder virtio device shares, so each device model keeps only what is
//! specific to it.
//!
//! * [`DeviceCore`] owns the offered and acked feature bits, the (read-only) config space, the
//!   queue sizes, one notification EventFd per queue, the activate EventFd and, while the
//!   device runs, its [`ActiveState`] (guest memory, queues, interrupt). It does the
//!   [`VirtioDevice`] bookkeeping: the checks of [`VirtioDevice::activate`] and what
//!   [`VirtioDevice::reset`] forgets.
//! * [`CoreDevice`]: a device names its type and its core (and, if it needs them, hooks run
//!   during `activate` and `reset`); every [`VirtioDevice`] method then comes from the one
//!   blanket implementation over the core.
//! * The event-loop half: [`DeviceCore::init_events`] watches the activate EventFd,
//!   [`DeviceCore::on_event`] drains the activate or a queue EventFd (watching the queue
//!   EventFds on the first activation) and says which it was ([`CoreEvent`]), so a device's
//!   [`event_manager::MutEventSubscriber`] only decides what to process.
//!
//! [`VirtioDevice`]: super::VirtioDevice
//! [`VirtioDevice::activate`]: super::VirtioDevice::activate
//! [`VirtioDevice::reset`]: super::VirtioDevice::reset

use std::io;
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::log_limit::warn_ratelimited;
use super::{read_config_bytes, ActivateError, Interrupt, VirtioDevice};
use crate::GuestMemoryMmap;

/// Event data tag of the activate EventFd (queue EventFds carry their index). Devices tag
/// their other fds with values that are neither this nor a queue index.
const ACTIVATE_EVENT: u32 = u32::MAX;

/// Most chains one [`ActiveState::drain_queue`] call completes: a driver that keeps posting
/// cannot hold the device loop (and every other device and the API behind it) in one queue.
/// Past it, the queue's own EventFd is written (a self-kick) so the loop comes back to it after
/// serving whatever else is ready.
pub(crate) const DRAIN_BUDGET: usize = 64;

/// What a device holds between a successful activation and the next reset.
#[derive(Debug)]
pub(crate) struct ActiveState {
    /// Guest memory, as handed over by the transport.
    pub(crate) mem: GuestMemoryMmap,
    /// One queue per entry of the device's queue sizes, all ready.
    pub(crate) queues: Vec<Queue>,
    /// The interrupt shared with the transport.
    pub(crate) interrupt: Arc<Interrupt>,
    /// The queue EventFds (clones), for the self-kick of a drain that ran out of budget.
    kicks: Vec<EventFd>,
    /// Log prefix of the device ("virtio-blk").
    name: &'static str,
}

/// A receive path ran out of available buffers: ask the driver for a kick when it posts more
/// (with EVENT_IDX this publishes avail_event, so it is done every time the queue runs dry).
/// Returns true when buffers arrived meanwhile and the caller should look again; at most once
/// per `rearmed`, so a ring that reports buffers it cannot hand out never makes the caller spin.
pub(crate) fn rearm_when_empty(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    rearmed: &mut bool,
    name: &str,
) -> bool {
    match queue.enable_notification(mem) {
        Ok(true) if !*rearmed => {
            *rearmed = true;
            true
        }
        Ok(_) => false,
        Err(e) => {
            warn_ratelimited!("{name}: receive queue: {e}");
            false
        }
    }
}

impl ActiveState {
    /// Completes the available chains of queue `index` with `handle`, which returns the used
    /// length, and checks again after re-enabling notifications (the EVENT_IDX race). At most
    /// [`DRAIN_BUDGET`] chains per call: with more available, notifications stay disabled and
    /// the queue's EventFd is written so the event loop calls again after serving the others.
    /// Raises the used-buffer interrupt when anything completed, and returns whether it did. A queue
    /// the driver broke beyond repair (e.g. an avail index more than a ring ahead, which would
    /// report "more work" forever) makes the device ask for a reset (DEVICE_NEEDS_RESET). A
    /// missing or not-ready queue is left alone.
    pub(crate) fn drain_queue(
        &mut self,
        index: usize,
        mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>, &GuestMemoryMmap) -> u32,
    ) -> bool {
        self.drain_queue_until(index, |chain, mem| Some(handle(chain, mem)))
    }

    /// As [`ActiveState::drain_queue`], where `handle` may also refuse a chain (`None`: a rate
    /// limiter is out of tokens): the chain goes back to the avail ring untouched, to be popped
    /// again on a later call (the limiter's timer), and this call stops.
    pub(crate) fn drain_queue_until(
        &mut self,
        index: usize,
        mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>, &GuestMemoryMmap) -> Option<u32>,
    ) -> bool {
        let name = self.name;
        let mem = &self.mem;
        let Some(queue) = self.queues.get_mut(index) else {
            return false;
        };
        if !queue.ready() {
            return false;
        }
        let mut used_any = false;
        let mut budget = DRAIN_BUDGET;
        'outer: loop {
            if let Err(e) = queue.disable_notification(mem) {
                warn_ratelimited!("{name}: queue {index}: cannot disable notifications: {e}");
                break;
            }
            loop {
                if budget == 0 {
                    // Notifications stay disabled: the self-kick brings the loop back.
                    match self.kicks.get(index).map(|k| k.write(1)) {
                        Some(Ok(())) => {}
                        Some(Err(e)) => {
                            warn_ratelimited!("{name}: queue {index}: cannot self-kick: {e}")
                        }
                        None => {}
                    }
                    break 'outer;
                }
                budget -= 1;
                let chain = match queue.iter(mem) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => {
                        warn_ratelimited!("{name}: queue {index}: {e}");
                        if let Err(e) = self.interrupt.signal_needs_reset() {
                            warn_ratelimited!("{name}: cannot raise the interrupt: {e}");
                        }
                        break 'outer;
                    }
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let Some(len) = handle(chain, mem) else {
                    queue.go_to_previous_position();
                    break 'outer;
                };
                if let Err(e) = queue.add_used(mem, head, len) {
                    warn_ratelimited!("{name}: queue {index}: cannot add used entry: {e}");
                }
                used_any = true;
            }
            match queue.enable_notification(mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn_ratelimited!("{name}: queue {index}: cannot enable notifications: {e}");
                    break;
                }
            }
        }
        if used_any {
            self.signal_used(index);
        }
        used_any
    }

    /// Raise the used-buffer interrupt if queue `index` asks for it (always when that cannot be
    /// told). Failures are logged (rate-limited); an unknown index does nothing.
    pub(crate) fn signal_used(&mut self, index: usize) {
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        if q.needs_notification(&self.mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_used_queue() {
                warn_ratelimited!("{}: cannot raise the interrupt: {e}", self.name);
            }
        }
    }
}

/// What [`DeviceCore::on_event`] made of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CoreEvent {
    /// The device was activated: the activate EventFd was drained and the queue EventFds are
    /// watched.
    Activated,
    /// Queue `0`'s EventFd was kicked (and drained).
    Queue(usize),
    /// Not an activate or queue event: the device's own tag.
    Other(u32),
}

/// Features, queues, EventFds and activation state of one virtio device.
#[derive(Debug)]
pub(crate) struct DeviceCore {
    name: &'static str,
    avail_features: u64,
    acked_features: u64,
    config_space: Vec<u8>,
    queue_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    activate_evt: EventFd,
    active: Option<ActiveState>,
    queue_evts_registered: bool,
}

impl DeviceCore {
    /// A device named `name` (the log prefix, e.g. "virtio-blk") offering `avail_features`,
    /// with the read-only `config_space` and one queue of each size in `queue_sizes`. Creates
    /// the queue and activate EventFds.
    pub(crate) fn new(
        name: &'static str,
        avail_features: u64,
        config_space: Vec<u8>,
        queue_sizes: &[u16],
    ) -> io::Result<Self> {
        let queue_evts = queue_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(DeviceCore {
            name,
            avail_features,
            acked_features: 0,
            config_space,
            queue_sizes: queue_sizes.to_vec(),
            queue_evts,
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            queue_evts_registered: false,
        })
    }

    /// Replaces the configuration space and, if the driver is running, tells it with a
    /// config-change interrupt (the config generation moves).
    pub(crate) fn update_config(&mut self, config_space: Vec<u8>) {
        self.config_space = config_space;
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.signal_config_change() {
                log::warn!(
                    "{}: cannot raise the config-change interrupt: {e}",
                    self.name
                );
            }
        }
    }

    /// Feature bits offered.
    pub(crate) fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Feature bits acked (0 after reset).
    pub(crate) fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Record the driver's features, masked to those offered.
    pub(crate) fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    /// Whether feature `bit` was acked.
    pub(crate) fn acked(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// [`super::VirtioDevice::read_config`]: bytes past the config space read as zero.
    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    /// [`super::VirtioDevice::write_config`]: the config space is read-only, the write is
    /// logged (rate-limited) and ignored.
    pub(crate) fn write_config(&self, offset: u64, data: &[u8]) {
        warn_ratelimited!(
            "{}: {}-byte write to read-only config space at {offset:#x} ignored",
            self.name,
            data.len()
        );
    }

    /// Maximum size of each queue.
    pub(crate) fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// One notification EventFd per queue, for the device's whole life.
    pub(crate) fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Written once per activation; the event loop reacts by watching the queue EventFds.
    pub(crate) fn activate_event(&self) -> &EventFd {
        &self.activate_evt
    }

    /// The checks of [`super::VirtioDevice::activate`]: not active yet, one queue per queue
    /// size, every queue ready.
    pub(crate) fn check_activate(&self, queues: &[Queue]) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: queues.len(),
            });
        }
        if let Some(index) = queues.iter().position(|q| !q.ready()) {
            return Err(ActivateError::QueueNotReady(index));
        }
        Ok(())
    }

    /// Tell the event loop and keep the state: the end of an activation that passed
    /// [`Self::check_activate`].
    pub(crate) fn commit_activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let kicks = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(ActivateError::ActivateEvent)?;
        self.activate_evt
            .write(1)
            .map_err(ActivateError::ActivateEvent)?;
        self.active = Some(ActiveState {
            mem,
            queues,
            interrupt,
            kicks,
            name: self.name,
        });
        Ok(())
    }

    /// Stop using guest memory and the queues; forget the acked features. The EventFds stay.
    pub(crate) fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    /// Whether the device was activated since the last reset.
    pub(crate) fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The activation state, None while not active.
    pub(crate) fn active(&self) -> Option<&ActiveState> {
        self.active.as_ref()
    }

    /// The activation state, None while not active.
    pub(crate) fn active_mut(&mut self) -> Option<&mut ActiveState> {
        self.active.as_mut()
    }

    /// For [`event_manager::MutEventSubscriber::init`]: watch the activate EventFd, and the
    /// queue EventFds if the device is already active.
    pub(crate) fn init_events(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            ACTIVATE_EVENT,
            EventSet::IN,
        )) {
            log::error!("{}: cannot watch the activate event fd: {e:?}", self.name);
        }
        if self.is_activated() {
            self.register_queue_events(ops);
        }
    }

    /// Watch the queue EventFds (once: they live as long as the device).
    fn register_queue_events(&mut self, ops: &mut EventOps) {
        if self.queue_evts_registered {
            return;
        }
        for (data, evt) in (0u32..).zip(&self.queue_evts) {
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("{}: cannot watch queue {data} event fd: {e:?}", self.name);
            }
        }
        self.queue_evts_registered = true;
    }

    /// For [`event_manager::MutEventSubscriber::process`]: handle an event tagged `data`. The
    /// activate EventFd is drained and the queue EventFds watched; a queue EventFd is drained.
    /// Anything else is left to the device.
    pub(crate) fn on_event(&mut self, data: u32, ops: &mut EventOps) -> CoreEvent {
        if data == ACTIVATE_EVENT {
            self.drain(self.activate_evt.read());
            self.register_queue_events(ops);
            return CoreEvent::Activated;
        }
        let index = data as usize;
        match self.queue_evts.get(index) {
            Some(evt) => {
                self.drain(evt.read());
                CoreEvent::Queue(index)
            }
            None => CoreEvent::Other(data),
        }
    }

    fn drain(&self, result: io::Result<u64>) {
        match result {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn_ratelimited!("{}: cannot read event fd: {e}", self.name),
        }
    }
}

/// A device model built on a [`DeviceCore`]: it says what it is and where its core is, and
/// gets every [`VirtioDevice`] method from the blanket implementation below. The two hooks
/// have empty defaults.
pub(crate) trait CoreDevice: Send {
    /// The virtio device ID ([`super::device_type`]).
    const DEVICE_TYPE: u32;
    /// The shared core.
    fn core(&self) -> &DeviceCore;
    /// The shared core, mutably.
    fn core_mut(&mut self) -> &mut DeviceCore;
    /// Runs once the activation checks passed, before the event loop is told.
    fn before_activate(&mut self) {}
    /// Runs on reset, before the core forgets the activation and acked features.
    fn on_reset(&mut self) {}

    /// Runs once a snapshot's activation is restored (see
    /// [`super::VirtioDevice::after_restore`]).
    fn after_restore(&mut self) {}
}

impl<T: CoreDevice> VirtioDevice for T {
    fn device_type(&self) -> u32 {
        T::DEVICE_TYPE
    }

    fn avail_features(&self) -> u64 {
        self.core().avail_features()
    }

    fn set_acked_features(&mut self, features: u64) {
        self.core_mut().set_acked_features(features);
    }

    fn acked_features(&self) -> u64 {
        self.core().acked_features()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.core().queue_max_sizes()
    }

    fn queue_events(&self) -> &[EventFd] {
        self.core().queue_events()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.core().read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.core_mut().write_config(offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        self.core().check_activate(&queues)?;
        self.before_activate();
        self.core_mut().commit_activate(mem, queues, interrupt)
    }

    fn reset(&mut self) {
        self.on_reset();
        self.core_mut().reset();
    }

    fn is_activated(&self) -> bool {
        self.core().is_activated()
    }

    fn active_queues(&self) -> Vec<virtio_queue::QueueState> {
        self.core()
            .active()
            .map(|a| a.queues.iter().map(Queue::state).collect())
            .unwrap_or_default()
    }

    fn after_restore(&mut self) {
        CoreDevice::after_restore(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    /// Issue 18 item 5: a drain completes at most DRAIN_BUDGET chains, leaves the rest for a
    /// later pass and kicks its own queue so the event loop comes back after the others.
    #[test]
    fn drain_queue_has_a_budget_and_self_kicks() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 128);
        let posted: u16 = 100;
        let descs: Vec<RawDescriptor> = (0..posted)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    0x2_0000 + u64::from(i) * 16,
                    16,
                    2, // VRING_DESC_F_WRITE
                    0,
                ))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut core = DeviceCore::new("test", 0, Vec::new(), &[128]).unwrap();
        let irq_fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let irq = Arc::new(Interrupt::new(irq_fd.clone()));
        core.commit_activate(mem.clone(), vec![vq.create_queue().unwrap()], irq)
            .unwrap();
        let kick = core.queue_events()[0].try_clone().unwrap();
        let active = core.active_mut().unwrap();
        let mut served = 0usize;
        assert!(active.drain_queue(0, |_, _| {
            served += 1;
            0
        }));
        assert_eq!(served, DRAIN_BUDGET, "one pass is bounded");
        assert_eq!(usize::from(vq.used().idx().load()), DRAIN_BUDGET);
        assert_eq!(irq_fd.read().unwrap(), 1, "what completed is signalled");
        assert_eq!(kick.read().unwrap(), 1, "the queue kicked itself");
        // The next pass (the loop answering the self-kick) finishes the ring, and stops
        // kicking.
        assert!(active.drain_queue(0, |_, _| {
            served += 1;
            0
        }));
        assert_eq!(served, usize::from(posted));
        assert_eq!(vq.used().idx().load(), posted);
        assert!(kick.read().is_err(), "nothing left: no self-kick");
    }
}
