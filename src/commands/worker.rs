//! A worker of `fluidcloud serve --database`: claims relocations from the
//! queue every worker shares ([`fluidcloud_conduit::relocate::queue`]),
//! runs them under a lease it renews, and relays progress so that every
//! worker can stream any relocation's events.
//!
//! - **Waking.** A thread holds a connection that `LISTEN`s on the queue,
//!   cancel and events channels. The claim loop sleeps until a
//!   notification, a local run ending, or the earliest lease of another
//!   worker expiring (the only timer: a dead worker sends nothing).
//! - **Running a claim.** The journal's own lock is taken first: a worker
//!   whose lease expired but who still runs (a long pause, a partition)
//!   holds it, and the claim is handed back until its session ends. The
//!   executor then resumes from the journal, so steps that succeeded are
//!   not run again and a step that was running goes through its resume
//!   path, as with `fluidcloud resume`.
//! - **Losing the lease** (renewals failed for a whole lease, or another
//!   worker holds the row) cancels the run here: it must not go on beside
//!   another.
//! - **A run cut short** by the database going away (the journal cannot be
//!   written) is handed back to the queue, to be claimed again once the
//!   database answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fluidcloud_conduit::SitesFile;
use fluidcloud_conduit::relocate as reloc;
use fluidcloud_conduit::relocate::queue::{
    CANCEL_CHANNEL, Claim, Database, EVENTS_CHANNEL, Limit, Mode, QUEUE_CHANNEL,
};
use fluidcloud_conduit::relocate::store::Store;
use fluidcloud_plugins::Retryable as _;
use fluidcloud_viaduct::postgres::postgres::{
    self as pg, NoTls, fallible_iterator::FallibleIterator as _,
};
use fluidcloud_viaduct::{Canceller, Executor, PgJournal, ProgressEvent, Workflow};
use tokio::sync::{Notify, broadcast, mpsc};

use super::relocate::{build_report, executor_config};

/// How a worker runs.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    /// Its name in leases (unique among workers).
    pub(crate) name: String,
    /// How long a claim holds without renewal.
    pub(crate) lease: Duration,
    /// Relocations this worker runs at once; 0: none, it only answers the
    /// API (and streams events).
    pub(crate) max_running: usize,
}

/// Figures of this worker, for `/metrics`.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) claims: AtomicU64,
    pub(crate) takeovers: AtomicU64,
    pub(crate) lost_leases: AtomicU64,
    pub(crate) handed_back: AtomicU64,
    /// Steps running now in this worker's runs.
    pub(crate) steps_running: std::sync::atomic::AtomicI64,
    /// Step durations.
    pub(crate) steps: Mutex<Histogram>,
    /// Claim transactions' durations (found work or not).
    pub(crate) claim_times: Mutex<Histogram>,
}

/// Durations in seconds, as a Prometheus histogram.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// Cumulative counts per bound.
    buckets: Vec<u64>,
    count: u64,
    sum_secs: f64,
}

/// Bucket bounds of step latencies, in seconds.
const STEP_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0];
/// Bucket bounds of claim latencies, in seconds.
const CLAIM_BUCKETS: &[f64] = &[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Mutex<Self> {
        Mutex::new(Self {
            bounds,
            buckets: vec![0; bounds.len()],
            count: 0,
            sum_secs: 0.0,
        })
    }

    fn observe(this: &Mutex<Self>, secs: f64) {
        let mut h = this.lock().unwrap_or_else(PoisonError::into_inner);
        for i in 0..h.bounds.len() {
            if secs <= h.bounds[i] {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum_secs += secs;
    }

    /// Appends histogram `name` in Prometheus text format to `out`.
    fn write(this: &Mutex<Self>, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write as _;
        let h = this.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, n) in h.bounds.iter().zip(&h.buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum_secs);
        let _ = writeln!(out, "{name}_count {}", h.count);
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            claims: AtomicU64::default(),
            takeovers: AtomicU64::default(),
            lost_leases: AtomicU64::default(),
            handed_back: AtomicU64::default(),
            steps_running: std::sync::atomic::AtomicI64::default(),
            steps: Histogram::new(STEP_BUCKETS),
            claim_times: Histogram::new(CLAIM_BUCKETS),
        }
    }
}

/// Events of relocations run by any worker, to this worker's watchers.
#[derive(Default)]
pub(crate) struct Hub {
    senders: Mutex<HashMap<String, broadcast::Sender<ProgressEvent>>>,
}

