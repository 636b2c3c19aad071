//! The executor: runs a frozen workflow on tokio, journalling first.
//!
//! One coordinator loop owns the state. Each turn it (1) takes every
//! message that arrived (a step finished, a retry delay elapsed,
//! cancellation), (2) decides the transitions that follow and the steps
//! that may start, (3) appends all those records to the journal in one
//! batch, and only then (4) acts: spawns the started steps, arms retry
//! timers, unblocks dependents, publishes progress. A batch is one SQLite
//! transaction, so many transitions share one `fsync` (group commit)
//! while each is still durable before anything depends on it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fluidcloud_plugins::{CancelFlag, ExecContext, StepOutput};
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::journal::{Journal, JournalHeader, Outcome, Record, RunMode, RunState};
use crate::lifecycle::StepState;
use crate::progress::{self, ProgressEvent, StepSink};
use crate::retry::RetryPolicy;
use crate::workflow::{Registry, Workflow};

/// What to do when a step fails for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Start nothing more; let running steps finish; cancel the rest.
    #[default]
    StopAll,
    /// Skip the (transitive) dependents of the failed step; run the rest.
    SkipDependents,
}

/// How the executor runs a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorConfig {
    /// Steps running at once, over all sites (at least 1).
    pub max_concurrency: usize,
    /// Steps running at once on a given site.
    pub per_site: BTreeMap<String, usize>,
    /// Steps running at once on a site not in `per_site`; `None` = no limit
    /// besides the global one.
    pub default_per_site: Option<usize>,
    /// Time limit of one attempt of a step, in milliseconds; exceeding it is
    /// a transient failure.
    pub step_timeout_ms: Option<u64>,
    /// Retries.
    pub retry: RetryPolicy,
    /// What a failure does to the rest.
    pub on_failure: FailurePolicy,
    /// After cancellation, how long running steps get to reach a safe point
    /// before they are aborted, in milliseconds.
    pub cancel_grace_ms: u64,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            max_concurrency: 8,
            per_site: BTreeMap::new(),
            default_per_site: None,
            step_timeout_ms: None,
            retry: RetryPolicy::default(),
            on_failure: FailurePolicy::StopAll,
            cancel_grace_ms: 10_000,
        }
    }
}

impl ExecutorConfig {
    fn site_limit(&self, site: &str) -> usize {
        self.per_site
            .get(site)
            .copied()
            .or(self.default_per_site)
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

struct CancelInner {
    flag: CancelFlag,
    notify: Notify,
    reason: Mutex<Option<String>>,
    abort: AtomicBool,
}

/// A handle that cancels a run from anywhere (a signal handler, a REST
/// call). Cloning is cheap.
#[derive(Clone)]
pub struct Canceller(Arc<CancelInner>);

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Canceller {
    fn new() -> Self {
        Self(Arc::new(CancelInner {
            flag: CancelFlag::new(),
            notify: Notify::new(),
            reason: Mutex::new(None),
            abort: AtomicBool::new(false),
        }))
    }

    /// Stops new steps and asks running ones to stop at a safe point;
    /// those still running after the grace period are aborted.
    pub fn cancel(&self, reason: &str) {
        self.0
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(|| reason.to_owned());
        self.0.flag.cancel();
        self.0.notify.notify_one();
    }

    /// As [`Canceller::cancel`], aborting running steps at once.
    pub fn abort(&self, reason: &str) {
        self.0.abort.store(true, Ordering::SeqCst);
        self.cancel(reason);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.is_cancelled()
    }

    fn reason(&self) -> String {
        self.0
            .reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default()
    }

    /// Cancels on the first Ctrl-C (SIGINT) and aborts on the second. Spawns
    /// a task; needs a tokio runtime.
    pub fn on_ctrl_c(&self) -> JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                me.cancel("interrupt");
                if tokio::signal::ctrl_c().await.is_ok() {
                    me.abort("second interrupt");
                }
            }
        })
    }
}

/// One step in a [`RunReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// The step id.
    pub id: String,
    /// Its state at the end.
    pub state: StepState,
    /// Attempts over all runs.
    pub attempts: u32,
    /// Its output, if it succeeded.
    pub output: Option<StepOutput>,
    /// The last error of this run, if any.
    pub error: Option<String>,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// The workflow id.
    pub workflow_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Every step, in workflow order.
    pub steps: Vec<StepReport>,
    /// Steps started (or rolled back) by this run.
    pub started: usize,
    /// Duration of this run.
    pub elapsed: Duration,
}

