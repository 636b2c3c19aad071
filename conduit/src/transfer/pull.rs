//! The receiving half: a target agent pulls one disk from a source agent.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fluidcloud_broker::tls::{self, Fingerprint, ServerIdentity};
use fluidcloud_migrators::volume::{Leaf, Manifest};
use fluidcloud_plugins::{Error, Result};

use super::frame::{self, Expect, Frame};
use super::limit::{Bucket, Limits};
use super::local::Leaves;
use super::{
    CHUNK, DEFAULT_STREAMS, MAX_STREAMS, PullRequest, PullState, PullStatus, RootReply,
    StripeRequest, chunk_len, chunks_of, hex, read_leaf,
};
use crate::driver::{DiskWriter, SiteDriver};

/// Connection attempts in a row, without progress, before a stripe fails.
const MAX_ATTEMPTS: u32 = 6;
/// Longest wait for the next bytes of a stripe before the connection is
/// given up and opened again.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What a pull needs from its agent.
#[derive(Clone)]
pub struct PullContext {
    /// The agent's site.
    pub driver: Arc<dyn SiteDriver>,
    /// The agent's identity, presented to the source agent.
    pub identity: Arc<ServerIdentity>,
    /// Bandwidth buckets.
    pub limits: Arc<Limits>,
    /// Set when the agent shuts down: stripes stop at the next frame.
    pub stopping: Arc<AtomicBool>,
    /// Stripes received at once, over every pull: each holds about three
    /// chunks in memory, so this bounds what pulls cost.
    pub receiving: Arc<tokio::sync::Semaphore>,
    /// Where the leaves of each verified pull are kept (`leaves/`), for a
    /// later delta that names only the changed chunks.
    pub state_dir: std::path::PathBuf,
}

impl std::fmt::Debug for PullContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullContext")
            .field("site", &self.driver.name())
            .finish_non_exhaustive()
    }
}

/// A pull's shared state.
#[derive(Debug)]
pub struct Pull {
    status: Mutex<PullStatus>,
    started: Instant,
    ended: tokio::sync::Notify,
}

