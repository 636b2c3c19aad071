#!/usr/bin/env bash
# WAN benchmark: one disk moved from site A to site B over a shaped link,
# fluidcloud's agent-to-agent transfer against the tools one would use.
#
# The machines are network namespaces (scripts/netns up wanbench --rate
# RATE): the links of A and B are shaped with tbf at RATE both ways, orch's
# is not. The disk is a raw file of SIZE (default 4G) with 3/8 of it
# allocated (1.5 GiB at 4G) in 12 extents of SIZE/32, each somewhere in a
# slot of SIZE/16 (not aligned to 4 MiB chunks; 4 slots stay empty): half
# random bytes (incompressible), half log-like text (zstd -1 makes about
# 5x of it), holes between. It is built once per SIZE and cached in
# target/bench-wan/cache/, and hard-linked into A's
# directory (target/bench-wan/a/volumes/disk.raw). Every tool runs in
# the namespace of its site, with the other site's directories hidden
# (scripts/netns exec --hide): what reaches B crossed the link.
#
# Tools (each run starts with no target file in B; the source is read once
# into the page cache before each run, caches are never dropped):
#   rsync      rsync --sparse --inplace, client in B, daemon in A
#   rsync -z   the same with -z (rsync negotiates zstd when both ends have
#              it, as here)
#   qemu-nbd   qemu-img convert -O raw nbd://A/ in B, from
#              `qemu-nbd -r --persistent -f raw` in A (NBD block status:
#              holes do not cross the link)
#   fluidcloud `fluidcloud agent` in A and in B, `fluidcloud transfer
#              --from a:volume/disk.raw --to b:volume/disk.raw` from orch
#              (run_fluidcloud)
# Each time includes a `sync` of the target file (fluidcloud's transfer
# syncs what it writes; the peers do not). After every run the target is
# compared with the source (cmp): a wrong copy fails the bench. Runs are
# interleaved (each tool once, N times over); each tool's best counts.
#
# Printed: each run (time, bytes A's link sent, link use = those bytes /
# (time x RATE)); each tool's best; the wire floor (allocated bytes /
# RATE: a copy that sends every allocated byte uncompressed, at line rate).
# The last line is `wan: X.XXx vs best peer (PEER), link use Y %`, X =
# the best peer's time / fluidcloud's. Target: X >= 1.5; exits 1 when
# missed.
#
# Usage: bench/wan.sh [--rate RATE] [--runs N] [--size SIZE] [--peers-only]
#   --rate        the links' rate, tc syntax (default 1gbit)
#   --runs        runs of each tool (default 3)
#   --size        the disk's size, G or M (default 4G)
#   --peers-only  only the peers, no fluidcloud (no build, no target; the
#                 last line is `wan: peers only (...)`)
# Needs root (namespaces), rsync, qemu-nbd and qemu-img (qemu-utils): exits
# 3 and says to run scripts/setup when one is missing.
# (The tools' functions are called as "run_$t", cleanup by the trap.)
# shellcheck disable=SC2317
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

die() {
    echo "bench/wan: $*" >&2
    exit 1
}

unavailable() {
    echo "bench/wan: $*; run scripts/setup" >&2
    exit 3
}

rate=1gbit runs=3 size=4G peers_only=
while [ $# -gt 0 ]; do
    case "$1" in
    --rate | --runs | --size) [ -n "${2:-}" ] || die "$1 needs a value" ;;&
    --rate) rate=$2 && shift ;;
    --runs) runs=$2 && shift ;;
    --size) size=$2 && shift ;;
    --peers-only) peers_only=1 ;;
    *) die "unknown argument '$1' (usage: bench/wan.sh [--rate RATE] [--runs N] [--size SIZE] [--peers-only])" ;;
    esac
    shift
done
[[ $runs =~ ^[1-9][0-9]*$ ]] || die "--runs needs a positive number"
case "$size" in
*[0-9]G) size_bytes=$((${size%G} << 30)) ;;
*[0-9]M) size_bytes=$((${size%M} << 20)) ;;
*) die "--size needs a size in G or M (4G, 512M)" ;;
esac
[ "$size_bytes" -ge $((64 << 20)) ] || die "--size must be at least 64M"

# RATE in bytes per second (the units of tc that a link rate is given in).
rate_bytes=$(awk -v r="$rate" 'BEGIN {
    if (!match(r, /^[0-9]+(\.[0-9]+)?/)) exit 1
    n = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
    m["bit"] = 0.125; m["kbit"] = 125; m["mbit"] = 125e3; m["gbit"] = 125e6
    m["bps"] = 1; m["kbps"] = 1e3; m["mbps"] = 1e6; m["gbps"] = 1e9
    if (!(u in m)) exit 1
    printf "%.0f", n * m[u] }') || die "bad --rate '$rate' (kbit, mbit, gbit, bps, kbps, mbps, gbps)"

