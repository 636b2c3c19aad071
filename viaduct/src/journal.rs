//! The journal: an append-only log of everything the engine decided, from
//! which the state of a run is rebuilt.
//!
//! See the crate docs for the format and the guarantees. [`Journal`] is the
//! interface; [`SqliteJournal`] is the embedded default, and
//! [`crate::PgJournal`] keeps journals in a PostgreSQL database for several
//! workers ([`JournalLocation`] opens either); [`RunState::replay`]
//! rebuilds the state.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use fluidcloud_plugins::StepOutput;
use rusqlite::{Connection, OpenFlags, params};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lifecycle::{self, StepState};
use crate::workflow::{Workflow, WorkflowDef};

/// The `format` value in the `viaduct_meta` table.
pub const JOURNAL_FORMAT: &str = "fluidcloud-viaduct-journal";
/// The journal format version this crate writes and reads.
pub const JOURNAL_VERSION: u32 = 1;

/// What the journal knows about the workflow it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalHeader {
    /// The workflow's stable id.
    pub workflow_id: String,
    /// The workflow definition, so a resume needs nothing but the journal.
    pub workflow: WorkflowDef,
}

/// Why a run was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunMode {
    /// Execute (first run or resume).
    Execute,
    /// Roll back.
    Rollback,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every step succeeded (or, for a rollback, every step that ran is
    /// rolled back).
    Succeeded,
    /// At least one step failed.
    Failed,
    /// Cancelled; a resume continues.
    Cancelled,
}

/// One journal record. Serialized as JSON with a `kind` tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Record {
    /// A process started executing or rolling back the workflow.
    RunStarted {
        /// What for.
        mode: RunMode,
        /// The process id, for forensics.
        pid: u32,
    },
    /// A step changed state.
    Transition {
        /// The step id.
        step: String,
        /// State before (checked on replay).
        from: StepState,
        /// State after.
        to: StepState,
        /// Attempt number (1-based) the transition belongs to.
        attempt: u32,
        /// The error, for `failed` and `retry-wait`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Backoff before the next attempt, for `retry-wait`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delay_ms: Option<u64>,
    },
    /// What a step produced; always journalled in the same batch as, and
    /// before, its `running -> succeeded` transition.
    Output {
        /// The step id.
        step: String,
        /// Its output.
        output: StepOutput,
    },
    /// Cancellation was asked for.
    CancelRequested {
        /// Why (e.g. `interrupt`).
        reason: String,
    },
    /// A run ended normally (not written when the process is killed).
    RunFinished {
        /// How.
        outcome: Outcome,
    },
}

impl Record {
    /// The `kind` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RunStarted { .. } => "run-started",
            Self::Transition { .. } => "transition",
            Self::Output { .. } => "output",
            Self::CancelRequested { .. } => "cancel-requested",
            Self::RunFinished { .. } => "run-finished",
        }
    }

    pub(crate) fn step(&self) -> Option<&str> {
        match self {
            Self::Transition { step, .. } | Self::Output { step, .. } => Some(step),
            _ => None,
        }
    }
}

/// A record with its place in the journal.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Sequence number, increasing, from 1.
    pub seq: i64,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The record.
    pub record: Record,
}

/// Durable, append-only storage of records.
///
/// `append` returns only when the whole batch is durable, and applies it
/// atomically: after a crash either all of a batch is there or none of it.
pub trait Journal: Send {
    /// Where it is, for messages (a path, or a URL for a database server).
    fn location(&self) -> &Path;

    /// The header, or `None` for a new, empty journal.
    ///
    /// # Errors
    /// [`Error::ForeignJournal`] when the storage holds something else,
    /// [`Error::CorruptJournal`] when it is damaged, [`Error::Journal`] on
    /// an I/O failure.
    fn header(&self) -> Result<Option<JournalHeader>>;

    /// Initialises an empty journal for a workflow.
    ///
    /// # Errors
    /// When it cannot be written, or is not empty.
    fn create(&mut self, header: &JournalHeader) -> Result<()>;

    /// Appends a batch atomically and durably.
    ///
    /// # Errors
    /// When it cannot be written; then none of the batch is recorded.
    fn append(&mut self, batch: &[Record]) -> Result<()>;

    /// Every entry, in order.
    ///
    /// # Errors
    /// [`Error::CorruptJournal`] when an entry fails its checksum or does
    /// not parse.
    fn replay(&self) -> Result<Vec<Entry>>;

