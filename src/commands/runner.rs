//! The relocations of `fluidcloud serve`: the broker's
//! [`Relocations`] trait over the same planning, store and journal as
//! `fluidcloud relocate`.
//!
//! Nothing is kept only in memory but the runs going on: every relocation
//! is the directory `relocate` writes (`relocation.json` and the SQLite
//! journal of the viaduct), so a restarted service — or `fluidcloud status`
//! on the same sites file — finds all of them, and a run the restart cut
//! short reads as `interrupted` from its journal, ready to resume or roll
//! back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use fluidcloud_broker::runner::{
    RelocationRequest, RelocationView, Relocations, RunnerError, StepView, Watch,
};
use fluidcloud_conduit::relocate::Relocation;
use fluidcloud_conduit::relocate::report::{self, Report};
use fluidcloud_conduit::relocate::store::Store;
use fluidcloud_conduit::{SitesFile, drivers, introspect};
use fluidcloud_plugins::TopologyDoc;
use fluidcloud_viaduct::{Canceller, Executor, Plan, ProgressEvent};
use tokio::sync::broadcast;

use super::relocate::{
    RelocateArgs, build_report, executor_config, make_plan, reopen, rollback_allowed,
};
use super::worker::{self, Worker, WorkerConfig};
use crate::ExitWith;
use fluidcloud_conduit::relocate::lock::{self, ServiceLock};
use fluidcloud_conduit::relocate::queue::Mode;

/// A run going on in this process.
struct Active {
    rollback: bool,
    canceller: Canceller,
    events: broadcast::Sender<ProgressEvent>,
}

struct Inner {
    file: SitesFile,
    store: Store,
    active: Mutex<HashMap<String, Active>>,
    /// With a database: this process's worker of the shared queue.
    worker: Option<Arc<Worker>>,
}

/// Relocations of one sites file, run in the background.
#[derive(Clone)]
pub(crate) struct Runner(Arc<Inner>);

fn failed(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Failed(e.to_string())
}

/// An error of planning as the API answers it: what the request named
/// wrongly is a 422 pointing at the field.
fn plan_error(e: &anyhow::Error, req: &RelocationRequest) -> RunnerError {
    use fluidcloud_conduit::Error as C;
    use fluidcloud_plugins::Error as S;
    let message = format!("{e:#}");
    let field = |pointer: &str| RunnerError::Invalid {
        pointer: pointer.to_owned(),
        detail: message.clone(),
    };
    for cause in e.chain() {
        if let Some(ExitWith(code, _)) = cause.downcast_ref::<ExitWith>() {
            return match code {
                2 => field("/to"),
                _ => RunnerError::Conflict(message),
            };
        }
        if let Some(c) = cause.downcast_ref::<C>() {
            return match c {
                C::UnknownSite { name, .. } if *name == req.from => field("/from"),
                C::UnknownSite { .. } => field("/to"),
                C::Site {
                    source: S::NotFound { .. },
                    ..
                } => field("/service"),
                C::Site {
                    source: S::Precondition(_),
                    ..
                } => RunnerError::Conflict(message),
                C::Config { .. } => field("/service"),
                _ => failed(message),
            };
        }
        if let Some(S::NotFound { .. }) = cause.downcast_ref::<S>() {
            return field("/service");
        }
        if let Some(b) = cause.downcast_ref::<fluidcloud_broker::Error>() {
            return match b {
                fluidcloud_broker::Error::Invalid(_) => field("/constraints"),
                _ => RunnerError::Conflict(message),
            };
        }
    }
    failed(message)
}

fn view(r: &Relocation, rep: &Report, active: Option<bool>, full: bool) -> RelocationView {
    let status = match active {
        Some(true) => "rolling-back".to_owned(),
        Some(false) => "running".to_owned(),
        None => rep.status.clone(),
    };
    let deps: HashMap<&str, Vec<String>> = r
        .workflow
        .steps
        .iter()
        .map(|s| {
            let d = s.dependencies().into_iter().map(str::to_owned).collect();
            (s.id.as_str(), d)
        })
        .collect();
    RelocationView {
        id: r.id.clone(),
        service: r.service.clone(),
        from: r.from.clone(),
        targets: rep.targets.clone(),
        status,
        bytes_to_move: r.bytes_to_move,
        bytes_written: rep.bytes_written,
        steps: rep
            .steps
            .iter()
            .map(|s| StepView {
                id: s.id.clone(),
                migrator: s.migrator.clone(),
                site: s.site.clone(),
                state: s.state.as_str().to_owned(),
                attempts: s.attempts,
                bytes_written: s.bytes_written,
                error: s.error.clone(),
                depends_on: deps.get(s.id.as_str()).cloned().unwrap_or_default(),
            })
            .collect(),
        report: (full && active.is_none())
            .then(|| serde_json::to_value(rep).ok())
            .flatten(),
    }
}

