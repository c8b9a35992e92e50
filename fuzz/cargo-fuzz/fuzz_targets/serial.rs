//! libFuzzer wrapper of `cinder_fuzz::serial::run` (corpus: fuzz/corpus/serial).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::serial::run(data));