impl Pull {
    /// A new pull `id` of a disk of `chunks` chunks.
    pub fn new(id: String, chunks: u64) -> Self {
        Self {
            status: Mutex::new(PullStatus {
                id,
                state: Some(PullState::Running),
                chunks,
                ..PullStatus::default()
            }),
            started: Instant::now(),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// Its status once it ended, or after `wait`, whichever is first.
    pub async fn status_within(&self, wait: Duration) -> PullStatus {
        let ended = self.ended.notified();
        if !self.ended() {
            let _ = tokio::time::timeout(wait, ended).await;
        }
        self.status()
    }

    /// Its status now.
    pub fn status(&self) -> PullStatus {
        let mut s = self.lock().clone();
        s.elapsed_s = self.started.elapsed().as_secs_f64();
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PullStatus> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether it ended.
    pub fn ended(&self) -> bool {
        self.lock().state != Some(PullState::Running)
    }

    /// Sets how many chunks (or objects) there are.
    pub fn set_chunks(&self, n: u64) {
        self.lock().chunks = n;
    }

    /// Updates the counters.
    pub fn add(&self, f: impl FnOnce(&mut PullStatus)) {
        f(&mut self.lock());
    }

    /// Records the outcome: the verified root (or summary) and the record
    /// written, or the error.
    pub fn finish(&self, result: Result<(String, Option<crate::driver::ImageRecord>)>) {
        self.record(result);
        self.ended.notify_waiters();
    }

    fn record(&self, result: Result<(String, Option<crate::driver::ImageRecord>)>) {
        let mut s = self.lock();
        match result {
            Ok((root, record)) => {
                s.state = Some(PullState::Succeeded);
                s.root = Some(root);
                s.record = record;
            }
            Err(e) => {
                let (_, p) = crate::agent::Problem::of(&e);
                s.state = Some(PullState::Failed);
                s.error = Some(p.detail);
                s.error_kind = Some(p.kind);
            }
        }
    }
}

/// Runs `req` to its end, recording the outcome in `pull`.
pub async fn run(ctx: PullContext, req: PullRequest, pull: Arc<Pull>) {
    let result = run_inner(&ctx, &req, &pull).await;
    pull.finish(result.map(|(root, record)| (root, Some(record))));
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Transient(format!("a blocking task failed: {e}")))?
}

async fn run_inner(
    ctx: &PullContext,
    req: &PullRequest,
    pull: &Arc<Pull>,
) -> Result<(String, crate::driver::ImageRecord)> {
    let writer: Arc<dyn DiskWriter> = {
        let driver = ctx.driver.clone();
        let (into, size, owner) = (req.into.clone(), req.virtual_size, req.owner.clone());
        Arc::from(
            blocking(move || {
                let disks = crate::driver::require_disks(driver.as_ref())?;
                disks.write(into.store, &into.name, into.format, size, &owner)
            })
            .await?,
        )
    };
    let leaves_at = leaves_path(ctx, &req.into);
    let held = {
        let (w, size, only) = (writer.clone(), req.virtual_size, req.only.clone());
        let (at, owner) = (leaves_at.clone(), req.owner.clone());
        blocking(move || Held::of(w.as_ref(), size, only.as_deref(), &at, &owner)).await?
    };
    if let Some(only) = &held.only {
        pull.set_chunks(only.len() as u64);
    }
    let client = client_for(&req.source.fingerprint, &ctx.identity)?;
    let bucket = req.bwlimit.map(|rate| {
        let key = req
            .limit_key
            .clone()
            .unwrap_or_else(|| format!("pull:{}", pull.status().id));
        ctx.limits.bucket(&key, rate)
    });
    let stripes = u64::from(req.streams.unwrap_or(DEFAULT_STREAMS).clamp(1, MAX_STREAMS));
    let written = Arc::new(Mutex::new(held.written.clone()));
    let mut tasks = Vec::new();
    for k in 0..stripes {
        let stripe = Stripe {
            ctx: ctx.clone(),
            client: client.clone(),
            req: req.clone(),
            stripe: k,
            stripes,
            have: held
                .have
                .data
                .iter()
                .filter(|(i, _)| *i % stripes == k)
                .map(|(i, h)| (*i, hex(h)))
                .collect(),
            only: held
                .only
                .as_ref()
                .map(|o| o.iter().copied().filter(|i| i % stripes == k).collect()),
            writer: writer.clone(),
            written: written.clone(),
            pull: pull.clone(),
            bucket: bucket.clone(),
            settled: HashSet::new(),
            data_seen: HashSet::new(),
        };
        tasks.push(tokio::spawn(stripe.run()));
    }
    let mut first_error = None;
    for t in tasks {
        let r = t
            .await
            .map_err(|e| Error::Transient(format!("a stripe task failed: {e}")))
            .and_then(|r| r);
        if let Err(e) = r {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let leaves = written
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let ours = leaves.root_hex();
    if held.only.is_none() {
        check_root(&client, req, &ours).await?;
    }
    pull.add(|s| s.tracked = held.only.is_some());
    let record = blocking(move || writer.finish()).await?;
    let owner = req.owner.clone();
    blocking(move || Leaves::store(&leaves_at, &leaves, Some(&owner))).await?;
    Ok((ours, record))
}

/// Compares `ours` with the Merkle root the source computes of its disk.
async fn check_root(client: &reqwest::Client, req: &PullRequest, ours: &str) -> Result<()> {
    let theirs: RootReply = peer(client, req)
        .post("/v1/transfers/root", &serde_json::json!({}))
        .await?
        .json()
        .await
        .map_err(|e| {
            Error::Transient(format!(
                "source agent {}: an unreadable root: {e}",
                req.source.url
            ))
        })?;
    if theirs.root != ours {
        return Err(Error::Corrupt {
            what: format!(
                "{} after the transfer: Merkle root {ours}, the source's {}",
                req.into, theirs.root
            ),
            offset: 0,
        });
    }
    Ok(())
}

/// Where the leaves of the last verified pull of `disk` are kept.
pub(crate) fn leaves_path(ctx: &PullContext, disk: &super::DiskRef) -> std::path::PathBuf {
    ctx.state_dir
        .join("leaves")
        .join(format!("{}-{}.json", disk.store.as_str(), disk.name))
}

/// What the target holds before a pull: the leaves it sends as `have`,
/// the leaves the pull starts from, and the chunks it looks at.
struct Held {
    have: Manifest,
    written: Manifest,
    /// `Some`: only these chunks (a change set, with the leaves of the
    /// last verified pull by the same relocation for every other one).
    only: Option<Vec<u64>>,
}

impl Held {
    fn of(
        writer: &dyn DiskWriter,
        size: u64,
        only: Option<&[u64]>,
        leaves_at: &std::path::Path,
        owner: &str,
    ) -> Result<Self> {
        let base = match only {
            Some(_) => Leaves::load_for(leaves_at, Some(owner))?.filter(|b| b.virtual_size == size),
            None => None,
        };
        let (Some(only), Some(mut written)) = (only, base) else {
            let have = hash_current(writer, size)?;
            return Ok(Self {
                written: have.clone(),
                have,
                only: None,
            });
        };
        let mut only: Vec<u64> = only
            .iter()
            .copied()
            .filter(|i| *i < chunks_of(size))
            .collect();
        only.sort_unstable();
        only.dedup();
        let reader = writer.current()?;
        let mut have = Manifest::zero(CHUNK, size);
        let mut buf = Vec::new();
        for &index in &only {
            let leaf = read_leaf(reader.as_ref(), index, &mut buf)?;
            have.set(index, leaf);
            written.set(index, leaf);
        }
        Ok(Self {
            have,
            written,
            only: Some(only),
        })
    }
}

/// Leaves of what the writer holds now; holes cost nothing.
fn hash_current(writer: &dyn DiskWriter, size: u64) -> Result<Manifest> {
    let reader = writer.current()?;
    let mut m = Manifest::zero(CHUNK, size);
    let mut buf = Vec::new();
    for index in 0..chunks_of(size) {
        let leaf = read_leaf(reader.as_ref(), index, &mut buf)?;
        m.set(index, leaf);
    }
    Ok(m)
}

/// The HTTP client of a pull: pins the source's certificate
/// (`fingerprint`), presents ours.
///
/// # Errors
/// A malformed fingerprint.
pub fn client_for(fingerprint: &str, identity: &ServerIdentity) -> Result<reqwest::Client> {
    let pin: Fingerprint = fingerprint
        .parse()
        .map_err(|e: tls::TlsError| Error::Precondition(e.to_string()))?;
    let tls = tls::pinned_client_config_as(pin, identity)
        .map_err(|e| Error::Precondition(e.to_string()))?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls.config)
        .http1_only()
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Duration::from_secs(10))
        .build()
        .map_err(|e| Error::Precondition(format!("building an HTTP client: {e}")))
}

/// The source agent of a pull, with its ticket.
pub struct Peer<'a> {
    /// The pull's client.
    pub client: &'a reqwest::Client,
    /// The source agent's URL.
    pub url: &'a str,
    /// The ticket.
    pub ticket: &'a str,
}

fn peer<'a>(client: &'a reqwest::Client, req: &'a PullRequest) -> Peer<'a> {
    Peer {
        client,
        url: &req.source.url,
        ticket: &req.source.ticket,
    }
}

impl Peer<'_> {
    fn error(&self, detail: String) -> Error {
        Error::Transient(format!("source agent {}: {detail}", self.url))
    }

