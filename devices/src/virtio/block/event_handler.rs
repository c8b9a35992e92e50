//! How the event loop drives a [`Block`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! On `init` it watches its activate EventFd. When the transport activates the device (the
//! driver wrote DRIVER_OK), that fd becomes readable: the handler starts watching the queue
//! EventFds (once; they live as long as the device) and processes every queue. A readable
//! queue EventFd (an ioeventfd kick, or a QueueNotify write) is drained and its queue
//! processed; after a reset the kicks are drained and ignored.

use std::io;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;
use crate::virtio::ratelimit::warn_ratelimited;
use crate::virtio::VirtioDevice;

/// Event data tag of the activate EventFd (queue EventFds carry their index).
const ACTIVATE_EVENT: u32 = u32::MAX;

impl Block {
    fn register_queue_events(&mut self, ops: &mut EventOps) {
        if self.queue_evts_registered {
            return;
        }
        for (index, evt) in self.queue_events().iter().enumerate() {
            let data = u32::try_from(index).unwrap_or(ACTIVATE_EVENT - 1);
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("virtio-blk: cannot watch queue {index} event fd: {e:?}");
            }
        }
        self.queue_evts_registered = true;
    }

    fn process_all_queues(&mut self) {
        for index in 0..self.queue_max_sizes().len() {
            self.process_queue(index);
        }
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            self.activate_event(),
            ACTIVATE_EVENT,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: cannot watch the activate event fd: {e:?}");
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
            self.process_all_queues();
            return;
        }
        let index = source as usize;
        let Some(evt) = self.queue_events().get(index) else {
            warn_ratelimited!("virtio-blk: event for unknown source {source}");
            return;
        };
        drain(evt.read());
        self.process_queue(index);
    }
}

fn drain(result: io::Result<u64>) {
    match result {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => warn_ratelimited!("virtio-blk: cannot read event fd: {e}"),
    }
}
