//! The executor on real (no-op and file-copying) migrators.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use fluidcloud_plugins::{Artifact, ArtifactKind};
use fluidcloud_viaduct::testkit::ChunkCopy;
use fluidcloud_viaduct::{
    EXIT_CANCELLED, Error, ExecutorConfig, FailurePolicy, InputBinding, Outcome, ProgressEvent,
    Record, SqliteJournal, StepSpec, StepState, TRANSITIONS, WorkflowBuilder,
};
use futures::StreamExt;

fn copy_step(id: &str, dir: &std::path::Path, to: &str, input: InputBinding) -> StepSpec {
    StepSpec::new(id, ChunkCopy::NAME, "target")
        .params(serde_json::json!({
            "to": dir.join(to).display().to_string(),
            "chunk": 1000,
            "log": dir.join("effects.log").display().to_string(),
        }))
        .input("src", input)
        .output("file", vol())
}

fn given(path: &std::path::Path) -> InputBinding {
    InputBinding::Given {
        artifact: Artifact {
            kind: ArtifactKind::Volume,
            site: "source".into(),
            locator: path.display().to_string(),
            size: None,
            checksum: None,
        },
    }
}

#[tokio::test]
async fn a_chain_of_real_copies_runs_in_dependency_order_and_journals_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    let data = bytes(1, 10_500);
    std::fs::write(&src, &data).unwrap();
    let (reg, _) = registry();
    let wf = build(
        WorkflowBuilder::new("chain")
            .step(copy_step("one", dir.path(), "one.bin", given(&src)))
            .step(copy_step(
                "two",
                dir.path(),
                "two.bin",
                InputBinding::from_step("one", "file", vol()),
            )),
        &reg,
    );
    let journal = dir.path().join("j.db");
    let mut ex = executor(&wf, &reg, &journal, config());
    let mut events = ex.progress_stream();
    let report = ex.run().await.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    assert_eq!(report.exit_code(), 0);
    assert_eq!(std::fs::read(dir.path().join("two.bin")).unwrap(), data);
    assert_eq!(
        report.steps[1].output.as_ref().unwrap().artifacts["file"].size,
        Some(10_500)
    );
    let t = transitions(&journal);
    let pos = |step: &str, to: StepState| {
        t.iter()
            .position(|(s, _, x)| s == step && *x == to)
            .unwrap()
    };
    assert!(pos("one", StepState::Succeeded) < pos("two", StepState::Running));
    // Output is journalled before success.
    let e = entries(&journal);
    let out = e
        .iter()
        .position(|e| matches!(&e.record, Record::Output { step, .. } if step == "two"))
        .unwrap();
    let ok = e
        .iter()
        .position(|e| matches!(&e.record, Record::Transition { step, to: StepState::Succeeded, .. } if step == "two"))
        .unwrap();
    assert!(out < ok);
    // Progress: started, bytes with totals, finished, run finished.
    let mut seen = Vec::new();
    while let Some(ev) = events.next().await {
        let end = matches!(ev, ProgressEvent::RunFinished { .. });
        seen.push(ev);
        if end {
            break;
        }
    }
    assert!(seen.iter().any(
        |e| matches!(e, ProgressEvent::StepStarted { step, attempt: 1, .. } if step == "one")
    ));
    assert!(seen.iter().any(
        |e| matches!(e, ProgressEvent::StepProgress { step, done: 10_500, total: Some(10_500), rate, .. } if step == "two" && *rate > 0.0)
    ));
    assert!(seen.iter().any(
        |e| matches!(e, ProgressEvent::StepFinished { step, state: StepState::Succeeded, bytes: 10_500, .. } if step == "two")
    ));
}

#[tokio::test]
async fn transient_failures_are_retried_with_backoff_then_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("retry").step(nstep("flaky", "s", serde_json::json!({"fail": 2}))),
        &reg,
    );
    let journal = dir.path().join("j.db");
    let mut ex = executor(&wf, &reg, &journal, config());
    let mut rx = ex.subscribe();
    let report = ex.run().await.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    assert_eq!(noop.with_log(|l| l.attempts["flaky"]), 3);
    assert_eq!(report.steps[0].attempts, 3);
    let waits = transitions(&journal)
        .iter()
        .filter(|(_, _, to)| *to == StepState::RetryWait)
        .count();
    assert_eq!(waits, 2);
    let mut retried = 0;
    while let Ok(ev) = rx.try_recv() {
        if let ProgressEvent::StepRetrying { delay_ms, .. } = ev {
            assert!(delay_ms <= 5);
            retried += 1;
        }
    }
    assert_eq!(retried, 2);
}