for t in rsync qemu-nbd qemu-img cmp awk flock; do
    command -v "$t" >/dev/null 2>&1 || unavailable "$t is not installed"
done
[ "$(id -u)" -eq 0 ] || { echo "bench/wan: needs root (network namespaces)" >&2; exit 3; }
scripts/netns check

work=$repo/target/bench-wan
mkdir -p "$work/cache"
exec 9>>"$work/.lock"
flock -n 9 || die "another bench/wan.sh is running ($work/.lock)"

# ---- the disk ------------------------------------------------------------------
mib=$((1 << 20))
# Log-like text, LEN bytes of it, different for every SEED (no dedup wins).
text() { # SEED LEN
    awk -v seed="$1" -v n="$2" 'BEGIN {
        srand(seed)
        split("GET GET GET POST PUT DELETE", m, " ")
        split("/v1/orders /v1/users /v1/cart /v1/search /healthz /v1/payments /static/app.js", p, " ")
        split("INFO INFO INFO INFO INFO INFO WARN ERROR DEBUG", lv, " ")
        split("api web worker db-proxy auth", svc, " ")
        split("200 200 200 200 200 304 404 500 201", st, " ")
        t = 1714990000 + seed * 86400; q = seed * 1000000; b = 0
        while (b < n) {
            t += rand() * 0.05; q++
            s = sprintf("%s.%03dZ %-5s %s-%d req=%08x user=u%04d %s %s/%d status=%s bytes=%d dur=%dms\n",
                strftime("%Y-%m-%dT%H:%M:%S", int(t), 1), int((t - int(t)) * 1000),
                lv[int(rand() * 9) + 1], svc[int(rand() * 5) + 1], int(rand() * 4), q,
                int(rand() * 500), m[int(rand() * 6) + 1], p[int(rand() * 7) + 1],
                int(rand() * 1000), st[int(rand() * 9) + 1], int(rand() * 64) * 512, int(rand() * 100))
            if (b + length(s) > n) s = substr(s, 1, n - b)
            printf "%s", s; b += length(s)
        }
    }'
}

# The cached disk of SIZE: disk-SIZE.raw, and disk-SIZE.done once complete,
# holding the layout's version (a new layout rebuilds the disk).
layout=1
disk=$work/cache/disk-$size.raw
if [ "$(cat "$disk.done" 2>/dev/null)" != "$layout" ] || [ ! -f "$disk" ]; then
    echo "bench/wan: building the $size disk (once, cached in $work/cache)..." >&2
    rm -f "$disk" "$disk.done"
    truncate -s "$size" "$disk.tmp"
    slot=$((size_bytes / 16 / mib)) extent=$((size_bytes / 32 / mib))
    for i in $(seq 0 15); do
        # Slots 3, 7, 11 and 15 stay holes; the others hold one extent,
        # 1..9 MiB into the slot, alternately random and text.
        [ $((i % 4)) -ne 3 ] || continue
        seek=$((i * slot + 1 + (i * 5) % 9))
        if [ $((i % 2)) -eq 0 ]; then
            head -c $((extent * mib)) /dev/urandom
        else
            text "$i" $((extent * mib))
        fi | dd of="$disk.tmp" bs=1M seek=$seek conv=notrunc iflag=fullblock status=none
    done
    sync "$disk.tmp"
    mv "$disk.tmp" "$disk"
    echo "$layout" >"$disk.done"
fi
allocated=$(($(stat -c %b "$disk") * 512))

# ---- the machines --------------------------------------------------------------
net=wanbench
port_rsync=8730 port_nbd=10809 port_agent=7443
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    scripts/netns down "$net" || true
    rm -rf "$work/b" "$work/orch" "$work/agent-a" "$work/agent-b"
}
trap cleanup EXIT

rm -rf "$work/a" "$work/b" "$work/orch"
for s in a b; do
    mkdir -p "$work/$s"/{instances,images,volumes,buckets,config,services}
done
mkdir -p "$work/orch"
ln "$disk" "$work/a/volumes/disk.raw"
src=$work/a/volumes/disk.raw
dst=$work/b/volumes/disk.raw

scripts/netns down "$net"
scripts/netns up "$net" --rate "$rate"
a_ip=$(scripts/netns addr "$net" a)
b_ip=$(scripts/netns addr "$net" b)
orch_ip=$(scripts/netns addr "$net" orch)

