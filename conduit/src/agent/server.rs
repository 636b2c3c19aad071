//! The agent's HTTPS API: a site's capabilities, tickets, stripes, pulls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fluidcloud_broker::tls::{Peer, ServerIdentity};
use fluidcloud_plugins::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

use super::Problem;
use crate::driver::{
    self, ImageRecord, InstanceRecord, SiteDriver, require_block_store, require_compute,
    require_image_store, require_inventory,
};
use crate::transfer::limit::Limits;
use crate::transfer::pull::{Pull, PullContext};
use crate::transfer::source::{self, Tickets};
use crate::transfer::{PullRequest, PullStatus, StripeRequest, TicketRequest, chunks_of};

/// Largest request body: a chunk of volume data and its framing.
const BODY_LIMIT: usize = 16 << 20;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The bearer token orchestrators send; `None` serves without one
    /// (loopback only, checked by the command).
    pub token: Option<String>,
    /// Stripes sent at once over every transfer, and stripes received at
    /// once over every pull: bounds the agent's memory (each holds about
    /// three chunks).
    pub max_stripes: usize,
    /// The agent's state directory (records of the buckets it created).
    pub state_dir: std::path::PathBuf,
}

/// The agent's shared state.
pub struct AgentState {
    driver: Arc<dyn SiteDriver>,
    token: Option<blake3::Hash>,
    fingerprint: String,
    tickets: Tickets,
    pulls: Mutex<HashMap<String, Arc<Pull>>>,
    ctx: PullContext,
    stripes: Arc<Semaphore>,
    sending: AtomicU64,
    next_pull: AtomicU64,
    state_dir: std::path::PathBuf,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("site", &self.driver.name())
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Makes the process give memory of large blocks (chunks) back to the
/// system when they are freed. By default glibc raises its mmap threshold
/// to the size of the largest block freed, after which 4 MiB chunks come
/// from per-thread arenas that keep them: an agent whose stripes run on
/// ever other blocking threads grew to about twice its stripe budget
/// (measured in `tests/agents.rs`). Fixed at 1 MiB, every chunk is mapped
/// and unmapped, and memory follows the stripes actually running.
pub fn return_chunks_to_the_system() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

impl AgentState {
    /// The state of an agent serving `driver` as `identity`.
    pub fn new(
        driver: Arc<dyn SiteDriver>,
        identity: Arc<ServerIdentity>,
        options: &AgentOptions,
    ) -> Arc<Self> {
        let fingerprint = identity.fingerprint().to_string();
        Arc::new(Self {
            ctx: PullContext {
                driver: driver.clone(),
                identity,
                limits: Arc::new(Limits::default()),
                stopping: Arc::new(AtomicBool::new(false)),
                receiving: Arc::new(Semaphore::new(options.max_stripes.max(1))),
                state_dir: options.state_dir.clone(),
            },
            driver,
            token: options.token.as_deref().map(|t| blake3::hash(t.as_bytes())),
            fingerprint,
            tickets: Tickets::default(),
            pulls: Mutex::new(HashMap::new()),
            stripes: Arc::new(Semaphore::new(options.max_stripes.max(1))),
            sending: AtomicU64::new(0),
            next_pull: AtomicU64::new(1),
            state_dir: options.state_dir.clone(),
        })
    }

    /// Stops transfers at their next frame: pulls end failed (resumable),
    /// stripes end without their end frame (the target reconnects later).
    pub fn stop_transfers(&self) {
        self.ctx.stopping.store(true, Ordering::Relaxed);
    }

    /// Pulls still running.
    pub fn running_pulls(&self) -> usize {
        self.pulls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|p| !p.ended())
            .count()
    }
}

type Shared = State<Arc<AgentState>>;

/// An error answer.
struct Failure(u16, Problem);

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let (status, p) = Problem::of(&e);
        Self(status, p)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.1)).into_response()
    }
}

fn refuse(status: u16, kind: &str, detail: String) -> Failure {
    Failure(
        status,
        Problem {
            kind: kind.to_owned(),
            detail,
            what: None,
        },
    )
}

type Answer<T> = std::result::Result<axum::Json<T>, Failure>;

fn ok<T>(v: T) -> Answer<T> {
    Ok(axum::Json(v))
}