#[tokio::test]
async fn a_non_retryable_error_fails_at_once_and_stop_all_cancels_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("stop")
            .step(nstep(
                "bad",
                "s",
                serde_json::json!({"fail": 1, "error": "never"}),
            ))
            .step(nstep("after-bad", "s", serde_json::json!({})).after("bad"))
            .step(nstep("slow", "s", serde_json::json!({"sleep_ms": 100})))
            .step(nstep("after-slow", "s", serde_json::json!({})).after("slow")),
        &reg,
    );
    let journal = dir.path().join("j.db");
    let report = executor(&wf, &reg, &journal, config()).run().await.unwrap();
    assert_eq!(report.outcome, Outcome::Failed);
    assert_eq!(report.exit_code(), 1);
    assert_eq!(noop.with_log(|l| l.attempts["bad"]), 1, "never retried");
    assert_eq!(report.state_of("bad"), Some(StepState::Failed));
    assert_eq!(
        report.state_of("slow"),
        Some(StepState::Succeeded),
        "running steps finish"
    );
    assert_eq!(report.state_of("after-slow"), Some(StepState::Cancelled));
    assert_eq!(report.state_of("after-bad"), Some(StepState::Cancelled));
    assert!(report.steps.iter().all(|s| s.state.is_terminal()));
    let err = report.into_result().unwrap_err();
    assert!(
        matches!(err, Error::Step { ref step, .. } if step == "bad"),
        "{err}"
    );
}

#[tokio::test]
async fn skip_dependents_runs_every_independent_branch() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("skip")
            .step(nstep(
                "bad",
                "s",
                serde_json::json!({"fail": 9, "error": "never"}),
            ))
            .step(nstep("child", "s", serde_json::json!({})).after("bad"))
            .step(nstep("grandchild", "s", serde_json::json!({})).after("child"))
            .step(nstep("other", "s", serde_json::json!({"sleep_ms": 20})))
            .step(nstep("after-other", "s", serde_json::json!({})).after("other")),
        &reg,
    );
    let config = ExecutorConfig {
        on_failure: FailurePolicy::SkipDependents,
        ..config()
    };
    let report = executor(&wf, &reg, &dir.path().join("j.db"), config)
        .run()
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Failed);
    assert_eq!(report.state_of("child"), Some(StepState::Skipped));
    assert_eq!(report.state_of("grandchild"), Some(StepState::Skipped));
    assert_eq!(report.state_of("after-other"), Some(StepState::Succeeded));
    assert!(!noop.with_log(|l| l.attempts.contains_key("child")));
}

#[tokio::test]
async fn global_and_per_site_limits_are_reached_and_never_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let mut b = WorkflowBuilder::new("limits");
    for i in 0..12 {
        b.push(nstep(
            &format!("edge{i}"),
            "edge",
            serde_json::json!({"sleep_ms": 15}),
        ));
        b.push(nstep(
            &format!("cloud{i}"),
            "cloud",
            serde_json::json!({"sleep_ms": 15}),
        ));
    }
    let wf = build(b, &reg);
    let config = ExecutorConfig {
        max_concurrency: 5,
        per_site: [("edge".to_owned(), 2)].into(),
        ..config()
    };
    let report = executor(&wf, &reg, &dir.path().join("j.db"), config)
        .run()
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
    noop.with_log(|l| {
        assert_eq!(l.max_running, 5, "global bound reached, not exceeded");
        assert_eq!(l.max_by_site["edge"], 2, "edge bound reached, not exceeded");
        assert_eq!(l.max_by_site["cloud"], 3);
    });
}

#[tokio::test]
async fn an_attempt_over_its_timeout_is_a_transient_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("timeout").step(nstep(
            "hang",
            "s",
            serde_json::json!({"sleep_ms": 5000, "ignore_cancel": true}),
        )),
        &reg,
    );
    let config = ExecutorConfig {
        step_timeout_ms: Some(40),
        retry: fast_retry(2),
        ..config()
    };
    let t0 = Instant::now();
    let report = executor(&wf, &reg, &dir.path().join("j.db"), config)
        .run()
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(report.state_of("hang"), Some(StepState::Failed));
    assert_eq!(noop.with_log(|l| l.attempts["hang"]), 2);
    assert!(
        report.steps[0]
            .error
            .as_deref()
            .unwrap()
            .contains("timed out after 40ms")
    );
}

