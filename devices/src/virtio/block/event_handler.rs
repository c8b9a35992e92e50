//! How the event loop drives a [`Block`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! On `init` it watches its activate EventFd. When the transport activates the device (the
//! driver wrote DRIVER_OK), that fd becomes readable: the handler starts watching the queue
//! EventFds (once; they live as long as the device) and processes every queue. A readable
//! queue EventFd (an ioeventfd kick, or a QueueNotify write) is drained and its queue
//! processed; after a reset the kicks are drained and ignored. With an I/O thread
//! ([`Block::start_io_thread`]) the thread polls those fds itself and the handler watches
//! nothing.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;
use crate::virtio::device_core::CoreEvent;
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::VirtioDevice;

/// Event data tag of the rate limiter's timer (neither the activate tag nor a queue).
const TIMER_EVENT: u32 = 0x1001;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if self.has_io_thread() {
            // The I/O thread polls the device's fds.
            return;
        }
        self.core.init_events(ops);
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER_EVENT, EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the rate limiter timer: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.core.on_event(events.data(), ops) {
            CoreEvent::Activated => {
                for index in 0..self.queue_max_sizes().len() {
                    self.process_queue(index);
                }
            }
            CoreEvent::Queue(index) => self.process_queue(index),
            CoreEvent::Other(TIMER_EVENT) => self.on_timer(),
            CoreEvent::Other(source) => {
                warn_ratelimited!("virtio-blk: event for unknown source {source}");
            }
        }
    }
}
