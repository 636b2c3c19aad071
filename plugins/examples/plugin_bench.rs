//! Round-trip latency of the plugin host: `plan` calls to a no-op plugin.
//!
//! `cargo run --release -p fluidcloud-plugins --example plugin-bench -- PLUGIN [N]`
//! prints the median and the 99th percentile; `bench/plugin.sh` runs it.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use fluidcloud_plugins::host::{HostConfig, PluginCommand, PluginMigrator};
use fluidcloud_plugins::{Migrator, StepRequest};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let plugin = args.next().expect("usage: plugin-bench PLUGIN [N]");
    let n: usize = args.next().map_or(10_000, |s| s.parse().unwrap());
    let m = PluginMigrator::spawn(PluginCommand::new(plugin), HostConfig::default()).unwrap();
    let req = StepRequest {
        step_id: "bench".into(),
        params: serde_json::json!({ "size": 1 }),
        inputs: Default::default(),
    };
    for _ in 0..200 {
        m.plan(&req).await.unwrap();
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let e = m.plan(&req).await.unwrap();
        lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
        assert_eq!(e.bytes_read, 1);
    }
    lat.sort_by(f64::total_cmp);
    let median = lat[n / 2];
    let p99 = lat[(n * 99 / 100).min(n - 1)];
    println!("{n} round trips (plan) to {}", m.describe().name);
    println!("plugin: median {median:.0} µs, p99 {p99:.0} µs");
}
