//! `volume_copy SOURCE TARGET [--chunk-size BYTES] [--threads N]
//! [--overwrite] [--verify-all]` copies a volume with
//! `fluidcloud_migrators::volume::copy` and prints the summary as JSON;
//! `volume_copy --manifest PATH [--chunk-size BYTES]` prints a volume's
//! Merkle root. Used by `bench/volume.sh`.

use std::path::PathBuf;
use std::process::ExitCode;

use fluidcloud_migrators::volume::{self, VolumeCopyOptions};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut opts = VolumeCopyOptions::default();
    let mut paths = Vec::new();
    let mut manifest = false;
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("volume_copy: {name} needs a number");
            }
            v
        };
        match a.as_str() {
            "--chunk-size" => match num("--chunk-size") {
                Some(v) => opts.chunk_size = v,
                None => return ExitCode::from(2),
            },
            "--threads" => match num("--threads") {
                Some(v) => opts.threads = v as usize,
                None => return ExitCode::from(2),
            },
            "--overwrite" => opts.overwrite = true,
            "--verify-all" => opts.verify_all = true,
            "--manifest" => manifest = true,
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let result = match (manifest, paths.as_slice()) {
        (true, [path]) => volume::manifest_of(path, opts.chunk_size).map(|m| {
            println!("{}", m.root_hex());
        }),
        (false, [source, target]) => volume::copy(source, target, &opts, &|_, _| {}).map(|s| {
            println!("{}", serde_json::to_string(&s).unwrap_or_default());
        }),
        _ => {
            eprintln!(
                "usage: volume_copy SOURCE TARGET [--chunk-size B] [--threads N] [--overwrite] [--verify-all]\n       volume_copy --manifest PATH [--chunk-size B]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("volume_copy: {msg}");
            ExitCode::FAILURE
        }
    }
}
