//! How the event loop drives a [`Vsock`]: it is an [`event_manager::MutEventSubscriber`].
//!
//! Watched: the activate EventFd; the three queue EventFds (from the first activation on); the
//! listening socket at `uds_path` (while active); each host client until its `CONNECT` line is
//! complete; and each connection's socket, for reading only while the guest has credit and
//! cinder does not already know there is data, for writing only while guest bytes wait. A
//! socket with nothing to wait for is not in the epoll set at all, so a hung-up peer cannot
//! make the loop spin. The listener is left out for a while after `accept` ran out of file
//! descriptors (level-triggered, it would otherwise wake the loop without end).
//!
//! One timerfd, armed at the backend's earliest deadline (a host client's `CONNECT` line, a
//! host-initiated connection waiting for the guest, a shutdown, the listener's back-off),
//! brings the loop back when one runs out.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::backend::{ClientOutcome, ConnKey};
use super::device::Vsock;
use super::interest::Token;
use super::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::virtio::device_core::CoreEvent;
use crate::virtio::log_limit::warn_ratelimited;
use crate::virtio::VirtioDevice;

const LISTENER_EVENT: u32 = u32::MAX - 1;
const TIMER_EVENT: u32 = u32::MAX - 2;

impl Vsock {
    /// Bring the epoll set in line with what each connection wants; drop finished ones.
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let want_listener = self.is_activated() && self.backend.listener_backoff.is_none();
        if want_listener != self.interest.listener_watched {
            let ev = Events::with_data(&self.backend.listener, LISTENER_EVENT, EventSet::IN);
            let r = if want_listener {
                ops.add(ev)
            } else {
                ops.remove(ev)
            };
            if let Err(e) = r {
                log::error!("virtio-vsock: cannot (un)watch the listener: {e:?}");
            }
            self.interest.listener_watched = want_listener;
        }
        // Finished connections, and those a reset dropped: out of the epoll set while their
        // fds are still open, then closed (dropped).
        let mut closing = std::mem::take(&mut self.backend.dropped);
        let done: Vec<ConnKey> = self
            .backend
            .conns
            .iter()
            .filter(|(_, c)| c.is_done())
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            if let Some(conn) = self.backend.conns.remove(&key) {
                closing.push((key, conn));
            }
        }
        for (key, conn) in closing {
            let fd = conn.stream.as_raw_fd();
            // The registration is this connection's only if the fd matches: after a reset a
            // new connection may already use the same key.
            if let Some(&(tok, reg_fd, have)) = self.interest.conns.get(&key) {
                if reg_fd == fd {
                    self.interest.conns.remove(&key);
                    self.interest.tokens.remove(&tok);
                    if !have.is_empty() {
                        if let Err(e) = ops.remove(Events::with_data_raw(fd, tok, have)) {
                            warn_ratelimited!("virtio-vsock: cannot unwatch {key:?}: {e:?}");
                        }
                    }
                }
            }
            drop(conn);
        }
        // Registrations whose connection is gone some other way (none expected): forgotten
        // only, as their fd numbers may already belong to someone else.
        let gone: Vec<ConnKey> = self
            .interest
            .conns
            .keys()
            .filter(|k| !self.backend.conns.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            if let Some((tok, _, _)) = self.interest.conns.remove(&key) {
                self.interest.tokens.remove(&tok);
            }
        }
        let keys: Vec<ConnKey> = self.backend.conns.keys().copied().collect();
        for key in keys {
            let Some(conn) = self.backend.conns.get(&key) else {
                continue;
            };
            let mut want = EventSet::empty();
            if conn.wants_host_read() {
                want |= EventSet::IN;
            }
            if conn.wants_host_write() {
                want |= EventSet::OUT;
            }
            let fd = conn.stream.as_raw_fd();
            let (tok, _, have) = match self.interest.conns.get(&key) {
                Some(v) => *v,
                None => {
                    let tok = self.interest.alloc(Token::Conn(key));
                    (tok, fd, EventSet::empty())
                }
            };
            if want != have {
                let r = if have.is_empty() {
                    ops.add(Events::with_data_raw(fd, tok, want))
                } else if want.is_empty() {
                    ops.remove(Events::with_data_raw(fd, tok, have))
                } else {
                    ops.modify(Events::with_data_raw(fd, tok, want))
                };
                if let Err(e) = r {
                    warn_ratelimited!("virtio-vsock: cannot update watch of {key:?}: {e:?}");
                }
            }
            self.interest.conns.insert(key, (tok, fd, want));
        }
        self.arm_timer();
    }

    /// Arms the timer at the earliest deadline (or disarms it), if that changed.
    fn arm_timer(&mut self) {
        let next = self.backend.next_deadline();
        if next == self.timer_at {
            return;
        }
        let r = match next {
            // A zero duration would disarm it: a deadline already past fires at once.
            Some(at) => {
                let d = at.saturating_duration_since(Instant::now());
                self.timer.reset(d.max(Duration::from_nanos(1)), None)
            }
            None => self.timer.clear(),
        };
        match r {
            Ok(()) => self.timer_at = next,
            Err(e) => warn_ratelimited!("virtio-vsock: cannot set the timer: {e}"),
        }
    }

    /// The timer fired: whatever ran out is dropped or reset.
    fn on_timer(&mut self, ops: &mut EventOps) {
        // Non-blocking: nothing to read (a re-arm cleared it) is fine.
        let _ = self.timer.wait();
        self.timer_at = None;
        self.expire(Instant::now(), ops);
    }

    /// Drops the host clients whose `CONNECT` line is overdue at `now` and resets the
    /// connections whose timers ran out (the caller brings the epoll set in line after).
    fn expire(&mut self, now: Instant, ops: &mut EventOps) {
        for tok in self.backend.expired_clients(now) {
            self.interest.tokens.remove(&tok);
            if let Some(client) = self.backend.clients.remove(&tok) {
                log::info!("virtio-vsock: host client sent no CONNECT line in time; dropped");
                let _ = ops.remove(Events::with_data(&client.stream, tok, EventSet::IN));
            }
        }
        self.backend.expire(now);
    }

    fn on_listener(&mut self, ops: &mut EventOps) {
        // Bounded per event; level-triggered epoll brings us back for the rest.
        for _ in 0..16 {
            let Some(stream) = self.accept_client() else {
                break;
            };
            let tok = self.interest.alloc(Token::Client);
            if let Err(e) = ops.add(Events::with_data(&stream, tok, EventSet::IN)) {
                warn_ratelimited!("virtio-vsock: cannot watch a host client: {e:?}");
                self.interest.tokens.remove(&tok);
                continue;
            }
            self.add_client(tok, stream);
        }
    }

    fn on_client(&mut self, tok: u32, ops: &mut EventOps) {
        let Some(client) = self.backend.clients.get_mut(&tok) else {
            return;
        };
        let outcome = client.on_readable();
        if outcome == ClientOutcome::Pending {
            return;
        }
        self.interest.tokens.remove(&tok);
        let Some(client) = self.backend.clients.remove(&tok) else {
            return;
        };
        let _ = ops.remove(Events::with_data(&client.stream, tok, EventSet::IN));
        if let ClientOutcome::Connect(port) = outcome {
            if !self.is_activated() {
                return;
            }
            // Registered afresh by sync_interest under a connection token.
            let _ = self.backend.connect_from_host(client.stream, port);
        }
    }

    fn on_conn(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.backend.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
            conn.set_host_readable();
        }
        if set.contains(EventSet::OUT) {
            if let Err(e) = conn.flush_host() {
                warn_ratelimited!("virtio-vsock: connection {key:?} reset: {e}");
            }
        }
        if set.contains(EventSet::ERROR) && !set.contains(EventSet::IN) {
            conn.kill();
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.core.init_events(ops);
        if let Err(e) = ops.add(Events::with_data(&self.timer, TIMER_EVENT, EventSet::IN)) {
            log::error!("virtio-vsock: cannot watch the timer: {e:?}");
        }
        self.sync_interest(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.core.on_event(events.data(), ops) {
            CoreEvent::Activated => self.process_tx(),
            CoreEvent::Queue(index) => {
                if index == TX_QUEUE {
                    self.process_tx();
                }
                // RX_QUEUE: new buffers, handled below; EVENT_QUEUE: cinder sends no events.
                debug_assert!(index == RX_QUEUE || index == TX_QUEUE || index == EVENT_QUEUE);
            }
            CoreEvent::Other(LISTENER_EVENT) => self.on_listener(ops),
            CoreEvent::Other(TIMER_EVENT) => self.on_timer(ops),
            CoreEvent::Other(tok) => match self.interest.tokens.get(&tok).copied() {
                Some(Token::Client) => self.on_client(tok, ops),
                Some(Token::Conn(key)) => self.on_conn(key, events.event_set()),
                None => {
                    // A stale registration: take it out so it cannot spin.
                    let _ = ops.remove(events);
                }
            },
        }
        self.process_rx();
        self.sync_interest(ops);
    }
}
