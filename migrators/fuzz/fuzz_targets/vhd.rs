#![no_main]
//! The VHD reader (footer, dynamic header, BAT).
use fluidcloud_migrators::image::vhd::VhdReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fluidcloud_migrators_fuzz::run(data, VhdReader::open);
});
