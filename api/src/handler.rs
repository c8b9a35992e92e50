//! The seam between the API thread and whoever executes requests.

use std::io;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::routes::{ApiRequest, ApiResponse};

/// Executes typed API requests. [`crate::ApiServer::run`] calls it on the
/// API thread, one request at a time.
pub trait RequestHandler: Send {
    /// Answers one request.
    fn handle(&mut self, req: ApiRequest) -> ApiResponse;
}

impl<F: FnMut(ApiRequest) -> ApiResponse + Send> RequestHandler for F {
    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        self(req)
    }
}

/// A [`RequestHandler`] that forwards each request to the VMM event loop:
/// it sends the request on `tx`, writes `notify` so the event loop's epoll
/// wakes up, and blocks until the reply arrives on `rx`.
pub struct ChannelHandler {
    /// Requests to the VMM.
    pub tx: Sender<ApiRequest>,
    /// Replies from the VMM.
    pub rx: Receiver<ApiResponse>,
    /// Written once per request.
    pub notify: EventFd,
    /// How long to wait for a reply; `None` waits forever.
    pub reply_timeout: Option<Duration>,
}

/// The VMM end of a [`ChannelHandler`]: register `event` in the event
/// loop; when it is readable call [`VmmEndpoint::next_request`] until it
/// returns `None`, answering each request with [`VmmEndpoint::reply`], in
/// order.
pub struct VmmEndpoint {
    /// Requests from the API thread.
    pub requests: Receiver<ApiRequest>,
    /// Replies to the API thread.
    pub responses: Sender<ApiResponse>,
    /// Becomes readable when a request is queued (non-blocking EventFd).
    pub event: EventFd,
}

/// Creates a connected [`ChannelHandler`] and [`VmmEndpoint`].
pub fn api_channel() -> io::Result<(ChannelHandler, VmmEndpoint)> {
    let event = EventFd::new(EFD_NONBLOCK)?;
    let notify = event.try_clone()?;
    let (req_tx, req_rx) = channel();
    let (resp_tx, resp_rx) = channel();
    Ok((
        ChannelHandler {
            tx: req_tx,
            rx: resp_rx,
            notify,
            reply_timeout: None,
        },
        VmmEndpoint {
            requests: req_rx,
            responses: resp_tx,
            event,
        },
    ))
}

impl RequestHandler for ChannelHandler {
    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        // A reply that arrived after an earlier timeout belongs to that
        // request: drop it so replies stay paired with their requests.
        while self.rx.try_recv().is_ok() {}
        if self.tx.send(req).is_err() {
            return ApiResponse::error(500, "the VMM is not running anymore");
        }
        if let Err(e) = self.notify.write(1) {
            return ApiResponse::error(500, format!("cannot notify the VMM: {e}"));
        }
        let reply = match self.reply_timeout {
            Some(t) => self.rx.recv_timeout(t),
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match reply {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                ApiResponse::error(500, "the VMM did not answer in time")
            }
            Err(RecvTimeoutError::Disconnected) => {
                ApiResponse::error(500, "the VMM is not running anymore")
            }
        }
    }
}

impl VmmEndpoint {
    /// The next queued request, if any. Clears the EventFd first, so a
    /// request queued meanwhile wakes the loop again.
    pub fn next_request(&self) -> Option<ApiRequest> {
        // EAGAIN just means the counter was already zero.
        let _ = self.event.read();
        match self.requests.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
        }
    }

    /// Answers the oldest unanswered request. Returns false when the API
    /// thread is gone.
    pub fn reply(&self, resp: ApiResponse) -> bool {
        self.responses.send(resp).is_ok()
    }
}