impl RunReport {
    /// The process exit code the CLI uses: 0, 1 for a failed step, or
    /// [`EXIT_CANCELLED`].
    pub fn exit_code(&self) -> i32 {
        match self.outcome {
            Outcome::Succeeded => 0,
            Outcome::Failed => 1,
            Outcome::Cancelled => EXIT_CANCELLED,
        }
    }

    /// The state of step `id`.
    pub fn state_of(&self, id: &str) -> Option<StepState> {
        self.steps.iter().find(|s| s.id == id).map(|s| s.state)
    }

    /// `Ok` when the run succeeded.
    ///
    /// # Errors
    /// [`Error::Cancelled`], or [`Error::Step`] for the first failed step.
    pub fn into_result(self) -> Result<Self> {
        match self.outcome {
            Outcome::Succeeded => Ok(self),
            Outcome::Cancelled => Err(Error::Cancelled),
            Outcome::Failed => {
                let failed = self.steps.iter().find(|s| s.state == StepState::Failed);
                Err(Error::Step {
                    step: failed.map(|s| s.id.clone()).unwrap_or_default(),
                    source: fluidcloud_plugins::Error::Precondition(
                        failed
                            .and_then(|s| s.error.clone())
                            .unwrap_or_else(|| "failed".into()),
                    ),
                })
            }
        }
    }
}

/// Exit code of a cancelled run (128 + SIGINT, the shell convention). A
/// later `resume` continues it.
pub const EXIT_CANCELLED: i32 = 130;

enum Msg {
    Done {
        i: usize,
        attempt: u32,
        result: fluidcloud_plugins::Result<StepOutput>,
        elapsed: Duration,
    },
    Wake {
        i: usize,
    },
}

/// Runs, resumes and rolls back one workflow against one journal.
pub struct Executor {
    workflow: Arc<Workflow>,
    registry: Registry,
    journal: Box<dyn Journal>,
    config: ExecutorConfig,
    events: broadcast::Sender<ProgressEvent>,
    canceller: Canceller,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("workflow", &self.workflow.id())
            .field("journal", &self.journal.location())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// An executor for `workflow`, journalling to `journal` (new, or one
    /// holding this workflow's earlier runs).
    pub fn new(
        workflow: Workflow,
        registry: Registry,
        journal: Box<dyn Journal>,
        config: ExecutorConfig,
    ) -> Self {
        Self {
            workflow: Arc::new(workflow),
            registry,
            journal,
            config,
            events: broadcast::channel(4096).0,
            canceller: Canceller::new(),
        }
    }

    /// An executor for the workflow stored in `journal`: what `fluidcloud
    /// resume` uses, needing nothing but the journal file.
    ///
    /// # Errors
    /// When the journal is empty, foreign or corrupt, or its workflow no
    /// longer validates against `registry`.
    pub fn from_journal(
        registry: Registry,
        journal: Box<dyn Journal>,
        config: ExecutorConfig,
    ) -> Result<Self> {
        let header = journal.header()?.ok_or_else(|| Error::ForeignJournal {
            path: journal.location().to_owned(),
            what: "empty journal: nothing to resume".into(),
        })?;
        let workflow = Workflow::freeze(header.workflow, &registry)?;
        if workflow.id() != header.workflow_id {
            return Err(Error::CorruptJournal {
                path: journal.location().to_owned(),
                row: 0,
                what: format!(
                    "stored workflow hashes to {} but the journal says {}",
                    workflow.id(),
                    header.workflow_id
                ),
            });
        }
        Ok(Self::new(workflow, registry, journal, config))
    }

    /// The workflow.
    pub fn workflow(&self) -> &Workflow {
        &self.workflow
    }

    /// A receiver of progress events.
    pub fn subscribe(&self) -> broadcast::Receiver<ProgressEvent> {
        self.events.subscribe()
    }