# Waits until PORT at IP accepts connections, as seen from namespace SITE.
wait_port() { # SITE IP PORT WHAT PID
    for _ in $(seq 100); do
        kill -0 "$5" 2>/dev/null || die "$4 exited (see $work/*.log)"
        if scripts/netns exec "$net" "$1" -- bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "$4 does not listen on $2:$3"
}

cat >"$work/rsyncd.conf" <<EOF
use chroot = no
log file = $work/rsyncd.log
[vol]
path = $work/a/volumes
read only = yes
uid = root
gid = root
EOF
rm -f "$work/rsyncd.log"
scripts/netns exec "$net" a --hide "$work/b" -- \
    rsync --daemon --no-detach --config="$work/rsyncd.conf" --address="$a_ip" --port=$port_rsync \
    >"$work/rsyncd.out.log" 2>&1 9>&- &
pids+=($!)
disown
wait_port b "$a_ip" $port_rsync "the rsync daemon" $!

scripts/netns exec "$net" a --hide "$work/b" -- \
    qemu-nbd -r -x '' --persistent --shared=4 -f raw -b "$a_ip" -p $port_nbd "$src" \
    >"$work/qemu-nbd.log" 2>&1 9>&- &
pids+=($!)
disown
wait_port b "$a_ip" $port_nbd "qemu-nbd" $!

# ---- the tools: each writes $dst, from B's (or orch's) namespace -----------------
in_b() { scripts/netns exec "$net" b --hide "$work/a" --hide "$work/cache" -- "$@"; }

run_rsync() { in_b rsync --sparse --inplace "rsync://$a_ip:$port_rsync/vol/disk.raw" "$dst"; }
run_rsync_z() { in_b rsync -z --sparse --inplace "rsync://$a_ip:$port_rsync/vol/disk.raw" "$dst"; }
run_nbd() { in_b qemu-img convert -f raw -O raw "nbd://$a_ip:$port_nbd/" "$dst"; }

# fluidcloud: an agent per site, each in its namespace with the other
# site's directories hidden, and the transfer driven from orch, which sees
# neither site's files.
fc_token=
start_agents() {
    [ -z "$fc_token" ] || return 0
    (cd "$repo" && cargo build --release --quiet --bin fluidcloud)
    fc=$repo/target/release/fluidcloud
    fc_token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export FLUIDCLOUD_AGENT_TOKEN=$fc_token
    local s ip other
    for s in a b; do
        local hide=(--hide "$work/orch")
        if [ "$s" = a ]; then
            ip=$a_ip other=b
        else
            ip=$b_ip other=a
            hide+=(--hide "$work/cache")
        fi
        cat >"$work/$s/sites.toml" <<EOF
[sites.$s]
kind = "local"
path = "."
jurisdiction = "EU/FR"
image_formats = ["raw"]
location = { region = "lab", latitude = 48.1, longitude = -1.7 }
EOF
        rm -rf "$work/agent-$s"
        mkdir -p "$work/agent-$s"
        scripts/netns exec "$net" "$s" --hide "$work/$other" --hide "$work/agent-$other" "${hide[@]}" -- \
            "$fc" agent --config "$work/$s/sites.toml" --site "$s" --listen "$ip:$port_agent" \
            --state-dir "$work/agent-$s" >"$work/agent-$s.log" 2>&1 9>&- &
        pids+=($!)
        disown
        wait_port orch "$ip" "$port_agent" "the agent of $s" $!
    done
    local fp_a fp_b
    fp_a=$(sed -n 's/^fingerprint.*\(sha256:[0-9a-fA-F]*\).*/\1/p' "$work/agent-a.log" | head -n1)
    fp_b=$(sed -n 's/^fingerprint.*\(sha256:[0-9a-fA-F]*\).*/\1/p' "$work/agent-b.log" | head -n1)
    if [ -z "$fp_a" ] || [ -z "$fp_b" ]; then
        die "an agent printed no fingerprint (see $work/agent-*.log)"
    fi
    # TODO(run_fluidcloud): the orchestrator's sites file. The keys of an
    # agent site are not settled yet: written here as kind = "agent",
    # endpoint, fingerprint and the token's environment variable.
    cat >"$work/orch/sites.toml" <<EOF
[sites.a]
kind = "agent"
endpoint = "$a_ip:$port_agent"
fingerprint = "$fp_a"
token_env = "FLUIDCLOUD_AGENT_TOKEN"
jurisdiction = "EU/FR"
location = { region = "lab", latitude = 48.1, longitude = -1.7 }

[sites.b]
kind = "agent"
endpoint = "$b_ip:$port_agent"
fingerprint = "$fp_b"
token_env = "FLUIDCLOUD_AGENT_TOKEN"
jurisdiction = "EU/FR"
location = { region = "lab", latitude = 48.1, longitude = -1.7 }
EOF
}

