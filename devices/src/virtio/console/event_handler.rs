//! How the event loop drives a [`Console`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! Watched: the activate EventFd (always), the two queue EventFds (from the first activation
//! on), and the host input fd only while the guest has receive buffers posted. With no buffer
//! posted the input is not watched, so input waits in the kernel (pipe, socket or tty buffer)
//! instead of waking the event loop or filling memory in cinder. A receive-queue kick (the
//! guest posted buffers) re-arms the input.

use std::io;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Console, InputOutcome};
use super::{RX_QUEUE, TX_QUEUE};
use crate::virtio::ratelimit::warn_ratelimited;
use crate::virtio::VirtioDevice;

/// Event data tag of the activate EventFd.
const ACTIVATE_EVENT: u32 = u32::MAX;
/// Event data tag of the input fd.
const INPUT_EVENT: u32 = u32::MAX - 1;

impl Console {
    fn register_queue_events(&mut self, ops: &mut EventOps) {
        if self.queue_evts_registered {
            return;
        }
        for (index, evt) in self.queue_events().iter().enumerate() {
            let data = u32::try_from(index).unwrap_or(INPUT_EVENT - 1);
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                log::error!("virtio-console: cannot watch queue {index} event fd: {e:?}");
            }
        }
        self.queue_evts_registered = true;
    }

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
        if let Err(e) = ops.add(Events::with_data(
            self.activate_event(),
            ACTIVATE_EVENT,
            EventSet::IN,
        )) {
            log::error!("virtio-console: cannot watch the activate event fd: {e:?}");
        }
        if self.is_activated() {
            self.register_queue_events(ops);
            self.update_input_interest(ops, None);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // The fd as registered: after end of file `input_fd()` is None but removal needs it.
        let input_fd = self.input_fd();
        match events.data() {
            ACTIVATE_EVENT => {
                drain(self.activate_event().read());
                self.register_queue_events(ops);
                self.process_tx();
            }
            INPUT_EVENT => {
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
            source => {
                let index = source as usize;
                let Some(evt) = self.queue_events().get(index) else {
                    warn_ratelimited!("virtio-console: event for unknown source {source}");
                    return;
                };
                drain(evt.read());
                if index == TX_QUEUE {
                    self.process_tx();
                }
                debug_assert!(index == TX_QUEUE || index == RX_QUEUE);
            }
        }
        self.update_input_interest(ops, input_fd);
    }
}

fn drain(result: io::Result<u64>) {
    match result {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => warn_ratelimited!("virtio-console: cannot read event fd: {e}"),
    }
}
