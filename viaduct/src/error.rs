//! The viaduct's error type.

use std::path::PathBuf;

use fluidcloud_plugins::{Diagnostic, Retry, Retryable};

use crate::lifecycle::StepState;

/// Everything that can go wrong while building, journalling or running a
/// workflow.
///
/// A step's own failure is not an error of [`crate::Executor::run`]: it is
/// recorded in the journal and reported in the [`crate::RunReport`]. This
/// enum is for what stops the engine itself, and for callers that turn a
/// report into a `Result` with [`crate::RunReport::into_result`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The workflow failed validation; each diagnostic names the step.
    #[error("invalid workflow: {}", summarize(.0))]
    InvalidWorkflow(Vec<Diagnostic>),
    /// The journal could not be opened, read or written.
    #[error("journal {}: {what}", path.display())]
    Journal {
        /// The journal file (`:memory:` for an in-memory journal).
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The underlying database error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database server (of a journal, or of `serve --database`) could
    /// not be reached, or refused.
    #[error("database {}: {what}", path.display())]
    Database {
        /// The database URL without its password, `#` the journal's name.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The journal exists but its content is damaged; nothing was executed.
    #[error("corrupt journal {}: row {row}: {what}", path.display())]
    CorruptJournal {
        /// The journal file.
        path: PathBuf,
        /// The row (event sequence number) at fault; 0 for the file itself.
        row: i64,
        /// What is wrong with it.
        what: String,
    },
    /// The file is a journal of another workflow, or not a viaduct journal at
    /// all; nothing was executed.
    #[error("foreign journal {}: {what}", path.display())]
    ForeignJournal {
        /// The journal file.
        path: PathBuf,
        /// Why it is not this workflow's journal.
        what: String,
    },
    /// Another process holds the journal (it is running or rolling back
    /// this workflow); nothing was executed.
    #[error("journal {} is in use by another process", path.display())]
    JournalInUse {
        /// The journal file.
        path: PathBuf,
    },
    /// A step moved along an edge its lifecycle does not have.
    #[error("step `{step}`: invalid transition {from} -> {to}")]
    InvalidTransition {
        /// The step.
        step: String,
        /// Its current state.
        from: StepState,
        /// The state asked for.
        to: StepState,
    },
    /// A step failed (see [`crate::RunReport::into_result`]).
    #[error("step `{step}` failed: {source}")]
    Step {
        /// The step.
        step: String,
        /// The migrator's error.
        #[source]
        source: fluidcloud_plugins::Error,
    },
    /// Rolling a step back failed; the rollback stopped there and can be
    /// resumed.
    #[error("rollback of step `{step}` failed: {source}")]
    Rollback {
        /// The step.
        step: String,
        /// The migrator's error.
        #[source]
        source: fluidcloud_plugins::Error,
    },
    /// The workflow was rolled back; it cannot run again from this journal.
    #[error("journal {}: the workflow was rolled back; plan a new one", path.display())]
    RolledBack {
        /// The journal file.
        path: PathBuf,
    },
    /// The run was cancelled; resume it to continue. The CLI exits with
    /// [`crate::EXIT_CANCELLED`].
    #[error("cancelled; resume to continue")]
    Cancelled,
    /// Reading or writing a file of the engine failed.
    #[error("{context}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn summarize(diags: &[Diagnostic]) -> String {
    match diags {
        [] => "no details".to_owned(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    }
}

impl Retryable for Error {
    fn retry(&self) -> Retry {
        match self {
            Self::Step { source, .. } | Self::Rollback { source, .. } => source.retry(),
            Self::Journal { source, .. } => match source.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    Retry::Transient
                }
                _ => Retry::Never,
            },
            Self::Io { source, .. } => fluidcloud_plugins::error::io_retry(source.kind()),
            // A server restarting, a network cut: a new connection may
            // succeed (the journal says what was written).
            Self::Database { .. } => Retry::Transient,
            Self::InvalidWorkflow(_)
            | Self::CorruptJournal { .. }
            | Self::ForeignJournal { .. }
            | Self::InvalidTransition { .. }
            | Self::RolledBack { .. }
            | Self::JournalInUse { .. }
            | Self::Cancelled => Retry::Never,
        }
    }
}

/// Result alias of the viaduct.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_errors_keep_the_migrators_classification() {
        let e = Error::Step {
            step: "copy".into(),
            source: fluidcloud_plugins::Error::Transient("reset".into()),
        };
        assert_eq!(e.retry(), Retry::Transient);
        assert_eq!(
            e.to_string(),
            "step `copy` failed: transient failure: reset"
        );
        let c = Error::CorruptJournal {
            path: "/j.db".into(),
            row: 7,
            what: "bad checksum".into(),
        };
        assert_eq!(c.retry(), Retry::Never);
        assert_eq!(c.to_string(), "corrupt journal /j.db: row 7: bad checksum");
    }
}
