#![no_main]
//! libFuzzer entry point of [`fluidcloud_fuzz::qcow2`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fluidcloud_fuzz::qcow2(data);
});
