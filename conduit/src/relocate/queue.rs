//! Relocations in PostgreSQL, shared by several `fluidcloud serve` workers.
//!
//! `fluidcloud_relocations` holds one row per relocation: its plan (the
//! [`Relocation`], JSON), its last report, and its place in the queue. The
//! steps' history is the relocation's viaduct journal in the same database
//! (`viaduct_events`, journal name = relocation id).
//!
//! - **Queue state.** `queued` (accepted, or asked to resume or roll back),
//!   `running` (claimed by the worker in `owner` until `lease_until`), or
//!   `done` (the run ended: the journal says how).
//! - **Claims are per relocation.** A relocation's steps share things that
//!   live in the process running them: the guest appliance between
//!   `guest-prepare` and `guest-adapt`, change-tracking sessions, the
//!   executor's view of running steps and the journal's exclusive lock. A
//!   per-step claim would hand all of that from worker to worker at every
//!   step; a per-relocation claim moves it only when a worker dies. A claim
//!   is a `FOR UPDATE SKIP LOCKED` pick of the fairest row, so workers never
//!   wait on each other, and a lease the holder renews; the database's clock
//!   times leases, so workers' clocks need not agree.
//! - **One relocation per service**: a unique index on (source site,
//!   service) over the rows that are not `done`, so two workers accepting
//!   the same service at once cannot both insert.
//! - **Limits** are slots (`fluidcloud_slots`): a scope (`global`,
//!   `site:NAME`, `pair:FROM>TO`) with N rows admits N running relocations.
//!   A claim takes a free slot of each of its scopes (`FOR UPDATE SKIP
//!   LOCKED` again) in the same transaction, so limits hold across workers
//!   without a global lock; a scope without rows is unlimited.
//! - **Wake-ups** are `NOTIFY fluidcloud_queue` (something became
//!   claimable), `fluidcloud_cancel` (payload: an id) and
//!   `fluidcloud_events` (a running relocation's progress, relayed to the
//!   workers whose clients watch it).

use std::sync::Arc;
use std::time::Duration;

use fluidcloud_plugins::Error as SdkError;
use fluidcloud_viaduct::journal::Entry;
use fluidcloud_viaduct::postgres::postgres::error::SqlState;
use fluidcloud_viaduct::postgres::{self as pg, PgConn};

use super::Relocation;
use crate::error::{Error, Result};

/// The schema of the relocation tables, as migrations applied in order.
pub const MIGRATIONS: &[&str] = &["
CREATE TABLE fluidcloud_relocations (
    id          TEXT PRIMARY KEY,
    service     TEXT NOT NULL,
    from_site   TEXT NOT NULL,
    targets     TEXT[] NOT NULL,
    tenant      TEXT NOT NULL,
    record      TEXT NOT NULL,
    report      TEXT,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done')),
    mode        TEXT NOT NULL CHECK (mode IN ('run', 'rollback')),
    owner       TEXT,
    lease_until TIMESTAMPTZ,
    cancel      BOOLEAN NOT NULL DEFAULT false,
    claims      INTEGER NOT NULL DEFAULT 0,
    takeovers   INTEGER NOT NULL DEFAULT 0,
    created     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    queued_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX fluidcloud_one_per_service
    ON fluidcloud_relocations (from_site, service) WHERE state <> 'done';
CREATE INDEX fluidcloud_relocations_open
    ON fluidcloud_relocations (queued_at) WHERE state <> 'done';
CREATE TABLE fluidcloud_slots (
    scope  TEXT NOT NULL,
    slot   INTEGER NOT NULL,
    holder TEXT,
    PRIMARY KEY (scope, slot)
);
CREATE INDEX fluidcloud_slots_holder ON fluidcloud_slots (holder);
CREATE TABLE fluidcloud_tenants (
    tenant     TEXT PRIMARY KEY,
    last_claim TIMESTAMPTZ NOT NULL
);
"];

/// The advisory lock the relocation tables' migrations run under.
const MIGRATION_LOCK: i64 = 0x666c_7564_6d69_6772; // "fludmigr"

/// Channel: something became claimable.
pub const QUEUE_CHANNEL: &str = "fluidcloud_queue";
/// Channel: cancel the relocation named by the payload.
pub const CANCEL_CHANNEL: &str = "fluidcloud_cancel";
/// Channel: a running relocation's progress (`{"id": …, "event": …}`, or
/// `{"id": …, "end": true}` when its run ended).
pub const EVENTS_CHANNEL: &str = "fluidcloud_events";

/// How a run was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run (or resume) the workflow.
    Run,
    /// Roll it back.
    Rollback,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Rollback => "rollback",
        }
    }

    fn parse(s: &str) -> Self {
        if s == "rollback" {
            Self::Rollback
        } else {
            Self::Run
        }
    }
}