/// The router of an agent.
pub fn router(state: Arc<AgentState>) -> Router {
    let control = Router::new()
        .route("/v1/site", get(site))
        .route("/v1/instances", get(instances).post(define))
        .route("/v1/instances/{name}/state", get(state_of))
        .route("/v1/instances/{name}/console", get(console))
        .route("/v1/instances/{name}/changes", get(changes))
        .route("/v1/instances/{name}/{action}", post(instance_action))
        .route("/v1/config-files", get(config_files))
        .route(
            "/v1/config-files/{*path}",
            get(config_file).put(put_config).delete(remove_config),
        )
        .route("/v1/manifests/{service}", get(manifest))
        .route("/v1/images", get(images))
        .route("/v1/images/{name}", get(image_info).delete(delete_image))
        .route("/v1/volumes", get(volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(volume_info).delete(delete_volume))
        .route("/v1/volumes/{name}/allocation", get(allocation))
        .route(
            "/v1/volumes/{name}/data",
            get(read_volume).put(write_volume),
        )
        .route("/v1/volumes/{name}/flush", post(flush_volume))
        .route("/v1/disks/remove", post(remove_disk))
        .route("/v1/disks/holder", post(disk_holder))
        .route("/v1/guests/inspect", post(inspect_guests))
        .route("/v1/guests/prepare", post(prepare_guest))
        .route("/v1/guests/adapt", post(adapt_guest))
        .route("/v1/guests/release", post(release_guest))
        .route("/v1/tickets", post(grant_ticket))
        .route("/v1/pulls", post(start_pull))
        .route("/v1/bucket-pulls", post(start_bucket_pull))
        .route("/v1/buckets", get(buckets))
        .route("/v1/buckets/{name}", get(bucket_summary))
        .route("/v1/buckets/remove", post(remove_bucket))
        .route("/v1/pulls/{id}", get(pull_status))
        .layer(middleware::from_fn_with_state(state.clone(), bearer));
    let transfers = Router::new()
        .route("/v1/transfers/stripe", post(stripe))
        .route("/v1/transfers/root", post(root))
        .route("/v1/transfers/objects", post(list_objects))
        .route("/v1/transfers/object", post(get_object));
    Router::new()
        .route("/health", get(health))
        .merge(control)
        .merge(transfers)
        .fallback(|| async {
            refuse(
                404,
                "not-found",
                "no such endpoint of fluidcloud agent".into(),
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// The host a request names (`Host`, or the authority of an absolute
/// URI), without its port.
fn requested_host(req: &Request) -> Option<String> {
    let raw = fluidcloud_broker::rest::requested_authority(req)?;
    let host = match raw.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default().to_owned(),
        None => raw
            .rsplit_once(':')
            .map_or(raw.as_str(), |(h, _)| h)
            .to_owned(),
    };
    Some(host.to_ascii_lowercase())
}

/// Whether `host` names this machine's loopback: `localhost`, or a
/// loopback address.
fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn bearer(State(s): Shared, req: Request, next: Next) -> Response {
    let Some(want) = s.token else {
        // Without a token (loopback only): answer only requests that name
        // this machine's loopback, so that a web page cannot reach the
        // agent through a name of its own that resolves to it (DNS
        // rebinding).
        let host = requested_host(&req);
        if host.as_deref().is_some_and(is_loopback_name) {
            return next.run(req).await;
        }
        return refuse(
            421,
            "unknown-host",
            format!(
                "this agent runs without a token and answers only for localhost and loopback addresses, not for Host `{}`",
                host.unwrap_or_default()
            ),
        )
        .into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| blake3::hash(t.trim().as_bytes()));
    match given {
        // blake3::Hash compares in constant time.
        Some(h) if h == want => next.run(req).await,
        Some(_) => refuse(401, "unauthorized", "wrong bearer token".into()).into_response(),
        None => refuse(
            401,
            "unauthorized",
            "a bearer token is required (Authorization: Bearer …)".into(),
        )
        .into_response(),
    }
}

/// `GET /health`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health {
    /// `ok`, or `stopping` during a graceful shutdown.
    pub status: String,
    /// The site served.
    pub site: String,
    /// Its driver kind.
    pub kind: String,
    /// The agent's certificate fingerprint.
    pub fingerprint: String,
    /// Pulls running.
    pub pulls: usize,
    /// Stripes being sent.
    pub sending: u64,
    /// fluidcloud's version.
    pub version: String,
}

async fn health(State(s): Shared) -> axum::Json<Health> {
    axum::Json(Health {
        status: if s.ctx.stopping.load(Ordering::Relaxed) {
            "stopping".into()
        } else {
            "ok".into()
        },
        site: s.driver.name().to_owned(),
        kind: s.driver.kind().to_owned(),
        fingerprint: s.fingerprint.clone(),
        pulls: s.running_pulls(),
        sending: s.sending.load(Ordering::Relaxed),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// `GET /v1/site`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SiteDoc {
    /// The site's name at the agent.
    pub name: String,
    /// Its driver kind.
    pub kind: String,
    /// Capabilities it offers (`inventory`, `image-store`, …).
    pub capabilities: Vec<String>,
    /// Whether it tracks instances' disk writes.
    pub change_tracking: bool,
    /// Whether disks can be transferred from and to it.
    pub disks: bool,
    /// Whether it looks inside its guests' disks (`/v1/guests/…`).
    #[serde(default)]
    pub guests: bool,
}

async fn site(State(s): Shared) -> Answer<SiteDoc> {
    s.driver.check().await?;
    ok(SiteDoc {
        name: s.driver.name().to_owned(),
        kind: s.driver.kind().to_owned(),
        capabilities: s
            .driver
            .capabilities()
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect(),
        change_tracking: s.driver.change_tracking().is_some(),
        disks: s.driver.disks().is_some(),
        guests: s.driver.guests().is_some(),
    })
}

async fn instances(State(s): Shared) -> Answer<Vec<InstanceRecord>> {
    ok(require_inventory(s.driver.as_ref())?.instances().await?)
}

async fn define(State(s): Shared, axum::Json(rec): axum::Json<InstanceRecord>) -> Answer<()> {
    ok(require_compute(s.driver.as_ref())?.define(&rec).await?)
}

async fn state_of(State(s): Shared, Path(name): Path<String>) -> Answer<driver::InstanceState> {
    ok(require_compute(s.driver.as_ref())?.state(&name).await?)
}

async fn console(State(s): Shared, Path(name): Path<String>) -> Answer<String> {
    ok(require_compute(s.driver.as_ref())?.console(&name).await?)
}

async fn changes(
    State(s): Shared,
    Path(name): Path<String>,
) -> Answer<Option<Vec<fluidcloud_migrators::changes::ChangeSet>>> {
    let t = s
        .driver
        .change_tracking()
        .ok_or_else(|| Error::NotSupported {
            operation: "change tracking".into(),
            site: Some(s.driver.name().to_owned()),
        })?;
    ok(t.changes(&name).await?)
}

async fn instance_action(
    State(s): Shared,
    Path((name, action)): Path<(String, String)>,
) -> Answer<Option<String>> {
    let d = s.driver.as_ref();
    let tracking = || {
        d.change_tracking().ok_or_else(|| Error::NotSupported {
            operation: "change tracking".into(),
            site: Some(d.name().to_owned()),
        })
    };
    let out = match action.as_str() {
        "start" => require_compute(d)?.start(&name).await.map(|()| None),
        "stop" => require_compute(d)?.stop(&name).await.map(|()| None),
        "undefine" => require_compute(d)?.undefine(&name).await.map(|()| None),
        "trial" => require_compute(d)?.start_trial(&name).await.map(Some),
        "end-trial" => require_compute(d)?.end_trial(&name).await.map(|()| None),
        "begin-tracking" => tracking()?.begin_tracking(&name).await.map(|()| None),
        "end-tracking" => tracking()?.end_tracking(&name).await.map(|()| None),
        other => {
            return Err(refuse(
                404,
                "not-found",
                format!("no instance action `{other}`"),
            ));
        }
    };
    ok(out?)
}

async fn config_files(State(s): Shared) -> Answer<Vec<String>> {
    ok(require_inventory(s.driver.as_ref())?.config_files().await?)
}

async fn config_file(
    State(s): Shared,
    Path(path): Path<String>,
) -> std::result::Result<Response, Failure> {
    let rec = require_inventory(s.driver.as_ref())?
        .config_file(&path)
        .await?;
    let mut headers = HeaderMap::new();
    if let Ok(v) = rec.locator.parse() {
        headers.insert("x-fluidcloud-locator", v);
    }
    Ok((headers, rec.content).into_response())
}

/// `?owner=TAG` of a config write or removal.
#[derive(Debug, Deserialize)]
struct OwnerQuery {
    owner: String,
}

async fn put_config(
    State(s): Shared,
    Path(path): Path<String>,
    Query(q): Query<OwnerQuery>,
    body: Bytes,
) -> Answer<()> {
    ok(require_inventory(s.driver.as_ref())?
        .put_config_file(&path, &body, &q.owner)
        .await?)
}

async fn remove_config(
    State(s): Shared,
    Path(path): Path<String>,
    Query(q): Query<OwnerQuery>,
) -> Answer<bool> {
    ok(require_inventory(s.driver.as_ref())?
        .remove_config_file(&path, &q.owner)
        .await?)
}

async fn manifest(
    State(s): Shared,
    Path(service): Path<String>,
) -> Answer<Option<(std::path::PathBuf, String)>> {
    ok(require_inventory(s.driver.as_ref())?
        .service_manifest(&service)
        .await?)
}

async fn images(State(s): Shared) -> Answer<Vec<String>> {
    ok(require_image_store(s.driver.as_ref())?
        .list_images()
        .await?)
}

async fn image_info(State(s): Shared, Path(name): Path<String>) -> Answer<ImageRecord> {
    ok(require_image_store(s.driver.as_ref())?
        .image_info(&name)
        .await?)
}

async fn delete_image(State(s): Shared, Path(name): Path<String>) -> Answer<()> {
    ok(require_image_store(s.driver.as_ref())?
        .delete_image(&name)
        .await?)
}

async fn volumes(State(s): Shared) -> Answer<Vec<String>> {
    ok(require_block_store(s.driver.as_ref())?
        .list_volumes()
        .await?)
}

async fn volume_info(State(s): Shared, Path(name): Path<String>) -> Answer<ImageRecord> {
    ok(require_block_store(s.driver.as_ref())?
        .volume_info(&name)
        .await?)
}

/// `POST /v1/volumes`.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewVolume {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

async fn create_volume(State(s): Shared, axum::Json(v): axum::Json<NewVolume>) -> Answer<()> {
    ok(require_block_store(s.driver.as_ref())?
        .create_volume(&v.name, v.size)
        .await?)
}

async fn delete_volume(State(s): Shared, Path(name): Path<String>) -> Answer<()> {
    ok(require_block_store(s.driver.as_ref())?
        .delete_volume(&name)
        .await?)
}

async fn allocation(State(s): Shared, Path(name): Path<String>) -> Answer<Vec<driver::Extent>> {
    ok(require_block_store(s.driver.as_ref())?
        .allocation(&name)
        .await?)
}

/// `?offset=N&len=N` of volume data.
#[derive(Debug, Deserialize)]
struct Range {
    offset: u64,
    #[serde(default)]
    len: Option<usize>,
}

async fn read_volume(
    State(s): Shared,
    Path(name): Path<String>,
    Query(r): Query<Range>,
) -> std::result::Result<Vec<u8>, Failure> {
    let len = r.len.unwrap_or(0).min(BODY_LIMIT / 2);
    let mut buf = vec![0u8; len];
    let n = require_block_store(s.driver.as_ref())?
        .read_at(&name, r.offset, &mut buf)
        .await?;
    buf.truncate(n);
    Ok(buf)
}

async fn write_volume(
    State(s): Shared,
    Path(name): Path<String>,
    Query(r): Query<Range>,
    body: Bytes,
) -> Answer<()> {
    ok(require_block_store(s.driver.as_ref())?
        .write_at(&name, r.offset, &body)
        .await?)
}

async fn flush_volume(State(s): Shared, Path(name): Path<String>) -> Answer<()> {
    ok(require_block_store(s.driver.as_ref())?.flush(&name).await?)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Transient(format!("a blocking task failed: {e}")))?
}

/// `POST /v1/disks/remove`: a transfer's rollback.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveDisk {
    /// The disk.
    pub disk: crate::transfer::DiskRef,
    /// The creator tag of the transfer that wrote it.
    pub owner: String,
}

async fn remove_disk(State(s): Shared, axum::Json(r): axum::Json<RemoveDisk>) -> Answer<bool> {
    let state = s.clone();
    ok(blocking(move || {
        let removed = driver::require_disks(state.driver.as_ref())?.remove(
            r.disk.store,
            &r.disk.name,
            &r.owner,
        )?;
        // The leaves of the pulls that wrote it go with it.
        let leaves = crate::transfer::pull::leaves_path(&state.ctx, &r.disk);
        match std::fs::remove_file(&leaves) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("removing {}", leaves.display()), e)),
        }
        Ok(removed)
    })
    .await?)
}

