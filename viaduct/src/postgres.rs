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

pub use postgres;
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
pub const MIGRATION_LOCK: i64 = 0x7664_7563_6d69_6772; // "vducmigr"

/// The connection as its thread holds it.
struct Conn {
    config: postgres::Config,
    client: Option<Client>,
    reconnect: bool,
}

impl Conn {
    /// Runs `f`; with `reconnect`, connects again first when the
    /// connection is gone, and once more when `f` failed because it went
    /// (a server restart is seen only at the first query after it).
    /// Each caller's work is safe to repeat: a lost reply to a committed
    /// transaction makes the repeat fail or do nothing.
    fn run<T>(
        &mut self,
        f: &mut impl FnMut(&mut Client) -> std::result::Result<T, postgres::Error>,
    ) -> Option<std::result::Result<T, postgres::Error>> {
        if self.reconnect && self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = self.config.connect(NoTls).ok();
        }
        let client = self.client.as_mut()?;
        let first = f(client);
        if first.is_ok() || !self.reconnect || !client.is_closed() {
            return Some(first);
        }
        self.client = self.config.connect(NoTls).ok();
        match self.client.as_mut() {
            Some(c) => Some(f(c)),
            None => Some(first),
        }
    }
}

/// A job for the connection's thread.
type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// One connection to a PostgreSQL server, kept on a thread of its own and
/// used through [`PgConn::call`]: what the journal and the relocation
/// store of `fluidcloud serve` talk to the database through.
pub struct PgConn {
    /// The database URL without its password (and a `#` suffix, if any).
    location: PathBuf,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// `url` without its password.
fn redacted(url: &str) -> String {
    fluidcloud_plugins::redact::string(url)
}

impl PgConn {
    /// Connects to the database at `url`
    /// (`postgres://USER:PASSWORD@HOST:PORT/DATABASE`); `suffix` is added to
    /// the location messages name (a journal's `#NAME`).
    ///
    /// With `reconnect`, a call made after the connection broke (a server
    /// restart, a network cut) connects again. A journal never does: its
    /// lock belongs to its first session.
    ///
    /// # Errors
    /// [`Error::Database`] when the URL is malformed or the server cannot
    /// be reached or refuses.
    pub fn connect(url: &str, suffix: &str, app: &str, reconnect: bool) -> Result<Self> {
        let location = PathBuf::from(format!("{}{suffix}", redacted(url)));
        let mut config: postgres::Config = url.parse().map_err(|e| Error::Database {
            path: location.clone(),
            what: "parse the database URL".into(),
            source: Box::new(e),
        })?;
        // The server must notice a client machine that vanished (no FIN,
        // no RST): its session's advisory locks, a journal's among them,
        // are released only then. Probes after 10 s idle, every 5 s, 3 of
        // them: about 25 s, instead of the kernel's two hours.
        config
            .connect_timeout(Duration::from_secs(10))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .options(
                "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
            )
            .application_name(app);
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("pg-conn".into())
            .spawn(move || {
                let client = match config.connect(NoTls) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut conn = Conn {
                    config,
                    client: Some(client),
                    reconnect,
                };
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| Error::Io {
                context: format!("starting the connection thread of {}", location.display()),
                source: e,
            })?;
        let connected = ready_rx.recv();
        let conn = Self {
            location,
            jobs: Some(jobs),
            thread: Some(thread),
        };
        match connected {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => Err(conn.db_error("connect", e)),
            Err(_) => Err(Error::Database {
                path: conn.location.clone(),
                what: "connect".into(),
                source: "the connection's thread ended".into(),
            }),
        }
    }

    /// The database URL without its password, for messages.
    pub fn location(&self) -> &Path {
        &self.location
    }

    fn db_error(&self, what: &str, source: postgres::Error) -> Error {
        Error::Database {
            path: self.location.clone(),
            what: what.to_owned(),
            source: Box::new(source),
        }
    }

    /// Runs `f` with the connection, on its thread; `what` names it in
    /// errors. On a reconnecting connection `f` may run twice (see
    /// [`PgConn::connect`]): it must be safe to repeat.
    ///
    /// # Errors
    /// [`Error::Database`] from `f`, or when the connection is gone.
    pub fn call<T: Send + 'static>(
        &self,
        what: &str,
        mut f: impl FnMut(&mut Client) -> std::result::Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |c| {
            let _ = tx.send(c.run(&mut f));
        });
        let gone = || Error::Database {
            path: self.location.clone(),
            what: format!("{what}: the connection is closed"),
            source: "connection closed".into(),
        };
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        rx.recv()
            .map_err(|_| gone())?
            .ok_or_else(gone)?
            .map_err(|e| self.db_error(what, e))
    }

