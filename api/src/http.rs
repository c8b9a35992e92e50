//! HTTP/1.1 framing: request parsing (with `httparse`) and response
//! serialization. Pure functions over byte buffers, so the parser can be
//! fuzzed and unit-tested without sockets.
//!
//! Limits (see the crate README):
//! - request line plus headers: at most [`MAX_HEADER_BYTES`] bytes and
//!   [`MAX_HEADERS`] headers;
//! - body: at most [`DEFAULT_MAX_BODY_BYTES`] unless the server is configured
//!   otherwise; a larger `Content-Length` is refused before the body is read;
//! - `PUT` and `PATCH` must carry `Content-Length`; `Transfer-Encoding` is
//!   refused (no chunked bodies).

/// Largest request line plus header block.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 32;
/// Default largest request body (64 KiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a request could not be framed. Every variant is answered with an
/// error status and the connection is closed, since the position of the
/// next request in the byte stream is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Request line or headers do not parse.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// Header block over [`MAX_HEADER_BYTES`].
    #[error("request headers too large: limit is {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("unsupported HTTP version; use HTTP/1.1")]
    UnsupportedVersion,
    /// PUT/PATCH without Content-Length.
    #[error("missing Content-Length header: {0} requests must carry one")]
    MissingContentLength(String),
    /// Content-Length not a decimal number, or given twice differently.
    #[error("invalid Content-Length header: `{0}`")]
    InvalidContentLength(String),
    /// Body over the limit.
    #[error("request body too large: {len} bytes, the limit is {limit} bytes")]
    BodyTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// Chunked or other transfer codings.
    #[error("Transfer-Encoding is not supported; send the body with Content-Length")]
    TransferEncoding,
    /// The request did not arrive in time.
    #[error("request timed out: the whole request must arrive within {0} ms")]
    Timeout(u128),
}

impl HttpError {
    /// Status code answering this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Timeout(_) => 408,
            _ => 400,
        }
    }
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, as sent (`GET`, `PUT`, ...).
    pub method: String,
    /// Request target, as sent.
    pub path: String,
    /// Body (empty when there is none).
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept open.
    pub keep_alive: bool,
}

/// Outcome of parsing the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed. `expect_continue` is set when the headers are
    /// complete and asked for `100 Continue`.
    Incomplete {
        /// Headers complete and `Expect: 100-continue` present.
        expect_continue: bool,
    },
    /// A request, and how many bytes of the buffer it used.
    Complete(Request, usize),
}

fn header_str<'a>(name: &str, value: &'a [u8]) -> Result<&'a str, HttpError> {
    std::str::from_utf8(value)
        .map(str::trim)
        .map_err(|_| HttpError::Malformed(format!("header {name} is not valid UTF-8")))
}

/// Parses one request from the start of `buf`.
pub fn parse_request(buf: &[u8], max_body: usize) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEADER_BYTES {
                return Err(HttpError::HeadersTooLarge);
            }
            return Ok(Parsed::Incomplete {
                expect_continue: false,
            });
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::Malformed(format!(
                "too many headers (limit {MAX_HEADERS})"
            )))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEADER_BYTES {
        return Err(HttpError::HeadersTooLarge);
    }
    let method = req.method.unwrap_or_default().to_string();
    let path = req.path.unwrap_or_default().to_string();
    if !path.starts_with('/') {
        return Err(HttpError::Malformed(format!(
            "request target `{path}` must be an absolute path"
        )));
    }
    let mut keep_alive = match req.version {
        Some(1) => true,
        Some(0) => false,
        _ => return Err(HttpError::UnsupportedVersion),
    };
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = header_str(name, h.value)?;
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::InvalidContentLength(v.to_string()));
            }
            let n: u64 = v
                .parse()
                .map_err(|_| HttpError::InvalidContentLength(v.to_string()))?;
            if content_length.is_some_and(|old| old != n) {
                return Err(HttpError::InvalidContentLength(v.to_string()));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        } else if name.eq_ignore_ascii_case("connection") {
            let v = header_str(name, h.value)?;
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            let v = header_str(name, h.value)?;
            expect_continue = v.eq_ignore_ascii_case("100-continue");
        }
    }
    let body_len = match content_length {
        Some(n) => n,
        None if method == "PUT" || method == "PATCH" => {
            return Err(HttpError::MissingContentLength(method))
        }
        None => 0,
    };
    let body_len = match usize::try_from(body_len) {
        Ok(n) if n <= max_body => n,
        _ => {
            return Err(HttpError::BodyTooLarge {
                len: body_len,
                limit: max_body,
            })
        }
    };
    let total = head_len + body_len;
    if buf.len() < total {
        return Ok(Parsed::Incomplete { expect_continue });
    }
    Ok(Parsed::Complete(
        Request {
            method,
            path,
            body: buf[head_len..total].to_vec(),
            keep_alive,
        },
        total,
    ))
}

