//! libFuzzer wrapper of `cinder_fuzz::rng::run` (corpus: fuzz/corpus/virtio_rng).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::rng::run(data));
