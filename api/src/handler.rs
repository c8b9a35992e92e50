//! The seam between the API thread and whoever executes requests.

use std::io;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

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
    /// How long to wait for a reply ([`DEFAULT_REPLY_TIMEOUT`]); `None` waits forever.
    /// A request not answered in time gets a 503, and its late reply is discarded.
    pub reply_timeout: Option<Duration>,
    /// Requests that timed out and whose replies have not arrived yet. The VMM answers
    /// every request once and in order, so the next this many replies are theirs.
    stale: usize,
}

/// How long a request waits for the late reply of an earlier one that timed out before it
/// is answered 503 itself (bounded by the reply timeout).
pub const STALE_GRACE: Duration = Duration::from_secs(1);

/// Default [`ChannelHandler::reply_timeout`]: how long the API thread waits for the control
/// loop before answering 503 (a control loop stuck on a slow host call must not leave
/// clients hanging).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

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
            reply_timeout: Some(DEFAULT_REPLY_TIMEOUT),
            stale: 0,
        },
        VmmEndpoint {
            requests: req_rx,
            responses: resp_tx,
            event,
        },
    ))
}

impl ChannelHandler {
    /// Waits for one reply until `deadline` (forever without one).
    fn recv_until(&self, deadline: Option<Instant>) -> Result<ApiResponse, RecvTimeoutError> {
        match deadline {
            Some(d) => self
                .rx
                .recv_timeout(d.saturating_duration_since(Instant::now())),
            None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        }
    }
}

fn gone() -> ApiResponse {
    ApiResponse::error(500, "the VMM is not running anymore")
}

impl RequestHandler for ChannelHandler {
    fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        let deadline = self.reply_timeout.map(|t| Instant::now() + t);
        // Replies that arrive after their request timed out belong to those requests:
        // discard them (in order) so that each reply reaches its own request. While the VMM
        // is still stuck on one, the API thread waits for it only [`STALE_GRACE`], so every
        // client gets its 503 quickly rather than one reply timeout each in turn.
        let stale_deadline = deadline.map(|d| d.min(Instant::now() + STALE_GRACE));
        while self.stale > 0 {
            match self.recv_until(stale_deadline) {
                Ok(_) => self.stale -= 1,
                Err(RecvTimeoutError::Timeout) => {
                    return ApiResponse::error(
                        503,
                        "the VMM is still busy with an earlier request that timed out; retry later",
                    )
                }
                Err(RecvTimeoutError::Disconnected) => return gone(),
            }
        }
        if self.tx.send(req).is_err() {
            return gone();
        }
        if let Err(e) = self.notify.write(1) {
            return ApiResponse::error(500, format!("cannot notify the VMM: {e}"));
        }
        match self.recv_until(deadline) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                self.stale += 1;
                let waited = self.reply_timeout.unwrap_or_default();
                log::warn!("API: the VMM did not answer a request within {waited:?}");
                ApiResponse::error(
                    503,
                    format!(
                        "the VMM did not answer within {} ms (it is busy); the request may \
                         still take effect: check with GET before retrying",
                        waited.as_millis()
                    ),
                )
            }
            Err(RecvTimeoutError::Disconnected) => gone(),
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
