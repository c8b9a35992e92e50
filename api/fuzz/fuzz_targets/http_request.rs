//! Feeds arbitrary bytes to the HTTP parser and, for complete requests, to
//! the router: neither may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    // Walk pipelined requests like the server does.
    for _ in 0..16 {
        match api::http::parse_request(buf, api::http::DEFAULT_MAX_BODY_BYTES) {
            Ok(api::http::Parsed::Complete(req, used)) => {
                let _ = api::parse_api_request(&req.method, &req.path, &req.body);
                buf = &buf[used..];
            }
            _ => break,
        }
    }
});