#[tokio::test]
async fn declared_outputs_must_be_produced() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = registry();
    let wf = build(
        WorkflowBuilder::new("outputs")
            .step(nstep("liar", "s", serde_json::json!({})).output("img", vol())),
        &reg,
    );
    let report = executor(&wf, &reg, &dir.path().join("j.db"), config())
        .run()
        .await
        .unwrap();
    assert_eq!(report.state_of("liar"), Some(StepState::Failed));
    assert!(
        report.steps[0]
            .error
            .as_deref()
            .unwrap()
            .contains("did not produce declared output `img`")
    );
}

#[tokio::test]
async fn resume_reruns_only_what_did_not_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("resume")
            .step(nstep("a", "s", serde_json::json!({})))
            .step(nstep("b", "s", serde_json::json!({"fail": 1, "error": "never"})).after("a"))
            .step(nstep("c", "s", serde_json::json!({})).after("b"))
            .step(nstep("d", "s", serde_json::json!({}))),
        &reg,
    );
    let journal = dir.path().join("j.db");
    let first = executor(&wf, &reg, &journal, config()).run().await.unwrap();
    assert_eq!(first.outcome, Outcome::Failed);
    // A new process: only the journal (and the same registry) is needed.
    let j = SqliteJournal::open(&journal).unwrap();
    let mut ex =
        fluidcloud_viaduct::Executor::from_journal(reg.clone(), Box::new(j), config()).unwrap();
    let second = ex.run().await.unwrap();
    drop(ex); // releases the journal lock
    assert_eq!(second.outcome, Outcome::Succeeded);
    noop.with_log(|l| {
        assert_eq!(l.attempts["a"], 1);
        assert_eq!(l.attempts["d"], 1);
        assert_eq!(l.attempts["b"], 2);
        assert_eq!(l.attempts["c"], 1);
    });
    assert_eq!(second.started, 2);
    // Resuming a finished workflow runs nothing.
    let third = executor(&wf, &reg, &journal, config()).run().await.unwrap();
    assert_eq!((third.outcome, third.started), (Outcome::Succeeded, 0));
}

#[tokio::test]
async fn a_journal_of_another_workflow_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let journal = dir.path().join("j.db");
    let one = build(
        WorkflowBuilder::new("one").step(nstep("a", "s", serde_json::json!({}))),
        &reg,
    );
    let two = build(
        WorkflowBuilder::new("two").step(nstep("b", "s", serde_json::json!({}))),
        &reg,
    );
    executor(&one, &reg, &journal, config())
        .run()
        .await
        .unwrap();
    let err = executor(&two, &reg, &journal, config())
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ForeignJournal { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("belongs to workflow {}", one.id())),
        "{err}"
    );
    assert!(!noop.with_log(|l| l.attempts.contains_key("b")));
}

#[tokio::test]
async fn corrupt_or_foreign_journal_files_are_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("w").step(nstep("a", "s", serde_json::json!({}))),
        &reg,
    );
    let garbage = dir.path().join("garbage.db");
    std::fs::write(
        &garbage,
        b"this is not a database, it is a shopping list\n".repeat(100),
    )
    .unwrap();
    let err = SqliteJournal::open(&garbage).unwrap_err();
    assert!(
        err.to_string().contains("not a readable SQLite database"),
        "{err}"
    );

    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign)
        .unwrap()
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
        .unwrap();
    let err = executor(&wf, &reg, &foreign, config())
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ForeignJournal { .. }), "{err}");

    // A journal whose rows were edited.
    let edited = dir.path().join("edited.db");
    executor(&wf, &reg, &edited, config()).run().await.unwrap();
    let before = noop.with_log(|l| l.attempts["a"]);
    rusqlite::Connection::open(&edited)
        .unwrap()
        .execute(
            "UPDATE viaduct_events SET body = body || ' ' WHERE seq = 2",
            [],
        )
        .unwrap();
    let err = executor(&wf, &reg, &edited, config())
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CorruptJournal { row: 2, .. }), "{err}");
    assert_eq!(
        noop.with_log(|l| l.attempts["a"]),
        before,
        "nothing executed"
    );
}

