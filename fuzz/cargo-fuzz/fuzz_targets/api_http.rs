//! libFuzzer wrapper of `cinder_fuzz::api::http` (corpus: fuzz/corpus/api_http).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::api::http(data));