async fn disk_holder(
    State(s): Shared,
    axum::Json(d): axum::Json<crate::transfer::DiskRef>,
) -> Answer<Option<Option<String>>> {
    let state = s.clone();
    ok(
        blocking(move || driver::require_disks(state.driver.as_ref())?.holder(d.store, &d.name))
            .await?,
    )
}

/// `POST /v1/guests/inspect`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InspectGuests {
    /// The boot disks to look inside.
    pub boots: Vec<crate::guest::BootDisk>,
    /// Directories scanned besides `/etc`.
    pub dirs: Vec<String>,
}

/// `POST /v1/guests/adapt`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptGuest {
    /// The guest's disks and key.
    pub job: crate::guest::GuestJob,
    /// What to change.
    pub plan: crate::guest::GuestPlan,
}

/// `POST /v1/guests/release`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseGuest {
    /// The key the appliance waits under.
    pub key: String,
}

/// How long an appliance booted by `/v1/guests/prepare` waits for its
/// adaptation before the agent stops it (an orchestrator that died or went
/// away between the two steps; a resume boots a new one).
const GUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

async fn inspect_guests(
    State(s): Shared,
    axum::Json(r): axum::Json<InspectGuests>,
) -> Answer<std::collections::BTreeMap<String, crate::guest::GuestView>> {
    ok(driver::require_guests(s.driver.as_ref())?
        .inspect(&r.boots, &r.dirs)
        .await?)
}