    /// Runs `f` with the connection on its thread without waiting for it
    /// (nothing happens when the connection is gone): for notifications
    /// whose loss costs no more than a late update.
    pub fn post(&self, mut f: impl FnMut(&mut Client) + Send + 'static) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send(Box::new(move |c| {
                let _ = c.run(&mut |client| {
                    f(client);
                    Ok::<(), postgres::Error>(())
                });
            }));
        }
    }

    /// Applies the `migrations` this database lacks, recording each in
    /// `table` (created if missing), under the advisory lock `lock` so
    /// that processes starting together do not race. The position of each
    /// migration (from 1) is its version.
    ///
    /// # Errors
    /// [`Error::ForeignJournal`] when the database's schema is newer than
    /// `migrations`; [`Error::Database`].
    pub fn migrate(
        &self,
        table: &'static str,
        lock: i64,
        migrations: &'static [&'static str],
    ) -> Result<()> {
        let latest = migrations.len() as i64;
        let found = self.call("apply the schema migrations", move |c| {
            let mut tx = c.transaction()?;
            // `IF NOT EXISTS` would otherwise log a notice at every start.
            tx.batch_execute("SET LOCAL client_min_messages = warning")?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])?;
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                    version    INTEGER PRIMARY KEY,
                    applied_ms BIGINT NOT NULL
                )"
            ))?;
            let current: i64 = tx
                .query_one(
                    &format!("SELECT coalesce(max(version), 0)::BIGINT FROM {table}"),
                    &[],
                )?
                .get(0);
            if current > latest {
                return Ok(current);
            }
            for (i, sql) in migrations.iter().enumerate() {
                let version = i as i32 + 1;
                if i64::from(version) > current {
                    tx.batch_execute(sql)?;
                    tx.execute(
                        &format!("INSERT INTO {table} (version, applied_ms) VALUES ($1, $2)"),
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
                    "the database's schema ({table}) is version {found}; this build knows up to {latest}"
                ),
            });
        }
        Ok(())
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        // Ends the thread, which closes the connection (and so releases
        // its session's advisory locks).
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every entry of journal `name`, in order, read through `conn`: what
/// [`Journal::replay`] returns, for readers that keep one connection for
/// many journals.
///
/// # Errors
/// [`Error::Database`]; [`Error::CorruptJournal`] for an entry that fails
/// its checksum or does not parse.
pub fn entries(conn: &PgConn, name: &str) -> Result<Vec<Entry>> {
    let owned = name.to_owned();
    let rows = conn.call("read events", move |c| {
        c.query(
            "SELECT seq, at_ms, kind, body, sum FROM viaduct_events WHERE journal = $1 ORDER BY seq",
            &[&owned],
        )
    })?;
    let location = PathBuf::from(format!("{}#{name}", conn.location.display()));
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (seq, at_ms, kind, body, sum): (i64, i64, &str, &str, &str) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        out.push(crate::journal::parse_entry(
            &location, seq, at_ms, kind, body, sum,
        )?);
    }
    Ok(out)
}

/// One journal in a PostgreSQL database.
#[derive(Debug)]
pub struct PgJournal {
    conn: PgConn,
    name: String,
    locked: bool,
}

impl Drop for PgJournal {
    fn drop(&mut self) {
        // Release the lock before the connection closes: the server frees
        // a closed session's locks only once its backend notices, and the
        // next owner should not find it still held.
        if self.locked {
            let name = self.name.clone();
            let _ = self.call("unlock the journal", move |c| {
                c.execute(
                    "SELECT pg_advisory_unlock(hashtextextended($2, $1))",
                    &[&LOCK_SEED, &name],
                )
            });
        }
    }
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
        let conn = PgConn::connect(url, &format!("#{name}"), "fluidcloud-journal", false)?;
        conn.migrate("viaduct_schema", MIGRATION_LOCK, MIGRATIONS)?;
        Ok(Self {
            conn,
            name: name.to_owned(),
            locked: false,
        })
    }

    fn call<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnMut(&mut Client) -> std::result::Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T> {
        self.conn.call(what, f)
    }
}

impl Journal for PgJournal {
    fn location(&self) -> &Path {
        self.conn.location()
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
                path: self.conn.location().to_owned(),
                what: format!("format is {format:?}, expected {JOURNAL_FORMAT:?}"),
            });
        }
        if u32::try_from(version).ok() != Some(JOURNAL_VERSION) {
            return Err(Error::ForeignJournal {
                path: self.conn.location().to_owned(),
                what: format!(
                    "journal version {version}; this build reads version {JOURNAL_VERSION}"
                ),
            });
        }
        let workflow: WorkflowDef =
            serde_json::from_str(row.get::<_, &str>(3)).map_err(|e| Error::CorruptJournal {
                path: self.conn.location().to_owned(),
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
            path: self.conn.location().to_owned(),
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
                path: self.conn.location().to_owned(),
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
        entries(&self.conn, &self.name)
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
                path: self.conn.location().to_owned(),
            });
        }
        self.locked = true;
        Ok(())
    }
}
