//! virtio-rng driver (device id 4): one request for a few random bytes,
//! completion by polling the used ring. Exercises the virtqueue core.

use crate::time;
use crate::virtio::{Buf, Transport};

/// Reads up to `want` bytes (at most 64). Returns how many the device gave.
pub fn read(t: &Transport, want: u32) -> Result<u32, &'static str> {
    t.init(0)?;
    let mut q = t.setup_queue(0, 8)?;
    t.driver_ok();
    let want = want.clamp(1, 64);
    let buf = crate::virtio::dma_alloc(want as u64, 8).ok_or("out of buffer memory")?;
    q.submit(&[Buf {
        addr: buf,
        len: want,
        write: true,
    }])?;
    let dl = time::deadline(1_000_000);
    let res = loop {
        if let Some((_, len)) = q.poll() {
            break Ok(len);
        }
        if time::passed(dl) {
            break Err("no used-ring entry within 1 s");
        }
        core::hint::spin_loop();
    };
    t.write(crate::virtio::reg::STATUS, 0); // reset: stop using our memory
    match res {
        Ok(len) if len > want => Err("device reported more bytes than the buffer holds"),
        r => r,
    }
}
