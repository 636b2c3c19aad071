#![no_main]
//! libFuzzer entry point of [`fluidcloud_fuzz::config_scan`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fluidcloud_fuzz::config_scan(data);
});