/// Where a relocation stands in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueState {
    /// Waiting for a worker.
    Queued(Mode),
    /// Claimed by `owner`; `live` while its lease has not expired.
    Running {
        /// How it runs.
        mode: Mode,
        /// The worker.
        owner: Option<String>,
        /// The lease is current.
        live: bool,
    },
    /// Not running: the journal says how it ended.
    Done,
}

/// A relocation a worker claimed.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The relocation.
    pub relocation: Relocation,
    /// Run or roll back.
    pub mode: Mode,
    /// Another worker held it and its lease expired.
    pub takeover: bool,
    /// A cancel was asked for while its worker was gone: the run stops at
    /// once, recorded as cancelled.
    pub cancel: bool,
}

/// Figures of the queue across all workers, for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueFigures {
    /// Relocations waiting for a worker.
    pub queued: u64,
    /// Relocations claimed under a current lease.
    pub running: u64,
    /// Relocations claimed under an expired lease (their worker is gone).
    pub expired: u64,
    /// Claims that took a relocation over from a worker whose lease ran out.
    pub takeovers: u64,
    /// Each limited scope: (scope, limit, slots held).
    pub limits: Vec<(String, u64, u64)>,
}

/// A concurrency limit: at most `max` running relocations in `scope`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// `global`, `site:NAME` or `pair:FROM>TO`.
    pub scope: String,
    /// Relocations at once.
    pub max: u32,
}

/// The relocation tables of one database.
///
/// Three connections, so that one kind of work never waits behind
/// another: `conn` for records and reports (the API), `leases` for claims
/// and renewals (a renewal stuck behind a burst of reads would let a lease
/// expire), `events` for the progress relayed to other workers.
#[derive(Debug)]
pub struct Database {
    url: String,
    conn: PgConn,
    leases: PgConn,
    events: PgConn,
}

/// A database failure as the conduit reports it.
pub fn db_err(e: fluidcloud_viaduct::Error) -> Error {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    Error::Site {
        site: "database".into(),
        source: SdkError::Transient(text),
    }
}

fn precondition(msg: String) -> Error {
    Error::Site {
        site: "database".into(),
        source: SdkError::Precondition(msg),
    }
}

fn not_found(id: &str) -> Error {
    Error::Site {
        site: "database".into(),
        source: SdkError::NotFound {
            what: format!("relocation `{id}`"),
            site: None,
        },
    }
}

fn decode(id: &str, text: &str) -> Result<Relocation> {
    serde_json::from_str(text).map_err(|e| {
        precondition(format!(
            "the record of relocation {id} in the database is damaged: {e}"
        ))
    })
}

impl Database {
    /// Connects to `url` and applies the migrations of the journal's and
    /// the relocations' tables. Calls made after the server restarted
    /// connect again.
    ///
    /// # Errors
    /// When the server cannot be reached, refuses, or has a newer schema.
    pub fn open(url: &str) -> Result<Arc<Self>> {
        let conn = PgConn::connect(url, "", "fluidcloud", true).map_err(db_err)?;
        conn.migrate("viaduct_schema", pg::MIGRATION_LOCK, pg::MIGRATIONS)
            .map_err(db_err)?;
        conn.migrate("fluidcloud_schema", MIGRATION_LOCK, MIGRATIONS)
            .map_err(db_err)?;
        Ok(Arc::new(Self {
            url: url.to_owned(),
            conn,
            leases: PgConn::connect(url, "", "fluidcloud-leases", true).map_err(db_err)?,
            events: PgConn::connect(url, "", "fluidcloud-events", true).map_err(db_err)?,
        }))
    }

