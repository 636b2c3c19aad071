//! Helper binary for the viaduct's benchmark and crash test.
//!
//! - `viaduct-harness bench STEPS JOURNAL [LIMIT_SECONDS]`: runs a seeded
//!   random DAG of STEPS no-op steps with the journal at JOURNAL (a SQLite
//!   path, or `postgres://…#NAME`; new), prints the per-step overhead and, last,
//!   `viaduct: N steps in X.XX s (Y µs/step)`; exits 1 above the limit
//!   (default 2 s).
//! - `viaduct-harness crash-worker DIR`: runs (or resumes) the fixed
//!   file-copying workflow of the crash test on `DIR/src`, journal
//!   `DIR/journal.db`; exits with the run's exit code.
//! - `viaduct-harness journal-writer LOCATION BATCH`: takes the journal at
//!   LOCATION (a SQLite path, or `postgres://…#NAME`), which must exist,
//!   and appends batches of BATCH transitions until it is killed (the
//!   journal conformance suite's torn batch).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use fluidcloud_plugins::{Artifact, ArtifactKind};
use fluidcloud_viaduct::testkit::{ChunkCopy, Noop};
use fluidcloud_viaduct::{
    Executor, ExecutorConfig, InputBinding, JournalLocation, Record, Registry, RetryPolicy,
    SqliteJournal, StepSpec, StepState, WorkflowBuilder,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("viaduct-harness: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.get(1).map(String::as_str) {
        Some("bench") if args.len() >= 4 => {
            let steps = args[2].parse().unwrap_or(10_000);
            let limit = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(2.0);
            rt.block_on(bench(steps, &args[3], limit))
        }
        Some("crash-worker") if args.len() == 3 => rt.block_on(crash_worker(Path::new(&args[2]))),
        Some("journal-writer") if args.len() == 4 => {
            journal_writer(&args[2], args[3].parse().unwrap_or(100))
        }
        _ => {
            eprintln!(
                "usage: viaduct-harness bench STEPS JOURNAL [LIMIT_SECONDS] | crash-worker DIR | journal-writer LOCATION BATCH"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("viaduct-harness: {e}");
            ExitCode::from(2)
        }
    }
}

/// SplitMix64, for a reproducible DAG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

async fn bench(steps: usize, journal: &str, limit: f64) -> Result<u8, fluidcloud_viaduct::Error> {
    let t0 = Instant::now();
    let registry = Registry::new().with(Arc::new(Noop::new()));
    let mut rng = Rng(42);
    let mut b = WorkflowBuilder::new(format!("bench-{steps}"));
    for i in 0..steps {
        let mut s = StepSpec::new(format!("s{i}"), Noop::NAME, format!("site{}", i % 8));
        // Each step waits for up to two of the 200 steps before it.
        for _ in 0..rng.below(3) {
            if i > 0 {
                let d = i - 1 - rng.below(i.min(200) as u64) as usize;
                let id = format!("s{d}");
                if !s.after.contains(&id) {
                    s = s.after(id);
                }
            }
        }
        b.push(s);
    }
    let wf = b.build(&registry)?;
    let built = t0.elapsed();
    let config = ExecutorConfig {
        max_concurrency: 64,
        retry: RetryPolicy::never(),
        ..ExecutorConfig::default()
    };
    let location = JournalLocation::parse(journal);
    let mut ex = Executor::new(wf, registry, location.open()?, config);
    let t1 = Instant::now();
    let report = ex.run().await?;
    let ran = t1.elapsed();
    let total = t0.elapsed();
    let entries = location.open()?.replay()?;
    let transitions = entries
        .iter()
        .filter(|e| matches!(e.record, Record::Transition { .. }))
        .count();
    let entries = entries.len();
    let per_step = total.as_secs_f64() * 1e6 / steps as f64;
    println!("build+validate: {:.3} s", built.as_secs_f64());
    println!(
        "run (journalled): {:.3} s, {} journal records",
        ran.as_secs_f64(),
        entries
    );
    println!(
        "journal: {transitions} step transitions, {:.0} per second",
        transitions as f64 / ran.as_secs_f64()
    );
    println!(
        "outcome: {:?}, {} steps started",
        report.outcome, report.started
    );
    println!(
        "per-step overhead: {:.1} µs (run only: {:.1} µs)",
        per_step,
        ran.as_secs_f64() * 1e6 / steps as f64
    );
    println!(
        "viaduct: {steps} steps in {:.2} s ({per_step:.0} µs/step)",
        total.as_secs_f64()
    );
    if report.outcome != fluidcloud_viaduct::Outcome::Succeeded {
        eprintln!("viaduct-harness: the benchmark workflow did not succeed");
        return Ok(1);
    }
    Ok(if total.as_secs_f64() > limit { 1 } else { 0 })
}

/// The crash test's workflow: five chunked copies, two of them fed by
/// other copies, one joining two inputs.
pub(crate) fn crash_workflow(dir: &Path) -> WorkflowBuilder {
    let p = |rel: &str| dir.join(rel).display().to_string();
    let given = |rel: &str| InputBinding::Given {
        artifact: Artifact {
            kind: ArtifactKind::Volume,
            site: "source".into(),
            locator: p(rel),
            size: None,
            checksum: None,
        },
    };
    let from = |step: &str| InputBinding::from_step(step, "file", ArtifactKind::Volume);
    let copy = |id: &str, to: &str| {
        StepSpec::new(id, ChunkCopy::NAME, "target")
            .params(serde_json::json!({
                "to": p(to), "chunk": 4096, "delay_ms": 6, "log": p("side-effects.log"),
            }))
            .output("file", ArtifactKind::Volume)
    };
    WorkflowBuilder::new("crash-test")
        .step(copy("copy-a", "stage/a.bin").input("src", given("src/a.bin")))
        .step(copy("copy-b", "stage/b.bin").input("src", given("src/b.bin")))
        .step(
            copy("join-ab", "out/ab.bin")
                .input("x", from("copy-a"))
                .input("y", from("copy-b")),
        )
        .step(copy("copy-c", "out/c.bin").input("src", given("src/c.bin")))
        .step(copy("final-a", "out/a.bin").input("src", from("copy-a")))
}

async fn crash_worker(dir: &Path) -> Result<u8, fluidcloud_viaduct::Error> {
    let registry = Registry::new().with(Arc::new(ChunkCopy));
    for sub in ["stage", "out"] {
        let d: PathBuf = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|source| fluidcloud_viaduct::Error::Io {
            context: format!("create {}", d.display()),
            source,
        })?;
    }
    let wf = crash_workflow(dir).build(&registry)?;
    let journal = SqliteJournal::open(dir.join("journal.db"))?;
    let config = ExecutorConfig {
        max_concurrency: 2,
        ..ExecutorConfig::default()
    };
    let mut ex = Executor::new(wf, registry, Box::new(journal), config);
    // Ctrl-C (SIGINT) cancels: the run journals it and exits 130.
    let _ctrl_c = ex.canceller().on_ctrl_c();
    let report = ex.run().await?;
    u8::try_from(report.exit_code()).map_err(|_| fluidcloud_viaduct::Error::Cancelled)
}

/// Appends batches of `batch` transitions to the journal at `location`
/// until killed.
fn journal_writer(location: &str, batch: usize) -> Result<u8, fluidcloud_viaduct::Error> {
    let mut journal = JournalLocation::parse(location).open()?;
    journal.lock()?;
    for n in 0u32.. {
        let records: Vec<Record> = (0..batch)
            .map(|i| Record::Transition {
                step: format!("s{i}"),
                from: StepState::Pending,
                to: StepState::Running,
                attempt: n,
                error: None,
                delay_ms: None,
            })
            .collect();
        journal.append(&records)?;
    }
    Ok(0)
}