    /// Takes exclusive ownership of the journal for this process until the
    /// journal is dropped (or the process dies), so two processes never run
    /// the same workflow at once. Readers do not need it. Taking it twice is
    /// a no-op.
    ///
    /// # Errors
    /// [`Error::JournalInUse`] when another process holds it.
    fn lock(&mut self) -> Result<()>;
}

/// How hard [`SqliteJournal`] pushes each batch to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: a batch survives power loss once `append`
    /// returns. The default.
    #[default]
    Full,
    /// `synchronous=NORMAL`: survives a killed process, not power loss.
    Process,
}

/// The embedded journal: one SQLite file in WAL mode.
pub struct SqliteJournal {
    conn: Connection,
    path: PathBuf,
    lock: Option<std::fs::File>,
}

impl std::fmt::Debug for SqliteJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteJournal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE viaduct_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE viaduct_events (
    seq   INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    kind  TEXT NOT NULL,
    step  TEXT,
    body  TEXT NOT NULL,
    sum   TEXT NOT NULL
) STRICT;
";

/// FNV-1a 64 of the body, as 16 hex digits: detects damaged rows.
pub(crate) fn checksum(body: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl SqliteJournal {
    /// Opens (or creates) the journal at `path` with [`Durability::Full`].
    ///
    /// # Errors
    /// [`Error::CorruptJournal`] when the file is not a SQLite database,
    /// [`Error::Journal`] when it cannot be opened.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(path, Durability::Full)
    }

    /// Opens (or creates) the journal at `path`.
    ///
    /// # Errors
    /// As [`SqliteJournal::open`].
    pub fn open_with(path: impl Into<PathBuf>, durability: Durability) -> Result<Self> {
        let path = path.into();
        // Readable by its owner only (SQLite gives its WAL and shared
        // memory files the database file's mode): a journal records what a
        // relocation did, on which sites.
        if path != Path::new(":memory:") {
            use std::os::unix::fs::OpenOptionsExt as _;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("creating journal {}", path.display()),
                        source: e,
                    });
                }
            }
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| Error::Journal {
            path: path.clone(),
            what: "open".into(),
            source,
        })?;
        let j = Self {
            conn,
            path,
            lock: None,
        };
        // The first statement reads the file header: a file that is not a
        // database fails here, before anything is written to it.
        let tables: i64 = j
            .conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(|e| j.db_error("read the schema", e))?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Process => "NORMAL",
        };
        if tables == 0 || j.is_ours()? {
            j.conn
                .execute_batch(&format!(
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};"
                ))
                .map_err(|e| j.db_error("set WAL mode", e))?;
        }
        Ok(j)
    }

    fn is_ours(&self) -> Result<bool> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name IN ('viaduct_meta','viaduct_events')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.db_error("read the schema", e))?;
        Ok(n == 2)
    }

    fn db_error(&self, what: &str, source: rusqlite::Error) -> Error {
        match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                Error::CorruptJournal {
                    path: self.path.clone(),
                    row: 0,
                    what: format!("not a readable SQLite database ({source})"),
                }
            }
            _ => Error::Journal {
                path: self.path.clone(),
                what: what.to_owned(),
                source,
            },
        }
    }

    fn corrupt(&self, row: i64, what: impl Into<String>) -> Error {
        Error::CorruptJournal {
            path: self.path.clone(),
            row,
            what: what.into(),
        }
    }

    fn meta(&self, key: &str) -> Result<Option<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT value FROM viaduct_meta WHERE key = ?1")
            .map_err(|e| self.db_error("read meta", e))?;
        let mut rows = st.query([key]).map_err(|e| self.db_error("read meta", e))?;
        match rows.next().map_err(|e| self.db_error("read meta", e))? {
            Some(r) => Ok(Some(r.get(0).map_err(|e| self.db_error("read meta", e))?)),
            None => Ok(None),
        }
    }
}

impl Journal for SqliteJournal {
    fn location(&self) -> &Path {
        &self.path
    }

