#![no_main]
//! The VHDX reader (headers, region tables, metadata, BAT).
use fluidcloud_migrators::image::vhdx::VhdxReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fluidcloud_migrators_fuzz::run(data, VhdxReader::open);
});