run_fluidcloud() {
    # TODO(run_fluidcloud): remove this `if` once `fluidcloud agent`
    # and `fluidcloud transfer` exist; check the orch sites file in
    # start_agents, and that nothing in --state-dir lets a run reuse what
    # an earlier one sent (the loop removes $dst before each run).
    if true; then
        echo "bench/wan: run_fluidcloud: not implemented (bench/wan.sh --peers-only runs the peers)" >&2
        return 2
    fi
    start_agents
    scripts/netns exec "$net" orch --hide "$work/a" --hide "$work/b" --hide "$work/cache" -- \
        "$fc" transfer --sites "$work/orch/sites.toml" --from a:volume/disk.raw --to b:volume/disk.raw --json \
        >"$work/transfer.json"
}

# ---- the runs ----------------------------------------------------------------------
now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $* }"; }
tx_a() { scripts/netns counters "$net" a | cut -d' ' -f2; }

tools=(rsync rsync_z nbd)
[ -n "$peers_only" ] || tools+=(fluidcloud)
declare -A label=([rsync]="rsync" [rsync_z]="rsync -z" [nbd]="qemu-nbd" [fluidcloud]="fluidcloud")
declare -A best wire

echo "wan: $size disk, $((allocated / mib)) MiB allocated; link $rate (a=$a_ip b=$b_ip orch=$orch_ip); $runs run(s) of ${#tools[@]} tools" >&2
for run in $(seq "$runs"); do
    for t in "${tools[@]}"; do
        rm -f "$dst"
        sync
        cat "$src" >/dev/null
        tx0=$(tx_a)
        t0=$(now)
        "run_$t" || die "${label[$t]} failed (run $run)"
        ts=$(now)
        sync "$dst"
        t1=$(now)
        tx1=$(tx_a)
        cmp -s "$src" "$dst" || die "${label[$t]}: the copy in B differs from the source (run $run)"
        secs=$(calc "$t1 - $t0")
        sent=$((tx1 - tx0))
        printf 'run %d  %-10s %7.2f s (sync %.2f s)  %7.1f MiB sent by A  link use %3.0f %%  (%d MiB allocated in B)\n' \
            "$run" "${label[$t]}" "$secs" "$(calc "$t1 - $ts")" "$(calc "$sent / $mib")" \
            "$(calc "100 * $sent / ($secs * $rate_bytes)")" $(($(stat -c %b "$dst") * 512 / mib))
        if [ -z "${best[$t]:-}" ] || awk -v a="$secs" -v b="${best[$t]}" 'BEGIN { exit !(a < b) }'; then
            best[$t]=$secs
            wire[$t]=$sent
        fi
    done
done
rm -f "$dst"

floor=$(calc "$allocated / $rate_bytes")
echo
printf 'best of %d, %s disk (%d MiB allocated), link %s:\n' "$runs" "$size" $((allocated / mib)) "$rate"
for t in "${tools[@]}"; do
    printf '  %-10s %7.2f s  (%.2fx the floor, %.0f MiB sent, link use %.0f %%)\n' "${label[$t]}" "${best[$t]}" \
        "$(calc "${best[$t]} / $floor")" "$(calc "${wire[$t]} / $mib")" "$(calc "100 * ${wire[$t]} / (${best[$t]} * $rate_bytes)")"
done
printf '  wire floor %7.2f s  (allocated bytes / link rate)\n' "$floor"

peer=
for t in rsync rsync_z nbd; do
    if [ -z "$peer" ] || awk -v a="${best[$t]}" -v b="${best[$peer]}" 'BEGIN { exit !(a < b) }'; then peer=$t; fi
done
if [ -n "$peers_only" ]; then
    printf 'wan: peers only (best %s %.2f s; rsync %.2f s, rsync -z %.2f s, qemu-nbd %.2f s; floor %.2f s)\n' \
        "${label[$peer]}" "${best[$peer]}" "${best[rsync]}" "${best[rsync_z]}" "${best[nbd]}" "$floor"
    exit 0
fi
ratio=$(calc "${best[$peer]} / ${best[fluidcloud]}")
use=$(calc "100 * ${wire[fluidcloud]} / (${best[fluidcloud]} * $rate_bytes)")
failed=0
if awk -v r="$ratio" 'BEGIN { exit !(r >= 1.5) }'; then
    echo "target      fluidcloud >= 1.5x the best peer: ok"
else
    echo "target      fluidcloud >= 1.5x the best peer: MISSED"
    failed=1
fi
printf 'wan: %.2fx vs best peer (%s), link use %.0f %%\n' "$ratio" "${label[$peer]}" "$use"
exit $failed
