//! Several `fluidcloud serve` workers sharing one PostgreSQL database: the
//! real binary, real sockets, Debian's PostgreSQL started by
//! `scripts/postgres`. What ran is asserted from the journal in the
//! database, read here with a client of our own.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{chunks_written, fresh_demo, random_file, same_bytes};
use fluidcloud_testkit::Postgres;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;

/// A `serve` worker of a database.
struct Worker {
    child: Child,
    url: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    fn start(config: &str, database: &str, name: &str, lease: &str, log: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
            .args(["--config", config, "serve", "--plain-http", "--no-auth"])
            .args(["--listen", "127.0.0.1:0", "--database", database])
            .args(["--lease", lease, "--worker-name", name])
            .env_remove("FLUIDCLOUD_STATE_DIR")
            .env_remove("FLUIDCLOUD_DATABASE")
            .env("RUST_LOG", "info")
            // The `wait` migrator: a step that stands for a long transfer.
            .env(
                "FLUIDCLOUD_PLUGIN_PATH",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/plugins"),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?} (log: {})", log.display()))
            .to_owned();
        Worker { child, url }
    }

    /// SIGTERM, as a service manager stops it; waits for it to exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        self.child.wait().unwrap()
    }

    /// SIGKILL, as a crash or a lost machine stops it.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Workers `w1`… of `database`, logging into `log`.
fn workers(config: &str, database: &str, n: usize, lease: &str, log: &Path) -> Vec<Worker> {
    (1..=n)
        .map(|k| {
            Worker::start(
                config,
                database,
                &format!("w{k}"),
                lease,
                &log.join(format!("w{k}.log")),
            )
        })
        .collect()
}

