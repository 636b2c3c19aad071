#![no_main]
//! Format detection (`probe`), then `open` on whatever it detected, the
//! way the CLI opens an image it knows nothing about.
use fluidcloud_migrators::image::{open, probe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fluidcloud_migrators_fuzz::run_boxed(data, |p| {
        let _ = probe(p);
        open(p)
    });
});