#[tokio::test]
async fn cancellation_stops_new_steps_journals_it_and_a_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let mut b = WorkflowBuilder::new("cancel");
    b.push(nstep("s0", "s", serde_json::json!({"sleep_ms": 800})));
    for i in 1..4 {
        b.push(
            nstep(&format!("s{i}"), "s", serde_json::json!({"sleep_ms": 10}))
                .after(format!("s{}", i - 1)),
        );
    }
    b.push(nstep("flaky", "s", serde_json::json!({"fail": 1})));
    let wf = build(b, &reg);
    let journal = dir.path().join("j.db");
    let config = ExecutorConfig {
        retry: fluidcloud_viaduct::RetryPolicy {
            initial_ms: 60_000,
            max_delay_ms: 60_000,
            ..fast_retry(3)
        },
        ..config()
    };
    let mut ex = executor(&wf, &reg, &journal, config.clone());
    let c = ex.canceller();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(60)).await;
        c.cancel("interrupt");
    });
    let t0 = Instant::now();
    let report = ex.run().await.unwrap();
    drop(ex); // releases the journal lock
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "s0 stopped at a safe point"
    );
    assert_eq!(report.outcome, Outcome::Cancelled);
    assert_eq!(report.exit_code(), EXIT_CANCELLED);
    assert_eq!(EXIT_CANCELLED, 130);
    assert!(
        report.steps.iter().all(|s| s.state == StepState::Cancelled),
        "{report:?}"
    );
    assert!(entries(&journal).iter().any(|e| e.record
        == Record::CancelRequested {
            reason: "interrupt".into()
        }));
    assert!(matches!(report.into_result(), Err(Error::Cancelled)));
    assert!(
        !noop.with_log(|l| l.attempts.contains_key("s1")),
        "no new step started"
    );

    let report = executor(&wf, &reg, &journal, config).run().await.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded);
}

#[tokio::test]
async fn steps_ignoring_cancellation_are_aborted_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = registry();
    let wf = build(
        WorkflowBuilder::new("abort").step(nstep(
            "stubborn",
            "s",
            serde_json::json!({"sleep_ms": 5000, "ignore_cancel": true}),
        )),
        &reg,
    );
    let config = ExecutorConfig {
        cancel_grace_ms: 50,
        ..config()
    };
    let mut ex = executor(&wf, &reg, &dir.path().join("j.db"), config);
    let c = ex.canceller();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.cancel("interrupt");
    });
    let t0 = Instant::now();
    let report = ex.run().await.unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(80) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(report.state_of("stubborn"), Some(StepState::Cancelled));
    assert_eq!(
        report.steps[0].error.as_deref(),
        Some("aborted after cancellation")
    );
}

#[tokio::test]
async fn rollback_compensates_in_reverse_dependency_order_and_leaves_the_source_alone() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    let data = bytes(7, 5000);
    std::fs::write(&src, &data).unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("rollback")
            .step(copy_step("copy", dir.path(), "copy.bin", given(&src)))
            .step(copy_step(
                "copy2",
                dir.path(),
                "copy2.bin",
                InputBinding::from_step("copy", "file", vol()),
            ))
            .step(nstep("provision", "t", serde_json::json!({})).after("copy2"))
            .step(nstep("verify", "t", serde_json::json!({})).after("provision"))
            .step(
                nstep(
                    "cutover",
                    "t",
                    serde_json::json!({"fail": 9, "error": "never"}),
                )
                .after("verify"),
            )
            .step(nstep("never-ran", "t", serde_json::json!({})).after("cutover")),
        &reg,
    );
    let journal = dir.path().join("j.db");
    let report = executor(&wf, &reg, &journal, config()).run().await.unwrap();
    assert_eq!(report.outcome, Outcome::Failed);
    assert!(dir.path().join("copy2.bin").exists());
    let mut ex = executor(&wf, &reg, &journal, config());
    let rb = ex.rollback().await.unwrap();
    drop(ex); // releases the journal lock
    assert_eq!(rb.outcome, Outcome::Succeeded);
    assert_eq!(rb.started, 5);
    noop.with_log(|l| assert_eq!(l.rolled_back, ["cutover", "verify", "provision"]));
    assert_eq!(rb.state_of("never-ran"), Some(StepState::Cancelled));
    for f in [
        "copy.bin",
        "copy2.bin",
        "copy.bin.progress",
        "copy2.bin.progress",
    ] {
        assert!(!dir.path().join(f).exists(), "{f} should be removed");
    }
    assert_eq!(std::fs::read(&src).unwrap(), data, "source untouched");
    let t = transitions(&journal);
    let rolled: Vec<&str> = t
        .iter()
        .filter(|(_, _, to)| *to == StepState::RolledBack)
        .map(|(s, _, _)| s.as_str())
        .collect();
    assert_eq!(rolled, ["cutover", "verify", "provision", "copy2", "copy"]);
    // A second rollback has nothing left to do; running again is refused.
    let again = executor(&wf, &reg, &journal, config())
        .rollback()
        .await
        .unwrap();
    assert_eq!(again.started, 0);
    let err = executor(&wf, &reg, &journal, config())
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RolledBack { .. }), "{err}");
}

