//! libFuzzer wrapper of `cinder_fuzz::api::config_file` (corpus: fuzz/corpus/api_config_file).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::api::config_file(data));
