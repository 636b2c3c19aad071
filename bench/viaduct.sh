#!/usr/bin/env bash
# Viaduct benchmark: a 10,000-step synthetic DAG of no-op steps, run with the
# SQLite journal (WAL, synchronous=FULL) on a real file. There is no peer
# tool for a workflow engine, so this only measures.
#
# Prints the per-step overhead; the last line is
#   viaduct: N steps in X.XX s (Y µs/step)
# and the exit status is non-zero above the 2 s target.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
steps="${VIADUCT_BENCH_STEPS:-10000}"
limit="${VIADUCT_BENCH_LIMIT:-2}"

cd "$root"
cargo build --release --quiet -p fluidcloud-viaduct --bin viaduct-harness

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The harness prints details, then the last line; exits 1 over the limit.
cargo run --release --quiet -p fluidcloud-viaduct --bin viaduct-harness -- \
    bench "$steps" "$work/journal.db" "$limit"
