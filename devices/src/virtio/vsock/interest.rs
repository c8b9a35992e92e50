//! What the event loop has registered for a [`super::Vsock`] (host clients and connections by
//! token), kept in the device and driven by `event_handler.rs`.

use std::collections::HashMap;

use event_manager::EventSet;

use super::backend::ConnKey;

/// First token for host clients and connections.
const FIRST_TOKEN: u32 = 16;
const LAST_TOKEN: u32 = u32::MAX - 16;

/// What a dynamic token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    Client,
    Conn(ConnKey),
}

/// The event loop's view of what is registered.
#[derive(Debug, Default)]
pub struct Interest {
    pub(super) next_token: u32,
    pub(super) tokens: HashMap<u32, Token>,
    /// Per connection: its token, fd and the event set currently registered (empty: not in
    /// the epoll set).
    pub(super) conns: HashMap<ConnKey, (u32, i32, EventSet)>,
    pub(super) listener_watched: bool,
}

impl Interest {
    pub(super) fn alloc(&mut self, t: Token) -> u32 {
        loop {
            if self.next_token < FIRST_TOKEN || self.next_token > LAST_TOKEN {
                self.next_token = FIRST_TOKEN;
            }
            let tok = self.next_token;
            self.next_token += 1;
            if let std::collections::hash_map::Entry::Vacant(e) = self.tokens.entry(tok) {
                e.insert(t);
                return tok;
            }
        }
    }
}
