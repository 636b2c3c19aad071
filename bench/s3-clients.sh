#!/usr/bin/env bash
# S3 client benchmark behind the project's choice of object_store over
# aws-sdk-s3 for buckets (docs/design.md; the AWS issue asks for the choice
# to be made on measured speed and memory). Both clients put, then get and
# check, the same objects on Garage A (scripts/garage, a real S3 server on
# loopback), 32 requests in flight each, one process per client and round:
# 1,000 objects of 64 KiB and 8 of 64 MiB (0.56 GiB). Rounds alternate the
# clients; the best of three of each counts. The program is
# bench/s3-clients (its own crate, so aws-sdk-s3 is compiled only here).
#
# The last line is
#   s3-clients: X.XXx vs aws-sdk-s3 (put+get time; memory ...)
# and the exit status is non-zero when object_store is more than 10% slower
# than aws-sdk-s3 or needs more memory: then the choice is wrong.
#
# Usage: bench/s3-clients.sh [WORKDIR]
#        SMALL=200 LARGE=2 bench/s3-clients.sh     (a quick look)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
small=${SMALL:-1000}
large=${LARGE:-8}
rounds=${ROUNDS:-3}
user_work=${1:-}
work=${user_work:-$(mktemp -d /var/tmp/fluidcloud-s3-clients.XXXXXX)}
mkdir -p "$work"
cleanup() {
    "$root/scripts/garage" stop "$work/garage" >/dev/null 2>&1 || true
    if [[ -z $user_work && -z ${KEEP:-} ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

command -v rclone >/dev/null || { echo "rclone is required (scripts/setup)" >&2; exit 2; }

echo "building bench/s3-clients (release)..." >&2
(cd "$root/bench/s3-clients" && CARGO_TARGET_DIR="$root/target/bench-s3" cargo build --release -q)
bin="$root/target/bench-s3/release/s3-clients"

echo "starting Garage..." >&2
"$root/scripts/garage" start "$work/garage" >/dev/null
# shellcheck disable=SC1091
source "$work/garage/env"
export RCLONE_CONFIG=/dev/null RCLONE_CONFIG_GA_TYPE=s3 RCLONE_CONFIG_GA_PROVIDER=Other \
    RCLONE_CONFIG_GA_ENDPOINT="$GARAGE_A_ENDPOINT" RCLONE_CONFIG_GA_REGION=garage \
    RCLONE_CONFIG_GA_ACCESS_KEY_ID="$GARAGE_A_ACCESS_KEY_ID" \
    RCLONE_CONFIG_GA_SECRET_ACCESS_KEY="$GARAGE_A_SECRET_ACCESS_KEY" RCLONE_CONFIG_GA_FORCE_PATH_STYLE=true
export AWS_ACCESS_KEY_ID="$GARAGE_A_ACCESS_KEY_ID" AWS_SECRET_ACCESS_KEY="$GARAGE_A_SECRET_ACCESS_KEY"

results="$work/results.jsonl"
: >"$results"
for round in $(seq 1 "$rounds"); do
    for client in object_store aws-sdk-s3; do
        b="bench-${client//_/-}-$round"
        env -u AWS_CA_BUNDLE rclone mkdir "GA:$b"
        env -u AWS_CA_BUNDLE "$bin" "$client" "$GARAGE_A_ENDPOINT" garage "$b" "$small" 64 "$large" 64 | tee -a "$results" >&2
        env -u AWS_CA_BUNDLE rclone purge "GA:$b"
    done
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best, rss = {}, {}
for r in rows:
    t = r["put_s"] + r["get_s"]
    c = r["client"]
    if c not in best or t < best[c]["t"]:
        best[c] = dict(r, t=t)
    # Memory: the least of the rounds (the host reclaims memory).
    p, g = rss.get(c, (1 << 62, 1 << 62))
    rss[c] = (min(p, r["put_rss_kib"]), min(g, r["get_rss_kib"]))
os_, sdk = best["object_store"], best["aws-sdk-s3"]
gib = os_["bytes"] / 2**30
ratio = sdk["t"] / os_["t"]
mib = lambda k: f"{k / 1024:.0f}"
print(
    f"s3-clients: {ratio:.2f}x vs aws-sdk-s3 (put+get of {gib:.2f} GiB, 32 in flight, best of {len(rows)//2}: "
    f"object_store {os_['put_s']:.2f}+{os_['get_s']:.2f} s, aws-sdk-s3 {sdk['put_s']:.2f}+{sdk['get_s']:.2f} s; "
    f"peak RSS streaming the gets object_store {mib(rss['object_store'][1])} MiB, aws-sdk-s3 {mib(rss['aws-sdk-s3'][1])} MiB; "
    f"putting (bodies in memory) {mib(rss['object_store'][0])} and {mib(rss['aws-sdk-s3'][0])} MiB)"
)
sys.exit(0 if ratio >= 0.9 and rss["object_store"][1] <= rss["aws-sdk-s3"][1] * 1.1 else 1)
PY
