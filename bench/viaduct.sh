#!/usr/bin/env bash
# Viaduct benchmark: a 10,000-step synthetic DAG of no-op steps, run with the
# SQLite journal (WAL, synchronous=FULL) on a real file, and first with the
# PostgreSQL journal on a throw-away cluster (scripts/postgres, fsync on).
# There is no peer tool for a workflow engine, so this only measures.
#
# Prints the per-step overhead and the journal's step transitions per
# second; the last line is
#   viaduct: N steps in X.XX s (Y µs/step)
# and the exit status is non-zero above the 2 s target, or when the
# PostgreSQL journal takes fewer than 5,000 step transitions per second.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
steps="${VIADUCT_BENCH_STEPS:-10000}"
limit="${VIADUCT_BENCH_LIMIT:-2}"

cd "$root"
cargo build --release --quiet -p fluidcloud-viaduct --bin viaduct-harness

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pg_dir="$root/target/tmp/postgres-bench"
url=$(scripts/postgres createdb "$pg_dir" bench_viaduct)
trap 'rm -rf "$work"; scripts/postgres stop "$pg_dir" >/dev/null 2>&1 || true' EXIT
echo "== PostgreSQL journal"
pg=$(cargo run --release --quiet -p fluidcloud-viaduct --bin viaduct-harness -- \
    bench "$steps" "$url#bench" 100)
echo "$pg" | sed 's/^/  /'
rate=$(echo "$pg" | sed -nE 's/^journal: [0-9]+ step transitions, ([0-9]+) per second/\1/p')
echo "== SQLite journal"
# The harness prints details, then the last line; exits 1 over the limit.
status=0
cargo run --release --quiet -p fluidcloud-viaduct --bin viaduct-harness -- \
    bench "$steps" "$work/journal.db" "$limit" || status=$?
if [ "${rate:-0}" -lt 5000 ]; then
    echo "bench/viaduct.sh: the PostgreSQL journal took ${rate:-0} step transitions/s, under 5,000" >&2
    exit 1
fi
exit "$status"