impl Hub {
    fn senders(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<ProgressEvent>>> {
        self.senders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver of `id`'s events, until its run ends.
    pub(crate) fn subscribe(&self, id: &str) -> broadcast::Receiver<ProgressEvent> {
        self.senders()
            .entry(id.to_owned())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe()
    }

    /// Ends `id`'s streams (its run ended, or nobody can tell).
    pub(crate) fn end(&self, id: &str) {
        self.senders().remove(id);
    }

    /// Dispatches one relayed message (`{"id", "event"}` or `{"id", "end"}`).
    fn publish(&self, payload: &str) {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(payload) else {
            return;
        };
        let Some(id) = msg["id"].as_str() else {
            return;
        };
        if msg["end"].as_bool() == Some(true) {
            self.end(id);
            return;
        }
        let Ok(ev) = serde_json::from_value::<ProgressEvent>(msg["event"].clone()) else {
            return;
        };
        let mut senders = self.senders();
        if let Some(tx) = senders.get(id)
            && tx.send(ev).is_err()
        {
            // Nobody watches any more.
            senders.remove(id);
        }
    }
}

/// A worker.
pub(crate) struct Worker {
    config: WorkerConfig,
    db: Arc<Database>,
    store: Store,
    file: SitesFile,
    pub(crate) hub: Hub,
    pub(crate) counters: Counters,
    /// Runs of this worker: their cancellers.
    running: Mutex<HashMap<String, Canceller>>,
    /// Claims of this worker not yet released (counted from the claim, so
    /// that the claim loop never takes more than its room).
    claimed: std::sync::atomic::AtomicUsize,
    /// The process is stopping: claim nothing, hand runs back.
    stopping: std::sync::atomic::AtomicBool,
    wake: Notify,
}

impl Worker {
    /// A worker of `store`'s database; sets the limits of `file` and
    /// starts claiming.
    ///
    /// # Errors
    /// Database errors.
    pub(crate) fn start(
        file: SitesFile,
        store: Store,
        db: Arc<Database>,
        config: WorkerConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let limits: Vec<Limit> = file
            .limits
            .scopes(file.sites.keys())
            .into_iter()
            .map(|(scope, max)| Limit { scope, max })
            .collect();
        db.set_limits(&limits)?;
        let worker = Arc::new(Self {
            config,
            db,
            store,
            file,
            hub: Hub::default(),
            counters: Counters::default(),
            running: Mutex::new(HashMap::new()),
            claimed: std::sync::atomic::AtomicUsize::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
            wake: Notify::new(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        listen(worker.db.url().to_owned(), tx)?;
        tokio::spawn(Arc::clone(&worker).dispatch(rx));
        // With no room at all this process only answers the API.
        if worker.config.max_running > 0 {
            tokio::spawn(Arc::clone(&worker).claim_loop());
        }
        Ok(worker)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Canceller>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Relocations this worker holds now.
    pub(crate) fn running_here(&self) -> usize {
        self.claimed.load(Ordering::SeqCst)
    }

    /// Routes notifications: queue → claim, cancel → the run here, events →
    /// the watchers here.
    async fn dispatch(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<(String, String)>) {
        while let Some((channel, payload)) = rx.recv().await {
            match channel.as_str() {
                QUEUE_CHANNEL => self.wake.notify_one(),
                CANCEL_CHANNEL => {
                    if let Some(c) = self.running().get(&payload) {
                        c.cancel("cancelled through the REST API");
                    }
                }
                EVENTS_CHANNEL => self.hub.publish(&payload),
                _ => {}
            }
        }
    }

    /// Claims while this worker has room, then sleeps until woken or the
    /// earliest lease expires.
    async fn claim_loop(self: Arc<Self>) {
        while !self.stopping.load(Ordering::SeqCst) {
            while self.running_here() < self.config.max_running {
                let asked = Instant::now();
                let claimed = self.db.claim(&self.config.name, self.config.lease);
                Histogram::observe(&self.counters.claim_times, asked.elapsed().as_secs_f64());
                match claimed {
                    Ok(Some(claim)) => self.launch(claim),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot claim; trying again");
                        break;
                    }
                }
            }
            let wait = match self.db.next_expiry() {
                Ok(Some(d)) => d + Duration::from_millis(50),
                Ok(None) => self.config.lease,
                Err(_) => Duration::from_secs(1),
            }
            .clamp(Duration::from_millis(50), self.config.lease);
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn launch(self: &Arc<Self>, claim: Claim) {
        let id = claim.relocation.id.clone();
        self.claimed.fetch_add(1, Ordering::SeqCst);
        self.counters.claims.fetch_add(1, Ordering::Relaxed);
        if claim.takeover {
            self.counters.takeovers.fetch_add(1, Ordering::Relaxed);
            tracing::info!(relocation = %id, "taking over from a worker whose lease expired");
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            // A run this worker cancelled because it stops is not finished:
            // it goes back to the queue.
            let finished = this.run_claim(&claim).await && !this.stopping.load(Ordering::SeqCst);
            this.running().remove(&id);
            let retry = if finished || this.stopping.load(Ordering::SeqCst) {
                Duration::ZERO
            } else {
                this.counters.handed_back.fetch_add(1, Ordering::Relaxed);
                Duration::from_secs(1)
            };
            if let Err(e) = this.db.release(&id, &this.config.name, finished, retry) {
                tracing::warn!(relocation = %id, error = %e, "cannot release; the lease will expire");
            }
            if finished {
                this.db.notify_later(
                    EVENTS_CHANNEL,
                    serde_json::json!({"id": id, "end": true}).to_string(),
                );
            }
            this.claimed.fetch_sub(1, Ordering::SeqCst);
            this.wake.notify_one();
        });
    }

    /// Runs a claimed relocation; whether its run ended (`false`: it was
    /// cut short and goes back to the queue).
    async fn run_claim(self: &Arc<Self>, claim: &Claim) -> bool {
        let r = &claim.relocation;
        let mut executor = match self.executor(r) {
            Ok(e) => e,
            Err(e) if e.retry() == fluidcloud_plugins::Retry::Never => {
                // The journal is someone else's (its worker still runs) or
                // the plan cannot run at all: hand back, or give up.
                let busy = matches!(e, fluidcloud_viaduct::Error::JournalInUse { .. });
                tracing::warn!(relocation = %r.id, error = %e, "cannot run");
                return !busy;
            }
            Err(e) => {
                tracing::warn!(relocation = %r.id, error = %e, "cannot open the journal");
                return false;
            }
        };
        let canceller = executor.canceller();
        if claim.cancel {
            canceller.cancel("cancelled through the REST API");
        }
        self.running().insert(r.id.clone(), canceller.clone());
        let relay = tokio::spawn(self.clone().relay(r.id.clone(), executor.subscribe()));
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let renew = tokio::spawn(
            self.clone()
                .renew(r.id.clone(), canceller, Arc::clone(&lost)),
        );
        let result = match claim.mode {
            Mode::Run => executor.run().await,
            Mode::Rollback => executor.rollback().await,
        };
        drop(executor);
        renew.abort();
        fluidcloud_conduit::guest::release(&r.id);
        let _ = relay.await;
        match result {
            // Stopped because this worker lost its claim: whoever holds it
            // now, or claims it next, continues.
            Ok(_) if lost.load(Ordering::SeqCst) => false,
            Ok(_) => {
                self.save_report(r);
                true
            }
            Err(e) => {
                tracing::warn!(relocation = %r.id, error = %e, "run cut short");
                e.retry() != fluidcloud_plugins::Retry::Transient
            }
        }
    }

    /// An executor over `r`'s journal, whose lock it holds.
    fn executor(&self, r: &reloc::Relocation) -> fluidcloud_viaduct::Result<Executor> {
        let registry = reloc::registry_for(&r.workflow, &self.file.plugin_env()).map_err(|e| {
            fluidcloud_viaduct::Error::InvalidWorkflow(vec![fluidcloud_plugins::Diagnostic::error(
                e.to_string(),
            )])
        })?;
        let workflow = Workflow::freeze(r.workflow.clone(), &registry)?;
        let journal = PgJournal::open(self.db.url(), &r.id)?;
        let mut executor = Executor::new(workflow, registry, Box::new(journal), executor_config());
        executor.state()?;
        Ok(executor)
    }

    fn save_report(&self, r: &reloc::Relocation) {
        match build_report(&self.store, r) {
            Ok(rep) => {
                let json = serde_json::to_vec_pretty(&rep).unwrap_or_default();
                if let Err(e) = self.store.save_report(&r.id, &json) {
                    tracing::error!(relocation = %r.id, error = %e, "cannot save the report");
                }
            }
            Err(e) => tracing::error!(relocation = %r.id, error = %e, "cannot build the report"),
        }
    }

    /// Renews the lease of `id` every third of a lease; cancels the run
    /// when a cancel was asked for, or the lease is lost.
    async fn renew(
        self: Arc<Self>,
        id: String,
        canceller: Canceller,
        lost: Arc<std::sync::atomic::AtomicBool>,
    ) {
        let period = self.config.lease / 3;
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.db.renew(&id, &self.config.name, self.config.lease) {
                Ok(Some(cancel)) => {
                    last_ok = Instant::now();
                    if cancel {
                        canceller.cancel("cancelled through the REST API");
                    }
                }
                Ok(None) => {
                    lost.store(true, Ordering::SeqCst);
                    return self.lose(&id, &canceller, "another worker holds its claim");
                }
                Err(e) if last_ok.elapsed() >= self.config.lease => {
                    lost.store(true, Ordering::SeqCst);
                    return self.lose(&id, &canceller, &format!("its lease ran out ({e})"));
                }
                Err(e) => tracing::warn!(relocation = %id, error = %e, "cannot renew the lease"),
            }
        }
    }

    fn lose(&self, id: &str, canceller: &Canceller, why: &str) {
        self.counters.lost_leases.fetch_add(1, Ordering::Relaxed);
        tracing::error!(relocation = %id, "stopping the run here: {why}");
        canceller.cancel(&format!("this worker lost the relocation: {why}"));
    }

    /// Relays `id`'s progress to every worker's watchers, and times steps.
    async fn relay(self: Arc<Self>, id: String, mut rx: broadcast::Receiver<ProgressEvent>) {
        let mut last_progress: HashMap<String, Instant> = HashMap::new();
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            match &ev {
                // A few progress updates a second are what people read.
                ProgressEvent::StepProgress { step, .. } => {
                    let now = Instant::now();
                    if last_progress
                        .get(step)
                        .is_some_and(|t| now.duration_since(*t) < Duration::from_millis(250))
                    {
                        continue;
                    }
                    last_progress.insert(step.clone(), now);
                }
                ProgressEvent::StepStarted { .. } => {
                    self.counters.steps_running.fetch_add(1, Ordering::Relaxed);
                }
                ProgressEvent::StepFinished { elapsed_ms, .. } => {
                    self.counters.steps_running.fetch_sub(1, Ordering::Relaxed);
                    Histogram::observe(&self.counters.steps, *elapsed_ms as f64 / 1000.0);
                }
                _ => {}
            }
            let mut event = serde_json::to_value(&ev).unwrap_or_default();
            // NOTIFY payloads are limited to 8000 bytes.
            if let Some(text) = event
                .get_mut("text")
                .filter(|t| t.as_str().is_some_and(|s| s.len() > 4000))
            {
                let s = text.as_str().unwrap_or_default();
                let mut cut = 4000;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                *text = format!("{}…", &s[..cut]).into();
            }
            self.db.notify_later(
                EVENTS_CHANNEL,
                serde_json::json!({ "id": id, "event": event }).to_string(),
            );
        }
    }

    /// Stops every run of this worker (the process is stopping): each is
    /// cancelled at a safe point and handed back to the queue; nothing new
    /// is claimed.
    pub(crate) fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for c in self.running().values() {
            c.cancel("the worker is stopping");
        }
        self.wake.notify_one();
    }

    /// Waits until every claim of this worker is released, up to `limit`;
    /// whether they were.
    pub(crate) async fn drained(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while self.running_here() > 0 {
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Starts the thread that listens for notifications and passes them to
/// `tx`, reconnecting when the database goes away (and then waking the
/// claim loop, since notifications were missed).
fn listen(url: String, tx: mpsc::UnboundedSender<(String, String)>) -> anyhow::Result<()> {
    let config: pg::Config = url.parse()?;
    std::thread::Builder::new()
        .name("pg-listen".into())
        .spawn(move || {
            let mut first = true;
            while !tx.is_closed() {
                let client = config
                    .clone()
                    .connect_timeout(Duration::from_secs(5))
                    .application_name("fluidcloud-listen")
                    .connect(NoTls)
                    .and_then(|mut c| {
                        c.batch_execute(&format!(
                            "LISTEN {QUEUE_CHANNEL}; LISTEN {CANCEL_CHANNEL}; LISTEN {EVENTS_CHANNEL}"
                        ))?;
                        Ok(c)
                    });
                let mut client = match client {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen to the database; retrying");
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                };
                if !first {
                    let _ = tx.send((QUEUE_CHANNEL.to_owned(), String::new()));
                }
                first = false;
                let mut notes = client.notifications();
                let mut iter = notes.timeout_iter(Duration::from_secs(1));
                loop {
                    match iter.next() {
                        Ok(Some(n)) => {
                            if tx.send((n.channel().to_owned(), n.payload().to_owned())).is_err() {
                                return;
                            }
                        }
                        Ok(None) if tx.is_closed() => return,
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "lost the database's notifications; reconnecting");
                            break;
                        }
                    }
                }
            }
        })?;
    Ok(())
}

/// The Prometheus text of a worker and its queue.
pub(crate) fn metrics(worker: &Worker) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let q = worker.db.figures()?;
    let c = &worker.counters;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        "fluidcloud_queue_depth",
        "Relocations waiting for a worker.",
        "gauge",
        q.queued.to_string(),
    );
    gauge(
        "fluidcloud_relocations_running",
        "Relocations claimed under a current lease, all workers.",
        "gauge",
        q.running.to_string(),
    );
    gauge(
        "fluidcloud_relocations_expired",
        "Relocations whose worker's lease expired, not yet taken over.",
        "gauge",
        q.expired.to_string(),
    );
    gauge(
        "fluidcloud_lease_takeovers_total",
        "Claims that took a relocation over from a worker whose lease expired, all workers.",
        "counter",
        q.takeovers.to_string(),
    );
    gauge(
        "fluidcloud_worker_running",
        "Relocations this worker runs.",
        "gauge",
        worker.running_here().to_string(),
    );
    gauge(
        "fluidcloud_worker_claims_total",
        "Relocations this worker claimed.",
        "counter",
        c.claims.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "fluidcloud_worker_takeovers_total",
        "Relocations this worker took over.",
        "counter",
        c.takeovers.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "fluidcloud_worker_lost_leases_total",
        "Runs this worker stopped because it lost their lease.",
        "counter",
        c.lost_leases.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "fluidcloud_worker_handed_back_total",
        "Runs cut short here and handed back to the queue.",
        "counter",
        c.handed_back.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "fluidcloud_worker_steps_running",
        "Steps running now in this worker's runs.",
        "gauge",
        c.steps_running.load(Ordering::Relaxed).max(0).to_string(),
    );
    let _ = writeln!(
        out,
        "# HELP fluidcloud_limit Relocations a scope admits at once ([limits]).\n# TYPE fluidcloud_limit gauge"
    );
    for (scope, max, _) in &q.limits {
        let _ = writeln!(out, "fluidcloud_limit{{scope=\"{scope}\"}} {max}");
    }
    let _ = writeln!(
        out,
        "# HELP fluidcloud_limit_used Relocations holding a slot of a scope, all workers.\n# TYPE fluidcloud_limit_used gauge"
    );
    for (scope, _, used) in &q.limits {
        let _ = writeln!(out, "fluidcloud_limit_used{{scope=\"{scope}\"}} {used}");
    }
    Histogram::write(
        &c.steps,
        "fluidcloud_step_seconds",
        "Time of steps' last attempts, run by this worker.",
        &mut out,
    );
    Histogram::write(
        &c.claim_times,
        "fluidcloud_claim_seconds",
        "Time of this worker's claim transactions.",
        &mut out,
    );
    Ok(out)
}

/// The status a relocation shows, from its queue state and its journal's.
pub(crate) fn status_of(
    state: &fluidcloud_conduit::relocate::queue::QueueState,
    journal: &str,
) -> String {
    use fluidcloud_conduit::relocate::queue::QueueState;
    match state {
        QueueState::Queued(_) => "queued".to_owned(),
        QueueState::Running {
            mode: Mode::Rollback,
            live: true,
            ..
        } => "rolling-back".to_owned(),
        QueueState::Running { live: true, .. } => "running".to_owned(),
        // Claimed by a worker that is gone: another takes it over.
        QueueState::Running { live: false, .. } => "queued".to_owned(),
        QueueState::Done => journal.to_owned(),
    }
}