async fn prepare_guest(
    State(s): Shared,
    axum::Json(job): axum::Json<crate::guest::GuestJob>,
) -> Answer<crate::guest::Prepared> {
    let prepared = driver::require_guests(s.driver.as_ref())?
        .prepare(&job)
        .await?;
    if prepared.launch_seconds.is_some() {
        tokio::spawn(async {
            tokio::time::sleep(GUEST_WAIT).await;
            let _ = tokio::task::spawn_blocking(|| crate::guest::expire(GUEST_WAIT)).await;
        });
    }
    ok(prepared)
}

async fn adapt_guest(
    State(s): Shared,
    axum::Json(r): axum::Json<AdaptGuest>,
) -> Answer<crate::guest::Adapted> {
    ok(driver::require_guests(s.driver.as_ref())?
        .adapt(&r.job, &r.plan)
        .await?)
}

async fn release_guest(State(s): Shared, axum::Json(r): axum::Json<ReleaseGuest>) -> Answer<()> {
    ok(driver::require_guests(s.driver.as_ref())?
        .release(&r.key)
        .await?)
}

async fn grant_ticket(
    State(s): Shared,
    axum::Json(req): axum::Json<TicketRequest>,
) -> Answer<crate::transfer::TicketGrant> {
    req.peer
        .parse::<fluidcloud_broker::tls::Fingerprint>()
        .map_err(|e| refuse(400, "invalid", format!("peer: {e}")))?;
    match (&req.disk, &req.bucket) {
        (Some(_), None) => {
            let state = s.clone();
            let grant = blocking(move || {
                let disks = driver::require_disks(state.driver.as_ref())?;
                let disk = req.disk.as_ref().ok_or_else(|| {
                    Error::Precondition("a ticket for a disk names the disk".into())
                })?;
                let reader = disks.read(disk.store, &disk.name, disk.format)?;
                state.tickets.grant(&req, Some(reader.as_ref()))
            })
            .await?;
            ok(grant)
        }
        (None, Some(b)) => {
            let os = driver::require_object_storage(s.driver.as_ref())?;
            if !os.list_buckets().await?.iter().any(|n| n == b) {
                return Err(Error::NotFound {
                    what: format!("bucket {b}"),
                    site: Some(s.driver.name().to_owned()),
                }
                .into());
            }
            ok(s.tickets.grant(&req, None)?)
        }
        _ => Err(refuse(
            400,
            "invalid",
            "a ticket is for one `disk` or one `bucket`".into(),
        )),
    }
}

