//! libFuzzer wrapper of `cinder_fuzz::blk::run` (corpus: fuzz/corpus/virtio_blk).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::blk::run(data));
