//! libFuzzer wrapper of `cinder_fuzz::loader::run` (corpus: fuzz/corpus/kernel_loader).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::loader::run(data));
