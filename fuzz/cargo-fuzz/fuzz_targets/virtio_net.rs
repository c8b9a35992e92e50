//! libFuzzer wrapper of `cinder_fuzz::net::run` (corpus: fuzz/corpus/virtio_net).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::net::run(data));
