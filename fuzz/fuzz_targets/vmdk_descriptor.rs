#![no_main]
//! libFuzzer entry point of [`fluidcloud_fuzz::vmdk_descriptor`].
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = fluidcloud_fuzz::vmdk_descriptor(data);
});
