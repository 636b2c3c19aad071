//! Crash-resume: a real child process running real file copies is killed
//! with SIGKILL at seeded random moments, then resumed, many times.
//!
//! Checks: the final files are byte-identical to an uninterrupted run's; no
//! step is run again after its success was journalled; each chunk's side
//! effect is applied once, or twice only for a chunk a kill interrupted
//! (at most one per running step per kill).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bytes;
use fluidcloud_viaduct::testkit::count_side_effects;
use fluidcloud_viaduct::{Journal, Record, SqliteJournal, StepState};

const WORKER: &str = env!("CARGO_BIN_EXE_viaduct-harness");
const KILLS: usize = 30;
const SEED: u64 = 0x5eed_2026;
/// The worker runs at most this many steps at once.
const CONCURRENCY: usize = 2;

fn prepare(dir: &Path) {
    std::fs::create_dir_all(dir.join("src")).unwrap();
    for (name, seed, len) in [
        ("a.bin", 1, 150_000),
        ("b.bin", 2, 90_001),
        ("c.bin", 3, 120_000),
    ] {
        std::fs::write(dir.join("src").join(name), bytes(seed, len)).unwrap();
    }
}

fn run_to_end(dir: &Path) -> Duration {
    let t0 = Instant::now();
    let st = Command::new(WORKER)
        .arg("crash-worker")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "worker failed: {st}");
    t0.elapsed()
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for sub in ["stage", "out"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let e = e.unwrap();
            out.insert(
                format!("{sub}/{}", e.file_name().to_string_lossy()),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    out
}

/// SplitMix64.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn sigkill_at_random_points_then_resume_matches_an_uninterrupted_run() {
    let root = tempfile::tempdir().unwrap();
    let reference = root.path().join("reference");
    let crashed = root.path().join("crashed");
    prepare(&reference);
    prepare(&crashed);

    let full = run_to_end(&reference);
    let ref_files = files(&reference);
    // Five targets and their progress files (`done`), no partial file.
    assert_eq!(ref_files.len(), 10, "{:?}", ref_files.keys());
    assert!(
        ref_files
            .keys()
            .all(|k| !k.ends_with(".part") && !k.ends_with(".tmp"))
    );
    let ref_effects = count_side_effects(&reference.join("side-effects.log")).unwrap();
    assert!(ref_effects.values().all(|&n| n == 1));

    // Kill points spread over the first part of a run: each resumed run
    // makes a little progress before the next kill.
    let window = (full.as_millis() as u64 / 25).max(10);
    let mut rng = SEED;
    let mut kills = 0;
    let mut finished_early = 0;
    let mut delays = Vec::new();
    while kills < KILLS {
        let delay = Duration::from_millis(next(&mut rng) % window);
        let mut child = Command::new(WORKER)
            .arg("crash-worker")
            .arg(&crashed)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_some() {
            finished_early += 1;
            assert!(
                finished_early < 10,
                "the workflow keeps finishing before the kill"
            );
            continue;
        }
        child.kill().unwrap(); // SIGKILL on unix
        child.wait().unwrap();
        kills += 1;
        delays.push(delay.as_millis());
    }
    run_to_end(&crashed);

    // Same files.
    let got = files(&crashed);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        ref_files.keys().collect::<Vec<_>>()
    );
    for (name, data) in &ref_files {
        assert!(
            got[name] == *data,
            "{name} differs after {kills} kills at {delays:?} ms"
        );
    }

    // Side effects: every chunk applied, none more than twice, and the
    // re-applied ones bounded by the interruptions.
    let effects = count_side_effects(&crashed.join("side-effects.log")).unwrap();
    assert_eq!(
        effects.keys().collect::<Vec<_>>(),
        ref_effects.keys().collect::<Vec<_>>(),
        "every chunk applied"
    );
    let twice: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        effects.values().all(|&n| n <= 2),
        "a chunk applied 3+ times: {twice:?}"
    );
    assert!(
        twice.len() <= kills * CONCURRENCY,
        "{} re-applied chunks for {kills} kills",
        twice.len()
    );

    // The journal: every step succeeded exactly once, and nothing happened
    // to a step after its success.
    let j = SqliteJournal::open(crashed.join("journal.db")).unwrap();
    let entries = j.replay().unwrap();
    let mut succeeded: BTreeMap<String, usize> = BTreeMap::new();
    for e in &entries {
        if let Record::Transition { step, to, .. } = &e.record {
            assert!(
                !succeeded.contains_key(step),
                "step {step} moved to {to} after it succeeded"
            );
            if *to == StepState::Succeeded {
                succeeded.insert(step.clone(), 1);
            }
        }
    }
    assert_eq!(succeeded.len(), 5);
    let runs = entries
        .iter()
        .filter(|e| matches!(e.record, Record::RunStarted { .. }))
        .count();
    assert!(
        runs > KILLS / 3,
        "the kills should interrupt runs that started: {runs}"
    );
    let resumed_steps = entries
        .iter()
        .filter(|e| {
            matches!(
                &e.record,
                Record::Transition {
                    from: StepState::Running,
                    to: StepState::Cancelled,
                    ..
                }
            )
        })
        .count();
    assert!(
        resumed_steps >= 1,
        "some kill should land while a step runs"
    );

    // A resume of the finished workflow applies nothing.
    let log_before = std::fs::read(crashed.join("side-effects.log")).unwrap();
    run_to_end(&crashed);
    assert_eq!(
        std::fs::read(crashed.join("side-effects.log")).unwrap(),
        log_before
    );
    eprintln!(
        "uninterrupted run {full:?}; {kills} kills (delays {delays:?} ms), {runs} runs, {resumed_steps} interrupted steps, {} chunks re-applied",
        twice.len()
    );
}

#[test]
fn ctrl_c_cancels_journals_it_exits_130_and_a_resume_finishes() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("w");
    prepare(&dir);
    let mut child = Command::new(WORKER)
        .arg("crash-worker")
        .arg(&dir)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "still running");
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(fluidcloud_viaduct::EXIT_CANCELLED));

    let entries = SqliteJournal::open(dir.join("journal.db"))
        .unwrap()
        .replay()
        .unwrap();
    assert!(entries.iter().any(|e| e.record
        == Record::CancelRequested {
            reason: "interrupt".into()
        }));
    assert_eq!(
        entries.last().unwrap().record,
        Record::RunFinished {
            outcome: fluidcloud_viaduct::Outcome::Cancelled
        }
    );
    assert!(!dir.join("out/ab.bin").exists(), "cancelled before the end");

    run_to_end(&dir);
    let src = |n: &str| std::fs::read(dir.join("src").join(n)).unwrap();
    let mut ab = src("a.bin");
    ab.extend(src("b.bin"));
    assert!(std::fs::read(dir.join("out/ab.bin")).unwrap() == ab);
    assert!(std::fs::read(dir.join("out/a.bin")).unwrap() == src("a.bin"));
    assert!(std::fs::read(dir.join("out/c.bin")).unwrap() == src("c.bin"));
    let effects = count_side_effects(&dir.join("side-effects.log")).unwrap();
    assert!(effects.values().all(|&n| n <= 2));
}
