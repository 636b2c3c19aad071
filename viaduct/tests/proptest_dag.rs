//! Property tests on random DAGs: dependencies respected, concurrency bounds
//! never exceeded, every step ends in a terminal state.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use fluidcloud_viaduct::{
    ExecutorConfig, FailurePolicy, Outcome, Record, StepState, WorkflowBuilder,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct StepGen {
    deps: Vec<prop::sample::Index>,
    site: usize,
    sleep_ms: u64,
    fail: u64,
    never: bool,
}

fn step_gen() -> impl Strategy<Value = StepGen> {
    (
        prop::collection::vec(any::<prop::sample::Index>(), 0..3),
        0..3usize,
        0..4u64,
        prop_oneof![6 => Just(0u64), 2 => Just(1u64), 1 => Just(3u64)],
        prop::bool::weighted(0.3),
    )
        .prop_map(|(deps, site, sleep_ms, fail, never)| StepGen {
            deps,
            site,
            sleep_ms,
            fail,
            never,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_dags_respect_dependencies_bounds_and_end_terminal(
        steps in prop::collection::vec(step_gen(), 1..25),
        max_concurrency in 1..6usize,
        site_limit in 1..3usize,
        skip in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (reg, noop) = registry();
        let mut b = WorkflowBuilder::new("prop");
        for (i, g) in steps.iter().enumerate() {
            let mut s = nstep(
                &format!("s{i}"),
                &format!("site{}", g.site),
                serde_json::json!({
                    "sleep_ms": g.sleep_ms,
                    "fail": g.fail,
                    "error": if g.never { "never" } else { "transient" },
                }),
            );
            if i > 0 {
                for d in &g.deps {
                    let id = format!("s{}", d.index(i));
                    if !s.after.contains(&id) {
                        s = s.after(id);
                    }
                }
            }
            b.push(s);
        }
        let wf = b.build(&reg).unwrap();
        let config = ExecutorConfig {
            max_concurrency,
            default_per_site: Some(site_limit),
            on_failure: if skip { FailurePolicy::SkipDependents } else { FailurePolicy::StopAll },
            retry: fast_retry(3),
            ..ExecutorConfig::default()
        };
        let journal = dir.path().join("j.db");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let report = rt.block_on(executor(&wf, &reg, &journal, config).run()).unwrap();

        // Every step terminal, in the report and in the replayed journal.
        prop_assert!(report.steps.iter().all(|s| s.state.is_terminal()), "{:?}", report.steps);
        let state = {
            let mut ex = executor(&wf, &reg, &journal, ExecutorConfig::default());
            ex.state().unwrap()
        };
        prop_assert_eq!(&state.states, &report.steps.iter().map(|s| s.state).collect::<Vec<_>>());

        // Bounds.
        noop.with_log(|l| {
            assert!(l.max_running <= max_concurrency, "{} > {max_concurrency}", l.max_running);
            for (site, n) in &l.max_by_site {
                assert!(*n <= site_limit, "{site}: {n} > {site_limit}");
            }
        });

        // Dependencies: a step starts only after all its dependencies
        // succeeded, in journal order.
        let mut succeeded_at: HashMap<String, usize> = HashMap::new();
        for (pos, e) in entries(&journal).iter().enumerate() {
            if let Record::Transition { step, to, .. } = &e.record {
                let i = wf.index_of(step).unwrap();
                match to {
                    StepState::Succeeded => { succeeded_at.insert(step.clone(), pos); }
                    StepState::Running => {
                        for &d in wf.dependencies(i) {
                            let dep = &wf.steps()[d].id;
                            prop_assert!(succeeded_at.contains_key(dep), "{} started before {} succeeded", step, dep);
                        }
                    }
                    _ => {}
                }
            }
        }

        // Without permanent failures, everything succeeds.
        let doomed = steps.iter().any(|g| g.fail >= 3 || (g.fail > 0 && g.never));
        if !doomed {
            prop_assert_eq!(report.outcome, Outcome::Succeeded);
        } else {
            prop_assert_ne!(report.outcome, Outcome::Cancelled);
        }
    }
}
