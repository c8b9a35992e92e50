//! Test helpers: temp dirs, a server on a thread, a raw HTTP client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use api::{
    ApiRequest, ApiResponse, ApiServer, Outcome, PreBootController, ServerConfig, ShutdownHandle,
    VmConfig,
};

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("cinder-api-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A mock VMM behind the PreBootController: boots instantly, pauses and
/// resumes, records every request it saw.
pub struct MockVmm {
    pub ctl: PreBootController,
    pub seen: Arc<Mutex<Vec<ApiRequest>>>,
}

impl MockVmm {
    pub fn new() -> Self {
        MockVmm {
            ctl: PreBootController::new(
                VmConfig::with_paths(api::paths::PathPolicy::UNCHECKED),
                "test-vm",
                "0.1.0",
            ),
            seen: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn handle(&mut self, req: ApiRequest) -> ApiResponse {
        self.seen.lock().unwrap().push(req.clone());
        match self.ctl.handle(req) {
            Outcome::Respond(r) => r,
            // Every action succeeds at once; the controller records what it changed.
            Outcome::Execute(action) => self.ctl.complete(action, Ok(())),
            Outcome::Query(q) => self.ctl.answer(q, Err(api::adapter::VmmError::NotRunning)),
        }
    }
}

/// A server on its own thread; shut down and joined on drop.
pub struct TestServer {
    pub dir: TempDir,
    pub sock: PathBuf,
    pub seen: Arc<Mutex<Vec<ApiRequest>>>,
    stop: Option<ShutdownHandle>,
    thread: Option<JoinHandle<()>>,
}

pub fn test_config() -> ServerConfig {
    ServerConfig {
        request_timeout: Duration::from_millis(800),
        ..ServerConfig::default()
    }
}

impl TestServer {
    pub fn start() -> TestServer {
        Self::start_with(test_config())
    }

    pub fn start_with(cfg: ServerConfig) -> TestServer {
        let dir = TempDir::new("srv");
        let sock = dir.path().join("api.sock");
        let server = ApiServer::bind_with_config(&sock, cfg).unwrap();
        let stop = server.shutdown_handle().unwrap();
        let mut vmm = MockVmm::new();
        let seen = vmm.seen.clone();
        let thread = std::thread::spawn(move || {
            server.run(move |req| vmm.handle(req)).unwrap();
        });
        TestServer {
            dir,
            sock,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.sock)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.shutdown();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn fault(&self) -> String {
        self.json()["fault_message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub struct Client {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Resp {
        let req = match body {
            Some(b) => format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ),
            None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        };
        self.send_raw(req.as_bytes());
        self.read_response().expect("no response")
    }

    /// Reads one response; None on EOF before a response.
    pub fn read_response(&mut self) -> Option<Resp> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
                let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while self.buf.len() < end + 4 + len {
                    if !self.fill() {
                        return None;
                    }
                }
                let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]).to_string();
                self.buf.drain(..end + 4 + len);
                return Some(Resp {
                    status,
                    headers: head,
                    body,
                });
            }
            if !self.fill() {
                return None;
            }
        }
    }

    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// True when the server closed the connection (EOF with no more data).
    pub fn is_closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