impl Runner {
    /// The relocations of `file`, kept where `fluidcloud relocate` keeps
    /// them: in `store`, run by this process; or, when `store` is a
    /// database, by whichever worker of it claims them (this process is
    /// one, as `worker` says).
    pub(crate) fn new(
        file: SitesFile,
        store: Store,
        worker: Option<WorkerConfig>,
    ) -> anyhow::Result<Self> {
        let worker = match (store.database(), worker) {
            (Some(db), Some(config)) => Some(Worker::start(
                file.clone(),
                store.clone(),
                Arc::clone(db),
                config,
            )?),
            _ => None,
        };
        Ok(Self(Arc::new(Inner {
            file,
            store,
            active: Mutex::new(HashMap::new()),
            worker,
        })))
    }

    /// This process's worker, when relocations are kept in a database.
    pub(crate) fn worker(&self) -> Option<&Arc<Worker>> {
        self.0.worker.as_ref()
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Active>> {
        self.0.active.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn load(&self, id: &str) -> Result<Relocation, RunnerError> {
        // Ids come from URLs: never let one name a path outside the store.
        // One that cannot be a relocation's name is not found (404), not a
        // failure of the service (the store refuses it as a precondition).
        if lock::check_name("relocation id", id).is_err() {
            return Err(RunnerError::NotFound(format!("no relocation `{id}`")));
        }
        self.0.store.load(id).map_err(|e| match e {
            fluidcloud_conduit::Error::Site {
                source: fluidcloud_plugins::Error::NotFound { .. },
                ..
            } => RunnerError::NotFound(e.to_string()),
            e => failed(e),
        })
    }

    fn view_of(&self, r: &Relocation, full: bool) -> Result<RelocationView, RunnerError> {
        if let Some(db) = self.0.store.database() {
            let state = db.state(&r.id).map_err(failed)?;
            let rep = build_report(&self.0.store, r).map_err(|e| failed(format!("{e:#}")))?;
            let mut v = view(r, &rep, None, full);
            v.status = worker::status_of(&state, &rep.status);
            if v.is_active() {
                v.report = None;
            }
            return Ok(v);
        }
        let active = self.active().get(&r.id).map(|a| a.rollback);
        let rep = match build_report(&self.0.store, r) {
            Ok(rep) => rep,
            // A run that just started may not have created its journal's
            // tables yet: nothing has happened, the plan is the state.
            Err(_) if active.is_some() => report::build(r, &[], &|path, old, new| {
                fluidcloud_migrators::config::unified_diff(path, old, new)
            }),
            Err(e) => return Err(failed(format!("{e:#}"))),
        };
        Ok(view(r, &rep, active, full))
    }

    /// Starts `executor` in the background; the caller holds the lock of
    /// the active runs and checked that `r` has none.
    fn launch(
        &self,
        active: &mut HashMap<String, Active>,
        r: Relocation,
        mut executor: Executor,
        rollback: bool,
        lock: ServiceLock,
    ) {
        let (tx, _) = broadcast::channel(1024);
        let mut rx = executor.subscribe();
        let forward = tx.clone();
        // The service's own channel outlives the executor's until the end
        // is recorded: an event stream ends only when the state is final.
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let _ = forward.send(ev);
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        active.insert(
            r.id.clone(),
            Active {
                rollback,
                canceller: executor.canceller(),
                events: tx,
            },
        );
        let this = self.clone();
        tokio::spawn(async move {
            let result = if rollback {
                executor.rollback().await
            } else {
                executor.run().await
            };
            drop(executor);
            fluidcloud_conduit::guest::release(&r.id);
            drop(lock);
            if let Err(e) = result {
                tracing::error!(relocation = %r.id, error = %e, "run ended with an error");
            }
            match build_report(&this.0.store, &r) {
                Ok(rep) => {
                    let json = serde_json::to_vec_pretty(&rep).unwrap_or_default();
                    if let Err(e) = this.0.store.save_report(&r.id, &json) {
                        tracing::error!(relocation = %r.id, error = %e, "cannot save the report");
                    }
                }
                Err(e) => {
                    tracing::error!(relocation = %r.id, error = %e, "cannot build the report");
                }
            }
            this.active().remove(&r.id);
        });
    }

    /// Resumes or rolls back `id` from its journal.
    fn continue_run(
        &self,
        id: &str,
        rollback: bool,
        force: bool,
    ) -> Result<RelocationView, RunnerError> {
        let r = self.load(id)?;
        if rollback {
            rollback_allowed(&self.0.store, &r, force)
                .map_err(|e| RunnerError::Conflict(format!("{e:#}")))?;
        }
        let current = self.view_of(&r, false)?;
        let what = if rollback { "roll back" } else { "resume" };
        if let Some(db) = self.0.store.database() {
            if !rollback && matches!(current.status.as_str(), "succeeded" | "rolled-back") {
                return Err(RunnerError::Conflict(format!(
                    "relocation {id} {}: nothing to {what}",
                    current.status
                )));
            }
            let mode = if rollback { Mode::Rollback } else { Mode::Run };
            db.requeue(id, mode)
                .map_err(|e| RunnerError::Conflict(e.to_string()))?;
            return self.view_of(&r, false);
        }
        if current.is_active() {
            return Err(RunnerError::Conflict(format!(
                "relocation {id} is {}: cancel it first, or wait",
                current.status
            )));
        }
        if !rollback && matches!(current.status.as_str(), "succeeded" | "rolled-back") {
            return Err(RunnerError::Conflict(format!(
                "relocation {id} {}: nothing to {what}",
                current.status
            )));
        }
        {
            let mut active = self.active();
            if active.contains_key(id) {
                return Err(RunnerError::Conflict(format!(
                    "relocation {id} is running already"
                )));
            }
            let lock = ServiceLock::acquire(&self.0.store, &r)
                .map_err(|e| RunnerError::Conflict(e.to_string()))?;
            let executor = reopen(&self.0.file, &self.0.store, &r)
                .map_err(|e| failed(format!("cannot {what} {id}: {e:#}")))?;
            self.launch(&mut active, r.clone(), executor, rollback, lock);
        }
        self.view_of(&r, false)
    }
}

#[async_trait]
impl Relocations for Runner {
    async fn start(&self, request: RelocationRequest) -> Result<RelocationView, RunnerError> {
        let args = RelocateArgs::from_api(&request);
        if let Some(tenant) = &request.tenant {
            lock::check_name("tenant", tenant).map_err(|e| RunnerError::Invalid {
                pointer: "/tenant".into(),
                detail: e.to_string(),
            })?;
        }
        let store = &self.0.store;
        let (relocation, workflow, registry) = make_plan(&self.0.file, store, &args)
            .await
            .map_err(|e| plan_error(&e, &request))?;
        // With a database, the queue's unique index is the service's lock
        // across workers; the lock file is one machine's.
        let lock = match store.database() {
            Some(_) => None,
            None => Some(
                ServiceLock::acquire(store, &relocation)
                    .map_err(|e| RunnerError::Conflict(e.to_string()))?,
            ),
        };
        lock::check_earlier(store, &relocation.from, &relocation.service, request.force)
            .map_err(|e| RunnerError::Conflict(e.to_string()))?;
        lock::check_outputs(&relocation)
            .await
            .map_err(|e| RunnerError::Conflict(e.to_string()))?;
        let created = match (store.database(), &request.tenant) {
            (Some(db), Some(tenant)) => db.insert(&relocation, tenant),
            _ => store.create(&relocation),
        };
        created.map_err(|e| match &e {
            fluidcloud_conduit::Error::Site {
                source: fluidcloud_plugins::Error::Precondition(_),
                ..
            } => RunnerError::Conflict(e.to_string()),
            _ => failed(e),
        })?;
        let Some(lock) = lock else {
            tracing::info!(relocation = %relocation.id, "queued");
            return self.view_of(&relocation, false);
        };
        let journal = store
            .journal(&relocation.id)
            .open()
            .map_err(|e| failed(format!("opening the journal of {}: {e}", relocation.id)))?;
        let executor = Executor::new(workflow, registry, journal, executor_config());
        {
            let mut active = self.active();
            self.launch(&mut active, relocation.clone(), executor, false, lock);
        }
        tracing::info!(relocation = %relocation.id, "started");
        self.view_of(&relocation, false)
    }

    async fn plan(&self, request: RelocationRequest) -> Result<serde_json::Value, RunnerError> {
        let args = RelocateArgs::from_api(&request);
        let (relocation, workflow, registry) = make_plan(&self.0.file, &self.0.store, &args)
            .await
            .map_err(|e| plan_error(&e, &request))?;
        let plan = Plan::new(&workflow, &registry).await;
        Ok(serde_json::json!({ "relocation": relocation, "plan": plan }))
    }

    async fn list(&self) -> Result<Vec<RelocationView>, RunnerError> {
        let ids = self.0.store.list().map_err(failed)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let r = self.load(&id)?;
            out.push(self.view_of(&r, false)?);
        }
        Ok(out)
    }

    async fn get(&self, id: &str) -> Result<RelocationView, RunnerError> {
        let r = self.load(id)?;
        self.view_of(&r, true)
    }

    async fn watch(&self, id: &str) -> Result<Watch, RunnerError> {
        let r = self.load(id)?;
        if let Some(w) = self.worker() {
            // Subscribe before reading the state, so nothing falls between.
            let events = w.hub.subscribe(id);
            let current = self.view_of(&r, false)?;
            let events = if current.is_active() {
                Some(events)
            } else {
                // Nothing more will come: no stream kept open for it.
                w.hub.end(id);
                None
            };
            return Ok(Watch { current, events });
        }
        // Subscribe before reading the state, so nothing falls between.
        let events = self.active().get(id).map(|a| a.events.subscribe());
        let current = self.view_of(&r, false)?;
        Ok(Watch { current, events })
    }

    async fn cancel(&self, id: &str) -> Result<RelocationView, RunnerError> {
        let r = self.load(id)?;
        if let Some(db) = self.0.store.database() {
            let current = self.view_of(&r, false)?;
            if current.status == "rolling-back" {
                return Err(RunnerError::Conflict(format!(
                    "relocation {id} is rolling back; a rollback is not cancelled"
                )));
            }
            let dequeued = db
                .cancel(id)
                .map_err(|e| RunnerError::Conflict(e.to_string()))?;
            if dequeued && let Some(w) = self.worker() {
                w.hub.end(id);
            }
            return self.view_of(&r, false);
        }
        match self.active().get(id) {
            Some(a) if !a.rollback => a.canceller.cancel("cancelled through the REST API"),
            Some(_) => {
                return Err(RunnerError::Conflict(format!(
                    "relocation {id} is rolling back; a rollback is not cancelled"
                )));
            }
            None => {
                return Err(RunnerError::Conflict(format!(
                    "relocation {id} is not running"
                )));
            }
        }
        self.view_of(&r, false)
    }

    async fn rollback(&self, id: &str, force: bool) -> Result<RelocationView, RunnerError> {
        self.continue_run(id, true, force)
    }

    async fn resume(&self, id: &str) -> Result<RelocationView, RunnerError> {
        self.continue_run(id, false, false)
    }

    async fn metrics(&self) -> Result<Option<String>, RunnerError> {
        self.worker()
            .map(|w| worker::metrics(w).map_err(|e| failed(format!("{e:#}"))))
            .transpose()
    }

    async fn introspect(&self, site: &str, service: &str) -> Result<TopologyDoc, RunnerError> {
        let invalid = |pointer: &str, e: &dyn std::fmt::Display| RunnerError::Invalid {
            pointer: pointer.to_owned(),
            detail: e.to_string(),
        };
        let cfg = self.0.file.site(site).map_err(|e| invalid("/site", &e))?;
        let driver = drivers::open(site, cfg).map_err(failed)?;
        let found = introspect(driver.as_ref(), cfg, Some(service), None)
            .await
            .map_err(|e| match e {
                fluidcloud_conduit::Error::Site {
                    source: fluidcloud_plugins::Error::NotFound { .. },
                    ..
                } => invalid("/service", &e),
                e => failed(e),
            })?;
        Ok(found.topology.to_doc())
    }
}
