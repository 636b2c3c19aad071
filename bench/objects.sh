#!/usr/bin/env bash
# Bucket-copy benchmark: fluidcloud's object-copy against rclone, Garage A to
# Garage B (two real S3 servers from scripts/garage on loopback).
#
# The source bucket holds 2,000 objects of 4-64 KiB and 4 objects of
# 256 MiB (about 1.06 GiB), put there by rclone so it carries no fluidcloud
# metadata. In the same run, each into a fresh bucket on B:
#   1. rclone copy with its defaults
#   2. rclone copy --transfers 32 --checkers 32
#   3. fluidcloud (migrators/examples/object_copy.rs)
# Every copy is checked before its time counts: `rclone check` (sizes and
# MD5s) for rclone's, and for ours the summary (every object copied and
# verified, none failed) plus the BLAKE3 manifest read back from B equal to
# the source's.
#
# Targets: >= 1.5x rclone's defaults and >= 1.0x tuned rclone in wall-clock
# throughput. The last line is
#   object-copy: X.XXx vs rclone (tuned; Y.YYx vs defaults, S GiB in T s)
# and the exit status is non-zero when a target is missed.
#
# Usage: bench/objects.sh [WORKDIR]      (default: a temporary directory)
#        SMALL=200 LARGE_MIB=64 bench/objects.sh   (a quick look)
#        PROFILE=dev bench/objects.sh    (skip the release build)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
small=${SMALL:-2000}
large_mib=${LARGE_MIB:-256}
profile=${PROFILE:-release}
user_work=${1:-}
work=${user_work:-$(mktemp -d /var/tmp/fluidcloud-objects.XXXXXX)}
mkdir -p "$work"
cleanup() {
    "$root/scripts/garage" stop "$work/garage" >/dev/null 2>&1 || true
    if [[ -z $user_work && -z ${KEEP:-} ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

command -v rclone >/dev/null || { echo "rclone is required (scripts/setup)" >&2; exit 2; }

echo "building the object_copy example ($profile)..." >&2
if [[ $profile == release ]]; then
    (cd "$root" && cargo build --release -q -p fluidcloud-migrators --example object_copy)
    fc="$root/target/release/examples/object_copy"
else
    (cd "$root" && cargo build -q -p fluidcloud-migrators --example object_copy)
    fc="$root/target/debug/examples/object_copy"
fi

echo "starting Garage A and B..." >&2
"$root/scripts/garage" start "$work/garage"
# shellcheck disable=SC1091
source "$work/garage/env"

# rclone remotes GA and GB from the environment; no config file.
for inst in A B; do
    ep_var="GARAGE_${inst}_ENDPOINT" key_var="GARAGE_${inst}_ACCESS_KEY_ID" sec_var="GARAGE_${inst}_SECRET_ACCESS_KEY"
    export "RCLONE_CONFIG_G${inst}_TYPE=s3"
    export "RCLONE_CONFIG_G${inst}_PROVIDER=Other"
    export "RCLONE_CONFIG_G${inst}_ENDPOINT=${!ep_var}"
    export "RCLONE_CONFIG_G${inst}_ACCESS_KEY_ID=${!key_var}"
    export "RCLONE_CONFIG_G${inst}_SECRET_ACCESS_KEY=${!sec_var}"
    export "RCLONE_CONFIG_G${inst}_REGION=garage"
    export "RCLONE_CONFIG_G${inst}_FORCE_PATH_STYLE=true"
done
export RCLONE_CONFIG=/dev/null
# Plain http on loopback: no CA bundle involved, whatever the environment says.
rc() { env -u AWS_CA_BUNDLE rclone "$@"; }
url() { # url INST BUCKET
    local ep_var="GARAGE_$1_ENDPOINT"
    echo "s3://$2?endpoint=${!ep_var}&region=garage&access_key_id_env=GARAGE_$1_ACCESS_KEY_ID&secret_access_key_env=GARAGE_$1_SECRET_ACCESS_KEY"
}

echo "making $small small objects and 4 x $large_mib MiB in $work/data..." >&2
rm -rf "$work/data"
mkdir -p "$work/data/small" "$work/data/large"
python3 - "$work/data/small" "$small" <<'EOF'
import os, random, sys
d, n = sys.argv[1], int(sys.argv[2])
rnd = random.Random(42)
for i in range(n):
    sub = os.path.join(d, f"p{i % 16:02d}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"obj-{i:05d}.bin"), "wb") as f:
        f.write(os.urandom(rnd.randint(4 << 10, 64 << 10)))
EOF
for i in 1 2 3 4; do
    head -c $((large_mib << 20)) /dev/urandom >"$work/data/large/blob-$i.bin"
done
bytes=$(du -sb --apparent-size "$work/data" | cut -f1)
count=$((small + 4))

echo "filling the source bucket on A with rclone..." >&2
"$root/scripts/garage" bucket "$work/garage" A src
rc copy --transfers 16 --checkers 16 "$work/data" GA:src
rm -rf "$work/data"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

echo "rclone copy (defaults)..." >&2
t0=$(now)
rc copy GA:src GB:rclone-defaults
t1=$(now)
rc check -q GA:src GB:rclone-defaults
t_def=$(secs "$t0" "$t1")
echo "  rclone defaults: $t_def s" >&2

echo "rclone copy --transfers 32 --checkers 32..." >&2
t0=$(now)
rc copy --transfers 32 --checkers 32 GA:src GB:rclone-tuned
t1=$(now)
rc check -q GA:src GB:rclone-tuned
t_tun=$(secs "$t0" "$t1")
echo "  rclone tuned: $t_tun s" >&2

echo "fluidcloud object-copy..." >&2
t0=$(now)
summary=$("$fc" "$(url A src)" "$(url B fluidcloud)")
t1=$(now)
t_fc=$(secs "$t0" "$t1")
echo "  fluidcloud: $t_fc s: $summary" >&2
src_manifest=$("$fc" --manifest "$(url A src)")
dst_manifest=$("$fc" --manifest "$(url B fluidcloud)")
echo "  manifest A: $src_manifest" >&2
echo "  manifest B: $dst_manifest" >&2

python3 - "$summary" "$count" "$src_manifest" "$dst_manifest" "$bytes" "$t_def" "$t_tun" "$t_fc" <<'EOF'
import json, sys
summary, count, src_m, dst_m = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
size, t_def, t_tun, t_fc = int(sys.argv[5]), *map(float, sys.argv[6:9])
ok = True
if summary["copied"] != count or summary["failures"]:
    print(f"fluidcloud copied {summary['copied']} of {count}, {len(summary['failures'])} failed")
    ok = False
if src_m.split()[0] != dst_m.split()[0] or src_m.split()[0] != summary["manifest"]:
    print("manifests differ: the copy is not verified")
    ok = False
gib = size / 2**30
for name, t in [("rclone defaults", t_def), ("rclone tuned", t_tun), ("fluidcloud", t_fc)]:
    print(f"{name:16} {t:7.2f} s  {gib / t * 1024:8.1f} MiB/s")
vs_def, vs_tun = t_def / t_fc, t_tun / t_fc
if vs_def < 1.5:
    print(f"missed: {vs_def:.2f}x vs rclone defaults (target 1.5x)")
    ok = False
if vs_tun < 1.0:
    print(f"missed: {vs_tun:.2f}x vs tuned rclone (target 1.0x)")
    ok = False
print(f"object-copy: {vs_tun:.2f}x vs rclone (tuned; {vs_def:.2f}x vs defaults, {gib:.2f} GiB in {t_fc:.1f} s)")
sys.exit(0 if ok else 1)
EOF
