#!/usr/bin/env bash
# Relocation benchmark: the demo's shop service with its database volume
# grown to 2 GiB (half allocated, random data), its three qcow2 images and
# its 521-object bucket, relocated from dc-paris to the site the broker
# picks (all on this machine's disk), with --yes.
#
# The ideal is a raw disk copy of the same allocated bytes in the same run:
# `cp -r --sparse=always` of images, volume and bucket, then `sync` (our copy
# fsyncs what it writes, so the peer does too). Downtime is measured by the
# relocation itself (source stopped -> target started), read from its report.
#
# Last line: `relocate: X.XXx of ideal, downtime Y.YY s (details)`; exits
# non-zero above 1.5x of ideal or at 2 s of downtime or more.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
max_ratio="${RELOCATE_BENCH_MAX_RATIO:-1.5}"
max_down="${RELOCATE_BENCH_MAX_DOWNTIME:-2}"
cd "$root"
cargo build --release --quiet --bin fluidcloud
bin="$root/target/release/fluidcloud"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$bin" demo init "$work/d" >/dev/null
paris="$work/d/sites/dc-paris"
vol="$paris/volumes/db-data.raw"
rm -f "$vol"
truncate -s 2G "$vol"
# 16 extents of 64 MiB of random data, every other 64 MiB: 1 GiB allocated.
head -c $((64 << 20)) /dev/urandom >"$work/extent"
for i in $(seq 0 15); do
    dd if="$work/extent" of="$vol" bs=1M seek=$((i * 128)) conv=notrunc,fsync status=none
    # Make every extent different (the volume copy must not win by dedup).
    printf '%016d' "$i" | dd of="$vol" bs=16 seek=$((i * 128 * 65536)) conv=notrunc status=none
done
allocated=$(du -B1 -c "$paris/images" "$vol" "$paris/buckets/shop-media" | tail -n1 | cut -f1)
sync

# The peer: a raw copy of the same data, synced.
t0=$(date +%s.%N)
mkdir "$work/peer"
cp -r --sparse=always "$paris/images" "$vol" "$paris/buckets/shop-media" "$work/peer/"
sync
t1=$(date +%s.%N)
rm -rf "$work/peer"
sync

t2=$(date +%s.%N)
"$bin" --config "$work/d/fluidcloud.toml" --json relocate --from dc-paris --service shop --yes >"$work/report.json"
t3=$(date +%s.%N)

python3 - "$work/report.json" "$t0" "$t1" "$t2" "$t3" "$allocated" "$max_ratio" "$max_down" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
t0, t1, t2, t3 = map(float, sys.argv[2:6])
allocated = int(sys.argv[6]); max_ratio = float(sys.argv[7]); max_down = float(sys.argv[8])
ideal, took = t1 - t0, t3 - t2
down = rep["downtime_seconds"]
assert rep["status"] == "succeeded", rep["status"]
mib = allocated / 2**20
print(f"allocated data: {mib:.0f} MiB; raw copy (cp + sync): {ideal:.2f} s ({mib/ideal:.0f} MiB/s)")
print(f"fluidcloud relocate to {', '.join(rep['targets'])}: {took:.2f} s, {len(rep['steps'])} steps, downtime {down:.2f} s")
for s in sorted(rep["steps"], key=lambda s: -(s["seconds"] or 0))[:5]:
    print(f"  {s['id']:<32} {s['seconds'] or 0:6.2f} s")
ratio = took / ideal
ok = ratio <= max_ratio and down < max_down
print(f"relocate: {ratio:.2f}x of ideal, downtime {down:.2f} s ({mib:.0f} MiB in {took:.2f} s vs cp {ideal:.2f} s; targets <= {max_ratio}x, < {max_down} s)")
sys.exit(0 if ok else 1)
PY
