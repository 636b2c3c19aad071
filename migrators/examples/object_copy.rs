//! Copies a bucket with `fluidcloud_migrators::objects::copy_bucket` and
//! prints the summary as JSON (used by `bench/objects.sh`).
//!
//! ```text
//! object_copy SRC_URL DST_URL [--concurrency N] [--reread]
//! object_copy --manifest URL
//! ```
//!
//! Exits 1 when an object failed, 2 on bad usage or any other error.

use std::sync::Arc;
use std::time::Instant;

use fluidcloud_migrators::objects::{
    BucketLocation, ObjectCopyOptions, Verify, copy_bucket, manifest,
};
use fluidcloud_plugins::NoProgress;

fn usage() -> ! {
    eprintln!(
        "usage: object_copy SRC_URL DST_URL [--concurrency N] [--reread]\n       object_copy --manifest URL"
    );
    std::process::exit(2)
}

fn parse(url: &str) -> BucketLocation {
    BucketLocation::parse(url).unwrap_or_else(|e| {
        eprintln!("object_copy: {e}");
        std::process::exit(2)
    })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--manifest") {
        let Some(url) = args.get(1) else { usage() };
        match manifest(&parse(url)).await {
            Ok(m) => {
                println!(
                    "{} {} objects {} bytes",
                    m.digest,
                    m.entries.len(),
                    m.bytes()
                );
                return;
            }
            Err(e) => {
                eprintln!("object_copy: {e}");
                std::process::exit(2)
            }
        }
    }
    let mut positional = Vec::new();
    let mut opts = ObjectCopyOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--concurrency" => {
                opts.concurrency = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--reread" => opts.verify = Verify::Reread,
            s if s.starts_with("--") => usage(),
            _ => positional.push(a.clone()),
        }
    }
    let [src, dst] = positional.as_slice() else {
        usage()
    };
    let started = Instant::now();
    match copy_bucket(&parse(src), &parse(dst), &opts, Arc::new(NoProgress)).await {
        Ok(s) => {
            let secs = started.elapsed().as_secs_f64();
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.remove("created");
                o.insert("seconds".into(), secs.into());
            }
            println!("{v}");
            if !s.failures.is_empty() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("object_copy: {e}");
            std::process::exit(2)
        }
    }
}
