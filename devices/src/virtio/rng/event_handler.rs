//! How the event loop drives an [`Rng`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! On `init` it watches its activate EventFd; on activation it starts watching the queue
//! EventFd (once: it lives as long as the device) and processes the queue. A queue kick is
//! drained and the queue processed; after a reset kicks are drained and ignored.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Rng;
use crate::virtio::device_core::CoreEvent;
use crate::virtio::log_limit::warn_ratelimited;

/// Event data tag of the rate limiter's timer (the core's are the queue indexes and u32::MAX).
const TIMER_EVENT: u32 = u32::MAX - 1;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.init_events(ops);
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER_EVENT, EventSet::IN)) {
            log::error!("virtio-rng: cannot watch the rate limiter timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == TIMER_EVENT {
            self.on_timer();
            return;
        }
        match self.core.on_event(events.data(), ops) {
            CoreEvent::Activated | CoreEvent::Queue(_) => self.process_queue(),
            CoreEvent::Other(source) => {
                warn_ratelimited!("virtio-rng: event for unknown source {source}");
            }
        }
    }
}
