//! How the event loop drives a [`Net`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! On `init` it watches its activate EventFd. On activation it starts watching the two queue
//! EventFds (once; they live as long as the device) and the backend (TAP) fd for readability,
//! then processes both queues.
//!
//! * TAP readable: an RX pass. When the guest has no room for the frame it read, the device
//!   holds it and the TAP is removed from the epoll set (level-triggered readiness would
//!   otherwise spin) until the guest kicks the RX queue.
//! * RX queue kick: an RX pass (delivering the held frame first); if it leaves the guest with
//!   room, the TAP is watched again.
//! * TX queue kick: a TX pass.
//! * After a reset, kicks are drained and ignored and the TAP is no longer watched.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Net, RxState};
use super::{RX_QUEUE, TX_QUEUE};
use crate::virtio::device_core::CoreEvent;
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::VirtioDevice;

/// Event data tag of the backend (TAP) fd.
const BACKEND_EVENT: u32 = u32::MAX - 1;
/// Event data tags of the receive and transmit rate limiters' timers.
const RX_TIMER_EVENT: u32 = u32::MAX - 2;
const TX_TIMER_EVENT: u32 = u32::MAX - 3;

impl Net {
    fn watch_backend(&mut self, ops: &mut EventOps, want: bool) {
        if want == self.backend_registered {
            return;
        }
        let fd = self.backend().as_raw_fd();
        let events = Events::with_data_raw(fd, BACKEND_EVENT, EventSet::IN);
        let result = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.backend_registered = want,
            Err(e) => error_ratelimited!(
                "virtio-net: cannot {} the tap fd: {e:?}",
                if want { "watch" } else { "stop watching" }
            ),
        }
    }

    fn rx_pass(&mut self, ops: &mut EventOps) {
        let state = self.process_rx();
        self.watch_backend(ops, state.wants_backend_events());
        if state == RxState::BackendError {
            error_ratelimited!(
                "virtio-net: the tap failed; receiving stops until the device is reset"
            );
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.init_events(ops);
        for (timer, tag) in [
            (&self.rx_limit.timer, RX_TIMER_EVENT),
            (&self.tx_limit.timer, TX_TIMER_EVENT),
        ] {
            if let Err(e) = ops.add(Events::with_data(timer, tag, EventSet::IN)) {
                log::error!("virtio-net: cannot watch a rate limiter timer: {e:?}");
            }
        }
        if self.is_activated() {
            self.rx_pass(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.core.on_event(events.data(), ops) {
            CoreEvent::Activated => {
                self.process_tx();
                self.rx_pass(ops);
            }
            CoreEvent::Queue(RX_QUEUE) => self.rx_pass(ops),
            CoreEvent::Queue(TX_QUEUE) => self.process_tx(),
            CoreEvent::Queue(_) => {}
            CoreEvent::Other(BACKEND_EVENT) => self.rx_pass(ops),
            CoreEvent::Other(RX_TIMER_EVENT) => {
                self.rx_limit.fired();
                self.rx_pass(ops);
            }
            CoreEvent::Other(TX_TIMER_EVENT) => {
                self.tx_limit.fired();
                self.process_tx();
            }
            CoreEvent::Other(source) => {
                warn_ratelimited!("virtio-net: event for unknown source {source}");
            }
        }
    }
}
