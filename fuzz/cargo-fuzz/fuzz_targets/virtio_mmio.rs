//! libFuzzer wrapper of `cinder_fuzz::mmio::run` (corpus: fuzz/corpus/virtio_mmio).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::mmio::run(data));
