//! How the event loop drives a [`Console`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! Watched: the activate EventFd (always), the two queue EventFds (from the first activation
//! on), and the host input fd only while the guest has receive buffers posted. With no buffer
//! posted the input is not watched, so input waits in the kernel (pipe, socket or tty buffer)
//! instead of waking the event loop or filling memory in cinder. A receive-queue kick (the
//! guest posted buffers) re-arms the input.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Console, InputOutcome};
use super::{RX_QUEUE, TX_QUEUE};
use crate::virtio::device_core::CoreEvent;
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::VirtioDevice;

/// Event data tag of the input fd.
const INPUT_EVENT: u32 = u32::MAX - 1;

impl Console {
    /// Watch the input exactly when [`Console::wants_input`] says so.
    fn update_input_interest(&mut self, ops: &mut EventOps, input_fd: Option<i32>) {
        let want = self.wants_input();
        if want == self.input_watched {
            return;
        }
        let Some(fd) = input_fd.or(self.input_fd()) else {
            self.input_watched = false;
            return;
        };
        let ev = Events::with_data_raw(fd, INPUT_EVENT, EventSet::IN);
        let res = if want { ops.add(ev) } else { ops.remove(ev) };
        match res {
            Ok(()) => self.input_watched = want,
            Err(e) => {
                log::error!("virtio-console: cannot (un)watch the input fd {fd}: {e:?}");
                // Removing failed: forget it anyway so a closed input is not retried forever.
                if !want {
                    self.input_watched = false;
                }
            }
        }
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.init_events(ops);
        if self.is_activated() {
            self.update_input_interest(ops, None);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // The fd as registered: after end of file `input_fd()` is None but removal needs it.
        let input_fd = self.input_fd();
        match self.core.on_event(events.data(), ops) {
            CoreEvent::Activated => self.process_tx(),
            CoreEvent::Queue(index) => {
                if index == TX_QUEUE {
                    self.process_tx();
                }
                debug_assert!(index == TX_QUEUE || index == RX_QUEUE);
            }
            CoreEvent::Other(INPUT_EVENT) => {
                let set = events.event_set();
                if set.contains(EventSet::IN) {
                    match self.handle_input_ready() {
                        InputOutcome::Closed => log::info!("virtio-console: input closed"),
                        InputOutcome::Delivered(_)
                        | InputOutcome::NoBuffers
                        | InputOutcome::Inactive
                        | InputOutcome::WouldBlock => {}
                    }
                } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    // Hang-up without data: nothing more will come.
                    let _ = self.handle_input_ready();
                }
                let fd = events.fd();
                self.update_input_interest(ops, Some(fd));
                return;
            }
            CoreEvent::Other(source) => {
                warn_ratelimited!("virtio-console: event for unknown source {source}");
                return;
            }
        }
        self.update_input_interest(ops, input_fd);
    }
}