/// Relocates `svc1`…`svcN` to edge-nantes, each submitted to the next
/// worker in turn; their ids.
async fn submit_round_robin(workers: &[Worker], n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for k in 1..=n {
        let body = json!({"from": "dc-paris", "to": "edge-nantes", "service": format!("svc{k}")});
        let (status, v) = call(
            &workers[k % workers.len()].url,
            "POST",
            "/relocations",
            Some(body),
        )
        .await;
        assert_eq!(status, 202, "{v:#}");
        assert!(
            matches!(v["status"].as_str(), Some("queued" | "running")),
            "{v:#}"
        );
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ids
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn call(url: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method.parse().unwrap(), format!("{url}{path}"));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Every event of `/relocations/{id}/events` to the stream's end: names.
async fn event_names(url: &str, id: &str) -> Vec<(String, Value)> {
    let mut resp = reqwest::Client::new()
        .get(format!("{url}/relocations/{id}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut buf, mut out) = (String::new(), Vec::new());
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), resp.chunk())
        .await
        .expect("the event stream did not end in 5 minutes")
        .unwrap()
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let name = block
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_owned();
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            if !data.is_empty() {
                out.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    out
}

/// Adds `n` one-instance services `svc1`… to site dc-paris, each with a
/// small raw boot image.
fn small_services(dir: &Path, n: usize) {
    let site = dir.join("sites/dc-paris");
    for k in 1..=n {
        let name = format!("svc{k}");
        random_file(&site.join(format!("images/{name}.raw")), MIB);
        std::fs::write(
            site.join(format!("instances/{name}.toml")),
            format!(
                "name = \"{name}\"\nservice = \"{name}\"\nstate = \"running\"\nvcpus = 1\nmemory_mib = 256\n\
                 hostname = \"{name}.paris.internal\"\naddresses = [\"10.10.0.{}\"]\nboot_image = \"{name}.raw\"\n\n\
                 [format]\n\"{name}.raw\" = \"raw\"\n",
                100 + k
            ),
        )
        .unwrap();
    }
}

fn db(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap()
}

/// (journal, step) → how many times it entered `to`.
fn transitions(c: &mut postgres::Client, to: &str) -> BTreeMap<(String, String), i64> {
    c.query(
        "SELECT journal, step, count(*) FROM viaduct_events
         WHERE kind = 'transition' AND body::json->>'to' = $1 GROUP BY journal, step",
        &[&to],
    )
    .unwrap()
    .iter()
    .map(|r| ((r.get(0), r.get(1)), r.get(2)))
    .collect()
}

/// Relocation id → its journal's final record's outcome, if it has one.
fn outcomes(c: &mut postgres::Client) -> BTreeMap<String, Option<String>> {
    c.query(
        "SELECT r.id, (SELECT e.body::json->>'outcome' FROM viaduct_events e
                       WHERE e.journal = r.id ORDER BY e.seq DESC LIMIT 1)
         FROM fluidcloud_relocations r",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Polls worker `url` until every relocation is `succeeded`; panics on a
/// failed one or after `limit`.
async fn all_succeed(url: &str, ids: &[String], limit: Duration) {
    let start = Instant::now();
    loop {
        let (status, list) = call(url, "GET", "/relocations", None).await;
        if status != 200 {
            // The database may be restarting (a test does that).
            assert!(start.elapsed() < limit, "GET /relocations: {status} {list}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let states: BTreeMap<String, String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["id"].as_str().unwrap().to_owned(),
                    v["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let left: Vec<_> = ids
            .iter()
            .filter(|id| states.get(*id).map(String::as_str) != Some("succeeded"))
            .collect();
        if left.is_empty() {
            return;
        }
        for id in &left {
            let s = states.get(*id).map_or("missing", String::as_str);
            assert!(
                matches!(s, "queued" | "running" | "planned" | "interrupted"),
                "relocation {id} is {s}"
            );
        }
        assert!(
            start.elapsed() < limit,
            "not done after {limit:?}: {left:?} of {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// Where a test's workers log: kept after the run, for reading.
fn logs(dir: &Path) -> PathBuf {
    let name = dir.file_name().unwrap().to_string_lossy();
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("scale-logs")
        .join(&*name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn three_workers_run_fifty_relocations_submitted_to_any_of_them_each_exactly_once() {
    let (dir, config) = fresh_demo("scale-fifty");
    small_services(&dir, 50);
    let database = Postgres::shared().database("scale_fifty");
    let log = logs(&dir);
    let workers = workers(&config, &database, 3, "5", &log);
    let ids = rt().block_on(async {
        let ids = submit_round_robin(&workers, 50).await;
        // Every worker streams the last one's progress, whichever runs it.
        let last = ids.last().unwrap().clone();
        let handles: Vec<_> = workers
            .iter()
            .map(|w| {
                let (url, id) = (w.url.clone(), last.clone());
                tokio::spawn(async move { event_names(&url, &id).await })
            })
            .collect();
        let mut streams = Vec::new();
        for h in handles {
            streams.push(h.await.unwrap());
        }
        for (w, events) in workers.iter().zip(&streams) {
            let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names.last(), Some(&"end"), "{}: {names:?}", w.url);
            assert_eq!(
                events.last().unwrap().1["status"],
                "succeeded",
                "{}: {names:?}",
                w.url
            );
        }
        all_succeed(&workers[0].url, &ids, Duration::from_secs(600)).await;
        ids
    });
    // Each ran exactly once: one claim, one run, every step entered
    // `running` once and `succeeded` once.
    let mut c = db(&database);
    let claims: Vec<(String, i32, i32)> = c
        .query(
            "SELECT id, claims, takeovers FROM fluidcloud_relocations WHERE state = 'done'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(claims.len(), 50, "{claims:?}");
    assert!(
        claims.iter().all(|(_, n, t)| *n == 1 && *t == 0),
        "{claims:?}"
    );
    let runs: Vec<i64> = c
        .query(
            "SELECT count(*) FROM viaduct_events WHERE kind = 'run-started' GROUP BY journal",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(runs, vec![1; 50]);
    let started = transitions(&mut c, "running");
    let succeeded = transitions(&mut c, "succeeded");
    assert!(started.len() >= 50 * 5, "{} steps", started.len());
    assert_eq!(
        started.keys().collect::<Vec<_>>(),
        succeeded.keys().collect::<Vec<_>>()
    );
    assert!(
        started.values().chain(succeeded.values()).all(|n| *n == 1),
        "{started:?}"
    );
    for (id, outcome) in outcomes(&mut c) {
        assert_eq!(outcome.as_deref(), Some("succeeded"), "{id}");
    }
    // The workers' own counts of their claims add up, and the work spread.
    let per_worker: Vec<u64> = rt().block_on(async {
        let mut out = Vec::new();
        for w in &workers {
            let (status, text) = call(&w.url, "GET", "/metrics", None).await;
            assert_eq!(status, 200);
            let text = text.as_str().unwrap().to_owned();
            assert_eq!(metric(&text, "fluidcloud_queue_depth"), 0);
            assert_eq!(metric(&text, "fluidcloud_lease_takeovers_total"), 0);
            assert_eq!(metric(&text, "fluidcloud_worker_steps_running"), 0);
            assert!(
                metric(&text, "fluidcloud_step_seconds_count")
                    >= metric(&text, "fluidcloud_worker_claims_total")
            );
            out.push(metric(&text, "fluidcloud_worker_claims_total"));
        }
        out
    });
    assert_eq!(per_worker.iter().sum::<u64>(), 50, "{per_worker:?}");
    assert!(
        per_worker.iter().filter(|n| **n > 0).count() >= 2,
        "{per_worker:?}"
    );
    // And the data moved: every instance runs at the target, from its image.
    for k in 1..=50 {
        let name = format!("svc{k}");
        same_bytes(
            &dir.join(format!("sites/dc-paris/images/{name}.raw")),
            &dir.join(format!("sites/edge-nantes/images/{name}.raw")),
        );
        assert_eq!(
            common::instance_state(&dir, "edge-nantes", &name),
            "running"
        );
        assert_eq!(common::instance_state(&dir, "dc-paris", &name), "stopped");
    }
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 50);
}

fn unix_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[test]
fn a_worker_killed_mid_copy_is_taken_over_and_no_succeeded_step_runs_again() {
    const VOLUME: u64 = 1536 * MIB;
    const LEASE: f64 = 2.0;
    let (dir, config) = fresh_demo("scale-takeover");
    let src = dir.join("sites/dc-paris/volumes/db-data.raw");
    random_file(&src, VOLUME);
    let part = dir.join("sites/edge-nantes/volumes/.db-data.raw.fcpart");
    let database = Postgres::shared().database("scale_takeover");
    let log = logs(&dir);
    let mut a = Worker::start(&config, &database, "a", "2", &log.join("a.log"));
    let rt = rt();
    let id = rt.block_on(async {
        let body = json!({"from": "dc-paris", "to": "edge-nantes", "service": "shop"});
        let (status, v) = call(&a.url, "POST", "/relocations", Some(body)).await;
        assert_eq!(status, 202, "{v:#}");
        v["id"].as_str().unwrap().to_owned()
    });
    // A copies; B joins and waits (A's lease is live); A dies mid-copy.
    let start = Instant::now();
    while chunks_written(&part) < VOLUME / CHUNK / 5 {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let b = Worker::start(&config, &database, "b", "2", &log.join("b.log"));
    a.kill();
    let killed_ms = unix_ms();
    let before = chunks_written(&part);
    assert!(before < VOLUME / CHUNK, "the copy had finished");
    rt.block_on(all_succeed(
        &b.url,
        std::slice::from_ref(&id),
        Duration::from_secs(300),
    ));
    same_bytes(&src, &dir.join("sites/edge-nantes/volumes/db-data.raw"));

    let mut c = db(&database);
    let runs: Vec<(i64, i64)> = c
        .query(
            "SELECT seq, at_ms FROM viaduct_events WHERE journal = $1 AND kind = 'run-started' ORDER BY seq",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let (second_seq, second_at) = runs[1];
    // B took over within two leases of the kill (the lease, then its wake).
    let took = (second_at - killed_ms) as f64 / 1000.0;
    assert!(took < 2.0 * LEASE + 1.0, "takeover took {took:.1} s");
    // No step that had succeeded before the kill ran again.
    let done_before: Vec<String> = c
        .query(
            "SELECT step FROM viaduct_events WHERE journal = $1 AND seq < $2
             AND kind = 'transition' AND body::json->>'to' = 'succeeded'",
            &[&id, &second_seq],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        !done_before.is_empty(),
        "nothing had finished before the kill"
    );
    for step in &done_before {
        let again: i64 = c
            .query_one(
                "SELECT count(*) FROM viaduct_events WHERE journal = $1 AND seq > $2 AND step = $3",
                &[&id, &second_seq, step],
            )
            .unwrap()
            .get(0);
        assert_eq!(again, 0, "step {step} ran again after the takeover");
    }
    let (takeovers,): (i32,) = c
        .query_one(
            "SELECT takeovers FROM fluidcloud_relocations WHERE id = $1",
            &[&id],
        )
        .map(|r| (r.get(0),))
        .unwrap();
    assert_eq!(takeovers, 1);
    // The copy resumed: it re-sent at most the chunks in flight (one per
    // copying stream) when A died.
    let rep: Value = rt
        .block_on(call(&b.url, "GET", &format!("/relocations/{id}"), None))
        .1;
    let pre = rep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "precopy:db-data.raw")
        .unwrap();
    assert_eq!(pre["attempts"], 2, "{pre:#}");
    let written = pre["bytes_written"].as_u64().unwrap();
    let left = VOLUME - before * CHUNK;
    assert!(
        written <= left + 8 * CHUNK,
        "the new worker wrote {written} bytes; only {left} were left"
    );
    let metrics = rt.block_on(call(&b.url, "GET", "/metrics", None)).1;
    assert_eq!(
        metric(
            metrics.as_str().unwrap(),
            "fluidcloud_worker_takeovers_total"
        ),
        1
    );
}

#[test]
fn postgres_restarted_mid_run_loses_and_duplicates_no_relocation() {
    let (dir, config) = fresh_demo("scale-pg-restart");
    small_services(&dir, 12);
    let pg = Postgres::private("restart");
    let database = pg.database("scale_restart");
    let log = logs(&dir);
    let workers = workers(&config, &database, 2, "3", &log);
    let rt = rt();
    let ids = rt.block_on(submit_round_robin(&workers, 12));
    // Restart while relocations run (claimed, journals open).
    let running = |c: &mut postgres::Client, state: &str| -> i64 {
        c.query_one(
            "SELECT count(*) FROM fluidcloud_relocations WHERE state = $1",
            &[&state],
        )
        .unwrap()
        .get(0)
    };
    let mut c = db(&database);
    let start = Instant::now();
    while running(&mut c, "running") == 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "nothing started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let open = running(&mut c, "running") + running(&mut c, "queued");
    assert!(
        open > 1,
        "only {open} relocations were left to run at the restart"
    );
    drop(c);
    pg.restart();
    rt.block_on(all_succeed(&workers[1].url, &ids, Duration::from_secs(300)));
    let mut c = db(&database);
    let outcomes = outcomes(&mut c);
    assert_eq!(outcomes.len(), 12, "{outcomes:?}");
    assert!(
        outcomes.values().all(|o| o.as_deref() == Some("succeeded")),
        "{outcomes:?}"
    );
    let succeeded = transitions(&mut c, "succeeded");
    assert!(succeeded.values().all(|n| *n == 1), "{succeeded:?}");
    let per_journal: BTreeMap<&String, usize> =
        succeeded.keys().fold(BTreeMap::new(), |mut m, (j, _)| {
            *m.entry(j).or_default() += 1;
            m
        });
    assert_eq!(per_journal.len(), 12);
    for k in 1..=12 {
        assert_eq!(
            common::instance_state(&dir, "edge-nantes", &format!("svc{k}")),
            "running"
        );
    }
}

#[test]
fn two_workers_accepting_the_same_service_at_once_run_it_once() {
    let (dir, config) = fresh_demo("scale-same-service");
    let database = Postgres::shared().database("scale_same");
    let log = logs(&dir);
    let a = Worker::start(&config, &database, "a", "5", &log.join("a.log"));
    let b = Worker::start(&config, &database, "b", "5", &log.join("b.log"));
    let body = json!({"from": "dc-paris", "to": "edge-nantes", "service": "intranet"});
    let answers = rt().block_on(async {
        let (x, y) = tokio::join!(
            call(&a.url, "POST", "/relocations", Some(body.clone())),
            call(&b.url, "POST", "/relocations", Some(body.clone())),
        );
        [x, y]
    });
    let mut codes: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    codes.sort_unstable();
    assert_eq!(codes, [202, 409], "{answers:#?}");
    let refused = &answers.iter().find(|(s, _)| *s == 409).unwrap().1;
    assert!(refused.to_string().contains("intranet"), "{refused}");
    let mut c = db(&database);
    let rows: i64 = c
        .query_one(
            "SELECT count(*) FROM fluidcloud_relocations WHERE service = 'intranet'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    let id = answers.iter().find(|(s, _)| *s == 202).unwrap().1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    rt().block_on(all_succeed(
        &a.url,
        std::slice::from_ref(&id),
        Duration::from_secs(120),
    ));

    // The CLI reads the same database; it runs nothing behind the workers.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
            .args(["--config", &config, "--json"])
            .args(args)
            .env("FLUIDCLOUD_DATABASE", &database)
            .env_remove("FLUIDCLOUD_SERVER")
            .env_remove("FLUIDCLOUD_STATE_DIR")
            .output()
            .unwrap()
    };
    let list: Value = serde_json::from_str(&common::ok(&cli(&["status"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list:#}");
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "succeeded");
    let rep: Value = serde_json::from_str(&common::ok(&cli(&["report", &id]))).unwrap();
    assert_eq!(rep["status"], "succeeded");
    let refused = common::fails(
        &cli(&[
            "relocate",
            "--from",
            "edge-nantes",
            "--service",
            "intranet",
            "--to",
            "dc-paris",
            "--yes",
        ]),
        2,
    );
    assert!(
        refused.contains("--server") && refused.contains("database"),
        "{refused}"
    );
}

/// Each relocation's run as the journal times it: (first `run-started`,
/// last `run-finished`), in ms.
fn run_intervals(c: &mut postgres::Client) -> BTreeMap<String, (i64, i64)> {
    c.query(
        "SELECT journal, min(at_ms) FILTER (WHERE kind = 'run-started'),
                max(at_ms) FILTER (WHERE kind = 'run-finished')
         FROM viaduct_events GROUP BY journal",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

/// The most intervals open at one moment.
fn most_at_once(intervals: impl Iterator<Item = (i64, i64)>) -> usize {
    let mut edges: Vec<(i64, i32)> = intervals.flat_map(|(a, b)| [(a, 1), (b, -1)]).collect();
    // At equal times an end comes before a start: back to back is not overlap.
    edges.sort_unstable();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    usize::try_from(most).unwrap()
}

fn with_limits(config: &str, limits: &str) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!("\n[limits]\n{limits}\n"));
    std::fs::write(config, text).unwrap();
}

#[test]
fn a_site_limit_holds_across_three_workers() {
    let (dir, config) = fresh_demo("scale-limits");
    small_services(&dir, 12);
    with_limits(&config, "sites = { edge-nantes = 2 }");
    let database = Postgres::shared().database("scale_limits");
    let log = logs(&dir);
    let workers = workers(&config, &database, 3, "5", &log);
    let rt = rt();
    let ids = rt.block_on(submit_round_robin(&workers, 12));
    rt.block_on(all_succeed(&workers[0].url, &ids, Duration::from_secs(300)));
    let mut c = db(&database);
    let intervals = run_intervals(&mut c);
    assert_eq!(intervals.len(), 12);
    // Never more than two at once, and the two slots were used.
    assert_eq!(
        most_at_once(intervals.values().copied()),
        2,
        "{intervals:?}"
    );
    let held: i64 = c
        .query_one(
            "SELECT count(*) FROM fluidcloud_slots WHERE holder IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, 0, "slots left held after every relocation ended");
    let text = rt
        .block_on(call(&workers[2].url, "GET", "/metrics", None))
        .1;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("fluidcloud_limit{scope=\"site:edge-nantes\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("fluidcloud_limit_used{scope=\"site:edge-nantes\"} 0\n"),
        "{text}"
    );
}

#[test]
fn tenants_take_turns_when_relocations_wait() {
    let (dir, config) = fresh_demo("scale-fair");
    small_services(&dir, 6);
    with_limits(&config, "running = 1");
    let database = Postgres::shared().database("scale_fair");
    let log = logs(&dir);
    let w = Worker::start(&config, &database, "w", "5", &log.join("w.log"));
    // Hold the one global slot while everything is submitted, so that the
    // order is the queue's, not the order of arrival.
    let mut c = db(&database);
    let held = c
        .execute(
            "UPDATE fluidcloud_slots SET holder = 'test' WHERE scope = 'global'",
            &[],
        )
        .unwrap();
    assert_eq!(held, 1, "the limit made no slot");
    let rt = rt();
    let ids = rt.block_on(async {
        let body = json!({"from": "dc-paris", "to": "edge-nantes", "service": "svc1", "tenant": "../a"});
        let (status, v) = call(&w.url, "POST", "/relocations", Some(body)).await;
        assert_eq!(status, 422, "{v:#}");
        assert_eq!(v["errors"][0]["pointer"], "/tenant", "{v:#}");
        let mut ids = Vec::new();
        for (k, tenant) in [(1, "a"), (2, "a"), (3, "a"), (4, "a"), (5, "b"), (6, "b")] {
            let body = json!({"from": "dc-paris", "to": "edge-nantes", "service": format!("svc{k}"), "tenant": tenant});
            let (status, v) = call(&w.url, "POST", "/relocations", Some(body)).await;
            assert_eq!(status, 202, "{v:#}");
            assert_eq!(v["status"], "queued", "{v:#}");
            ids.push(v["id"].as_str().unwrap().to_owned());
        }
        ids
    });
    c.batch_execute(
        "UPDATE fluidcloud_slots SET holder = NULL WHERE holder = 'test'; NOTIFY fluidcloud_queue",
    )
    .unwrap();
    rt.block_on(all_succeed(&w.url, &ids, Duration::from_secs(300)));
    let intervals = run_intervals(&mut c);
    assert_eq!(
        most_at_once(intervals.values().copied()),
        1,
        "{intervals:?}"
    );
    let mut order: Vec<(i64, String)> = intervals
        .iter()
        .map(|(id, (start, _))| (*start, id.split('-').next().unwrap().to_owned()))
        .collect();
    order.sort();
    let order: Vec<&str> = order.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(order, ["svc1", "svc5", "svc2", "svc6", "svc3", "svc4"]);
}

#[test]
fn a_worker_stopped_with_sigterm_hands_its_relocation_to_another_at_once() {
    let (dir, config) = fresh_demo("scale-sigterm");
    // svc1's step waits 4 s: the run is mid-step when asked to stop.
    slow_service(&dir, 4000);
    let database = Postgres::shared().database("scale_sigterm");
    let log = logs(&dir);
    // A lease far longer than the test: only a hand-back explains a quick
    // continuation elsewhere.
    let (mut a, b, id, mut c) = mid_step(&config, &database, "120", &log);
    let rt = rt();
    let status = a.terminate();
    assert!(status.success(), "worker a exited with {status}");
    let stopped = Instant::now();
    rt.block_on(all_succeed(
        &b.url,
        std::slice::from_ref(&id),
        Duration::from_secs(60),
    ));
    assert!(
        stopped.elapsed() < Duration::from_secs(30),
        "b continued only after {:?}",
        stopped.elapsed()
    );
    let runs: Vec<String> = c
        .query(
            "SELECT coalesce(body::json->>'outcome', kind) FROM viaduct_events
             WHERE journal = $1 AND kind IN ('run-started', 'run-finished') ORDER BY seq",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        runs,
        ["run-started", "cancelled", "run-started", "succeeded"]
    );
    let (owner, claims): (Option<String>, i32) = c
        .query_one(
            "SELECT owner, claims FROM fluidcloud_relocations WHERE id = $1",
            &[&id],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((owner, claims), (None, 2));
}

/// One service, `svc1`, whose relocation carries a step `step:transfer`
/// that waits `ms` (the `wait` plugin).
fn slow_service(dir: &Path, ms: u32) {
    small_services(dir, 1);
    std::fs::write(
        dir.join("sites/dc-paris/services/svc1.toml"),
        format!("name = \"svc1\"\n\n[[steps]]\nname = \"transfer\"\nmigrator = \"wait\"\n[steps.params]\nms = {ms}\n"),
    )
    .unwrap();
}

/// Waits until relocation `id`'s `step:transfer` runs, as its journal says.
fn wait_for_the_wait(c: &mut postgres::Client, id: &str) {
    let started = Instant::now();
    while c
        .query_opt(
            "SELECT 1 FROM viaduct_events WHERE journal = $1 AND step = 'step:transfer'
             AND body::json->>'to' = 'running'",
            &[&id],
        )
        .unwrap()
        .is_none()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the wait never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Worker `a` runs svc1's relocation, in its waiting step; worker `b`
/// has joined: (a, b, the relocation's id, a database client).
fn mid_step(
    config: &str,
    database: &str,
    lease: &str,
    log: &Path,
) -> (Worker, Worker, String, postgres::Client) {
    let a = Worker::start(config, database, "a", lease, &log.join("a.log"));
    let id = rt()
        .block_on(submit_round_robin(std::slice::from_ref(&a), 1))
        .remove(0);
    let mut c = db(database);
    wait_for_the_wait(&mut c, &id);
    let b = Worker::start(config, database, "b", lease, &log.join("b.log"));
    (a, b, id, c)
}

#[test]
fn a_cancel_asked_while_the_worker_is_dead_is_kept_for_the_one_taking_over() {
    let (dir, config) = fresh_demo("scale-cancel-dead");
    slow_service(&dir, 30_000);
    let database = Postgres::shared().database("scale_cancel_dead");
    let log = logs(&dir);
    let (mut a, b, id, mut c) = mid_step(&config, &database, "3", &log);
    let rt = rt();
    a.kill();
    // Asked through b while a's lease still runs: nobody runs it to tell.
    let (status, v) = rt.block_on(call(
        &b.url,
        "POST",
        &format!("/relocations/{id}/cancel"),
        None,
    ));
    assert_eq!(status, 200, "{v:#}");
    let start = Instant::now();
    loop {
        let (_, v) = rt.block_on(call(&b.url, "GET", &format!("/relocations/{id}"), None));
        if v["status"] == "cancelled" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(25), "still {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let outcomes: Vec<String> = c
        .query(
            "SELECT body::json->>'outcome' FROM viaduct_events
             WHERE journal = $1 AND kind = 'run-finished' ORDER BY seq",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(outcomes, ["cancelled"]);
    // The source was never stopped: the wait ran before the downtime.
    assert_eq!(common::instance_state(&dir, "dc-paris", "svc1"), "running");
}