    /// Progress events as a stream (see [`crate::progress`]).
    pub fn progress_stream(&self) -> futures::stream::BoxStream<'static, ProgressEvent> {
        progress::stream(self.subscribe())
    }

    /// The handle that cancels this executor's runs. Cancellation sticks:
    /// a cancelled executor cancels any later run at once, so resume with a
    /// new executor (as a new process does).
    pub fn canceller(&self) -> Canceller {
        self.canceller.clone()
    }

    /// The journal's location.
    pub fn journal_location(&self) -> &std::path::Path {
        self.journal.location()
    }

    /// Takes the journal's lock, checks the journal belongs to the workflow
    /// (creating it when new) and replays it. Nothing is executed before
    /// this succeeds.
    ///
    /// # Errors
    /// [`Error::JournalInUse`], [`Error::ForeignJournal`],
    /// [`Error::CorruptJournal`], [`Error::Journal`].
    pub fn state(&mut self) -> Result<RunState> {
        self.journal.lock()?;
        match self.journal.header()? {
            None => {
                self.journal.create(&JournalHeader {
                    workflow_id: self.workflow.id().to_owned(),
                    workflow: self.workflow.def().clone(),
                })?;
                Ok(RunState::new(self.workflow.len()))
            }
            Some(h) if h.workflow_id != self.workflow.id() => Err(Error::ForeignJournal {
                path: self.journal.location().to_owned(),
                what: format!(
                    "it belongs to workflow {} ({:?}), not {} ({:?})",
                    h.workflow_id,
                    h.workflow.name,
                    self.workflow.id(),
                    self.workflow.name()
                ),
            }),
            Some(_) => {
                let entries = self.journal.replay()?;
                RunState::replay(&self.workflow, self.journal.location(), &entries)
            }
        }
    }

    fn report(
        &self,
        st: &RunState,
        errors: &HashMap<usize, String>,
        outcome: Outcome,
        started: usize,
        t0: Instant,
    ) -> RunReport {
        RunReport {
            workflow_id: self.workflow.id().to_owned(),
            outcome,
            steps: self
                .workflow
                .steps()
                .iter()
                .enumerate()
                .map(|(i, s)| StepReport {
                    id: s.id.clone(),
                    state: st.states[i],
                    attempts: st.attempts[i],
                    output: st.outputs[i].clone(),
                    error: errors.get(&i).cloned(),
                })
                .collect(),
            started,
            elapsed: t0.elapsed(),
        }
    }

    fn emit(&self, ev: ProgressEvent) {
        let _ = self.events.send(ev);
    }

    /// Runs the workflow, or resumes it: steps that succeeded in an earlier
    /// run are not run again; steps found running or waiting (the process
    /// died) are recorded `cancelled`, and those and failed, skipped and
    /// cancelled ones are put back to `pending` and run again, through
    /// their migrator's idempotent or keyed path.
    ///
    /// A step's failure is not an error: see [`RunReport::outcome`].
    ///
    /// # Errors
    /// Journal errors (nothing is executed when the journal is foreign or
    /// corrupt), and [`Error::RolledBack`] when the workflow was rolled
    /// back.
    pub async fn run(&mut self) -> Result<RunReport> {
        let t0 = Instant::now();
        let mut st = self.state()?;
        let wf = Arc::clone(&self.workflow);
        if st.states.contains(&StepState::RolledBack) {
            return Err(Error::RolledBack {
                path: self.journal.location().to_owned(),
            });
        }
        let mut batch = vec![Record::RunStarted {
            mode: RunMode::Execute,
            pid: std::process::id(),
        }];
        for i in 0..wf.len() {
            if matches!(st.states[i], StepState::Running | StepState::RetryWait) {
                trans(
                    &mut batch,
                    &wf,
                    &mut st,
                    i,
                    StepState::Cancelled,
                    Some("interrupted".into()),
                    None,
                )?;
            }
            if matches!(
                st.states[i],
                StepState::Cancelled | StepState::Failed | StepState::Skipped
            ) {
                trans(&mut batch, &wf, &mut st, i, StepState::Pending, None, None)?;
            }
        }
        self.journal.append(&batch)?;
        self.execute_loop(st, t0).await
    }

    #[allow(clippy::too_many_lines)]
    async fn execute_loop(&mut self, mut st: RunState, t0: Instant) -> Result<RunReport> {
        let wf = Arc::clone(&self.workflow);
        let n = wf.len();
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let mut missing: Vec<usize> = (0..n)
            .map(|i| {
                wf.dependencies(i)
                    .iter()
                    .filter(|&&d| st.states[d] != StepState::Succeeded)
                    .count()
            })
            .collect();
        let mut ready: VecDeque<usize> = wf
            .topo_order()
            .iter()
            .copied()
            .filter(|&i| st.states[i] == StepState::Pending && missing[i] == 0)
            .collect();
        let mut running: HashMap<usize, JoinHandle<()>> = HashMap::new();
        let mut site_running: HashMap<&str, usize> = HashMap::new();
        let mut waiting = 0usize;
        let mut stopping = false;
        let mut cancelled = false;
        let mut grace_deadline: Option<tokio::time::Instant> = None;
        let mut errors: HashMap<usize, String> = HashMap::new();
        let mut started_count = 0usize;
        let mut run_attempts = vec![0u32; n];
        let timeout = self.config.step_timeout_ms.map(Duration::from_millis);
        let mut inbox: Vec<Msg> = Vec::new();
        let mut aborted: Vec<usize> = Vec::new();

        loop {
            let mut batch: Vec<Record> = Vec::new();
            let mut events: Vec<ProgressEvent> = Vec::new();
            let mut timers: Vec<(usize, Duration)> = Vec::new();

            if self.canceller.is_cancelled() && !cancelled {
                cancelled = true;
                stopping = true;
                let reason = self.canceller.reason();
                let grace = if self.canceller.0.abort.load(Ordering::SeqCst) {
                    Duration::ZERO
                } else {
                    Duration::from_millis(self.config.cancel_grace_ms)
                };
                grace_deadline = Some(tokio::time::Instant::now() + grace);
                batch.push(Record::CancelRequested { reason });
                for i in 0..n {
                    if st.states[i] == StepState::RetryWait {
                        waiting -= 1;
                        trans(
                            &mut batch,
                            &wf,
                            &mut st,
                            i,
                            StepState::Cancelled,
                            Some("cancelled while waiting to retry".into()),
                            None,
                        )?;
                    }
                }
            }
            for msg in inbox.drain(..) {
                match msg {
                    Msg::Wake { i } => {
                        // `waiting` counts steps in retry-wait; it drops
                        // when the step starts or is cancelled.
                        if st.states[i] == StepState::RetryWait {
                            ready.push_front(i);
                        }
                    }
                    Msg::Done {
                        i,
                        attempt,
                        result,
                        elapsed,
                    } => {
                        if running.remove(&i).is_none()
                            || st.states[i] != StepState::Running
                            || st.attempts[i] != attempt
                        {
                            continue; // aborted meanwhile
                        }
                        let site = wf.steps()[i].site.as_str();
                        *site_running.entry(site).or_default() -= 1;
                        let result = result.and_then(|out| check_outputs(&wf, i, out));
                        let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
                        match result {
                            Ok(out) => {
                                let bytes = out.measured.bytes_written;
                                batch.push(Record::Output {
                                    step: wf.steps()[i].id.clone(),
                                    output: out.clone(),
                                });
                                st.outputs[i] = Some(out);
                                trans(
                                    &mut batch,
                                    &wf,
                                    &mut st,
                                    i,
                                    StepState::Succeeded,
                                    None,
                                    None,
                                )?;
                                events.push(ProgressEvent::StepFinished {
                                    step: wf.steps()[i].id.clone(),
                                    state: StepState::Succeeded,
                                    bytes,
                                    elapsed_ms,
                                });
                                for &d in wf.dependents(i) {
                                    missing[d] -= 1;
                                    if missing[d] == 0 && st.states[d] == StepState::Pending {
                                        ready.push_back(d);
                                    }
                                }
                            }
                            Err(e) => {
                                // Errors are journalled, reported and sent
                                // to clients: no secret may ride along.
                                let msg = fluidcloud_plugins::redact::string(&e.to_string());
                                errors.insert(i, msg.clone());
                                let delay = if cancelled {
                                    None
                                } else {
                                    // The retry budget is per run: a resume gives a
                                    // step its attempts again.
                                    self.config.retry.next_delay_keyed(
                                        run_attempts[i],
                                        &e,
                                        i as u64,
                                    )
                                };
                                let to = if cancelled {
                                    StepState::Cancelled
                                } else if delay.is_some() {
                                    StepState::RetryWait
                                } else {
                                    StepState::Failed
                                };
                                let delay_ms =
                                    delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                                trans(
                                    &mut batch,
                                    &wf,
                                    &mut st,
                                    i,
                                    to,
                                    Some(msg.clone()),
                                    delay_ms,
                                )?;
                                match to {
                                    StepState::RetryWait => {
                                        waiting += 1;
                                        timers.push((i, delay.unwrap_or_default()));
                                        events.push(ProgressEvent::StepRetrying {
                                            step: wf.steps()[i].id.clone(),
                                            attempt,
                                            delay_ms: delay_ms.unwrap_or_default(),
                                            error: msg,
                                        });
                                    }
                                    StepState::Failed => {
                                        events.push(finished(&wf, i, to, elapsed_ms));
                                        match self.config.on_failure {
                                            FailurePolicy::StopAll => stopping = true,
                                            FailurePolicy::SkipDependents => {
                                                let mut stack = wf.dependents(i).to_vec();
                                                while let Some(d) = stack.pop() {
                                                    if st.states[d] == StepState::Pending {
                                                        trans(
                                                            &mut batch,
                                                            &wf,
                                                            &mut st,
                                                            d,
                                                            StepState::Skipped,
                                                            Some(format!(
                                                                "`{}` failed",
                                                                wf.steps()[i].id
                                                            )),
                                                            None,
                                                        )?;
                                                        events.push(finished(
                                                            &wf,
                                                            d,
                                                            StepState::Skipped,
                                                            0,
                                                        ));
                                                        stack.extend_from_slice(wf.dependents(d));
                                                    }
                                                }
                                            }
                                        }
                                    }
                                    _ => events.push(finished(&wf, i, to, elapsed_ms)),
                                }
                            }
                        }
                    }
                }
            }
            // After the messages: a step that finished before the abort
            // keeps its result.
            if self.canceller.0.abort.load(Ordering::SeqCst)
                || grace_deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
            {
                for (&i, h) in &running {
                    h.abort();
                    aborted.push(i);
                }
            }
            for i in aborted.drain(..) {
                if running.remove(&i).is_some() {
                    *site_running.entry(wf.steps()[i].site.as_str()).or_default() -= 1;
                    trans(
                        &mut batch,
                        &wf,
                        &mut st,
                        i,
                        StepState::Cancelled,
                        Some("aborted".into()),
                        None,
                    )?;
                    errors.insert(i, "aborted after cancellation".into());
                }
            }

            if stopping && waiting > 0 {
                for i in 0..n {
                    if st.states[i] == StepState::RetryWait {
                        waiting -= 1;
                        trans(
                            &mut batch,
                            &wf,
                            &mut st,
                            i,
                            StepState::Cancelled,
                            Some("run stopped".into()),
                            None,
                        )?;
                    }
                }
            }

            // Choose what starts now.
            let mut to_start = Vec::new();
            if !stopping {
                let mut blocked = VecDeque::new();
                while running.len() + to_start.len() < self.config.max_concurrency.max(1) {
                    let Some(i) = ready.pop_front() else { break };
                    if !matches!(st.states[i], StepState::Pending | StepState::RetryWait) {
                        continue;
                    }
                    let site = wf.steps()[i].site.as_str();
                    let used = site_running.entry(site).or_default();
                    if *used >= self.config.site_limit(site) {
                        blocked.push_back(i);
                        continue;
                    }
                    *used += 1;
                    if st.states[i] == StepState::RetryWait {
                        waiting -= 1;
                    }
                    st.attempts[i] += 1;
                    run_attempts[i] += 1;
                    st.ever_ran[i] = true;
                    trans(&mut batch, &wf, &mut st, i, StepState::Running, None, None)?;
                    to_start.push(i);
                }
                while let Some(i) = blocked.pop_back() {
                    ready.push_front(i);
                }
            }

            let idle = running.is_empty() && to_start.is_empty() && waiting == 0;
            let mut outcome = None;
            if idle {
                for i in 0..n {
                    if st.states[i] == StepState::Pending {
                        trans(
                            &mut batch,
                            &wf,
                            &mut st,
                            i,
                            StepState::Cancelled,
                            Some(if cancelled {
                                "cancelled".into()
                            } else {
                                "run stopped".into()
                            }),
                            None,
                        )?;
                    }
                }
                let o = if cancelled {
                    Outcome::Cancelled
                } else if st.states.iter().all(|s| *s == StepState::Succeeded) {
                    Outcome::Succeeded
                } else {
                    Outcome::Failed
                };
                batch.push(Record::RunFinished { outcome: o });
                outcome = Some(o);
            }

            // Journal first, then act.
            self.journal.append(&batch)?;
            for ev in events {
                self.emit(ev);
            }
            for (i, delay) in timers {
                let tx = tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = tx.send(Msg::Wake { i });
                });
            }
            for i in to_start {
                started_count += 1;
                running.insert(i, self.spawn_step(i, &st, timeout, tx.clone()));
            }
            if let Some(o) = outcome {
                self.emit(ProgressEvent::RunFinished {
                    outcome: o,
                    elapsed_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
                });
                return Ok(self.report(&st, &errors, o, started_count, t0));
            }

            // Wait for something to happen.
            let notify = &self.canceller.0.notify;
            let grace = grace_deadline;
            tokio::select! {
                m = rx.recv() => inbox.extend(m),
                () = notify.notified(), if !cancelled => {}
                () = async {
                    match grace {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                }, if grace.is_some() && !running.is_empty() => {}
            }
            while let Ok(m) = rx.try_recv() {
                inbox.push(m);
            }
        }
    }

    fn spawn_step(
        &self,
        i: usize,
        st: &RunState,
        timeout: Option<Duration>,
        tx: mpsc::UnboundedSender<Msg>,
    ) -> JoinHandle<()> {
        let spec = &self.workflow.steps()[i];
        let request = self.workflow.request(i, &st.outputs);
        let attempt = st.attempts[i];
        self.emit(ProgressEvent::StepStarted {
            step: spec.id.clone(),
            site: spec.site.clone(),
            attempt,
        });
        let migrator = self.registry.get(&spec.migrator).cloned();
        let ctx = ExecContext {
            progress: StepSink::new(&spec.id, &self.events),
            cancel: self.canceller.0.flag.clone(),
        };
        let name = spec.migrator.clone();
        let span = tracing::info_span!(
            "step",
            step = %spec.id,
            site = %spec.site,
            migrator = %spec.migrator,
            attempt
        );
        tokio::spawn(
            async move {
                let t0 = Instant::now();
                let result = match migrator {
                    None => Err(fluidcloud_plugins::Error::NotFound {
                        what: format!("migrator `{name}`"),
                        site: None,
                    }),
                    Some(m) => {
                        let fut = AssertUnwindSafe(m.execute(&request, &ctx)).catch_unwind();
                        let r = match timeout {
                            Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
                                Ok(Err(fluidcloud_plugins::Error::Transient(format!(
                                    "timed out after {t:?}"
                                ))))
                            }),
                            None => fut.await,
                        };
                        r.unwrap_or_else(|_| {
                            Err(fluidcloud_plugins::Error::Precondition(format!(
                                "migrator `{name}` panicked"
                            )))
                        })
                    }
                };
                let _ = tx.send(Msg::Done {
                    i,
                    attempt,
                    result,
                    elapsed: t0.elapsed(),
                });
            }
            .instrument(span),
        )
    }

    /// Rolls the workflow back: compensations of every step that ran
    /// (succeeded, failed, or interrupted: partial targets are removed), in
    /// reverse dependency order, one at a time. Steps that never ran are
    /// left alone; the source site is never touched (migrators' rollbacks
    /// only remove what they created at the target). Interrupted rollbacks
    /// resume: rolled-back steps are not rolled back again.
    ///
    /// # Errors
    /// Journal errors; [`Error::Rollback`] when a compensation fails (the
    /// rollback stops there; run it again once the cause is fixed).
    pub async fn rollback(&mut self) -> Result<RunReport> {
        let t0 = Instant::now();
        let mut st = self.state()?;
        let wf = Arc::clone(&self.workflow);
        let mut batch = vec![Record::RunStarted {
            mode: RunMode::Rollback,
            pid: std::process::id(),
        }];
        for i in 0..wf.len() {
            if matches!(st.states[i], StepState::Running | StepState::RetryWait) {
                batch.push(Record::Transition {
                    step: wf.steps()[i].id.clone(),
                    from: st.states[i],
                    to: StepState::Cancelled,
                    attempt: st.attempts[i],
                    error: Some("interrupted".into()),
                    delay_ms: None,
                });
                st.states[i] = StepState::Cancelled;
            }
        }
        self.journal.append(&batch)?;
        let mut done = 0;
        for &i in wf.topo_order().iter().rev() {
            let state = st.states[i];
            let needs = st.ever_ran[i]
                && matches!(
                    state,
                    StepState::Succeeded
                        | StepState::Failed
                        | StepState::Cancelled
                        | StepState::Pending
                );
            if !needs {
                continue;
            }
            if self.canceller.is_cancelled() {
                self.journal.append(&[
                    Record::CancelRequested {
                        reason: self.canceller.reason(),
                    },
                    Record::RunFinished {
                        outcome: Outcome::Cancelled,
                    },
                ])?;
                return Ok(self.report(&st, &HashMap::new(), Outcome::Cancelled, done, t0));
            }
            let spec = &wf.steps()[i];
            let request = wf.request(i, &st.outputs);
            let ctx = ExecContext {
                progress: StepSink::new(&spec.id, &self.events),
                cancel: CancelFlag::new(),
            };
            let m = self
                .registry
                .get(&spec.migrator)
                .cloned()
                .ok_or_else(|| Error::Rollback {
                    step: spec.id.clone(),
                    source: fluidcloud_plugins::Error::NotFound {
                        what: format!("migrator `{}`", spec.migrator),
                        site: None,
                    },
                })?;
            let output = if state == StepState::Succeeded {
                st.outputs[i].as_ref()
            } else {
                None
            };
            m.rollback(&request, output, &ctx)
                .await
                .map_err(|source| Error::Rollback {
                    step: spec.id.clone(),
                    source,
                })?;
            self.journal.append(&[Record::Transition {
                step: spec.id.clone(),
                from: state,
                to: StepState::RolledBack,
                attempt: st.attempts[i],
                error: None,
                delay_ms: None,
            }])?;
            st.states[i] = StepState::RolledBack;
            done += 1;
            self.emit(ProgressEvent::StepRolledBack {
                step: spec.id.clone(),
            });
        }
        self.journal.append(&[Record::RunFinished {
            outcome: Outcome::Succeeded,
        }])?;
        self.emit(ProgressEvent::RunFinished {
            outcome: Outcome::Succeeded,
            elapsed_ms: u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
        Ok(self.report(&st, &HashMap::new(), Outcome::Succeeded, done, t0))
    }
}

fn trans(
    batch: &mut Vec<Record>,
    wf: &Workflow,
    st: &mut RunState,
    i: usize,
    to: StepState,
    error: Option<String>,
    delay_ms: Option<u64>,
) -> Result<()> {
    let step = &wf.steps()[i].id;
    crate::lifecycle::check(step, st.states[i], to)?;
    tracing::debug!(step = %step, from = %st.states[i], to = %to, error = error.as_deref(), "transition");
    batch.push(Record::Transition {
        step: wf.steps()[i].id.clone(),
        from: st.states[i],
        to,
        attempt: st.attempts[i],
        error,
        delay_ms,
    });
    st.states[i] = to;
    Ok(())
}

fn finished(wf: &Workflow, i: usize, state: StepState, elapsed_ms: u64) -> ProgressEvent {
    ProgressEvent::StepFinished {
        step: wf.steps()[i].id.clone(),
        state,
        bytes: 0,
        elapsed_ms,
    }
}

/// A step must produce every output it declares, of the declared kind.
fn check_outputs(
    wf: &Workflow,
    i: usize,
    out: StepOutput,
) -> fluidcloud_plugins::Result<StepOutput> {
    for (name, kind) in &wf.steps()[i].outputs {
        match out.artifacts.get(name) {
            Some(a) if a.kind == *kind => {}
            Some(a) => {
                return Err(fluidcloud_plugins::Error::Precondition(format!(
                    "output `{name}` is {} but the step declares {kind}",
                    a.kind
                )));
            }
            None => {
                return Err(fluidcloud_plugins::Error::Precondition(format!(
                    "the migrator did not produce declared output `{name}`"
                )));
            }
        }
    }
    Ok(out)
}
