#!/usr/bin/env bash
# Plugin host benchmark: 10,000 round trips (`plan` requests) from the host
# to a no-op plugin process (`fluidcloud-plugin-testkit`) over real pipes:
# serialization, the pipe both ways, the plugin's serve loop, routing the
# reply back to the awaiting call.
#
# The last line is
#   plugin: median X µs, p99 Y µs
# and the exit status is non-zero when the median is over the 1 ms target.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${PLUGIN_BENCH_N:-10000}"
limit_us="${PLUGIN_BENCH_LIMIT_US:-1000}"

cd "$root"
cargo build --release --quiet -p fluidcloud-plugins \
    --bin fluidcloud-plugin-testkit --example plugin-bench

target="${CARGO_TARGET_DIR:-$root/target}/release"
out="$("$target/examples/plugin-bench" "$target/fluidcloud-plugin-testkit" "$n")"
echo "$out"
median="$(echo "$out" | tail -n1 | sed -E 's/.*median ([0-9]+) .*/\1/')"
if [ "$median" -gt "$limit_us" ]; then
    echo "median ${median} µs is over the ${limit_us} µs target" >&2
    exit 1
fi
