//! The logger behind the `log` facade: stderr by default; `PUT /logger` (or the config
//! file's `logger`) can send it to a file or named pipe, change the level, and choose what
//! each line shows.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

struct Settings {
    sink: Option<File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    /// `--id`, shown in each line when given.
    instance_id: Option<String>,
}

struct CinderLogger {
    settings: Mutex<Settings>,
}

impl Log for CinderLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut s = match self.settings.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if let Some(m) = &s.module {
            if !record.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let mut line = String::from("cinder: ");
        if let Some(id) = &s.instance_id {
            line.push_str(&format!("[{id}] "));
        }
        if s.show_level {
            line.push_str(&format!("[{}] ", record.level().as_str().to_lowercase()));
        }
        if s.show_origin {
            line.push_str(&format!(
                "{}:{}: ",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("{}\n", record.args()));
        let written = match s.sink.as_mut() {
            Some(f) => f.write_all(line.as_bytes()).is_ok(),
            None => false,
        };
        if !written {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

static LOGGER: CinderLogger = CinderLogger {
    settings: Mutex::new(Settings {
        sink: None,
        show_level: true,
        show_origin: false,
        module: None,
        instance_id: None,
    }),
};

/// Shows the instance id (`--id`) in each line, after `cinder: ` and before the level.
pub fn set_instance_id(id: &str) {
    let mut s = match LOGGER.settings.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    s.instance_id = Some(id.to_string());
}

/// Installs the logger at `level` (a second call only changes the level).
pub fn init(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Why a logger configuration could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("logger: cannot open log_path {path}: {source}")]
pub struct LoggerError {
    /// The destination asked for.
    pub path: String,
    /// Why it could not be opened.
    #[source]
    pub source: std::io::Error,
}

/// Applies a `PUT /logger` body: level, destination (file or named pipe, opened for
/// appending), and what each line shows. Nothing changes when it fails.
pub fn apply(cfg: &api::model::Logger) -> Result<(), LoggerError> {
    use api::model::LogLevel;
    let sink = match &cfg.log_path {
        Some(p) => Some(
            crate::metrics::open_sink(std::path::Path::new(p)).map_err(|source| LoggerError {
                path: p.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let mut s = match LOGGER.settings.lock() {
        Ok(s) => s,
        Err(p) => p.into_inner(),
    };
    if sink.is_some() {
        s.sink = sink;
    }
    if let Some(v) = cfg.show_level {
        s.show_level = v;
    }
    if let Some(v) = cfg.show_log_origin {
        s.show_origin = v;
    }
    s.module = cfg.module.clone();
    drop(s);
    if let Some(level) = cfg.level {
        log::set_max_level(match level {
            LogLevel::Off => LevelFilter::Off,
            LogLevel::Error => LevelFilter::Error,
            LogLevel::Warning => LevelFilter::Warn,
            LogLevel::Info => LevelFilter::Info,
            LogLevel::Debug => LevelFilter::Debug,
            LogLevel::Trace => LevelFilter::Trace,
        });
    }
    Ok(())
}
