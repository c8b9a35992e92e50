//! How the event loop drives a [`Balloon`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! On `init` it watches its activate EventFd and the statistics timer; on activation it starts
//! watching the queue EventFds, arms the timer and drains every queue. A queue kick drains that
//! queue; the timer hands the statistics buffer back to the driver.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Balloon;
use crate::virtio::device_core::CoreEvent;
use crate::virtio::log_limit::warn_ratelimited;

/// Event data tag of the statistics timer (the core's are the queue indexes and u32::MAX).
const TIMER_EVENT: u32 = u32::MAX - 1;

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.init_events(ops);
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER_EVENT, EventSet::IN)) {
            log::error!("virtio-balloon: cannot watch the statistics timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == TIMER_EVENT {
            self.on_timer();
            return;
        }
        match self.core.on_event(events.data(), ops) {
            CoreEvent::Activated => self.on_activated(),
            CoreEvent::Queue(i) => self.on_queue(i),
            CoreEvent::Other(source) => {
                warn_ratelimited!("virtio-balloon: event for unknown source {source}");
            }
        }
    }
}
