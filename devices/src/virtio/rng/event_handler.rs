//! How the event loop drives an [`Rng`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! On `init` it watches its activate EventFd; on activation it starts watching the queue
//! EventFd (once: it lives as long as the device) and processes the queue. A queue kick is
//! drained and the queue processed; after a reset kicks are drained and ignored.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Rng;
use crate::virtio::device_core::CoreEvent;
use crate::virtio::log_limit::warn_ratelimited;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.init_events(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.core.on_event(events.data(), ops) {
            CoreEvent::Activated | CoreEvent::Queue(_) => self.process_queue(),
            CoreEvent::Other(source) => {
                warn_ratelimited!("virtio-rng: event for unknown source {source}");
            }
        }
    }
}
