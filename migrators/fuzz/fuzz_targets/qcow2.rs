#![no_main]
//! The qcow2 reader (header, extensions, snapshots, L1/L2, compressed
//! clusters, backing names).
use fluidcloud_migrators::image::qcow2::Qcow2Reader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fluidcloud_migrators_fuzz::run(data, |p| Qcow2Reader::open(p, None));
});