    fn lock(&mut self) -> Result<()> {
        use std::os::fd::AsRawFd;
        if self.lock.is_some() {
            return Ok(());
        }
        let mut lock_path = self.path.as_os_str().to_owned();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| Error::Io {
                context: format!("open {}", lock_path.display()),
                source,
            })?;
        // SAFETY: flock on a descriptor we own and keep open; the kernel
        // releases the lock when the file is closed or the process dies.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(if err.kind() == std::io::ErrorKind::WouldBlock {
                Error::JournalInUse {
                    path: self.path.clone(),
                }
            } else {
                Error::Io {
                    context: format!("lock {}", lock_path.display()),
                    source: err,
                }
            });
        }
        self.lock = Some(file);
        Ok(())
    }

    fn header(&self) -> Result<Option<JournalHeader>> {
        let tables: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(|e| self.db_error("read the schema", e))?;
        if tables == 0 {
            return Ok(None);
        }
        if !self.is_ours()? {
            return Err(Error::ForeignJournal {
                path: self.path.clone(),
                what: "a SQLite database without the viaduct tables".into(),
            });
        }
        let format = self.meta("format")?;
        if format.as_deref() != Some(JOURNAL_FORMAT) {
            return Err(Error::ForeignJournal {
                path: self.path.clone(),
                what: format!("format is {format:?}, expected {JOURNAL_FORMAT:?}"),
            });
        }
        let version = self.meta("version")?;
        if version.as_deref() != Some(&JOURNAL_VERSION.to_string()) {
            return Err(Error::ForeignJournal {
                path: self.path.clone(),
                what: format!(
                    "journal version {version:?}; this build reads version {JOURNAL_VERSION}"
                ),
            });
        }
        let id = self
            .meta("workflow_id")?
            .ok_or_else(|| self.corrupt(0, "no workflow_id"))?;
        let def = self
            .meta("workflow")?
            .ok_or_else(|| self.corrupt(0, "no workflow definition"))?;
        let workflow: WorkflowDef = serde_json::from_str(&def)
            .map_err(|e| self.corrupt(0, format!("workflow definition: {e}")))?;
        Ok(Some(JournalHeader {
            workflow_id: id,
            workflow,
        }))
    }

    fn create(&mut self, header: &JournalHeader) -> Result<()> {
        let def =
            serde_json::to_string(&header.workflow).map_err(|e| self.corrupt(0, e.to_string()))?;
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|source| Error::Journal {
            path: path.clone(),
            what: "begin".into(),
            source,
        })?;
        let wrap = |what: &str| {
            let path = path.clone();
            let what = what.to_owned();
            move |source| Error::Journal { path, what, source }
        };
        tx.execute_batch(SCHEMA)
            .map_err(wrap("create the schema"))?;
        for (k, v) in [
            ("format", JOURNAL_FORMAT.to_owned()),
            ("version", JOURNAL_VERSION.to_string()),
            ("workflow_id", header.workflow_id.clone()),
            ("workflow", def),
        ] {
            tx.execute(
                "INSERT INTO viaduct_meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(wrap("write meta"))?;
        }
        tx.commit().map_err(wrap("commit"))
    }

    fn append(&mut self, batch: &[Record]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let wrap = |what: &'static str| {
            let path = path.clone();
            move |source| Error::Journal {
                path,
                what: what.to_owned(),
                source,
            }
        };
        let at = now_ms();
        let tx = self.conn.transaction().map_err(wrap("begin"))?;
        {
            let mut st = tx
                .prepare_cached("INSERT INTO viaduct_events (at_ms, kind, step, body, sum) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(wrap("prepare append"))?;
            for r in batch {
                // Redacted before it is stored (and checksummed): the
                // journal outlives the run and is read by reports and the
                // REST service. Compact JSON stays valid: only quoted
                // values and URL passwords are replaced.
                let body = fluidcloud_plugins::redact::string(
                    &serde_json::to_string(r).unwrap_or_default(),
                );
                let sum = checksum(&body);
                st.execute(params![at, r.kind(), r.step(), body, sum])
                    .map_err(wrap("append"))?;
            }
        }
        tx.commit().map_err(wrap("commit"))
    }

    fn replay(&self) -> Result<Vec<Entry>> {
        let mut st = self
            .conn
            .prepare("SELECT seq, at_ms, kind, body, sum FROM viaduct_events ORDER BY seq")
            .map_err(|e| self.db_error("read events", e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(|e| self.db_error("read events", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at_ms, kind, body, sum) = row.map_err(|e| self.db_error("read events", e))?;
            out.push(parse_entry(&self.path, seq, at_ms, &kind, &body, &sum)?);
        }
        Ok(out)
    }
}

/// A stored event as an entry, checked: its checksum, its record, its
/// kind column.
pub(crate) fn parse_entry(
    path: &Path,
    seq: i64,
    at_ms: i64,
    kind: &str,
    body: &str,
    sum: &str,
) -> Result<Entry> {
    let corrupt = |what: String| Error::CorruptJournal {
        path: path.to_owned(),
        row: seq,
        what,
    };
    if checksum(body) != sum {
        return Err(corrupt("checksum mismatch".into()));
    }
    let record: Record =
        serde_json::from_str(body).map_err(|e| corrupt(format!("unreadable record: {e}")))?;
    if record.kind() != kind {
        return Err(corrupt(format!(
            "kind column {kind:?} but record is {}",
            record.kind()
        )));
    }
    Ok(Entry { seq, at_ms, record })
}

/// Where a journal is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalLocation {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// Journal `name` in the PostgreSQL database at `url`.
    Postgres {
        /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
        url: String,
        /// The journal's name in it.
        name: String,
    },
}

