//! libFuzzer wrapper of `cinder_fuzz::console::run` (corpus: fuzz/corpus/virtio_console).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::console::run(data));
