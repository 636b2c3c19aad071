//! # fluidcloud viaduct: the workflow engine
//!
//! The viaduct turns a placement into a DAG of migrator steps and runs it
//! safely: bounded concurrency, retries driven by each error's
//! [`Retry`](fluidcloud_plugins::Retry) classification, a durable journal so
//! a relocation resumes after `kill -9`, and rollback of completed steps.
//!
//! ## Design
//!
//! - **Build, validate, freeze.** A [`WorkflowBuilder`] collects
//!   [`StepSpec`]s: a migrator name from the [`Registry`], a site, parameters,
//!   named inputs bound to another step's named output with the expected
//!   [`ArtifactKind`](fluidcloud_plugins::ArtifactKind) (or to an artifact
//!   that exists already), declared outputs, and plain `after` ordering.
//!   [`WorkflowBuilder::build`] reports every problem at once as
//!   [`Diagnostic`](fluidcloud_plugins::Diagnostic)s keyed
//!   `steps.<id>.<field>`: duplicate ids, unknown migrators, missing
//!   producers or outputs, kind mismatches, kinds a migrator does not
//!   consume or produce, cycles, and each migrator's own `validate`. A
//!   frozen [`Workflow`] has a stable [`Workflow::id`], a hash of its
//!   canonical definition.
//! - **An explicit lifecycle.** [`lifecycle::TRANSITIONS`] is the whole
//!   state machine of a step; anything else is an error, at run time and
//!   when replaying a journal.
//! - **Journal first, then act.** The [`Executor`] has one coordinator loop
//!   that owns all state. Each turn it collects what happened, decides the
//!   transitions, appends them to the [`Journal`] as one batch, and only
//!   after the append returned does it act on them (start steps, arm retry
//!   timers, release dependents, publish [`ProgressEvent`]s).
//! - **Replay is the single source of truth.** A run never trusts memory
//!   from an earlier process: it rebuilds each step's state, attempts and
//!   outputs from the journal ([`RunState::replay`]), checking every record
//!   against the lifecycle table.
//! - **Retry policy is data.** [`RetryPolicy`] (serde) with the pure
//!   [`RetryPolicy::next_delay`]: exponential backoff with jitter, bounded
//!   attempts, never for [`Retry::Never`](fluidcloud_plugins::Retry::Never)
//!   errors, at least the wait a
//!   [`Retry::After`](fluidcloud_plugins::Retry::After) error asks for.
//! - **Concurrency** is bounded globally and per site
//!   ([`ExecutorConfig`]), so one small edge site is not flooded. Each
//!   attempt may have a timeout (a transient failure). A migrator that
//!   panics fails its step, not the engine.
//! - **Failure policy**: [`FailurePolicy::StopAll`] starts nothing more
//!   after a failure and cancels what has not started;
//!   [`FailurePolicy::SkipDependents`] skips only the failed step's
//!   transitive dependents.
//!
//! ## Journal format
//!
//! The embedded [`SqliteJournal`] is one SQLite file in WAL mode with
//! `synchronous=FULL` (a batch is on disk when `append` returns;
//! [`Durability::Process`] relaxes that to "survives a killed process").
//! Schema (version [`JOURNAL_VERSION`]):
//!
//! ```sql
//! CREATE TABLE viaduct_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
//! -- format = 'fluidcloud-viaduct-journal', version = '1',
//! -- workflow_id = 'wf-…', workflow = the definition as JSON
//! CREATE TABLE viaduct_events (
//!     seq   INTEGER PRIMARY KEY,  -- order of appends
//!     at_ms INTEGER NOT NULL,     -- wall clock, ms since the epoch
//!     kind  TEXT NOT NULL,        -- the record's kind tag, for queries
//!     step  TEXT,                 -- the step id, for queries
//!     body  TEXT NOT NULL,        -- the record as JSON
//!     sum   TEXT NOT NULL         -- FNV-1a 64 of body, hex
//! ) STRICT;
//! ```
//!
//! [`PgJournal`] keeps the same records, one row per record with the same
//! checksum, in one PostgreSQL database for every journal (schema in
//! [`postgres::MIGRATIONS`], applied when a journal is opened); a batch is
//! one transaction, and the journal's lock is a session advisory lock the
//! server releases when its holder's connection ends. Both backends pass
//! one conformance suite (`tests/journal_conformance.rs`).
//!
//! Record kinds ([`Record`], JSON with a `kind` tag):
//!
//! | kind | fields | meaning |
//! |---|---|---|
//! | `run-started` | `mode` (`execute`/`rollback`), `pid` | a process took over the workflow |
//! | `transition` | `step`, `from`, `to`, `attempt`, `error?`, `delay_ms?` | a step changed state |
//! | `output` | `step`, `output` (a [`StepOutput`](fluidcloud_plugins::StepOutput)) | what a step produced; always in the same batch as, and before, its `running -> succeeded` |
//! | `cancel-requested` | `reason` | cancellation was asked for |
//! | `run-finished` | `outcome` (`succeeded`/`failed`/`cancelled`) | a run ended normally; absent after a crash |
//!
//! The meta table makes the file self-describing: a resume needs only the
//! journal ([`Executor::from_journal`]). Opening a file that is not a
//! SQLite database gives [`Error::CorruptJournal`] (the file is not
//! changed); a database without these tables, of another format version, or
//! of another workflow gives [`Error::ForeignJournal`]; a row that fails
//! its checksum, does not parse, or describes a transition the lifecycle
//! does not allow from the replayed state gives [`Error::CorruptJournal`]
//! naming the row. In every case nothing is executed.
//!
//! **Group commit.** Every append is one transaction. The coordinator
//! batches all records of one turn of its loop (the steps that finished
//! together, their outputs, the dependents released, the steps started
//! next), so a 10,000-step run makes far fewer `fsync`s than transitions.
//! The rule holds per record: a step is spawned only after its
//! `pending -> running` is durable, and a dependent sees a producer's
//! output only after the `output` and `running -> succeeded` records are.
//!
//! **One owner at a time.** Before replaying, the executor takes the
//! journal's lock ([`Journal::lock`]; for SQLite an `flock` on
//! `JOURNAL.lock`, released by the kernel when the process dies, so a crash
//! never leaves a stale lock). A second process gets
//! [`Error::JournalInUse`] and executes nothing. Reading a journal needs no
//! lock.
//!
//! A [`Journal`] for PostgreSQL (several workers on several machines) would
//! keep the same two tables, append a batch in one transaction, and take a
//! row lock on the run while a worker owns it.
//!
//! ## Resume guarantees
//!
//! After the process is killed at any moment (`kill -9`), running the same
//! workflow against the same journal ([`Executor::run`] again, or
//! [`Executor::from_journal`]):
//!
//! 1. never re-runs a step whose `running -> succeeded` is journalled; its
//!    output is taken from the journal;
//! 2. records each step found `running` or `retry-wait` as `cancelled`
//!    (`interrupted`), puts it and failed, skipped or cancelled steps back
//!    to `pending`, and runs them again with the same
//!    [`StepRequest::step_id`](fluidcloud_plugins::StepRequest), so the
//!    migrator's keyed path continues (a block copy from its last completed
//!    chunk, see [`testkit::ChunkCopy`]);
//! 3. ends in the same state as an uninterrupted run.
//!
//! Attempt numbers go on across runs (the journal keeps them), but the
//! retry budget ([`RetryPolicy::max_attempts`]) is per run: a resume gives
//! a failed step its attempts again.
//!
//! A step that finished its work but was killed before its success was
//! journalled runs again: migrators must be idempotent or keyed, as the
//! [`Migrator`](fluidcloud_plugins::Migrator) contract says. The crash test
//! (`tests/crash_resume.rs`) kills a real child process at 30 seeded random
//! points and checks files and side-effect counts.
//!
//! ## Rollback
//!
//! [`Executor::rollback`] runs the compensations of every step that ran
//! (succeeded, failed or interrupted, so partial targets are removed) in
//! reverse dependency order, journalling each `-> rolled-back`. Steps that
//! never ran are not touched, nor is the source site: a migrator's
//! `rollback` removes only what it created at the target. An interrupted
//! rollback continues where it stopped. A rolled-back workflow cannot be run
//! again; plan a new one.
//!
//! ## Cancellation
//!
//! [`Canceller::cancel`] (or [`Canceller::on_ctrl_c`]): no new step starts,
//! a `cancel-requested` record is journalled, running steps see their
//! [`CancelFlag`](fluidcloud_plugins::CancelFlag) and get
//! [`ExecutorConfig::cancel_grace_ms`] to stop at a safe point, then are
//! aborted; everything not finished ends `cancelled`, and the run's
//! [`RunReport::exit_code`] is [`EXIT_CANCELLED`] (130, as for SIGINT),
//! which the CLI exits with. A later resume continues.
//!
//! ## Progress
//!
//! [`ProgressEvent`]s (step started, bytes done / total with the rate,
//! message, retrying, finished, rolled back, run finished) go to a
//! broadcast channel: [`Executor::subscribe`] or
//! [`Executor::progress_stream`], one stream for the CLI's progress bars and
//! the REST service's server-sent events.
//!
//! ## Plans
//!
//! [`Plan`] estimates each step through its migrator and renders a text
//! tree, JSON, Graphviz DOT or Mermaid.
//!
//! ## Speed
//!
//! `bench/viaduct.sh` runs 10,000 no-op steps with the journal on a file
//! and prints the per-step overhead.

pub mod error;
pub mod executor;
pub mod journal;
pub mod lifecycle;
pub mod plan;
pub mod postgres;
pub mod progress;
pub mod retry;
pub mod testkit;
pub mod workflow;

pub use error::{Error, Result};
pub use executor::{
    Canceller, EXIT_CANCELLED, Executor, ExecutorConfig, FailurePolicy, RunReport, StepReport,
};
pub use journal::{
    Durability, Entry, JOURNAL_FORMAT, JOURNAL_VERSION, Journal, JournalHeader, JournalLocation,
    Outcome, Record, RunMode, RunState, SqliteJournal,
};
pub use lifecycle::{StepState, TRANSITIONS, Transition};
pub use plan::{Plan, PlanStep};
pub use postgres::{PgConn, PgJournal};
pub use progress::ProgressEvent;
pub use retry::RetryPolicy;
pub use workflow::{InputBinding, Registry, StepSpec, Workflow, WorkflowBuilder, WorkflowDef};

pub use fluidcloud_plugins as sdk;