impl JournalLocation {
    /// `postgres://…#NAME` (or `postgresql://…#NAME`): journal NAME in that
    /// database; anything else is a SQLite file's path.
    pub fn parse(s: &str) -> Self {
        if (s.starts_with("postgres://") || s.starts_with("postgresql://"))
            && let Some((url, name)) = s.rsplit_once('#')
        {
            return Self::Postgres {
                url: url.to_owned(),
                name: name.to_owned(),
            };
        }
        Self::Sqlite(PathBuf::from(s))
    }

    /// Opens the journal.
    ///
    /// # Errors
    /// As [`SqliteJournal::open`] or [`crate::PgJournal::open`].
    pub fn open(&self) -> Result<Box<dyn Journal>> {
        Ok(match self {
            Self::Sqlite(path) => Box::new(SqliteJournal::open(path)?),
            Self::Postgres { url, name } => Box::new(crate::PgJournal::open(url, name)?),
        })
    }
}

/// The state of every step, rebuilt from the journal.
#[derive(Debug, Clone, PartialEq)]
pub struct RunState {
    /// State by step index.
    pub states: Vec<StepState>,
    /// Attempts started, by step index (over every run of the workflow).
    pub attempts: Vec<u32>,
    /// Outputs of steps that succeeded, by step index.
    pub outputs: Vec<Option<StepOutput>>,
    /// Whether the step was ever started (so a rollback must consider it).
    pub ever_ran: Vec<bool>,
    /// Whether the last run was cancelled (a cancel request with no later
    /// run start).
    pub cancel_requested: bool,
}

impl RunState {
    /// Every step pending.
    pub fn new(steps: usize) -> Self {
        Self {
            states: vec![StepState::Pending; steps],
            attempts: vec![0; steps],
            outputs: vec![None; steps],
            ever_ran: vec![false; steps],
            cancel_requested: false,
        }
    }

    /// Rebuilds the state of `workflow` from `entries`, checking every
    /// transition against the lifecycle table and against the state the
    /// replay reached so far.
    ///
    /// # Errors
    /// [`Error::CorruptJournal`] naming the first entry that does not fit.
    pub fn replay(workflow: &Workflow, journal: &Path, entries: &[Entry]) -> Result<Self> {
        let mut s = Self::new(workflow.len());
        let corrupt = |row: i64, what: String| Error::CorruptJournal {
            path: journal.to_owned(),
            row,
            what,
        };
        for e in entries {
            s.apply(workflow, &e.record)
                .map_err(|what| corrupt(e.seq, what))?;
        }
        Ok(s)
    }