    /// The URL (with its password: for opening journals, not for messages).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL without its password.
    pub fn location(&self) -> String {
        self.conn.location().display().to_string()
    }

    /// Adds relocation `r`, queued to run, for `tenant` (fair order is
    /// between tenants).
    ///
    /// # Errors
    /// `Precondition` when its id exists or another relocation of the same
    /// service from the same site is queued or running (naming it).
    pub fn insert(&self, r: &Relocation, tenant: &str) -> Result<()> {
        let record = serde_json::to_string(r)
            .map_err(|e| precondition(format!("cannot encode relocation {}: {e}", r.id)))?;
        let (id, service, from) = (r.id.clone(), r.service.clone(), r.from.clone());
        let targets: Vec<String> = r.targets();
        let tenant = tenant.to_owned();
        let outcome = self
            .conn
            .call("queue a relocation", move |c| {
                let mut tx = c.transaction()?;
                let inserted = tx.execute(
                    "INSERT INTO fluidcloud_relocations
                         (id, service, from_site, targets, tenant, record, state, mode)
                     VALUES ($1, $2, $3, $4, $5, $6, 'queued', 'run')",
                    &[&id, &service, &from, &targets, &tenant, &record],
                );
                match inserted {
                    Ok(_) => {
                        tx.execute("SELECT pg_notify($1, '')", &[&QUEUE_CHANNEL])?;
                        tx.commit()?;
                        Ok(None)
                    }
                    Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                        drop(tx);
                        let holder = c
                            .query_opt(
                                "SELECT id FROM fluidcloud_relocations
                                 WHERE from_site = $1 AND service = $2 AND state <> 'done'",
                                &[&from, &service],
                            )?
                            .map(|row| row.get::<_, String>(0));
                        Ok(Some(holder))
                    }
                    Err(e) => Err(e),
                }
            })
            .map_err(db_err)?;
        match outcome {
            None => Ok(()),
            Some(Some(holder)) => Err(precondition(format!(
                "relocation {holder} of service {} from site {} is queued or running; wait for it, or cancel it",
                r.service, r.from
            ))),
            Some(None) => Err(precondition(format!("relocation {} exists already", r.id))),
        }
    }

    /// Whether relocation `id` exists.
    ///
    /// # Errors
    /// Database errors.
    pub fn exists(&self, id: &str) -> Result<bool> {
        let id = id.to_owned();
        self.conn
            .call("look up a relocation", move |c| {
                Ok(
                    c.query_opt("SELECT 1 FROM fluidcloud_relocations WHERE id = $1", &[&id])?
                        .is_some(),
                )
            })
            .map_err(db_err)
    }

    /// Relocation `id`.
    ///
    /// # Errors
    /// `NotFound`; `Precondition` for a damaged record; database errors.
    pub fn load(&self, id: &str) -> Result<Relocation> {
        let owned = id.to_owned();
        let text = self
            .conn
            .call("read a relocation", move |c| {
                Ok(c.query_opt(
                    "SELECT record FROM fluidcloud_relocations WHERE id = $1",
                    &[&owned],
                )?
                .map(|row| row.get::<_, String>(0)))
            })
            .map_err(db_err)?
            .ok_or_else(|| not_found(id))?;
        decode(id, &text)
    }

    /// Ids of every relocation, oldest first.
    ///
    /// # Errors
    /// Database errors.
    pub fn list(&self) -> Result<Vec<String>> {
        self.conn
            .call("list relocations", |c| {
                Ok(c.query(
                    "SELECT id FROM fluidcloud_relocations ORDER BY created, id",
                    &[],
                )?
                .iter()
                .map(|row| row.get(0))
                .collect())
            })
            .map_err(db_err)
    }

    /// The relocations of `service` from site `from`, oldest first.
    ///
    /// # Errors
    /// Database errors; a damaged record.
    pub fn of_service(&self, from: &str, service: &str) -> Result<Vec<Relocation>> {
        let (f, s) = (from.to_owned(), service.to_owned());
        let rows = self
            .conn
            .call("read a service's relocations", move |c| {
                c.query(
                    "SELECT id, record FROM fluidcloud_relocations
                     WHERE from_site = $1 AND service = $2 ORDER BY created, id",
                    &[&f, &s],
                )
            })
            .map_err(db_err)?;
        rows.iter()
            .map(|row| decode(row.get(0), row.get(1)))
            .collect()
    }

    /// The journal of relocation `id`, every entry in order.
    ///
    /// # Errors
    /// Database errors; a corrupt entry.
    pub fn entries(&self, id: &str) -> Result<Vec<Entry>> {
        pg::entries(&self.conn, id).map_err(db_err)
    }

    /// Keeps the report of relocation `id`.
    ///
    /// # Errors
    /// Database errors.
    pub fn save_report(&self, id: &str, json: &[u8]) -> Result<()> {
        let (id, text) = (id.to_owned(), String::from_utf8_lossy(json).into_owned());
        self.conn
            .call("save a report", move |c| {
                c.execute(
                    "UPDATE fluidcloud_relocations SET report = $2 WHERE id = $1",
                    &[&id, &text],
                )
            })
            .map(drop)
            .map_err(db_err)
    }

    /// Where relocation `id` stands in the queue.
    ///
    /// # Errors
    /// `NotFound`; database errors.
    pub fn state(&self, id: &str) -> Result<QueueState> {
        let owned = id.to_owned();
        let row = self
            .conn
            .call("read a relocation's state", move |c| {
                c.query_opt(
                    "SELECT state, mode, owner, coalesce(lease_until > now(), false)
                     FROM fluidcloud_relocations WHERE id = $1",
                    &[&owned],
                )
            })
            .map_err(db_err)?
            .ok_or_else(|| not_found(id))?;
        let (state, mode): (&str, &str) = (row.get(0), row.get(1));
        Ok(match state {
            "queued" => QueueState::Queued(Mode::parse(mode)),
            "running" => QueueState::Running {
                mode: Mode::parse(mode),
                owner: row.get(2),
                live: row.get(3),
            },
            _ => QueueState::Done,
        })
    }

    /// Claims the fairest claimable relocation for `worker`, for `lease`:
    /// a queued one whose every limited scope has a free slot, or one whose
    /// worker's lease expired (it keeps its slots). Fair order: takeovers
    /// first, then tenants in turn (the one served longest ago, or never),
    /// then the oldest request of that tenant.
    ///
    /// # Errors
    /// Database errors; a damaged record.
    pub fn claim(&self, worker: &str, lease: Duration) -> Result<Option<Claim>> {
        let worker = worker.to_owned();
        let secs = lease.as_secs_f64();
        let got = self
            .leases
            .call("claim a relocation", move |c| {
                let mut tx = c.transaction()?;
                let candidates = tx.query(
                    "SELECT r.id, r.from_site, r.targets, r.state, r.mode, r.record, r.tenant,
                            r.cancel
                     FROM fluidcloud_relocations r
                     LEFT JOIN fluidcloud_tenants t ON t.tenant = r.tenant
                     WHERE r.state = 'queued'
                        OR (r.state = 'running' AND r.lease_until < now())
                     ORDER BY (r.state = 'running') DESC, t.last_claim NULLS FIRST,
                              r.queued_at, r.id
                     LIMIT 32
                     FOR UPDATE OF r SKIP LOCKED",
                    &[],
                )?;
                let mut full = std::collections::HashSet::new();
                for row in candidates {
                    let id: String = row.get(0);
                    let takeover = row.get::<_, &str>(3) == "running";
                    if !takeover {
                        let scopes = scopes(row.get(1), &row.get::<_, Vec<String>>(2));
                        if !take_slots(&mut tx, &id, &scopes, &mut full)? {
                            continue;
                        }
                    }
                    tx.execute(
                        "UPDATE fluidcloud_relocations
                         SET state = 'running', owner = $2,
                             lease_until = now() + make_interval(secs => $3),
                             claims = claims + 1, takeovers = takeovers + $4
                         WHERE id = $1",
                        &[&id, &worker, &secs, &i32::from(takeover)],
                    )?;
                    if !takeover {
                        tx.execute(
                            "INSERT INTO fluidcloud_tenants (tenant, last_claim)
                             VALUES ($1, clock_timestamp())
                             ON CONFLICT (tenant) DO UPDATE SET last_claim = excluded.last_claim",
                            &[&row.get::<_, &str>(6)],
                        )?;
                    }
                    // Others may find more work (this claim may have
                    // skipped rows they can take).
                    tx.execute("SELECT pg_notify($1, '')", &[&QUEUE_CHANNEL])?;
                    tx.commit()?;
                    let mode = Mode::parse(row.get(4));
                    let cancel: bool = row.get(7);
                    return Ok(Some((id, row.get::<_, String>(5), mode, takeover, cancel)));
                }
                Ok(None)
            })
            .map_err(db_err)?;
        got.map(|(id, text, mode, takeover, cancel)| {
            Ok(Claim {
                relocation: decode(&id, &text)?,
                mode,
                takeover,
                cancel,
            })
        })
        .transpose()
    }

    /// Renews `worker`'s lease of `id`; `None` when the worker no longer
    /// holds it, else whether a cancel was asked for.
    ///
    /// # Errors
    /// Database errors.
    pub fn renew(&self, id: &str, worker: &str, lease: Duration) -> Result<Option<bool>> {
        let (id, worker, secs) = (id.to_owned(), worker.to_owned(), lease.as_secs_f64());
        self.leases
            .call("renew a lease", move |c| {
                Ok(c.query_opt(
                    "UPDATE fluidcloud_relocations
                     SET lease_until = now() + make_interval(secs => $3)
                     WHERE id = $1 AND owner = $2 AND state = 'running'
                     RETURNING cancel",
                    &[&id, &worker, &secs],
                )?
                .map(|row| row.get(0)))
            })
            .map_err(db_err)
    }

    /// `worker`'s run of `id` ended: with `finished`, the relocation is
    /// done and its slots are freed; without, the run was cut short (the
    /// database or a site went away) and any worker may claim it again
    /// after `retry_after`.
    ///
    /// # Errors
    /// Database errors.
    pub fn release(
        &self,
        id: &str,
        worker: &str,
        finished: bool,
        retry_after: Duration,
    ) -> Result<()> {
        let (id, worker, secs) = (id.to_owned(), worker.to_owned(), retry_after.as_secs_f64());
        self.leases
            .call("release a relocation", move |c| {
                let mut tx = c.transaction()?;
                let n = if finished {
                    tx.execute(
                        "UPDATE fluidcloud_relocations
                         SET state = 'done', owner = NULL, lease_until = NULL, cancel = false
                         WHERE id = $1 AND owner = $2",
                        &[&id, &worker],
                    )?
                } else {
                    tx.execute(
                        "UPDATE fluidcloud_relocations
                         SET owner = NULL, lease_until = now() + make_interval(secs => $3)
                         WHERE id = $1 AND owner = $2",
                        &[&id, &worker, &secs],
                    )?
                };
                if finished && n > 0 {
                    tx.execute(
                        "UPDATE fluidcloud_slots SET holder = NULL WHERE holder = $1",
                        &[&id],
                    )?;
                }
                tx.execute("SELECT pg_notify($1, '')", &[&QUEUE_CHANNEL])?;
                tx.commit()
            })
            .map_err(db_err)
    }

    /// Queues relocation `id` again, to resume it or roll it back.
    ///
    /// # Errors
    /// `Precondition` when it is queued or running, or another relocation
    /// of its service is; database errors.
    pub fn requeue(&self, id: &str, mode: Mode) -> Result<()> {
        let owned = id.to_owned();
        let outcome = self
            .conn
            .call("queue a relocation again", move |c| {
                let mut tx = c.transaction()?;
                let n = tx.execute(
                    "UPDATE fluidcloud_relocations
                     SET state = 'queued', mode = $2, queued_at = clock_timestamp(), cancel = false
                     WHERE id = $1 AND state = 'done'",
                    &[&owned, &mode.as_str()],
                );
                match n {
                    Ok(0) => Ok(Some("is queued or running")),
                    Ok(_) => {
                        tx.execute("SELECT pg_notify($1, '')", &[&QUEUE_CHANNEL])?;
                        tx.commit()?;
                        Ok(None)
                    }
                    Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(Some(
                        "cannot run: another relocation of its service is queued or running",
                    )),
                    Err(e) => Err(e),
                }
            })
            .map_err(db_err)?;
        match outcome {
            None => Ok(()),
            Some(why) => Err(precondition(format!("relocation {id} {why}"))),
        }
    }

    /// Asks for `id` to be cancelled: a queued one is taken off the queue
    /// at once (`true`); a running one is flagged and its worker told
    /// (`false`).
    ///
    /// # Errors
    /// `Precondition` when it is not queued or running; database errors.
    pub fn cancel(&self, id: &str) -> Result<bool> {
        let owned = id.to_owned();
        let state = self
            .conn
            .call("cancel a relocation", move |c| {
                let mut tx = c.transaction()?;
                let row = tx.query_opt(
                    "UPDATE fluidcloud_relocations
                     SET cancel = (state = 'running'),
                         state = CASE state WHEN 'queued' THEN 'done' ELSE state END
                     WHERE id = $1 AND state <> 'done'
                     RETURNING state",
                    &[&owned],
                )?;
                tx.execute("SELECT pg_notify($1, $2)", &[&CANCEL_CHANNEL, &owned])?;
                tx.commit()?;
                Ok(row.map(|r| r.get::<_, String>(0)))
            })
            .map_err(db_err)?;
        match state.as_deref() {
            Some("done") => Ok(true),
            Some(_) => Ok(false),
            None => Err(precondition(format!("relocation {id} is not running"))),
        }
    }

    /// Sends `payload` on `channel`.
    ///
    /// # Errors
    /// Database errors.
    pub fn notify(&self, channel: &'static str, payload: String) -> Result<()> {
        self.conn
            .call("notify", move |c| {
                c.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            })
            .map(drop)
            .map_err(db_err)
    }

    /// Sends `payload` on `channel` without waiting (a lost one costs a
    /// watcher an update, no more).
    pub fn notify_later(&self, channel: &'static str, payload: String) {
        self.events.post(move |c| {
            let _ = c.execute("SELECT pg_notify($1, $2)", &[&channel, &payload]);
        });
    }

    /// Sets the concurrency limits to `limits`: each scope gets exactly
    /// `max` slots (free slots beyond are removed; held ones stay until
    /// their relocation ends), and scopes not named lose their free slots.
    /// Every worker sets the same limits from the same configuration.
    ///
    /// # Errors
    /// Database errors.
    pub fn set_limits(&self, limits: &[Limit]) -> Result<()> {
        let scopes: Vec<String> = limits.iter().map(|l| l.scope.clone()).collect();
        let maxes: Vec<i32> = limits
            .iter()
            .map(|l| i32::try_from(l.max).unwrap_or(i32::MAX))
            .collect();
        self.conn
            .call("set the limits", move |c| {
                let mut tx = c.transaction()?;
                tx.execute(
                    "DELETE FROM fluidcloud_slots s WHERE s.holder IS NULL AND NOT EXISTS (
                         SELECT 1 FROM unnest($1::TEXT[], $2::INT[]) AS l (scope, max)
                         WHERE l.scope = s.scope AND s.slot < l.max)",
                    &[&scopes, &maxes],
                )?;
                tx.execute(
                    "INSERT INTO fluidcloud_slots (scope, slot)
                     SELECT l.scope, n FROM unnest($1::TEXT[], $2::INT[]) AS l (scope, max),
                          generate_series(0, l.max - 1) AS n
                     ON CONFLICT DO NOTHING",
                    &[&scopes, &maxes],
                )?;
                tx.execute("SELECT pg_notify($1, '')", &[&QUEUE_CHANNEL])?;
                tx.commit()
            })
            .map_err(db_err)
    }

    /// The time until the earliest lease of a running relocation expires,
    /// if any runs: when a worker looks again for work to take over.
    ///
    /// # Errors
    /// Database errors.
    pub fn next_expiry(&self) -> Result<Option<Duration>> {
        let secs = self
            .leases
            .call("read the leases", |c| {
                c.query_one(
                    "SELECT extract(epoch FROM min(lease_until) - now())::FLOAT8
                     FROM fluidcloud_relocations WHERE state = 'running'",
                    &[],
                )
                .map(|row| row.get::<_, Option<f64>>(0))
            })
            .map_err(db_err)?;
        Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
    }

    /// The queue's figures across all workers.
    ///
    /// # Errors
    /// Database errors.
    pub fn figures(&self) -> Result<QueueFigures> {
        self.conn
            .call("read the queue's figures", |c| {
                let row = c.query_one(
                    "SELECT count(*) FILTER (WHERE state = 'queued'),
                            count(*) FILTER (WHERE state = 'running' AND lease_until >= now()),
                            count(*) FILTER (WHERE state = 'running' AND lease_until < now()),
                            coalesce(sum(takeovers), 0)::BIGINT
                     FROM fluidcloud_relocations",
                    &[],
                )?;
                let n = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
                let count = |v: i64| u64::try_from(v).unwrap_or(0);
                let limits = c
                    .query(
                        "SELECT scope, count(*), count(holder) FROM fluidcloud_slots
                         GROUP BY scope ORDER BY scope",
                        &[],
                    )?
                    .iter()
                    .map(|r| (r.get(0), count(r.get(1)), count(r.get(2))))
                    .collect();
                Ok(QueueFigures {
                    queued: n(0),
                    running: n(1),
                    expired: n(2),
                    takeovers: n(3),
                    limits,
                })
            })
            .map_err(db_err)
    }
}