/// The ticket of a transfer request, checked against the connection's
/// certificate.
fn ticket_of(
    s: &AgentState,
    headers: &HeaderMap,
    peer: &Peer,
) -> std::result::Result<Arc<source::Ticket>, Failure> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Ticket "))
        .ok_or_else(|| {
            refuse(
                401,
                "unauthorized",
                "a transfer ticket is required (Authorization: Ticket …)".into(),
            )
        })?;
    let presented = peer.cert.map(|f| f.to_string());
    s.tickets
        .check(secret.trim(), presented.as_deref())
        .map_err(|r| {
            tracing::warn!(peer = %peer.addr, refusal = %r, "transfer refused");
            refuse(403, "permission", r.to_string())
        })
}

async fn stripe(
    State(s): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<StripeRequest>,
) -> std::result::Result<Response, Failure> {
    let ticket = ticket_of(&s, &headers, &peer)?;
    if s.ctx.stopping.load(Ordering::Relaxed) {
        return Err(refuse(
            503,
            "transient",
            "the agent is shutting down".into(),
        ));
    }
    let permit = s
        .stripes
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| refuse(503, "transient", "the agent is shutting down".into()))?;
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let state = s.clone();
    state.sending.fetch_add(1, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let r = match state.driver.disks() {
            Some(disks) => source::send_stripe(disks, &ticket, &req, &tx),
            None => Err(Error::NotSupported {
                operation: "disk transfers".into(),
                site: Some(state.driver.name().to_owned()),
            }),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "stripe failed");
        }
        state.sending.fetch_sub(1, Ordering::Relaxed);
    });
    let stopping = s.ctx.stopping.clone();
    let frames = futures::stream::unfold(rx, move |mut rx| {
        let stopping = stopping.clone();
        async move {
            // After a shutdown request nothing more is sent: the target
            // sees the stripe end early and resumes it later.
            if stopping.load(Ordering::Relaxed) {
                return None;
            }
            rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
        }
    });
    let body = Body::from_stream(frames);
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-fluidcloud-frames")
        .body(body)
        .unwrap_or_default())
}