    /// Applies one record.
    pub(crate) fn apply(
        &mut self,
        workflow: &Workflow,
        record: &Record,
    ) -> std::result::Result<(), String> {
        match record {
            Record::Transition {
                step,
                from,
                to,
                attempt,
                ..
            } => {
                let i = workflow
                    .index_of(step)
                    .ok_or_else(|| format!("unknown step `{step}`"))?;
                if self.states[i] != *from {
                    return Err(format!(
                        "step `{step}`: transition from {from} but the step is {}",
                        self.states[i]
                    ));
                }
                lifecycle::check(step, *from, *to).map_err(|e| e.to_string())?;
                self.states[i] = *to;
                if *to == StepState::Running {
                    self.ever_ran[i] = true;
                    self.attempts[i] = self.attempts[i].max(*attempt);
                }
                if *to == StepState::Succeeded && self.outputs[i].is_none() {
                    return Err(format!("step `{step}` succeeded without an output record"));
                }
            }
            Record::Output { step, output } => {
                let i = workflow
                    .index_of(step)
                    .ok_or_else(|| format!("unknown step `{step}`"))?;
                if self.states[i] != StepState::Running {
                    return Err(format!(
                        "output of step `{step}` while it is {}",
                        self.states[i]
                    ));
                }
                self.outputs[i] = Some(output.clone());
            }
            Record::RunStarted { .. } => self.cancel_requested = false,
            Record::CancelRequested { .. } => self.cancel_requested = true,
            Record::RunFinished { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Noop, noop_registry};
    use crate::workflow::{StepSpec, WorkflowBuilder};

    fn wf() -> Workflow {
        WorkflowBuilder::new("j")
            .step(StepSpec::new("a", Noop::NAME, "s"))
            .build(&noop_registry())
            .unwrap()
    }

    fn header(w: &Workflow) -> JournalHeader {
        JournalHeader {
            workflow_id: w.id().into(),
            workflow: w.def().clone(),
        }
    }

    fn tr(from: StepState, to: StepState) -> Record {
        Record::Transition {
            step: "a".into(),
            from,
            to,
            attempt: 1,
            error: None,
            delay_ms: None,
        }
    }

    #[test]
    fn records_round_trip_and_replay_rebuilds_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let w = wf();
        {
            let mut j = SqliteJournal::open(&path).unwrap();
            assert_eq!(j.header().unwrap(), None);
            j.create(&header(&w)).unwrap();
            j.append(&[
                tr(StepState::Pending, StepState::Running),
                Record::Output {
                    step: "a".into(),
                    output: StepOutput::default(),
                },
                tr(StepState::Running, StepState::Succeeded),
            ])
            .unwrap();
        }
        let j = SqliteJournal::open(&path).unwrap();
        assert_eq!(j.header().unwrap(), Some(header(&w)));
        let entries = j.replay().unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].seq, 1);
        let s = RunState::replay(&w, &path, &entries).unwrap();
        assert_eq!(s.states, vec![StepState::Succeeded]);
        assert_eq!(s.outputs, vec![Some(StepOutput::default())]);
        let mode: String = j
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // The default durability: every batch fsynced (FULL = 2).
        let sync: i64 = j
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
    }

    #[test]
    fn replay_refuses_impossible_histories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let w = wf();
        let mut j = SqliteJournal::open(&path).unwrap();
        j.create(&header(&w)).unwrap();
        j.append(&[tr(StepState::Pending, StepState::Succeeded)])
            .unwrap();
        let err = RunState::replay(&w, &path, &j.replay().unwrap()).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("row 1: step `a`: invalid transition pending -> succeeded"),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_row_fails_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        let mut j = SqliteJournal::open(&path).unwrap();
        j.create(&header(&wf())).unwrap();
        j.append(&[tr(StepState::Pending, StepState::Running)])
            .unwrap();
        j.conn
            .execute(
                "UPDATE viaduct_events SET body = replace(body, 'running', 'failed')",
                [],
            )
            .unwrap();
        let err = j.replay().unwrap_err();
        assert!(matches!(err, Error::CorruptJournal { row: 1, .. }), "{err}");
    }

    #[test]
    fn garbage_and_other_databases_are_refused_without_being_changed() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&garbage, &bytes).unwrap();
        let err = SqliteJournal::open(&garbage).unwrap_err();
        assert!(matches!(err, Error::CorruptJournal { row: 0, .. }), "{err}");
        assert_eq!(std::fs::read(&garbage).unwrap(), bytes);

        let other = dir.path().join("other.db");
        let c = Connection::open(&other).unwrap();
        c.execute_batch("CREATE TABLE users (name TEXT)").unwrap();
        drop(c);
        let err = SqliteJournal::open(&other).unwrap().header().unwrap_err();
        assert!(matches!(err, Error::ForeignJournal { .. }), "{err}");
        assert!(
            err.to_string().contains("without the viaduct tables"),
            "{err}"
        );
    }
}
