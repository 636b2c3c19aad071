//! Progress events: one stream that the CLI turns into progress bars and the
//! REST service into server-sent events.
//!
//! The executor publishes on a [`tokio::sync::broadcast`] channel; any number
//! of consumers subscribe with [`crate::Executor::subscribe`] or take a
//! [`futures::Stream`] with [`crate::Executor::progress_stream`]. A slow
//! consumer misses events (the stream skips what it lagged behind) rather
//! than slowing the run; every event is a complete statement (`done` is a
//! total, not a delta), so missing some is harmless.

use std::sync::Arc;
use std::time::Instant;

use fluidcloud_plugins::ProgressSink;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::journal::Outcome;
use crate::lifecycle::StepState;

/// Something that happened during a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ProgressEvent {
    /// A step's migrator was started.
    StepStarted {
        /// The step.
        step: String,
        /// Its site.
        site: String,
        /// 1-based attempt number.
        attempt: u32,
    },
    /// A running step reported progress.
    StepProgress {
        /// The step.
        step: String,
        /// Bytes (or items) done so far.
        done: u64,
        /// The total, when known.
        total: Option<u64>,
        /// Average rate since the attempt started, per second.
        rate: f64,
    },
    /// A running step said something.
    StepMessage {
        /// The step.
        step: String,
        /// What it said.
        text: String,
    },
    /// A step failed and will be tried again.
    StepRetrying {
        /// The step.
        step: String,
        /// The attempt that failed.
        attempt: u32,
        /// The wait before the next attempt, in milliseconds.
        delay_ms: u64,
        /// The error.
        error: String,
    },
    /// A step reached a terminal state in this run.
    StepFinished {
        /// The step.
        step: String,
        /// Its state.
        state: StepState,
        /// Bytes written, from the step's measurements.
        bytes: u64,
        /// Time of the last attempt, in milliseconds.
        elapsed_ms: u64,
    },
    /// A step was rolled back.
    StepRolledBack {
        /// The step.
        step: String,
    },
    /// The run ended.
    RunFinished {
        /// How.
        outcome: Outcome,
        /// Its duration in milliseconds.
        elapsed_ms: u64,
    },
}

/// Turns a broadcast receiver into a stream that skips what it lagged
/// behind and ends when the executor is dropped.
pub fn stream(rx: broadcast::Receiver<ProgressEvent>) -> BoxStream<'static, ProgressEvent> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => return Some((ev, rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }))
}

/// The [`ProgressSink`] handed to one attempt of one step.
pub(crate) struct StepSink {
    pub(crate) step: String,
    pub(crate) started: Instant,
    pub(crate) tx: broadcast::Sender<ProgressEvent>,
}

impl StepSink {
    pub(crate) fn new(step: &str, tx: &broadcast::Sender<ProgressEvent>) -> Arc<Self> {
        Arc::new(Self {
            step: step.to_owned(),
            started: Instant::now(),
            tx: tx.clone(),
        })
    }
}

impl ProgressSink for StepSink {
    fn progress(&self, done: u64, total: Option<u64>) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let _ = self.tx.send(ProgressEvent::StepProgress {
            step: self.step.clone(),
            done,
            total,
            rate,
        });
    }

    fn message(&self, text: &str) {
        // Messages reach terminals, logs and server-sent events.
        let _ = self.tx.send(ProgressEvent::StepMessage {
            step: self.step.clone(),
            text: fluidcloud_plugins::redact::string(text),
        });
    }
}