async fn root(
    State(s): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Answer<crate::transfer::RootReply> {
    let ticket = ticket_of(&s, &headers, &peer)?;
    let state = s.clone();
    ok(blocking(move || {
        let disks = driver::require_disks(state.driver.as_ref())?;
        source::root(disks, &ticket)
    })
    .await?)
}

async fn list_objects(
    State(s): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Answer<Vec<crate::transfer::objects::ObjectEntry>> {
    let ticket = ticket_of(&s, &headers, &peer)?;
    let bucket = ticket.bucket()?;
    let store = driver::require_object_storage(s.driver.as_ref())?
        .bucket(bucket)
        .await?;
    ok(crate::transfer::objects::list_hashed(store.as_ref(), bucket).await?)
}

async fn get_object(
    State(s): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    axum::Json(req): axum::Json<crate::transfer::objects::ObjectRequest>,
) -> std::result::Result<Response, Failure> {
    let ticket = ticket_of(&s, &headers, &peer)?;
    let bucket = ticket.bucket()?;
    let store = driver::require_object_storage(s.driver.as_ref())?
        .bucket(bucket)
        .await?;
    let got = object_store::ObjectStoreExt::get(
        store.as_ref(),
        &object_store::path::Path::from(req.key.as_str()),
    )
    .await
    .map_err(|e| match e {
        object_store::Error::NotFound { .. } => Error::NotFound {
            what: format!("object {} of bucket {bucket}", req.key),
            site: Some(s.driver.name().to_owned()),
        },
        e => Error::Transient(format!("bucket {bucket}: {e}")),
    })?;
    let body = Body::from_stream(got.into_stream());
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .unwrap_or_default())
}

async fn start_bucket_pull(
    State(s): Shared,
    axum::Json(req): axum::Json<crate::transfer::objects::BucketPullRequest>,
) -> Answer<PullStatus> {
    if s.ctx.stopping.load(Ordering::Relaxed) {
        return Err(refuse(
            503,
            "transient",
            "the agent is shutting down".into(),
        ));
    }
    let pull = s.new_pull(0);
    tokio::spawn(crate::transfer::objects::run(
        s.ctx.clone(),
        s.state_dir.clone(),
        req,
        pull.clone(),
    ));
    ok(pull.status())
}

async fn buckets(State(s): Shared) -> Answer<Vec<String>> {
    ok(driver::require_object_storage(s.driver.as_ref())?
        .list_buckets()
        .await?)
}

async fn bucket_summary(
    State(s): Shared,
    Path(name): Path<String>,
) -> Answer<driver::BucketSummary> {
    ok(driver::require_object_storage(s.driver.as_ref())?
        .summary(&name)
        .await?)
}

/// `POST /v1/buckets/remove`: a bucket transfer's rollback.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveBucket {
    /// The bucket.
    pub bucket: String,
    /// The creator tag of the transfer that wrote it.
    pub owner: String,
}

