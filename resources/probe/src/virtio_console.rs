//! virtio-console driver (device id 3) and the `console` check, polled at
//! CPL3. Single port (receiveq0 = queue 0, transmitq0 = queue 1); the driver
//! never negotiates VIRTIO_CONSOLE_F_MULTIPORT, so a multiport device (QEMU's
//! virtio-serial) serves its port 0 (a `virtconsole`) on those queues too.
//!
//! `console`: posts a receive buffer, transmits `PROBE-HVC hello\n`, then
//! collects received bytes until a newline or `probe.console_ms` (default
//! 10000) and reports the line: `PROBE console ok got="..."`.

use crate::bootinfo;
use crate::checks::{Details, Status};
use crate::cmdline;
use crate::cpu::peek;
use crate::paging;
use crate::serial::Printable;
use crate::sync::Global;
use crate::time;
use crate::virtio::{self, Buf, Virtqueue};
use core::fmt::Write;

pub const DEVICE_ID: u32 = 3;
const HELLO: &[u8] = b"PROBE-HVC hello\n";
const DEFAULT_MS: u64 = 10_000;
const RX_LEN: u32 = 256;
const LINE_MAX: usize = 200;

#[repr(C, align(4096))]
struct Mem([u8; 4096]);

/// TX bytes at 0, the receive buffer at 2048.
static MEM: Global<Mem> = Global::new(Mem([0; 4096]));

fn tx_addr() -> u64 {
    MEM.get() as *const Mem as u64
}

fn rx_addr() -> u64 {
    tx_addr() + 2048
}

fn post_rx(q: &mut Virtqueue) -> Result<(), &'static str> {
    q.submit(&[Buf {
        addr: rx_addr(),
        len: RX_LEN,
        write: true,
    }])
}

struct Got {
    line: [u8; LINE_MAX],
    len: usize,
    complete: bool,
}

fn run(t: &virtio::Transport, ms: u64, got: &mut Got) -> Result<u64, &'static str> {
    t.init(0)?;
    let mut rx = t.setup_queue(0, 4)?;
    let mut tx = t.setup_queue(1, 4)?;
    t.driver_ok();
    post_rx(&mut rx)?;
    for (i, &b) in HELLO.iter().enumerate() {
        crate::cpu::poke::<u8>(tx_addr() + i as u64, b);
    }
    tx.submit(&[Buf {
        addr: tx_addr(),
        len: HELLO.len() as u32,
        write: false,
    }])?;
    let dl = time::deadline(2_000_000);
    loop {
        if let Some((_, len)) = tx.poll() {
            if len != 0 {
                // The used length of a transmit buffer is what the device wrote: 0.
                return Err("transmit completed with a nonzero used length");
            }
            break;
        }
        if time::passed(dl) {
            return Err("transmit not completed within 2 s");
        }
        core::hint::spin_loop();
    }
    let start = crate::cpu::rdtsc();
    let dl = time::deadline(ms.saturating_mul(1000));
    while !time::passed(dl) {
        let Some((_, len)) = rx.poll() else {
            core::hint::spin_loop();
            continue;
        };
        if len > RX_LEN {
            return Err("device reported more bytes than the receive buffer holds");
        }
        for i in 0..len as u64 {
            let b: u8 = peek(rx_addr() + i);
            if b == b'\n' {
                got.complete = true;
                break;
            }
            if got.len < LINE_MAX {
                got.line[got.len] = b;
                got.len += 1;
            }
        }
        if got.complete {
            return Ok(time::tsc_to_us(crate::cpu::rdtsc() - start) / 1000);
        }
        post_rx(&mut rx)?;
    }
    Err("no line received before probe.console_ms")
}

pub fn check(d: &mut Details) -> Status {
    let ms = cmdline::get(bootinfo::get().cmdline(), b"probe.console_ms")
        .and_then(cmdline::parse_u64)
        .unwrap_or(DEFAULT_MS)
        .clamp(1, 3_600_000);
    let dev = virtio::devices(bootinfo::get().cmdline())
        .flatten()
        .filter(|t| t.dev.addr.saturating_add(0x200) <= paging::mapped_limit())
        .find(|t| t.magic() == virtio::MAGIC && t.version() == 2 && t.device_id() == DEVICE_ID);
    let Some(t) = dev else {
        let _ = d.write_str("no version-2 virtio-console device on the command line");
        return Status::Skip;
    };
    let features = t.device_features();
    let mut got = Got {
        line: [0; LINE_MAX],
        len: 0,
        complete: false,
    };
    let res = run(&t, ms, &mut got);
    t.write(virtio::reg::STATUS, 0);
    let status = match res {
        Ok(wait_ms) => {
            let _ = write!(d, "wait_ms={wait_ms}");
            Status::Ok
        }
        Err(e) => {
            let _ = write!(d, "{e};");
            Status::Fail
        }
    };
    let line = &got.line[..got.len];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let _ = write!(
        d,
        " got=\"{}\" addr={:#x} multiport_offered={} timeout_ms={ms}",
        Printable(line),
        t.dev.addr,
        (features >> 1) & 1
    );
    status
}
