#!/usr/bin/env bash
# Volume-copy benchmark: fluidcloud's volume copy against rsync.
#
# Builds a 4 GiB sparse volume, half allocated (random data in 8 MiB
# extents scattered over 16 MiB slots, not aligned to the 4 MiB chunks),
# then times, in the same run and on the same warm data (the source is
# read once into the page cache before every timed run; caches cannot be
# dropped here):
#   full copy   volume_copy            vs rsync --sparse --whole-file
#                                      (and cp --sparse=always for reference)
#   re-sync     volume_copy (again)    vs rsync --inplace --no-whole-file
#               after changing 1% of the 4 MiB chunks of the source.
# volume_copy syncs its target to disk before it returns (it must, to be
# resumable); rsync and cp do not, so their times include a `sync` of their
# target file, and the times without it are printed too. Every target is
# compared with the source (cmp) before its time counts.
#
# Targets: full copy >= 1.5x rsync, re-sync >= 5x rsync with bytes written
# <= 2% of the volume, peak RSS < 256 MiB. The last line is
# `volume-copy: X.XXx vs rsync (full), Y.YYx (resync)`; the exit status is
# non-zero when a target is missed.
#
# Usage: bench/volume.sh [WORKDIR]   (default: a temporary directory)
#        SIZE_GIB=1 bench/volume.sh  (a smaller volume, for a quick look)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
size_gib=${SIZE_GIB:-4}
user_work=${1:-}
work=${user_work:-$(mktemp -d /var/tmp/fluidcloud-vbench.XXXXXX)}
mkdir -p "$work"
cleanup() {
    if [[ -z $user_work && -z ${KEEP:-} ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

command -v rsync >/dev/null || apt-get install -y rsync >/dev/null
echo "building volume_copy (release)..." >&2
(cd "$root" && cargo build --release -q -p fluidcloud-migrators --example volume_copy)
vc="$root/target/release/examples/volume_copy"

# ---- the test volume ---------------------------------------------------------
mib=$((1 << 20))
src="$work/src/vol.raw"
mkdir -p "$work/src" "$work/ours" "$work/rsync" "$work/cp"
rm -f "$src" "$work"/ours/* "$work"/rsync/* "$work"/cp/*
echo "making a ${size_gib} GiB sparse volume, half allocated, in $work..." >&2
truncate -s "${size_gib}G" "$src"
slots=$((size_gib * 64))
for ((i = 0; i < slots; i++)); do
    # 8 MiB of random data somewhere in each 16 MiB slot.
    seek=$((i * 16 + (i * 5) % 9))
    head -c $((8 * mib)) /dev/urandom |
        dd of="$src" bs=1M seek=$seek conv=notrunc status=none
done

# ---- helpers -------------------------------------------------------------------
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
ge() { awk "BEGIN { exit !($1 >= $2) }"; }
alloc() { echo $(($(stat -c %b "$1") * 512)); }
# No tool pays for another's write-back; every tool reads warm source data.
settle() { sync; cat "$src" >/dev/null; }
same() { cmp -s "$src" "$1" || { echo "MISMATCH: $1 differs from the source" >&2; exit 1; }; }
json() { sed -E "s/.*\"$2\":([0-9]+).*/\\1/" "$1"; }

# time_cmd OUT_VAR OUT_SYNCED_VAR TARGET CMD... : wall time without and with
# a sync of TARGET afterwards.
time_cmd() {
    local -n t1=$1 t2=$2
    local target=$3
    shift 3
    settle
    local a b c
    a=$(now)
    "$@"
    b=$(now)
    sync "$target"
    c=$(now)
    t1=$(calc "$b - $a")
    t2=$(calc "$c - $a")
}

failed=0
# target NAME TEST...: prints NAME's verdict; a miss fails the run.
target() {
    local name=$1
    shift
    if "$@"; then echo "target      $name: ok"; else echo "target      $name: MISSED"; failed=1; fi
}

# ---- full copy -------------------------------------------------------------------
echo "full copy..." >&2
time_cmd t_ours t_ours_s "$work/ours/vol.raw" \
    /usr/bin/time -f %M -o "$work/rss-full" "$vc" "$src" "$work/ours/vol.raw" >"$work/full.json"
time_cmd t_rsync t_rsync_s "$work/rsync/vol.raw" \
    rsync --sparse --whole-file "$src" "$work/rsync/vol.raw"
time_cmd t_cp t_cp_s "$work/cp/vol.raw" \
    cp --sparse=always "$src" "$work/cp/vol.raw"
for t in ours rsync cp; do same "$work/$t/vol.raw"; done
rss_full=$(tail -1 "$work/rss-full")

# ---- 1% of the chunks change -------------------------------------------------------
chunks=$((size_gib * 256))
changes=$(((chunks + 99) / 100))
echo "changing $changes of $chunks chunks..." >&2
for ((k = 0; k < changes; k++)); do
    c=$(((k * 7919 + 13) % chunks))
    head -c 65536 /dev/urandom |
        dd of="$src" bs=4096 seek=$((c * 1024 + (k % 900))) conv=notrunc status=none
done

echo "re-sync..." >&2
time_cmd r_ours r_ours_s "$work/ours/vol.raw" \
    /usr/bin/time -f %M -o "$work/rss-resync" "$vc" "$src" "$work/ours/vol.raw" >"$work/resync.json"
time_cmd r_rsync r_rsync_s "$work/rsync/vol.raw" \
    rsync --inplace --no-whole-file "$src" "$work/rsync/vol.raw"
for t in ours rsync; do same "$work/$t/vol.raw"; done
rss_resync=$(tail -1 "$work/rss-resync")

# ---- report ----------------------------------------------------------------------------
size=$((size_gib << 30))
written=$(json "$work/resync.json" bytes_written)
sent=$(json "$work/resync.json" chunks_sent)
full_ratio=$(calc "$t_rsync_s / $t_ours")
resync_ratio=$(calc "$r_rsync_s / $r_ours")
rss_max=$((rss_full > rss_resync ? rss_full : rss_resync))
echo
echo "volume ${size_gib} GiB, $(($(alloc "$src") / mib)) MiB allocated; data warm in the page cache for every run"
printf 'full copy   volume_copy %6.2fs (synced)   rsync %6.2fs (+sync %6.2fs)   cp %6.2fs (+sync %6.2fs)\n' \
    "$t_ours" "$t_rsync" "$t_rsync_s" "$t_cp" "$t_cp_s"
printf '            allocated: ours %d MiB, rsync %d MiB, cp %d MiB\n' \
    $(($(alloc "$work/ours/vol.raw") / mib)) $(($(alloc "$work/rsync/vol.raw") / mib)) $(($(alloc "$work/cp/vol.raw") / mib))
printf '            summary: %s\n' "$(cat "$work/full.json")"
printf 're-sync     volume_copy %6.2fs (synced)   rsync --inplace %6.2fs (+sync %6.2fs)\n' \
    "$r_ours" "$r_rsync" "$r_rsync_s"
printf '            summary: %s\n' "$(cat "$work/resync.json")"
printf 'ratios      full %.2fx (%.2fx vs rsync without its sync), re-sync %.2fx (%.2fx without)\n' \
    "$full_ratio" "$(calc "$t_rsync / $t_ours")" "$resync_ratio" "$(calc "$r_rsync / $r_ours")"
target "full copy >= 1.5x rsync" ge "$full_ratio" 1.5
target "re-sync >= 5x rsync" ge "$resync_ratio" 5
target "re-sync writes <= 2% ($written bytes in $sent chunks)" ge $((size / 50)) "$written"
target "peak RSS < 256 MiB ($((rss_max / 1024)) MiB)" ge $((256 * 1024 - 1)) "$rss_max"
printf 'volume-copy: %.2fx vs rsync (full), %.2fx (resync)\n' "$full_ratio" "$resync_ratio"
exit $failed
