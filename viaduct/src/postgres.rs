//! The journal on PostgreSQL: every workflow's journal in one database,
//! for several workers on several machines (`fluidcloud serve --database`).
//!
//! - **Tables.** `viaduct_journals` (one row per journal: its name, format,
//!   version and workflow definition) and `viaduct_events` (the records,
//!   keyed by journal and sequence number, each with the same FNV-1a
//!   checksum as the SQLite journal's). Versioned migrations
//!   ([`MIGRATIONS`]) are applied when a journal is opened, once, under an
//!   advisory lock, so workers that start together do not race; a database
//!   whose schema is newer than this build is refused.
//! - **A batch is one transaction** (group commit): a reader sees all of
//!   it or none of it, and a killed writer leaves none of it.
//! - **Exclusive use** ([`Journal::lock`]) is a session advisory lock on
//!   the journal's name: PostgreSQL releases it when the holder's
//!   connection ends, whether the process exited, was killed or lost its
//!   machine.
//! - **Blocking, on a thread of its own.** The [`Journal`] interface is
//!   synchronous, as SQLite's `fsync` is; the `postgres` client runs its
//!   own small runtime, so each journal keeps its connection on a
//!   dedicated thread and calls wait for it. Callers on an async runtime
//!   block for one round trip per call, as they block for SQLite's sync.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::{Client, NoTls};

use crate::error::{Error, Result};
use crate::journal::{
    Entry, JOURNAL_FORMAT, JOURNAL_VERSION, Journal, JournalHeader, Record, checksum, now_ms,
};
use crate::workflow::WorkflowDef;

/// The schema, as migrations applied in order; the position of each (from
/// 1) is its version, recorded in `viaduct_schema`.
pub const MIGRATIONS: &[&str] = &["
CREATE TABLE viaduct_journals (
    name        TEXT PRIMARY KEY,
    format      TEXT NOT NULL,
    version     INTEGER NOT NULL,
    workflow_id TEXT NOT NULL,
    workflow    TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);
CREATE TABLE viaduct_events (
    journal TEXT NOT NULL REFERENCES viaduct_journals (name) ON DELETE CASCADE,
    seq     BIGINT NOT NULL,
    at_ms   BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    step    TEXT,
    body    TEXT NOT NULL,
    sum     TEXT NOT NULL,
    PRIMARY KEY (journal, seq)
);
"];

/// Seeds the 64-bit hash of a journal's name that keys its advisory lock.
const LOCK_SEED: i64 = 0x7664_7563; // "vduc"
/// The advisory lock migrations run under.
const MIGRATION_LOCK: i64 = 0x7664_7563_6d69_6772; // "vducmigr"

/// A job for the connection's thread.
type Job = Box<dyn FnOnce(&mut Client) + Send>;

/// One journal in a PostgreSQL database.
pub struct PgJournal {
    /// The database URL without its password, `#` the journal's name.
    location: PathBuf,
    name: String,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    locked: bool,
}

impl std::fmt::Debug for PgJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgJournal")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// `url` without its password.
fn redacted(url: &str) -> String {
    fluidcloud_plugins::redact::string(url)
}

impl PgJournal {
    /// Opens journal `name` in the database at `url`
    /// (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`), applying the
    /// schema's migrations first.
    ///
    /// # Errors
    /// [`Error::Database`] when the server cannot be reached or refuses;
    /// [`Error::ForeignJournal`] when the database's schema is newer than
    /// this build's.
    pub fn open(url: &str, name: &str) -> Result<Self> {
        let location = PathBuf::from(format!("{}#{name}", redacted(url)));
        let mut config: postgres::Config = url.parse().map_err(|e| Error::Database {
            path: location.clone(),
            what: "parse the database URL".into(),
            source: Box::new(e),
        })?;
        config
            .connect_timeout(Duration::from_secs(10))
            .application_name("fluidcloud-journal");
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pg-journal".into())
            .spawn(move || {
                let mut client = match config.connect(NoTls) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    job(&mut client);
                }
            })
            .map_err(|e| Error::Io {
                context: format!("starting the connection thread of {}", location.display()),
                source: e,
            })?;
        let connected = ready_rx.recv();
        let mut j = Self {
            location,
            name: name.to_owned(),
            jobs: Some(jobs),
            thread: Some(thread),
            locked: false,
        };
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(j.db_error("connect", e)),
            Err(_) => {
                return Err(Error::Database {
                    path: j.location.clone(),
                    what: "connect".into(),
                    source: "the connection's thread ended".into(),
                });
            }
        }
        j.migrate()?;
        Ok(j)
    }

    fn db_error(&self, what: &str, source: postgres::Error) -> Error {
        Error::Database {
            path: self.location.clone(),
            what: what.to_owned(),
            source: Box::new(source),
        }
    }

    /// Runs `f` with the connection, on its thread.
    fn call<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Client) -> std::result::Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        let gone = || Error::Database {
            path: self.location.clone(),
            what: format!("{what}: the connection's thread ended"),
            source: "connection closed".into(),
        };
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        rx.recv()
            .map_err(|_| gone())?
            .map_err(|e| self.db_error(what, e))
    }

    /// Applies the migrations this database lacks.
    fn migrate(&mut self) -> Result<()> {
        let latest = MIGRATIONS.len() as i64;
        let found = self.call("apply the schema migrations", move |c| {
            let mut tx = c.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS viaduct_schema (
                    version    INTEGER PRIMARY KEY,
                    applied_ms BIGINT NOT NULL
                )",
            )?;
            let current: i64 = tx
                .query_one(
                    "SELECT coalesce(max(version), 0)::BIGINT FROM viaduct_schema",
                    &[],
                )?
                .get(0);
            if current > latest {
                return Ok(current);
            }
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i as i32 + 1;
                if i64::from(version) > current {
                    tx.batch_execute(sql)?;
                    tx.execute(
                        "INSERT INTO viaduct_schema (version, applied_ms) VALUES ($1, $2)",
                        &[&version, &now_ms()],
                    )?;
                }
            }
            tx.commit()?;
            Ok(current)
        })?;
        if found > latest {
            return Err(Error::ForeignJournal {
                path: self.location.clone(),
                what: format!(
                    "the database's journal schema is version {found}; this build knows up to {latest}"
                ),
            });
        }
        Ok(())
    }
}

