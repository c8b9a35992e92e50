//! Counters the VMM keeps, written as one JSON object per line to the metrics path
//! (`PUT /metrics` or the config file's `metrics`), on a timer and on `FlushMetrics`.
//!
//! Counters are cumulative since cinder started (each line is a full snapshot), which keeps
//! a reader that misses a line correct.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

/// A monotonically increasing counter (serialised as its current value).
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that is set, not counted (serialised as its current value).
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Serialize for Gauge {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

impl Gauge {
    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// vCPU exit counters.
#[derive(Default, Serialize)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exit_io_in: Counter,
    /// Port writes.
    pub exit_io_out: Counter,
    /// MMIO reads.
    pub exit_mmio_read: Counter,
    /// MMIO writes.
    pub exit_mmio_write: Counter,
    /// Accesses no device answered.
    pub unhandled: Counter,
    /// Fatal exits.
    pub failures: Counter,
}

/// API counters.
#[derive(Default, Serialize)]
pub struct ApiMetrics {
    /// Requests handled by the VMM.
    pub requests: Counter,
    /// Requests answered with an error status.
    pub errors: Counter,
    /// Microseconds from `--start-time-us` (CLOCK_MONOTONIC, given by the process that
    /// started cinder) to the API socket being ready, as Firecracker reports it; 0 without
    /// the flag.
    pub process_startup_time_us: Gauge,
    /// CPU microseconds cinder used from `--start-time-cpu-us` to the API socket being
    /// ready, plus `--parent-cpu-time-us`, as Firecracker reports it; 0 without the flag.
    pub process_startup_time_cpu_us: Gauge,
}

/// Every metric cinder keeps.
#[derive(Default)]
pub struct Metrics {
    /// vCPU exits.
    pub vcpu: VcpuMetrics,
    /// The API.
    pub api: ApiMetrics,
    /// Metrics lines written.
    pub flushes: Counter,
    /// Errors writing metrics or logs.
    pub sink_errors: Counter,
}

impl Metrics {
    /// One JSON object (no trailing newline), with the device sections (`name`, its counters
    /// as a JSON object) appended.
    pub fn to_json(&self, devices: &[(String, Value)]) -> String {
        #[derive(Serialize)]
        struct Own<'a> {
            flushes: &'a Counter,
            sink_errors: &'a Counter,
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut m = Map::new();
        m.insert("utc_timestamp_ms".into(), Value::from(ts));
        let mut put = |k: &str, v: Result<Value, serde_json::Error>| {
            m.insert(k.into(), v.unwrap_or(Value::Null));
        };
        put("vcpu", serde_json::to_value(&self.vcpu));
        put("api_server", serde_json::to_value(&self.api));
        put(
            "metrics",
            serde_json::to_value(Own {
                flushes: &self.flushes,
                sink_errors: &self.sink_errors,
            }),
        );
        put(
            "logger",
            Ok(serde_json::json!({ "missed_log_count": crate::logger::dropped_lines() })),
        );
        for (name, v) in devices {
            m.insert(name.clone(), v.clone());
        }
        Value::Object(m).to_string()
    }

    /// Appends one line to `sink` (see [`open_sink`]). A reader that does not keep up loses
    /// lines; cinder never blocks on it.
    pub fn flush_to(&self, sink: &mut File, devices: &[(String, Value)]) -> std::io::Result<()> {
        self.flush_capped(sink, devices, max_file_bytes())
    }

    /// [`Metrics::flush_to`] with the file cap `max` (0: none).
    fn flush_capped(
        &self,
        sink: &mut File,
        devices: &[(String, Value)],
        max: u64,
    ) -> std::io::Result<()> {
        self.flushes.inc();
        let line = self.to_json(devices) + "\n";
        // A regular file stops growing at its cap (a FIFO has no size).
        if let Ok(meta) = sink.metadata() {
            if max != 0 && meta.is_file() && meta.len().saturating_add(line.len() as u64) > max {
                self.sink_errors.inc();
                return Err(std::io::Error::other(format!(
                    "the metrics file reached its limit of {max} bytes (--metrics-max-size)"
                )));
            }
        }
        let res = sink.write_all(line.as_bytes());
        if res.is_err() {
            self.sink_errors.inc();
        }
        res
    }
}

/// Default cap on a metrics file ([`set_max_file_bytes`], the `--metrics-max-size` flag):
/// a line a minute takes months to reach it.
pub const DEFAULT_METRICS_FILE_MAX_BYTES: u64 = 64 * 1024 * 1024;

static MAX_FILE_BYTES: AtomicU64 = AtomicU64::new(DEFAULT_METRICS_FILE_MAX_BYTES);

/// Sets the metrics file's size cap (0: none). Past it, lines are not written and count as
/// `sink_errors`; the file keeps its first lines.
pub fn set_max_file_bytes(max: u64) {
    MAX_FILE_BYTES.store(max, Ordering::Relaxed);
}

fn max_file_bytes() -> u64 {
    MAX_FILE_BYTES.load(Ordering::Relaxed)
}

/// Opens a metrics or log destination that never blocks cinder: a regular file (created
/// with mode 0600, appended to) or a named pipe, opened read-write and non-blocking so that
/// neither the open nor a write waits for a reader (Firecracker's users point these at FIFOs).
/// A symbolic link as the last component is refused, not followed (`O_NOFOLLOW`), and so is
/// anything but a regular file or a FIFO (a device, a socket, a directory).
pub fn open_sink(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => std::io::Error::other(
                "it is a symbolic link: give the path of the file itself (cinder does not follow links there)",
            ),
            _ => e,
        })?;
    let t = f.metadata()?.file_type();
    if t.is_file() || t.is_fifo() {
        Ok(f)
    } else {
        Err(std::io::Error::other(format!(
            "it is a {}, not a regular file or FIFO",
            api::paths::kind_of(t)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_is_valid_and_counts() {
        let m = Metrics::default();
        m.vcpu.exit_io_out.add(3);
        m.api.requests.inc();
        let json = m.to_json(&[("block_rootfs".into(), serde_json::json!({"reads": 2}))]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["vcpu"]["exit_io_out"], 3);
        assert_eq!(v["api_server"]["requests"], 1);
        assert_eq!(v["api_server"]["process_startup_time_us"], 0);
        assert_eq!(v["block_rootfs"]["reads"], 2);
        let dir = std::env::temp_dir().join(format!("cinder-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.json");
        let mut sink = open_sink(&p).unwrap();
        m.flush_to(&mut sink, &[]).unwrap();
        m.flush_to(&mut sink, &[]).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["metrics"]["flushes"], 2);
        // A FIFO nobody reads: opening and writing never block.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut sink = open_sink(&fifo).unwrap();
        for _ in 0..10_000 {
            let _ = m.flush_to(&mut sink, &[]);
        }
        assert!(m.sink_errors.get() > 0, "a full FIFO drops lines");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sinks_are_private_and_never_a_link_or_a_device() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cinder-sink-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("new.log");
        drop(open_sink(&p).unwrap());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "created {mode:o}");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = open_sink(&link).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = open_sink(Path::new("/dev/null")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is a character device, not a regular file or FIFO"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_file_stops_at_its_cap() {
        let m = Metrics::default();
        let dir = std::env::temp_dir().join(format!("cinder-metrics-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.json");
        let mut sink = open_sink(&p).unwrap();
        let line = m.to_json(&[]).len() as u64 + 1;
        for _ in 0..100 {
            let _ = m.flush_capped(&mut sink, &[], line * 3 + line / 2);
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert_eq!(m.sink_errors.get(), 97);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
