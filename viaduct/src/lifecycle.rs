//! The step lifecycle as an explicit transition table.
//!
//! ```text
//!            start            ok
//!  Pending ─────────▶ Running ─────▶ Succeeded ───────┐
//!   │  ▲  ▲             │ │ │                          │ rollback
//!   │  │  │   retryable │ │ └─ error ─▶ Failed ────────┤
//!   │  │  │             ▼ │                            ▼
//!   │  │  │        RetryWait ─ cancel ─▶ Cancelled ─▶ RolledBack
//!   │  │  │             │   (also from Running, Pending)
//!   │  │  └── resume ───┴── from Cancelled, Failed, Skipped
//!   └─ dependency failed ─▶ Skipped
//! ```
//!
//! Every edge is in [`TRANSITIONS`]; [`check`] refuses anything else, and the
//! journal replay refuses a journal containing anything else.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a step is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    /// Not started (or put back to be run again by a resume).
    Pending,
    /// Its migrator is executing.
    Running,
    /// Finished; its outputs are in the journal.
    Succeeded,
    /// Failed for good (retries exhausted or the error is not retryable).
    Failed,
    /// Failed with a retryable error; waits for its backoff delay.
    RetryWait,
    /// Not run because a step it depends on failed.
    Skipped,
    /// Stopped by cancellation, by a stop-everything failure policy, or found
    /// interrupted by a crash.
    Cancelled,
    /// Its compensation ran: what it created at the target is removed.
    RolledBack,
}

impl StepState {
    /// Every state.
    pub const ALL: [StepState; 8] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::RetryWait,
        Self::Skipped,
        Self::Cancelled,
        Self::RolledBack,
    ];

    /// The lowercase name used in the journal and in output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RetryWait => "retry-wait",
            Self::Skipped => "skipped",
            Self::Cancelled => "cancelled",
            Self::RolledBack => "rolled-back",
        }
    }

    /// Parses [`StepState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether a run can end with a step in this state: nothing more will
    /// happen to it without a resume or a rollback.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Skipped | Self::Cancelled | Self::RolledBack
        )
    }
}

impl fmt::Display for StepState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One allowed edge of the lifecycle, with the event that takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: StepState,
    /// State after.
    pub to: StepState,
    /// What causes it.
    pub on: &'static str,
}

const fn t(from: StepState, to: StepState, on: &'static str) -> Transition {
    Transition { from, to, on }
}

use StepState::{Cancelled, Failed, Pending, RetryWait, RolledBack, Running, Skipped, Succeeded};

/// The complete transition table. Anything not listed is an error.
pub const TRANSITIONS: [Transition; 16] = [
    t(Pending, Running, "start: inputs ready and a slot free"),
    t(
        Pending,
        Skipped,
        "a dependency failed (skip-dependents policy)",
    ),
    t(
        Pending,
        Cancelled,
        "cancelled, or the run stopped after a failure",
    ),
    t(
        Pending,
        RolledBack,
        "rollback of a step re-queued after it had run",
    ),
    t(Running, Succeeded, "the migrator returned its outputs"),
    t(Running, Failed, "non-retryable error or attempts exhausted"),
    t(Running, RetryWait, "retryable error, attempts left"),
    t(
        Running,
        Cancelled,
        "cancelled, aborted, or found interrupted on resume",
    ),
    t(RetryWait, Running, "backoff delay elapsed"),
    t(
        RetryWait,
        Cancelled,
        "cancelled while waiting, or found waiting on resume",
    ),
    t(Succeeded, RolledBack, "rollback: compensation done"),
    t(Failed, RolledBack, "rollback: partial target removed"),
    t(Cancelled, RolledBack, "rollback: partial target removed"),
    t(Failed, Pending, "resume: try again"),
    t(Skipped, Pending, "resume: try again"),
    t(Cancelled, Pending, "resume: continue"),
];

/// Whether `from -> to` is in the table.
pub fn allowed(from: StepState, to: StepState) -> bool {
    TRANSITIONS.iter().any(|tr| tr.from == from && tr.to == to)
}

/// Checks one transition of `step`.
///
/// # Errors
/// [`Error::InvalidTransition`] when the table has no such edge.
pub fn check(step: &str, from: StepState, to: StepState) -> Result<()> {
    if allowed(from, to) {
        Ok(())
    } else {
        Err(Error::InvalidTransition {
            step: step.to_owned(),
            from,
            to,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_no_duplicates_and_terminal_states_only_go_on_by_resume_or_rollback() {
        for (i, a) in TRANSITIONS.iter().enumerate() {
            for b in &TRANSITIONS[i + 1..] {
                assert!(!(a.from == b.from && a.to == b.to), "{a:?} twice");
            }
            if a.from.is_terminal() {
                assert!(matches!(a.to, Pending | RolledBack), "terminal {a:?}");
            }
        }
        assert!(check("s", Pending, Succeeded).is_err());
        assert!(check("s", Succeeded, Running).is_err());
        assert!(check("s", RolledBack, Pending).is_err());
        assert!(check("s", Pending, Running).is_ok());
        for s in StepState::ALL {
            assert_eq!(StepState::parse(s.as_str()), Some(s));
        }
    }
}