/// Reason phrase of the status codes the server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Serializes a response. A 204 carries no body; any other status carries
/// `body` as `application/json`.
pub fn serialize_response(status: u16, body: Option<&str>, close: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status} {}\r\nServer: cinder\r\n", reason(status));
    let body = if status == 204 { None } else { body };
    match body {
        Some(b) => {
            out.push_str("Content-Type: application/json\r\n");
            out.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        None if status != 204 => out.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    if let Some(b) = body {
        out.push_str(b);
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse_request(buf, DEFAULT_MAX_BODY_BYTES) {
            Ok(Parsed::Complete(r, n)) => (r, n),
            other => panic!("not complete: {other:?}"),
        }
    }

    #[test]
    fn get_without_body() {
        let (r, n) = complete(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\nGET");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/version");
        assert!(r.body.is_empty());
        assert!(r.keep_alive);
        assert_eq!(n, 34);
    }

    #[test]
    fn put_with_body_and_close() {
        let (r, _) = complete(
            b"PUT /vm HTTP/1.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\nabcdEXTRA",
        );
        assert_eq!(r.body, b"abcd");
        assert!(!r.keep_alive);
    }

    #[test]
    fn http10_closes_by_default() {
        let (r, _) = complete(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive);
    }

    #[test]
    fn incomplete_states() {
        assert_eq!(
            parse_request(b"GET / HT", 10),
            Ok(Parsed::Incomplete {
                expect_continue: false
            })
        );
        assert_eq!(
            parse_request(
                b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nab",
                10
            ),
            Ok(Parsed::Incomplete {
                expect_continue: true
            })
        );
    }

    #[test]
    fn errors() {
        let e = |b: &[u8]| parse_request(b, 16).unwrap_err();
        assert!(matches!(
            e(b"NOT A REQUEST\r\n\r\n"),
            HttpError::Malformed(_)
        ));
        assert!(matches!(
            e(b"PUT /vm HTTP/1.1\r\n\r\n"),
            HttpError::MissingContentLength(_)
        ));
        assert!(matches!(
            e(b"PUT /vm HTTP/1.1\r\nContent-Length: 1x\r\n\r\n"),
            HttpError::InvalidContentLength(_)
        ));
        assert!(matches!(
            e(b"PUT /vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            HttpError::InvalidContentLength(_)
        ));
        assert!(matches!(
            e(b"PUT /vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            HttpError::InvalidContentLength(_)
        ));
        assert!(matches!(
            e(b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            HttpError::InvalidContentLength(_)
        ));
        assert!(matches!(
            e(b"PUT /vm HTTP/1.1\r\nContent-Length: 17\r\n\r\n"),
            HttpError::BodyTooLarge { len: 17, limit: 16 }
        ));
        assert!(matches!(
            e(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HttpError::TransferEncoding
        ));
        assert!(matches!(
            e(b"GET vm HTTP/1.1\r\n\r\n"),
            HttpError::Malformed(_)
        ));
        let big = vec![b'a'; MAX_HEADER_BYTES + 1];
        assert_eq!(e(&big), HttpError::HeadersTooLarge);
    }

    #[test]
    fn response_shapes() {
        let r = String::from_utf8(serialize_response(204, Some("ignored"), false)).unwrap();
        assert_eq!(r, "HTTP/1.1 204 No Content\r\nServer: cinder\r\n\r\n");
        let r = String::from_utf8(serialize_response(400, Some("{}"), true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(r.contains("Content-Length: 2\r\n"));
        assert!(r.contains("Connection: close\r\n"));
        assert!(r.ends_with("\r\n\r\n{}"));
    }
}