impl Drop for PgJournal {
    fn drop(&mut self) {
        // Ends the thread, which closes the connection (and so releases
        // the journal's lock).
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Journal for PgJournal {
    fn location(&self) -> &Path {
        &self.location
    }

    fn header(&self) -> Result<Option<JournalHeader>> {
        let name = self.name.clone();
        let row = self.call("read the journal's header", move |c| {
            c.query_opt(
                "SELECT format, version, workflow_id, workflow FROM viaduct_journals WHERE name = $1",
                &[&name],
            )
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (format, version): (String, i32) = (row.get(0), row.get(1));
        if format != JOURNAL_FORMAT {
            return Err(Error::ForeignJournal {
                path: self.location.clone(),
                what: format!("format is {format:?}, expected {JOURNAL_FORMAT:?}"),
            });
        }
        if u32::try_from(version).ok() != Some(JOURNAL_VERSION) {
            return Err(Error::ForeignJournal {
                path: self.location.clone(),
                what: format!(
                    "journal version {version}; this build reads version {JOURNAL_VERSION}"
                ),
            });
        }
        let workflow: WorkflowDef =
            serde_json::from_str(row.get::<_, &str>(3)).map_err(|e| Error::CorruptJournal {
                path: self.location.clone(),
                row: 0,
                what: format!("workflow definition: {e}"),
            })?;
        Ok(Some(JournalHeader {
            workflow_id: row.get(2),
            workflow,
        }))
    }

    fn create(&mut self, header: &JournalHeader) -> Result<()> {
        let def = serde_json::to_string(&header.workflow).map_err(|e| Error::CorruptJournal {
            path: self.location.clone(),
            row: 0,
            what: e.to_string(),
        })?;
        let (name, id) = (self.name.clone(), header.workflow_id.clone());
        let version = JOURNAL_VERSION as i32;
        let inserted = self.call("create the journal", move |c| {
            c.execute(
                "INSERT INTO viaduct_journals (name, format, version, workflow_id, workflow, created_ms)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
                &[&name, &JOURNAL_FORMAT, &version, &id, &def, &now_ms()],
            )
        })?;
        if inserted == 0 {
            return Err(Error::ForeignJournal {
                path: self.location.clone(),
                what: "the journal exists already (it is not empty)".into(),
            });
        }
        Ok(())
    }

    fn append(&mut self, batch: &[Record]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut kinds = Vec::with_capacity(batch.len());
        let mut steps = Vec::with_capacity(batch.len());
        let mut bodies = Vec::with_capacity(batch.len());
        let mut sums = Vec::with_capacity(batch.len());
        for r in batch {
            // Redacted before it is stored and checksummed, as in SQLite.
            let body =
                fluidcloud_plugins::redact::string(&serde_json::to_string(r).unwrap_or_default());
            sums.push(checksum(&body));
            bodies.push(body);
            kinds.push(r.kind().to_owned());
            steps.push(r.step().map(str::to_owned));
        }
        let name = self.name.clone();
        let at = now_ms();
        self.call("append", move |c| {
            let mut tx = c.transaction()?;
            // The lock holder is the only writer; the key would refuse a
            // second one anyway.
            let last: i64 = tx
                .query_one(
                    "SELECT coalesce(max(seq), 0)::BIGINT FROM viaduct_events WHERE journal = $1",
                    &[&name],
                )?
                .get(0);
            let seqs: Vec<i64> = (1..=kinds.len() as i64).map(|i| last + i).collect();
            tx.execute(
                "INSERT INTO viaduct_events (journal, seq, at_ms, kind, step, body, sum)
                 SELECT $1, s, $2, k, st, b, su
                 FROM unnest($3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[])
                      AS t (s, k, st, b, su)",
                &[&name, &at, &seqs, &kinds, &steps, &bodies, &sums],
            )?;
            tx.commit()
        })
    }

    fn replay(&self) -> Result<Vec<Entry>> {
        let name = self.name.clone();
        let rows = self.call("read events", move |c| {
            c.query(
                "SELECT seq, at_ms, kind, body, sum FROM viaduct_events WHERE journal = $1 ORDER BY seq",
                &[&name],
            )
        })?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let (seq, at_ms, kind, body, sum): (i64, i64, &str, &str, &str) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            out.push(crate::journal::parse_entry(
                &self.location,
                seq,
                at_ms,
                kind,
                body,
                sum,
            )?);
        }
        Ok(out)
    }

    fn lock(&mut self) -> Result<()> {
        if self.locked {
            return Ok(());
        }
        let name = self.name.clone();
        let got = self.call("lock the journal", move |c| {
            Ok(c.query_one(
                "SELECT pg_try_advisory_lock(hashtextextended($2, $1))",
                &[&LOCK_SEED, &name],
            )?
            .get::<_, bool>(0))
        })?;
        if !got {
            return Err(Error::JournalInUse {
                path: self.location.clone(),
            });
        }
        self.locked = true;
        Ok(())
    }
}
