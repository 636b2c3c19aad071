//! Shared helpers of the integration tests.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use fluidcloud_plugins::ArtifactKind;
use fluidcloud_viaduct::testkit::{ChunkCopy, Noop};
use fluidcloud_viaduct::{
    Entry, Executor, ExecutorConfig, Journal, Record, Registry, RetryPolicy, SqliteJournal,
    StepSpec, StepState, Workflow, WorkflowBuilder,
};

pub fn registry() -> (Registry, Arc<Noop>) {
    let noop = Arc::new(Noop::new());
    let reg = Registry::new().with(noop.clone()).with(Arc::new(ChunkCopy));
    (reg, noop)
}

/// A no-op step on `site` with `params` merged in (`site` is set for the
/// concurrency log).
pub fn nstep(id: &str, site: &str, params: serde_json::Value) -> StepSpec {
    let mut p = serde_json::json!({ "site": site });
    if let (Some(p), Some(extra)) = (p.as_object_mut(), params.as_object()) {
        for (k, v) in extra {
            p.insert(k.clone(), v.clone());
        }
    }
    StepSpec::new(id, Noop::NAME, site).params(p)
}

pub fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_ms: 1,
        multiplier: 2.0,
        max_delay_ms: 5,
        jitter: 0.0,
    }
}

pub fn config() -> ExecutorConfig {
    ExecutorConfig {
        max_concurrency: 4,
        retry: fast_retry(3),
        ..ExecutorConfig::default()
    }
}

pub fn executor(wf: &Workflow, reg: &Registry, journal: &Path, config: ExecutorConfig) -> Executor {
    let j = SqliteJournal::open(journal).unwrap();
    Executor::new(wf.clone(), reg.clone(), Box::new(j), config)
}

pub fn entries(journal: &Path) -> Vec<Entry> {
    SqliteJournal::open(journal).unwrap().replay().unwrap()
}

/// Every (from, to) transition in the journal, per step, in order.
pub fn transitions(journal: &Path) -> Vec<(String, StepState, StepState)> {
    entries(journal)
        .into_iter()
        .filter_map(|e| match e.record {
            Record::Transition { step, from, to, .. } => Some((step, from, to)),
            _ => None,
        })
        .collect()
}

pub fn build(b: WorkflowBuilder, reg: &Registry) -> Workflow {
    b.build(reg).unwrap()
}

pub fn vol() -> ArtifactKind {
    ArtifactKind::Volume
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