/// The limit scopes a relocation from `from` to `targets` counts in.
fn scopes(from: &str, targets: &[String]) -> Vec<String> {
    let mut out = vec!["global".to_owned(), format!("site:{from}")];
    for t in targets {
        out.push(format!("site:{t}"));
        out.push(format!("pair:{from}>{t}"));
    }
    out.sort();
    out.dedup();
    out
}

/// Takes a free slot of every limited scope for `id`; `false` (and
/// nothing taken) when one is full. A scope found full is remembered in
/// `full` for the rest of the claim: a slot freed (or unlocked by another
/// claim) a moment later must go to the candidate that was first in fair
/// order, on the next claim, not to a later one of this pass.
fn take_slots(
    tx: &mut pg::postgres::Transaction<'_>,
    id: &str,
    scopes: &[String],
    full: &mut std::collections::HashSet<String>,
) -> std::result::Result<bool, pg::postgres::Error> {
    if scopes.iter().any(|s| full.contains(s)) {
        return Ok(false);
    }
    let mut sp = tx.savepoint("slots")?;
    for scope in scopes {
        let limited = sp
            .query_opt(
                "SELECT 1 FROM fluidcloud_slots WHERE scope = $1 LIMIT 1",
                &[scope],
            )?
            .is_some();
        if !limited {
            continue;
        }
        let free = sp.query_opt(
            "SELECT slot FROM fluidcloud_slots WHERE scope = $1 AND holder IS NULL
             LIMIT 1 FOR UPDATE SKIP LOCKED",
            &[scope],
        )?;
        let Some(free) = free else {
            sp.rollback()?;
            full.insert(scope.clone());
            return Ok(false);
        };
        let slot: i32 = free.get(0);
        sp.execute(
            "UPDATE fluidcloud_slots SET holder = $3 WHERE scope = $1 AND slot = $2",
            &[scope, &slot, &id],
        )?;
    }
    sp.commit()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relocation_counts_in_its_sites_pairs_and_the_global_scope() {
        assert_eq!(
            scopes("a", &["b".into(), "c".into(), "b".into()]),
            [
                "global", "pair:a>b", "pair:a>c", "site:a", "site:b", "site:c"
            ]
        );
    }
}
