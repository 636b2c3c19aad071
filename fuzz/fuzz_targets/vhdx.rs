#![no_main]
//! libFuzzer entry point of [`fluidcloud_fuzz::vhdx`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fluidcloud_fuzz::vhdx(data);
});
