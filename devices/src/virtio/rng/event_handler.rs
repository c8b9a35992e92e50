//! How the event loop drives an [`Rng`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! On `init` it watches its activate EventFd; on activation it starts watching the queue
//! EventFd (once: it lives as long as the device) and processes the queue. A queue kick is
//! drained and the queue processed; after a reset kicks are drained and ignored.

use std::io;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Rng;
use crate::virtio::ratelimit::warn_ratelimited;
use crate::virtio::VirtioDevice;

/// Event data tag of the activate EventFd (queue EventFds carry their index).
const ACTIVATE_EVENT: u32 = u32::MAX;

impl Rng {
    fn register_queue_events(&mut self, ops: &mut EventOps) {
        if self.queue_evts_registered {
            return;
        }
        for (index, evt) in self.queue_events().iter().enumerate() {
            let data = u32::try_from(index).unwrap_or(ACTIVATE_EVENT - 1);
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("virtio-rng: cannot watch queue {index} event fd: {e:?}");
            }
        }
        self.queue_evts_registered = true;
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            self.activate_event(),
            ACTIVATE_EVENT,
            EventSet::IN,
        )) {
            log::error!("virtio-rng: cannot watch the activate event fd: {e:?}");
        }
        if self.is_activated() {
            self.register_queue_events(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let source = events.data();
        if source == ACTIVATE_EVENT {
            drain(self.activate_event().read());
            self.register_queue_events(ops);
            self.process_queue();
            return;
        }
        let Some(evt) = self.queue_events().get(source as usize) else {
            warn_ratelimited!("virtio-rng: event for unknown source {source}");
            return;
        };
        drain(evt.read());
        self.process_queue();
    }
}

fn drain(result: io::Result<u64>) {
    match result {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => warn_ratelimited!("virtio-rng: cannot read event fd: {e}"),
    }
}