#[tokio::test]
async fn rollback_removes_the_partial_target_of_an_interrupted_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    let data = bytes(3, 200_000);
    std::fs::write(&src, &data).unwrap();
    let (reg, _) = registry();
    let mut step = copy_step("copy", dir.path(), "copy.bin", given(&src));
    step.params["delay_ms"] = serde_json::json!(5);
    let wf = build(WorkflowBuilder::new("partial").step(step), &reg);
    let journal = dir.path().join("j.db");
    let mut ex = executor(&wf, &reg, &journal, config());
    let c = ex.canceller();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.cancel("interrupt");
    });
    let report = ex.run().await.unwrap();
    drop(ex); // releases the journal lock
    assert_eq!(report.outcome, Outcome::Cancelled);
    assert!(
        dir.path().join("copy.bin.part").exists(),
        "a partial target exists"
    );
    executor(&wf, &reg, &journal, config())
        .rollback()
        .await
        .unwrap();
    assert!(!dir.path().join("copy.bin.part").exists());
    assert!(!dir.path().join("copy.bin.progress").exists());
    assert_eq!(std::fs::read(&src).unwrap(), data);
}

/// Drives runs through every situation the lifecycle knows, then checks
/// that the journals, taken together, contain every edge of the table.
#[tokio::test]
async fn every_transition_of_the_lifecycle_is_exercised() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = registry();
    let mut seen = BTreeSet::new();
    let mut collect = |journal: &std::path::Path| {
        for (_, from, to) in transitions(journal) {
            seen.insert((from, to));
        }
    };

    // 1. Success, retry, failure, skip; then resume (failed/skipped ->
    //    pending) and rollback (succeeded -> rolled-back).
    let wf = build(
        WorkflowBuilder::new("t1")
            .step(nstep("ok", "s", serde_json::json!({})))
            .step(nstep("flaky", "s", serde_json::json!({"fail": 1})))
            .step(nstep(
                "bad",
                "s",
                serde_json::json!({"fail": 1, "error": "never"}),
            ))
            .step(nstep("dep", "s", serde_json::json!({})).after("bad")),
        &reg,
    );
    let j1 = dir.path().join("t1.db");
    let skip = ExecutorConfig {
        on_failure: FailurePolicy::SkipDependents,
        ..config()
    };
    executor(&wf, &reg, &j1, skip.clone()).run().await.unwrap();
    executor(&wf, &reg, &j1, skip.clone()).run().await.unwrap();
    executor(&wf, &reg, &j1, skip.clone())
        .rollback()
        .await
        .unwrap();
    collect(&j1);

    // 2. Cancellation: of a running step, a waiting one and a pending one;
    //    then resume (cancelled -> pending) and crash (dropping the run
    //    leaves `running`; the next run records it cancelled).
    let wf = build(
        WorkflowBuilder::new("t2")
            .step(nstep("long", "s", serde_json::json!({"sleep_ms": 2000})))
            .step(nstep("wait", "s", serde_json::json!({"fail": 1})))
            .step(nstep("later", "s", serde_json::json!({})).after("long")),
        &reg,
    );
    let j2 = dir.path().join("t2.db");
    let slow_retry = ExecutorConfig {
        retry: fluidcloud_viaduct::RetryPolicy {
            initial_ms: 60_000,
            max_delay_ms: 60_000,
            ..fast_retry(3)
        },
        ..config()
    };
    let mut ex = executor(&wf, &reg, &j2, slow_retry.clone());
    let c = ex.canceller();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.cancel("test");
    });
    ex.run().await.unwrap();
    drop(ex); // releases the journal lock
    let mut ex = executor(&wf, &reg, &j2, slow_retry.clone());
    let crashed = tokio::time::timeout(Duration::from_millis(50), ex.run()).await;
    assert!(crashed.is_err(), "the run was cut off");
    drop(ex);
    // 3. Roll back the crashed run: running/retry-wait -> cancelled, then
    //    cancelled -> rolled-back; `later` was put back to pending after
    //    it had been cancelled and never ran, so it stays.
    executor(&wf, &reg, &j2, slow_retry.clone())
        .rollback()
        .await
        .unwrap();
    collect(&j2);

    // 4. A step that ran, was put back to pending, and is rolled back
    //    before it ran again: both steps are cancelled while running; the
    //    resume, limited to one at a time, starts `holder` and is cut off
    //    while `requeued` waits for the slot.
    let wf = build(
        WorkflowBuilder::new("t4")
            .step(nstep("holder", "s", serde_json::json!({"sleep_ms": 2000})))
            .step(nstep(
                "requeued",
                "s",
                serde_json::json!({"sleep_ms": 2000}),
            )),
        &reg,
    );
    let j4 = dir.path().join("t4.db");
    let mut ex = executor(&wf, &reg, &j4, config());
    let c = ex.canceller();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        c.cancel("test");
    });
    ex.run().await.unwrap();
    drop(ex); // releases the journal lock
    let one = ExecutorConfig {
        max_concurrency: 1,
        ..config()
    };
    let mut ex = executor(&wf, &reg, &j4, one.clone());
    let _ = tokio::time::timeout(Duration::from_millis(50), ex.run()).await;
    drop(ex);
    let rb = executor(&wf, &reg, &j4, one).rollback().await.unwrap();
    assert_eq!(rb.state_of("requeued"), Some(StepState::RolledBack));
    collect(&j4);

    // 5. A failed step rolled back.
    let wf = build(
        WorkflowBuilder::new("t5").step(nstep(
            "bad",
            "s",
            serde_json::json!({"fail": 9, "error": "never"}),
        )),
        &reg,
    );
    let j5 = dir.path().join("t5.db");
    executor(&wf, &reg, &j5, config()).run().await.unwrap();
    executor(&wf, &reg, &j5, config()).rollback().await.unwrap();
    collect(&j5);

    let missing: Vec<_> = TRANSITIONS
        .iter()
        .filter(|t| !seen.contains(&(t.from, t.to)))
        .map(|t| format!("{} -> {} ({})", t.from, t.to, t.on))
        .collect();
    assert!(missing.is_empty(), "never exercised: {missing:#?}");
    for (from, to) in &seen {
        assert!(fluidcloud_viaduct::lifecycle::allowed(*from, *to));
    }
}