    /// POSTs `body` to `path` with the ticket; the response if 2xx.
    ///
    /// # Errors
    /// `Transient` when the source does not answer or fails,
    /// `PermissionDenied` for a refused ticket, and its other refusals.
    pub async fn post(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let resp = self
            .client
            .post(&url)
            .header("authorization", format!("Ticket {}", self.ticket))
            .json(body)
            .send()
            .await
            .map_err(|e| self.error(crate::agent::client::describe_reqwest(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let detail = crate::agent::client::problem_detail(resp).await;
        let msg = format!("source agent {}: {detail}", self.url);
        Err(match status.as_u16() {
            401 | 403 => Error::PermissionDenied {
                what: msg,
                site: None,
            },
            404 => Error::NotFound {
                what: msg,
                site: None,
            },
            409 | 412 | 422 => Error::Precondition(msg),
            _ => Error::Transient(msg),
        })
    }
}

/// One stripe of a pull.
struct Stripe {
    ctx: PullContext,
    client: reqwest::Client,
    req: PullRequest,
    stripe: u64,
    stripes: u64,
    have: BTreeMap<u64, String>,
    /// This stripe's chunks of a tracked pull; `None`: all of its chunks.
    only: Option<Vec<u64>>,
    writer: Arc<dyn DiskWriter>,
    written: Arc<Mutex<Manifest>>,
    pull: Arc<Pull>,
    bucket: Option<Arc<Bucket>>,
    /// Chunks settled by this stripe, and those that came as data.
    settled: HashSet<u64>,
    data_seen: HashSet<u64>,
}

/// How one connection of a stripe ended.
enum Ended {
    /// The stripe is complete.
    Complete,
    /// The connection broke after `progress` chunks; try again.
    Broken { progress: u64, why: String },
}

impl Stripe {
    async fn run(mut self) -> Result<()> {
        let _permit = self
            .ctx
            .receiving
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Transient("the agent is shutting down".into()))?;
        let mut next = 0u64;
        let mut failures = 0u32;
        loop {
            if self.ctx.stopping.load(Ordering::Relaxed) {
                return Err(Error::Transient(
                    "the agent is shutting down; the transfer resumes from what it wrote".into(),
                ));
            }
            match self.connection(&mut next).await? {
                Ended::Complete => return Ok(()),
                Ended::Broken { progress, why } => {
                    failures = if progress > 0 { 1 } else { failures + 1 };
                    if failures > MAX_ATTEMPTS {
                        return Err(Error::Transient(format!(
                            "source agent {}: stripe {} of {} gave up after {MAX_ATTEMPTS} attempts: {why}",
                            self.req.source.url, self.stripe, self.stripes
                        )));
                    }
                    tracing::info!(stripe = self.stripe, %why, "reconnecting");
                    self.pull.lock().reconnects += 1;
                    let backoff = Duration::from_millis(250 << failures.min(4));
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// One connection: frames from chunk `next` on, until the stripe ends
    /// or the connection breaks. Fatal errors (a refused ticket, a corrupt
    /// frame, a failing disk) return `Err`.
    async fn connection(&mut self, next: &mut u64) -> Result<Ended> {
        self.have.retain(|i, _| *i >= *next);
        if let Some(only) = &mut self.only {
            only.retain(|i| *i >= *next);
        }
        let body = StripeRequest {
            stripe: self.stripe,
            stripes: self.stripes,
            from: *next,
            have: self.have.clone(),
            idle_s: Some(READ_TIMEOUT.as_secs()),
            only: self.only.clone(),
        };
        let mut resp = match peer(&self.client, &self.req)
            .post("/v1/transfers/stripe", &body)
            .await
        {
            Ok(r) => r,
            Err(Error::Transient(why)) => return Ok(Ended::Broken { progress: 0, why }),
            Err(e) => return Err(e),
        };
        let mut expect = Expect {
            chunk: CHUNK,
            virtual_size: self.req.virtual_size,
            stripe: self.stripe,
            stripes: self.stripes,
            next: *next,
        };
        let mut buf = BytesMut::new();
        let mut progress = 0u64;
        loop {
            let chunk = match tokio::time::timeout(READ_TIMEOUT, resp.chunk()).await {
                Ok(Ok(Some(c))) => c,
                Ok(Ok(None)) => {
                    return Ok(Ended::Broken {
                        progress,
                        why: "the connection closed before the stripe's end".into(),
                    });
                }
                Ok(Err(e)) => {
                    return Ok(Ended::Broken {
                        progress,
                        why: crate::agent::client::describe_reqwest(&e),
                    });
                }
                Err(_) => {
                    return Ok(Ended::Broken {
                        progress,
                        why: format!("no data for {} s", READ_TIMEOUT.as_secs()),
                    });
                }
            };
            self.pull.lock().wire_bytes += chunk.len() as u64;
            if let Some(b) = &self.bucket {
                b.take(chunk.len() as u64).await;
            }
            buf.extend_from_slice(&chunk);
            loop {
                let f = frame::decode(&mut buf, &mut expect).map_err(|detail| Error::Corrupt {
                    what: format!(
                        "transfer of {} from {}: {detail}",
                        self.req.from, self.req.source.url
                    ),
                    offset: expect.next.saturating_mul(CHUNK),
                })?;
                let Some(f) = f else { break };
                if self.ctx.stopping.load(Ordering::Relaxed) {
                    return Ok(Ended::Broken {
                        progress,
                        why: "the agent is shutting down".into(),
                    });
                }
                match self.apply(f).await? {
                    Some(index) => {
                        *next = index + 1;
                        progress += 1;
                    }
                    None => return Ok(Ended::Complete),
                }
            }
        }
    }

    /// Applies one frame; the chunk it settled, or `None` at the end.
    async fn apply(&mut self, f: Frame) -> Result<Option<u64>> {
        let index = match f {
            Frame::End => return Ok(None),
            Frame::Error(msg) => {
                return Err(Error::Precondition(format!(
                    "source agent {}: {msg}",
                    self.req.source.url
                )));
            }
            Frame::Data {
                index, hash, bytes, ..
            } => {
                let len = bytes.len() as u64;
                let w = self.writer.clone();
                blocking(move || w.write_at(index * CHUNK, &bytes)).await?;
                self.set_leaf(index, Leaf::Data(hash));
                let mut s = self.pull.lock();
                s.data_chunks += 1;
                s.data_bytes += len;
                if !self.data_seen.insert(index) {
                    s.resent_chunks += 1;
                }
                index
            }
            Frame::Zero { index } => {
                let had = self
                    .written
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .leaf(index);
                if had != Leaf::Zero {
                    let w = self.writer.clone();
                    let len = chunk_len(self.req.virtual_size, index);
                    blocking(move || w.zero(index * CHUNK, len)).await?;
                    self.set_leaf(index, Leaf::Zero);
                }
                index
            }
            Frame::Same { index } => {
                self.pull.lock().same_chunks += 1;
                index
            }
        };
        if self.settled.insert(index) {
            self.pull.lock().done += 1;
        }
        Ok(Some(index))
    }

    fn set_leaf(&self, index: u64, leaf: Leaf) {
        self.written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .set(index, leaf);
    }
}
