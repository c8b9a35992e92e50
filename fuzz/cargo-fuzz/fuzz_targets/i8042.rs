//! libFuzzer wrapper of `cinder_fuzz::i8042::run` (corpus: fuzz/corpus/i8042).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::i8042::run(data));