#[tokio::test]
async fn a_failed_compensation_stops_the_rollback_and_a_later_rollback_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    std::fs::write(&src, bytes(9, 3000)).unwrap();
    let (reg, _) = registry();
    let wf = build(
        WorkflowBuilder::new("stuck")
            .step(copy_step("one", dir.path(), "one.bin", given(&src)))
            .step(copy_step(
                "two",
                dir.path(),
                "two.bin",
                InputBinding::from_step("one", "file", vol()),
            )),
        &reg,
    );
    let journal = dir.path().join("j.db");
    executor(&wf, &reg, &journal, config()).run().await.unwrap();
    // Something at the target that the compensation cannot remove.
    let two = dir.path().join("two.bin");
    std::fs::remove_file(&two).unwrap();
    std::fs::create_dir(&two).unwrap();
    std::fs::write(two.join("x"), b"x").unwrap();
    let err = executor(&wf, &reg, &journal, config())
        .rollback()
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rollback { ref step, .. } if step == "two"),
        "{err}"
    );
    assert!(dir.path().join("one.bin").exists(), "stopped before `one`");
    std::fs::remove_dir_all(&two).unwrap();
    let rb = executor(&wf, &reg, &journal, config())
        .rollback()
        .await
        .unwrap();
    assert_eq!(rb.started, 2);
    assert!(!dir.path().join("one.bin").exists());
    assert_eq!(rb.state_of("one"), Some(StepState::RolledBack));
}

