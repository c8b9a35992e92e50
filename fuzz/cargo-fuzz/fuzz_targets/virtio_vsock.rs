//! libFuzzer wrapper of `cinder_fuzz::vsock::run` (corpus: fuzz/corpus/virtio_vsock).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cinder_fuzz::vsock::run(data));