async fn remove_bucket(State(s): Shared, axum::Json(r): axum::Json<RemoveBucket>) -> Answer<bool> {
    ok(crate::transfer::objects::remove(&s.ctx, &s.state_dir, &r.bucket, &r.owner).await?)
}

impl AgentState {
    fn new_pull(&self, chunks: u64) -> Arc<Pull> {
        let id = format!("pull-{}", self.next_pull.fetch_add(1, Ordering::Relaxed));
        let pull = Arc::new(Pull::new(id.clone(), chunks));
        self.pulls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, pull.clone());
        pull
    }
}

async fn start_pull(
    State(s): Shared,
    axum::Json(req): axum::Json<PullRequest>,
) -> Answer<PullStatus> {
    if s.ctx.stopping.load(Ordering::Relaxed) {
        return Err(refuse(
            503,
            "transient",
            "the agent is shutting down".into(),
        ));
    }
    let pull = s.new_pull(chunks_of(req.virtual_size));
    tokio::spawn(crate::transfer::pull::run(s.ctx.clone(), req, pull.clone()));
    ok(pull.status())
}

/// `?wait_ms=N`: answer when the pull ends, or after N ms (at most 5 s).
#[derive(Debug, Deserialize)]
struct Wait {
    #[serde(default)]
    wait_ms: Option<u64>,
}

async fn pull_status(
    State(s): Shared,
    Path(id): Path<String>,
    Query(w): Query<Wait>,
) -> Answer<PullStatus> {
    let pull = s
        .pulls
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&id)
        .cloned()
        .ok_or_else(|| {
            refuse(
                404,
                "not-found",
                format!("no pull {id} at this agent (did it restart?)"),
            )
        })?;
    let wait = std::time::Duration::from_millis(w.wait_ms.unwrap_or(0).min(5000));
    ok(pull.status_within(wait).await)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn host_of(uri: &str, host: Option<&str>) -> Option<String> {
        let mut b = axum::http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        requested_host(&b.body(axum::body::Body::empty()).unwrap())
    }

    #[test]
    fn without_a_token_only_loopback_names_are_answered() {
        for (h, want) in [
            ("127.0.0.1:7400", true),
            ("localhost:7400", true),
            ("LOCALHOST", true),
            ("[::1]:7400", true),
            ("127.9.9.9", true),
            ("evil.example:7400", false),
            ("10.0.0.1:7400", false),
            ("[fe80::1]:7400", false),
            ("localhost.evil.example", false),
        ] {
            let host = host_of("/v1/site", Some(h)).unwrap();
            assert_eq!(is_loopback_name(&host), want, "{h} -> {host}");
        }
        assert_eq!(host_of("/v1/site", None), None);
        assert_eq!(
            host_of("https://evil.example:7400/v1/site", Some("127.0.0.1")).as_deref(),
            Some("evil.example")
        );
    }
}
