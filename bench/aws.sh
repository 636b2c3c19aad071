#!/usr/bin/env bash
# AWS benchmark: a disk image into EBS snapshot blocks, against moto.
#
# Builds a 2 GiB raw image with 1 GiB allocated (random data in 8 MiB
# extents scattered over 16 MiB slots), then, in the same run, alternately:
#   ours   fluidcloud transfer local:image/NAME aws:image/NAME
#          (StartSnapshot, PutSnapshotBlock for data blocks, CompleteSnapshot,
#          RegisterImage; 4 chunk workers x 16 puts in flight)
#   peer   bench/peers/boto3_snapshot_upload.py: boto3, the same 512 KiB
#          blocks with SHA-256 checksums, holes skipped, 64 threads (the same
#          number of puts in flight)
# Each run gets a fresh moto server (scripts/aws), so neither pays for the
# other's blocks in moto's memory. Both must leave a completed snapshot
# listing the same number of blocks. Best of ROUNDS (default 3) each.
#
# Targets: >= 2x the boto3 uploader; fluidcloud's peak RSS < 200 MiB.
# The last line is `aws: X.XXx vs boto3 uploader (...)`; the exit status is
# non-zero when a target is missed.
#
# Usage: bench/aws.sh [WORKDIR]       (default: a temporary directory)
#        SIZE_GIB=1 bench/aws.sh      (a smaller image, for a quick look)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
size_gib=${SIZE_GIB:-2}
rounds=${ROUNDS:-3}
user_work=${1:-}
work=${user_work:-$(mktemp -d /var/tmp/fluidcloud-awsbench.XXXXXX)}
mkdir -p "$work"
moto_dir="$work/moto"
cleanup() {
    "$root/scripts/aws" stop "$moto_dir" >/dev/null 2>&1 || true
    if [[ -z $user_work && -z ${KEEP:-} ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

"$root/scripts/aws" install
echo "building fluidcloud (release)..." >&2
(cd "$root" && cargo build --release -q --bin fluidcloud)
fc="$root/target/release/fluidcloud"

# ---- the image -------------------------------------------------------------------
mib=$((1 << 20))
site="$work/site"
mkdir -p "$site"/{images,volumes,instances,buckets,config,services}
img="$site/images/disk.raw"
rm -f "$img"
echo "making a ${size_gib} GiB image, half allocated, in $work..." >&2
truncate -s "${size_gib}G" "$img"
slots=$((size_gib * 64))
for ((i = 0; i < slots; i++)); do
    seek=$((i * 16 + (i * 5) % 9))
    head -c $((8 * mib)) /dev/urandom | dd of="$img" bs=1M seek=$seek conv=notrunc status=none
done
data_blocks=$(python3 - "$img" <<'EOF'
import os, sys
fd, n, off = os.open(sys.argv[1], os.O_RDONLY), 0, 0
size = os.fstat(fd).st_size
B = 512 * 1024
while off < size:
    d = os.pread(fd, B, off)
    n += any(d)
    off += B
print(n)
EOF
)
echo "the image holds $data_blocks blocks of 512 KiB with data" >&2

# ---- helpers -----------------------------------------------------------------------
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
fresh_moto() {
    "$root/scripts/aws" stop "$moto_dir" >/dev/null 2>&1 || true
    "$root/scripts/aws" start "$moto_dir"
}
# Blocks listed by the newest snapshot at the endpoint $1.
listed_blocks() {
    "$root/scripts/aws" python - "$1" <<'EOF'
import sys, boto3
kw = dict(endpoint_url=sys.argv[1], region_name="us-east-1",
          aws_access_key_id="testing", aws_secret_access_key="testing")
ec2, ebs = boto3.client("ec2", **kw), boto3.client("ebs", **kw)
snaps = [s for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]
         if s.get("Description") in ("written by fluidcloud", "boto3 reference upload")]
newest = max(snaps, key=lambda s: s["StartTime"])
print(len(ebs.list_snapshot_blocks(SnapshotId=newest["SnapshotId"])["Blocks"]))
EOF
}
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
# moto speaks plain HTTP: a CA bundle from the environment has nothing to do.
unset AWS_CA_BUNDLE REQUESTS_CA_BUNDLE

run_ours() { # -> seconds; peak RSS (KiB) in $work/ours.rss
    local url=$1 t0 t1
    cat >"$work/sites.toml" <<EOF
[sites.local]
kind = "local"
path = "site"
jurisdiction = "EU/FR"
location = { region = "fr", latitude = 48.8, longitude = 2.3 }

[sites.aws]
kind = "aws"
region = "us-east-1"
endpoint_url = "$url"
jurisdiction = "US/VA"
location = { region = "us-east-1", latitude = 38.9, longitude = -77.4 }
credentials = { access_key_id_env = "AWS_ACCESS_KEY_ID", secret_access_key_env = "AWS_SECRET_ACCESS_KEY" }
EOF
    t0=$(now)
    /usr/bin/time -f '%M %U %S' -o "$work/ours.rss" "$fc" --config "$work/sites.toml" --json \
        transfer --from local:image/disk.raw --to aws:image/disk.raw >"$work/ours.json"
    t1=$(now)
    calc "$t1 - $t0"
}

run_peer() {
    local url=$1 t0 t1
    t0=$(now)
    /usr/bin/time -f '%M %U %S' -o "$work/peer.rss" \
        "$root/scripts/aws" python "$root/bench/peers/boto3_snapshot_upload.py" "$img" "$url" us-east-1 64 >"$work/peer.json"
    t1=$(now)
    calc "$t1 - $t0"
}

best_ours=999999 best_peer=999999 rss_max=0 cpu_ours=999999 cpu_peer=999999
# CPU seconds (user + system) of the client of the last run, from its time file.
cpu_of() { awk '{ printf "%.2f", $2 + $3 }' "$1"; }
min() { awk -v a="$1" -v b="$2" 'BEGIN { print (b < a ? b : a) }'; }
for ((r = 1; r <= rounds; r++)); do
    url=$(fresh_moto)
    t=$(run_ours "$url")
    n=$(listed_blocks "$url")
    [ "$n" = "$data_blocks" ] || { echo "fluidcloud's snapshot lists $n blocks, not $data_blocks" >&2; exit 1; }
    rss=$(awk '{ print $1 }' "$work/ours.rss")
    cpu_ours=$(min "$cpu_ours" "$(cpu_of "$work/ours.rss")")
    ((rss > rss_max)) && rss_max=$rss
    best_ours=$(min "$best_ours" "$t")
    url=$(fresh_moto)
    p=$(run_peer "$url")
    n=$(listed_blocks "$url")
    [ "$n" = "$data_blocks" ] || { echo "boto3's snapshot lists $n blocks, not $data_blocks" >&2; exit 1; }
    best_peer=$(min "$best_peer" "$p")
    cpu_peer=$(min "$cpu_peer" "$(cpu_of "$work/peer.rss")")
    printf 'round %d: fluidcloud %.2f s (CPU %s s, peak RSS %d MiB), boto3 %.2f s (CPU %s s)\n' \
        "$r" "$t" "$(cpu_of "$work/ours.rss")" $((rss / 1024)) "$p" "$(cpu_of "$work/peer.rss")" >&2
done

ratio=$(calc "$best_peer / $best_ours")
mib_s=$(calc "$data_blocks * 0.5 / $best_ours")
peer_mib_s=$(calc "$data_blocks * 0.5 / $best_peer")
status=0
awk -v r="$ratio" 'BEGIN { exit !(r >= 2.0) }' || { echo "target missed: ${ratio}x < 2x" >&2; status=1; }
((rss_max < 200 * 1024)) || { echo "target missed: peak RSS $((rss_max / 1024)) MiB >= 200 MiB" >&2; status=1; }
# moto serves every request from one Python process: when both clients
# leave it no idle time, the wall-clock ratio measures moto. The client's
# own CPU time says what each client costs.
printf 'aws: %.2fx vs boto3 uploader (%d blocks of 512 KiB into a snapshot: fluidcloud %.2f s = %.0f MiB/s, boto3 %.2f s = %.0f MiB/s, 64 puts in flight each; client CPU fluidcloud %s s, boto3 %s s = %.1fx less; fluidcloud peak RSS %d MiB)\n' \
    "$ratio" "$data_blocks" "$best_ours" "$mib_s" "$best_peer" "$peer_mib_s" "$cpu_ours" "$cpu_peer" "$(calc "$cpu_peer / $cpu_ours")" $((rss_max / 1024))
exit $status
