//! virtio-console: guest output chains of any shape (TX) and host input delivered into any
//! receive chains (RX), through the transport and the event loop. The console's input is a
//! socket the host side writes to or closes; its output a sink that may fail.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::virtio::console::Console;

use crate::input::Input;
use crate::virtio::{self, Host, Program, BUFFERS, F_NEXT, F_WRITE};

/// The console's output: counts bytes, or fails while `fail` is set.
struct Sink {
    fail: Arc<AtomicBool>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Peer {
    input: Option<UnixStream>,
    fail: Arc<AtomicBool>,
}

impl Host for Peer {
    /// `0, blob`: type input; `1`: close the input; `2`: toggle output failures.
    fn op(&mut self, input: &mut Input<'_>) {
        match input.u8() % 3 {
            0 => {
                let bytes = input.blob(0x4000);
                if let Some(s) = &mut self.input {
                    let _ = s.write(bytes);
                }
            }
            1 => self.input = None,
            _ => {
                let f = self.fail.load(Ordering::Relaxed);
                self.fail.store(!f, Ordering::Relaxed);
            }
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let (theirs, ours) = UnixStream::pair().expect("cannot create a socket pair");
    ours.set_nonblocking(true)
        .expect("cannot make the input non-blocking");
    theirs
        .set_nonblocking(true)
        .expect("cannot make the peer non-blocking");
    let fail = Arc::new(AtomicBool::new(false));
    let dev = Console::new(Some(Box::new(ours)), Box::new(Sink { fail: fail.clone() }))
        .expect("cannot build the console");
    let peer = Peer {
        input: Some(theirs),
        fail,
    };
    virtio::run(dev, peer, data);
}

/// Seeds: output in two buffers; input into a two-buffer chain; input then EOF.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut tx = Program::new();
    tx.setup(u64::MAX, 2, 4)
        .mem(BUFFERS as u32, b"hello, console\n")
        .desc(1, 0, BUFFERS, 7, F_NEXT, 1)
        .desc(1, 1, BUFFERS + 7, 8, 0, 0)
        .avail(1, 0)
        .kick(1);
    let mut rx = Program::new();
    rx.setup(u64::MAX, 2, 4)
        .desc(0, 0, 0x2_0000, 8, F_WRITE | F_NEXT, 1)
        .desc(0, 1, 0x2_1000, 4096, F_WRITE, 0)
        .avail(0, 0)
        .kick(0)
        .host();
    rx.raw().u8(0).blob(b"typed input that spans both buffers");
    rx.host();
    rx.raw().u8(2);
    rx.desc(0, 2, 0x2_2000, 16, F_WRITE, 0)
        .avail(0, 2)
        .kick(0)
        .host();
    rx.raw().u8(1);
    rx.run();
    vec![tx.build(), rx.build()]
}

fn host(rng: &mut crate::mutate::Rng, b: &mut crate::input::Builder) {
    match rng.below(10) {
        0 => {
            b.u8(1);
        }
        1 => {
            b.u8(2);
        }
        _ => {
            let len = [1usize, 17, 4096, 5000, 0x4000][rng.below(5)];
            let text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            b.u8(0).blob(&text);
        }
    }
}

/// A random plausible input.
pub fn generate(rng: &mut crate::mutate::Rng) -> Vec<u8> {
    virtio::generate(rng, 2, virtio::random_payload, host)
}
