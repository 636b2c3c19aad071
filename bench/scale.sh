#!/usr/bin/env bash
# Scale-out benchmark: relocations shared by 1, 2 and 3 `fluidcloud serve`
# workers of one PostgreSQL database (scripts/postgres, a throw-away
# cluster with fsync on).
#
# Each round submits N relocations (default 1,000) of small services whose
# transfers are simulated by a plugin step that waits (bench/plugins/
# fluidcloud-migrator-wait), to an API-only node (--max-running 0), then
# starts the round's workers, each capped at M relocations at once, so the
# work is bound by latency, not by this machine's two cores. Throughput is
# measured from the journal: first run started to last run finished.
# It then measures the takeover: a worker running a relocation is killed
# with SIGKILL; the time until another starts it again, from the journal.
# And the PostgreSQL journal's step transitions per second, as
# bench/viaduct.sh does.
#
# The last line is
#   scale: X step transitions/s, takeover Y.Y s, 3 workers Z.ZZx of 1
# and the exit status is non-zero when the journal takes fewer than 5,000
# transitions/s, the takeover takes 2 leases or more, or 3 workers do less
# than 2.5 times the work of 1.
#
# SCALE_BENCH_RELOCATIONS (1000), SCALE_BENCH_WAIT_MS (300: each of the two
# waits of a relocation), SCALE_BENCH_MAX_RUNNING (4 per worker),
# SCALE_BENCH_LEASE (2 s) change the workload.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cargo build --release --quiet --bin fluidcloud
cargo build --release --quiet -p fluidcloud-viaduct --bin viaduct-harness

pg_dir="$root/target/tmp/postgres-bench"
work="$(mktemp -d)"
trap 'rm -rf "$work"; scripts/postgres stop "$pg_dir" >/dev/null 2>&1 || true' EXIT
scripts/postgres start "$pg_dir" >/dev/null

url=$(scripts/postgres createdb "$pg_dir" bench_scale_journal)
journal=$(target/release/viaduct-harness bench 10000 "$url#bench" 100)
rate=$(echo "$journal" | sed -nE 's/^journal: [0-9]+ step transitions, ([0-9]+) per second/\1/p')
echo "PostgreSQL journal: ${rate:-?} step transitions/s (10,000-step workflow)"

exec python3 - "$root" "$pg_dir" "$work" "${rate:-0}" <<'PY'
import json, os, re, signal, subprocess, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

root, pg_dir, work, rate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
N = int(os.environ.get("SCALE_BENCH_RELOCATIONS", "1000"))
WAIT = int(os.environ.get("SCALE_BENCH_WAIT_MS", "300"))
M = int(os.environ.get("SCALE_BENCH_MAX_RUNNING", "4"))
LEASE = float(os.environ.get("SCALE_BENCH_LEASE", "2"))
FC = os.path.join(root, "target/release/fluidcloud")
ENV = dict(os.environ, FLUIDCLOUD_PLUGIN_PATH=os.path.join(root, "bench/plugins"))
for var in ("FLUIDCLOUD_STATE_DIR", "FLUIDCLOUD_DATABASE", "FLUIDCLOUD_SERVER"):
    ENV.pop(var, None)


