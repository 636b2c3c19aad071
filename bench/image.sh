#!/usr/bin/env bash
# Image-conversion benchmark: `fluidcloud image convert` against qemu-img.
#
# Builds a 4 GiB test disk (half allocated: random, text and base64 data in
# 32 MiB runs, with 32 MiB holes between them), makes qcow2, zlib- and
# zstd-compressed qcow2 copies with qemu-img, then times, in the same run,
# qemu-img convert with its defaults, qemu-img convert -m 16 -W, and
# fluidcloud image convert on each conversion of the issue, each REPS times
# (default 5, interleaved; the fastest run of each counts; a conversion
# whose first qemu-img run takes over 20 s is run twice only: its noise is
# far below its margin). Every output of
# ours is checked with `qemu-img compare`; ours must also be as sparse as
# qemu-img's and stay under 256 MiB peak RSS.
#
# Targets: 1.2x the faster qemu-img setting on every conversion, 2x on
# compressed input. Conversions fluidcloud cannot do yet count as missed.
# The last line is `image-convert: X.XXx vs qemu-img (min over conversions)`;
# the exit status is non-zero when a target is missed.
#
# Usage: bench/image.sh [WORKDIR]   (default: a temporary directory)
#        SIZE_GIB=1 bench/image.sh  (a smaller disk, for a quick look)
#        REPS=1 bench/image.sh      (one run of each tool)
#        KEEP=1 bench/image.sh      (keep the work directory)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
size_gib=${SIZE_GIB:-4}
reps=${REPS:-5}
user_work=${1:-}
work=${user_work:-$(mktemp -d /var/tmp/fluidcloud-bench.XXXXXX)}
mkdir -p "$work"
cleanup() {
    if [[ -z $user_work && -z ${KEEP:-} ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT

command -v qemu-img >/dev/null || { echo "qemu-img is required (apt-get install qemu-utils)" >&2; exit 2; }
echo "building fluidcloud (release)..." >&2
(cd "$root" && cargo build --release -q -p fluidcloud)
fc="$root/target/release/fluidcloud"

# ---- the test disk ---------------------------------------------------------
slot=$((64 << 20))   # every 64 MiB slot: 32 MiB of data, then a 32 MiB hole
run=$((32 << 20))
src="$work/src.raw"
echo "making a ${size_gib} GiB test disk in $work..." >&2
head -c $run /dev/urandom >"$work/random.bin"
# `head` closes the pipes early: the producers' SIGPIPE is expected.
set +o pipefail
seq 1 100000000 | head -c $run >"$work/text.bin"
head -c $((run * 3 / 4)) /dev/urandom | base64 -w 76 | head -c $run >"$work/b64.bin"
set -o pipefail
rm -f "$src"
truncate -s "${size_gib}G" "$src"
slots=$((size_gib * 16))
kinds=(random text b64 text)
for ((i = 0; i < slots; i++)); do
    kind=${kinds[$((i % 4))]}
    dd if="$work/$kind.bin" of="$src" bs=1M seek=$((i * slot / (1 << 20))) conv=notrunc,sparse status=none
done
# Data on the very last bytes too.
printf 'end of disk' | dd of="$src" bs=1 seek=$((size_gib * (1 << 30) - 11)) conv=notrunc status=none
rm -f "$work"/{random,text,b64}.bin

echo "making the qcow2 inputs with qemu-img..." >&2
qemu-img convert -f raw -O qcow2 "$src" "$work/src.qcow2"
qemu-img convert -f raw -O qcow2 -c "$src" "$work/src-zlib.qcow2"
qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$src" "$work/src-zstd.qcow2"

# ---- timing ------------------------------------------------------------------
now() { date +%s.%N; }
# Every timed run starts with no dirty pages left over from the previous one
# (`sync`), so no tool pays for another's write-back, and with its input in
# the page cache, so none pays for reading it from disk. Then the previous
# output is removed and the run starts at once: this machine's hypervisor
# takes back guest pages that stay free for ~2 s (virtio-balloon free page
# reporting), and writing 2 GiB into pages it took back costs 2-5x more
# (measured: 2 GiB of pwrite took 0.49-0.56 s right after the removal,
# 2.2-4.1 s three seconds later, whatever the writer). Starting at once
# gives every tool the same, hypervisor-free conditions.
settle() {
    sync
    cat "$1" >/dev/null
    rm -f "$work/out"
}
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
lt() { awk "BEGIN { exit !($1 < $2) }"; }
alloc() { echo $(($(stat -c %b "$1") * 512)); }

# One timed run of a command that writes $work/out; prints its seconds.
timed() {
    local in=$1
    shift
    settle "$in"
    local t0 t1
    t0=$(now)
    "$@" >/dev/null
    t1=$(now)
    calc "$t1 - $t0"
}
min() { awk "BEGIN { print ($1 < $2) ? $1 : $2 }"; }

# conversion NAME INPUT OUT_FORMAT QEMU_OUT_OPTS FC_OUT_ARGS COMPRESSED_INPUT
# Each tool runs REPS times, the three interleaved, and its fastest run
# counts (what is left of the noise above: other guests on the host). (Outputs are compared with their format named: a
# fixed VHD probes as raw.)
worst=""
failed=0
conversion() {
    local name=$1 in=$2 fmt=$3 qopts=$4 fcargs=$5 compressed=$6
    local target=1.2
    [[ $compressed == yes ]] && target=2.0
    local out="$work/out" tq1="" tq2="" tf="" t r runs1="" runs2="" runsf=""
    local rss_file="$work/rss" rss_kib=0 verdict=ok qalloc=0
    local n=$reps
    for ((r = 0; r < n; r++)); do
        # shellcheck disable=SC2086 # options are word lists
        t=$(timed "$in" qemu-img convert -O "$fmt" $qopts "$in" "$out")
        if ((r == 0 && n > 2)) && lt 20 "$t"; then n=2; fi
        tq1=$(min "${tq1:-$t}" "$t")
        runs1+=" $t"
        if ((r == 0)); then
            qemu-img compare -q -F "$fmt" "$in" "$out" || { echo "$name: qemu-img's own output differs?" >&2; exit 3; }
            qalloc=$(alloc "$out")
        fi
        # shellcheck disable=SC2086
        t=$(timed "$in" qemu-img convert -m 16 -W -O "$fmt" $qopts "$in" "$out")
        tq2=$(min "${tq2:-$t}" "$t")
        runs2+=" $t"
        [[ -n $fcargs ]] || continue
        # shellcheck disable=SC2086
        t=$(timed "$in" /usr/bin/time -f %M -o "$rss_file" "$fc" image convert $fcargs "$in" "$out")
        tf=$(min "${tf:-$t}" "$t")
        runsf+=" $t"
        local kib; kib=$(tail -1 "$rss_file")
        ((kib > rss_kib)) && rss_kib=$kib
        if ! qemu-img compare -q -F "$fmt" "$in" "$out"; then
            verdict="WRONG OUTPUT"; failed=1
        fi
        local falloc; falloc=$(alloc "$out")
        # Sparse where qemu-img's is: no more than 5% (or 1 MiB) above it.
        if ((falloc > qalloc + qalloc / 20 + (1 << 20))); then
            verdict="NOT SPARSE ($falloc vs $qalloc bytes)"; failed=1
        fi
    done
    rm -f "$out"
    local best=$tq2
    if lt "$tq1" "$tq2"; then best=$tq1; fi
    if [[ -z $fcargs ]]; then
        printf '%-28s qemu-img %6.2fs  -m16 -W %6.2fs  fluidcloud   n/a   (not supported yet)  MISSED\n' \
            "$name" "$tq1" "$tq2"
        failed=1
        worst=0
        return
    fi
    if ((rss_kib > 256 * 1024)); then
        verdict="RSS ${rss_kib} KiB > 256 MiB"; failed=1
    fi
    local ratio; ratio=$(calc "$best / $tf")
    if [[ $verdict == ok ]] && lt "$ratio" "$target"; then
        verdict="MISSED (target ${target}x)"; failed=1
    fi
    [[ $verdict == ok || $verdict == MISSED* ]] || ratio=0
    printf '%-28s qemu-img %6.2fs  -m16 -W %6.2fs  fluidcloud %6.2fs  %5.2fx  rss %4d MiB  %s\n' \
        "$name" "$tq1" "$tq2" "$tf" "$ratio" $((rss_kib / 1024)) "$verdict"
    printf '%-28s every run (s): qemu-img%s | -m16 -W%s | fluidcloud%s\n' "" "$runs1" "$runs2" "$runsf"
    if [[ -z $worst ]] || lt "$ratio" "$worst"; then worst=$ratio; fi
}

# A reference for the conversions to raw: writing the output's 2 GiB of
# data into the page cache of a new file, with nothing else to do (one
# plain pwrite per MiB straight from a map of a cached file, as qemu-img
# writes). It shows how fast this machine's page cache is during the run;
# we beat it by preallocating each run first and, for decompressed data,
# by writing with O_DIRECT (docs/images.md, "Speed").
floor() {
    python3 - "$work/src.qcow2" "$work/out" <<'PY'
import mmap, os, sys, time
src, out = sys.argv[1], sys.argv[2]
fd = os.open(src, os.O_RDONLY)
size = os.fstat(fd).st_size
mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
mv = memoryview(mm)
o = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
t = time.monotonic()
for off in range(0, size, 1 << 20):
    os.pwrite(o, mv[off:off + (1 << 20)], off)
print(f"{time.monotonic() - t:.6f} {size}")
PY
}
if command -v python3 >/dev/null; then
    tfloor=""
    for ((r = 0; r < reps; r++)); do
        settle "$work/src.qcow2"
        read -r t bytes < <(floor)
        tfloor=$(min "${tfloor:-$t}" "$t")
    done
    rm -f "$work/out"
    printf 'page-cache write reference (plain pwrite): %.2fs for %d MiB (fastest of %d)\n' "$tfloor" $((bytes >> 20)) "$reps"
fi

echo "conversion                   fastest of $reps runs (qemu-img default, qemu-img -m 16 -W, ours), ours vs the faster qemu-img"
conversion "qcow2 -> raw" "$work/src.qcow2" raw "" "-O raw" no
conversion "raw -> qcow2" "$src" qcow2 "" "-O qcow2" no
conversion "zlib qcow2 -> raw" "$work/src-zlib.qcow2" raw "" "-O raw" yes
conversion "zstd qcow2 -> raw" "$work/src-zstd.qcow2" raw "" "-O raw" yes
conversion "qcow2 -> streamOptimized vmdk" "$work/src.qcow2" vmdk "-o subformat=streamOptimized" "-O vmdk" no
conversion "raw -> fixed vhd" "$src" vpc "-o subformat=fixed" "-O vhd" no

printf 'image-convert: %.2fx vs qemu-img (min over conversions)\n' "${worst:-0}"
exit $failed
