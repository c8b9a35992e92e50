//! Feeds arbitrary text to the config-file parser: it may refuse, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(cfg) = api::VmConfig::from_config_file(s) {
            let _ = cfg.validate();
            let _ = cfg.to_full_config();
        }
    }
});
