#![no_main]
//! libFuzzer entry point of [`fluidcloud_fuzz::plugin_protocol`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fluidcloud_fuzz::plugin_protocol(data);
});