#[tokio::test]
async fn a_second_process_on_the_same_journal_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("lock").step(nstep("slow", "s", serde_json::json!({"sleep_ms": 300}))),
        &reg,
    );
    let journal = dir.path().join("j.db");
    let mut first = executor(&wf, &reg, &journal, config());
    let running = tokio::spawn(async move {
        let r = first.run().await;
        drop(first);
        r
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = executor(&wf, &reg, &journal, config())
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::JournalInUse { .. }), "{err}");
    assert_eq!(running.await.unwrap().unwrap().outcome, Outcome::Succeeded);
    assert_eq!(noop.with_log(|l| l.attempts["slow"]), 1);
    let after = executor(&wf, &reg, &journal, config()).run().await.unwrap();
    assert_eq!(after.started, 0);
}

#[tokio::test]
async fn a_resume_gives_a_failed_step_a_fresh_retry_budget() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, noop) = registry();
    let wf = build(
        WorkflowBuilder::new("budget").step(nstep("flaky", "s", serde_json::json!({"fail": 4}))),
        &reg,
    );
    let journal = dir.path().join("j.db");
    let first = executor(&wf, &reg, &journal, config()).run().await.unwrap();
    assert_eq!(first.state_of("flaky"), Some(StepState::Failed));
    assert_eq!(noop.with_log(|l| l.attempts["flaky"]), 3);
    let second = executor(&wf, &reg, &journal, config()).run().await.unwrap();
    assert_eq!(second.outcome, Outcome::Succeeded);
    assert_eq!(noop.with_log(|l| l.attempts["flaky"]), 5);
    assert_eq!(
        second.steps[0].attempts, 5,
        "attempt numbers go on across runs"
    );
}

/// A migrator that panics: its step fails, the engine goes on.
struct Panics;

#[async_trait::async_trait]
impl fluidcloud_plugins::Migrator for Panics {
    fn describe(&self) -> fluidcloud_plugins::MigratorDescriptor {
        fluidcloud_plugins::MigratorDescriptor {
            name: "panics".into(),
            version: "0.0.0".into(),
            summary: "panics".into(),
            consumes: vec![],
            produces: vec![],
        }
    }
    fn validate(&self, _: &fluidcloud_plugins::StepRequest) -> Vec<fluidcloud_plugins::Diagnostic> {
        vec![]
    }
    async fn plan(
        &self,
        _: &fluidcloud_plugins::StepRequest,
    ) -> fluidcloud_plugins::Result<fluidcloud_plugins::Estimate> {
        Ok(fluidcloud_plugins::Estimate::default())
    }
    async fn execute(
        &self,
        _: &fluidcloud_plugins::StepRequest,
        _: &fluidcloud_plugins::ExecContext,
    ) -> fluidcloud_plugins::Result<fluidcloud_plugins::StepOutput> {
        panic!("plugin bug")
    }
    async fn rollback(
        &self,
        _: &fluidcloud_plugins::StepRequest,
        _: Option<&fluidcloud_plugins::StepOutput>,
        _: &fluidcloud_plugins::ExecContext,
    ) -> fluidcloud_plugins::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_panicking_migrator_fails_its_step_not_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, _) = registry();
    let reg = reg.with(std::sync::Arc::new(Panics));
    let wf = build(
        WorkflowBuilder::new("panic")
            .step(StepSpec::new("boom", "panics", "s"))
            .step(nstep("fine", "s", serde_json::json!({}))),
        &reg,
    );
    let config = ExecutorConfig {
        on_failure: FailurePolicy::SkipDependents,
        ..config()
    };
    let report = executor(&wf, &reg, &dir.path().join("j.db"), config)
        .run()
        .await
        .unwrap();
    assert_eq!(report.state_of("boom"), Some(StepState::Failed));
    assert_eq!(report.steps[0].attempts, 1, "a panic is not retried");
    assert!(
        report.steps[0]
            .error
            .as_deref()
            .unwrap()
            .contains("migrator `panics` panicked")
    );
    assert_eq!(report.state_of("fine"), Some(StepState::Succeeded));
}

#[test]
fn progress_events_serialize_for_server_sent_events() {
    let ev = ProgressEvent::StepProgress {
        step: "copy-volume".into(),
        done: 512,
        total: Some(1024),
        rate: 256.0,
    };
    assert_eq!(
        serde_json::to_string(&ev).unwrap(),
        r#"{"event":"step-progress","step":"copy-volume","done":512,"total":1024,"rate":256.0}"#
    );
    let back: ProgressEvent = serde_json::from_str(&serde_json::to_string(&ev).unwrap()).unwrap();
    assert_eq!(back, ev);
}