def sh(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def createdb(name):
    return sh(os.path.join(root, "scripts/postgres"), "createdb", pg_dir, name)


def sql(db, query):
    out = sh(os.path.join(root, "scripts/postgres"), "psql", pg_dir, "-d", db, "-AtXc", query)
    return [line.split("|") for line in out.splitlines() if line]


def services(dir, n, wait_ms):
    """n one-instance services svcK at dc-paris, each with two waits."""
    site = os.path.join(dir, "sites/dc-paris")
    for k in range(1, n + 1):
        name = f"svc{k}"
        with open(f"{site}/images/{name}.raw", "wb") as f:
            f.write(os.urandom(65536))
        with open(f"{site}/instances/{name}.toml", "w") as f:
            f.write(f'name = "{name}"\nservice = "{name}"\nstate = "running"\nvcpus = 1\n'
                    f'memory_mib = 256\nhostname = "{name}.paris.internal"\n'
                    f'addresses = ["10.{10 + k // 250}.{k % 250}.7"]\nboot_image = "{name}.raw"\n\n'
                    f'[format]\n"{name}.raw" = "raw"\n')
        with open(f"{site}/services/{name}.toml", "w") as f:
            f.write(f'name = "{name}"\n\n'
                    f'[[steps]]\nname = "transfer"\nmigrator = "wait"\n[steps.params]\nms = {wait_ms}\n\n'
                    f'[[steps]]\nname = "switch"\nmigrator = "wait"\nphase = "downtime"\n'
                    f'[steps.params]\nms = {wait_ms}\n')


def site(name, n, wait_ms):
    dir = os.path.join(work, name)
    sh(FC, "demo", "init", dir)
    services(dir, n, wait_ms)
    return os.path.join(dir, "fluidcloud.toml")


def serve(config, db_url, name, max_running):
    p = subprocess.Popen(
        [FC, "--config", config, "serve", "--plain-http", "--no-auth", "--listen", "127.0.0.1:0",
         "--database", db_url, "--lease", str(LEASE), "--max-running", str(max_running),
         "--worker-name", name],
        env=ENV, stdout=subprocess.PIPE, stderr=open(os.path.join(work, f"{name}.log"), "a"), text=True)
    line = p.stdout.readline()
    m = re.match(r"listening on (\S+)", line)
    if not m:
        sys.exit(f"bench/scale.sh: worker {name} did not start: {line!r}")
    p.url = m.group(1)
    return p


def http(url, method="GET", body=None):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, r.read().decode()


def submit(api, k):
    status, text = http(f"{api}/relocations", "POST",
                        {"from": "dc-paris", "to": "edge-nantes", "service": f"svc{k}"})
    if status != 202:
        sys.exit(f"bench/scale.sh: submitting svc{k}: {status} {text}")


def claim_p99(workers):
    buckets = {}
    for w in workers:
        for line in http(f"{w.url}/metrics")[1].splitlines():
            m = re.match(r'fluidcloud_claim_seconds_bucket\{le="([^"]+)"\} (\d+)', line)
            if m:
                buckets[m.group(1)] = buckets.get(m.group(1), 0) + int(m.group(2))
    total = buckets.get("+Inf", 0)
    for le, n in sorted(((float(k), v) for k, v in buckets.items()), key=lambda x: x[0]):
        if n >= 0.99 * total:
            return le
    return float("inf")


def stop(procs):
    for p in procs:
        p.kill()
        p.wait()


def round_of(k):
    config = site(f"r{k}", N, WAIT)
    db = f"bench_scale_{k}"
    url = createdb(db)
    api = serve(config, url, f"api{k}", 0)
    t = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: submit(api.url, i), range(1, N + 1)))
    submitted = time.monotonic() - t
    workers = [serve(config, url, f"w{k}-{i}", M) for i in range(1, k + 1)]
    deadline = time.monotonic() + 3600
    while int(sql(db, "SELECT count(*) FROM fluidcloud_relocations WHERE state = 'done'")[0][0]) < N:
        if time.monotonic() > deadline:
            sys.exit(f"bench/scale.sh: {k} workers did not finish in an hour")
        time.sleep(0.5)
    bad = sql(db, """SELECT r.id FROM fluidcloud_relocations r WHERE coalesce((SELECT e.body::json->>'outcome'
                     FROM viaduct_events e WHERE e.journal = r.id AND e.kind = 'run-finished'
                     ORDER BY e.seq DESC LIMIT 1), '') <> 'succeeded'""")
    if bad:
        sys.exit(f"bench/scale.sh: {len(bad)} relocations did not succeed, e.g. {bad[0][0]} (logs in {work})")
    first, last, steps = map(int, sql(db, """SELECT min(at_ms) FILTER (WHERE kind = 'run-started'),
        max(at_ms) FILTER (WHERE kind = 'run-finished'),
        count(*) FILTER (WHERE kind = 'transition') FROM viaduct_events""")[0])
    span = (last - first) / 1000
    p99 = claim_p99(workers)
    stop(workers + [api])
    per_min = N / span * 60
    print(f"{k} worker{'s' if k > 1 else ''}: {N} relocations in {span:.1f} s = {per_min:.0f}/min "
          f"({steps / span:.0f} step transitions/s), claim p99 <= {p99 * 1000:.0f} ms "
          f"(submitted in {submitted:.1f} s)", flush=True)
    return per_min


def takeover():
    config = site("takeover", 1, 60_000)
    db = "bench_scale_takeover"
    url = createdb(db)
    a = serve(config, url, "ta", M)
    body = {"from": "dc-paris", "to": "edge-nantes", "service": "svc1"}
    status, text = http(f"{a.url}/relocations", "POST", body)
    rid = json.loads(text)["id"]
    b = serve(config, url, "tb", M)
    while not sql(db, f"""SELECT 1 FROM viaduct_events WHERE journal = '{rid}' AND step = 'step:transfer'
                          AND body::json->>'to' = 'running'"""):
        time.sleep(0.01)
    owner = sql(db, f"SELECT owner FROM fluidcloud_relocations WHERE id = '{rid}'")[0][0]
    victim, other = (a, b) if owner == "ta" else (b, a)
    victim.send_signal(signal.SIGKILL)
    killed = time.time()
    victim.wait()
    while True:
        runs = sql(db, f"SELECT at_ms FROM viaduct_events WHERE journal = '{rid}' AND kind = 'run-started' ORDER BY seq")
        if len(runs) >= 2:
            break
        if time.time() - killed > 10 * LEASE + 30:
            sys.exit("bench/scale.sh: no worker took the relocation over")
        time.sleep(0.01)
    took = int(runs[1][0]) / 1000 - killed
    http(f"{other.url}/relocations/{rid}/cancel", "POST")
    stop([other])
    print(f"takeover: {took:.2f} s after SIGKILL (lease {LEASE:.1f} s)", flush=True)
    return took


print(f"workload: {N} relocations, two waits of {WAIT} ms each, {M} at once per worker, lease {LEASE:.1f} s",
      flush=True)
one = round_of(1)
two = round_of(2)
three = round_of(3)
took = takeover()
print(f"2 workers {two / one:.2f}x of 1")
ok = True
if rate < 5000:
    print(f"bench/scale.sh: the PostgreSQL journal took {rate} step transitions/s, under 5,000", file=sys.stderr)
    ok = False
if took >= 2 * LEASE:
    print(f"bench/scale.sh: the takeover took {took:.1f} s, not under 2 leases ({2 * LEASE:.1f} s)", file=sys.stderr)
    ok = False
if three / one < 2.5:
    print(f"bench/scale.sh: 3 workers did {three / one:.2f}x the work of 1, under 2.5x", file=sys.stderr)
    ok = False
print(f"scale: {rate} step transitions/s, takeover {took:.1f} s, 3 workers {three / one:.2f}x of 1")
sys.exit(0 if ok else 1)
PY
