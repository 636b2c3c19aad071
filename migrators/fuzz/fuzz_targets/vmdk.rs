#![no_main]
//! The VMDK reader (sparse headers, descriptors, grain tables, stream
//! markers, compressed grains).
use fluidcloud_migrators::image::vmdk::VmdkReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fluidcloud_migrators_fuzz::run(data, VmdkReader::open);
});
