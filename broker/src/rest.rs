//! The broker REST service.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/health` | liveness; open without a token |
//! | GET | `/openapi.json` | the OpenAPI 3.1 document, built from the types; open |
//! | GET | `/version` | name and version |
//! | GET | `/sites` | every site of the catalog |
//! | GET | `/sites/{name}` | one site |
//! | GET | `/migrators` | every migrator the broker may chain |
//! | POST | `/match` | topology (or a service name) + request → placement with explanations |
//! | POST | `/relocations` | plan a relocation, start it in the background: 202 + `Location` |
//! | GET | `/relocations` | every relocation |
//! | GET | `/relocations/{id}` | state, steps, and the report once no run is going on |
//! | GET | `/relocations/{id}/events` | server-sent events: the state now, then progress, then `end` |
//! | POST | `/plan` | what `POST /relocations` would run, planned and estimated; nothing runs |
//! | GET | `/ui/` | the web dashboard ([`crate::ui`]); its files are open, its data needs a token or a session |
//! | POST | `/ui/login`, `/ui/logout` | the token for a session cookie, and back |
//! | GET | `/metrics` | Prometheus text: queue depth, running relocations, lease takeovers, step latencies (workers of a database) |
//! | POST | `/relocations/{id}/cancel` | stop the run going on |
//! | POST | `/relocations/{id}/resume` | continue an interrupted, cancelled or failed one |
//! | POST | `/relocations/{id}/rollback` | undo it: clean the target, restart the source |
//!
//! Every other route needs `Authorization: Bearer TOKEN` (the scheme in
//! any case, as RFC 9110 says); tokens are compared in constant time
//! (SHA-256 digests compared with `subtle`). Bodies are limited in size,
//! requests in time, and every error is an `application/problem+json`
//! document (RFC 9457) whose `errors` name the offending field by JSON
//! pointer.
//!
//! Two guards sit in front of every route:
//!
//! - **Concurrency limits per client.** Requests going on at once from one
//!   client, event streams open from one client, and event streams open in
//!   all: past a limit the answer is 429 with `Retry-After`. An event
//!   stream lasts as long as its relocation runs, so without the stream
//!   limits a few clients could hold every task and socket of the service.
//!   A client is its IP address; an IPv6 client is its /64, the block one
//!   host is usually given, so rotating addresses gains nothing.
//! - **The `Host` header when authentication is off.** A service without a
//!   token listens on loopback only, but a web page the user opens can
//!   still reach it by pointing a DNS name of its own at 127.0.0.1 (DNS
//!   rebinding). The browser then sends that name as `Host`, so the
//!   service answers only the `Host` values it was told are its own
//!   ([`ServiceConfig::hosts`]) and refuses the others with 421. With a
//!   token the page cannot authenticate, so the check is not needed.
//!
//! Transport security lives in [`crate::tls`]: [`serve`] is plain HTTP
//! (which the binary allows on loopback only), [`crate::tls::serve_tls`]
//! HTTPS; both give the handlers the client's address as [`ClientAddr`].
//!
//! The service holds no site drivers: the catalog is injected through the
//! [`Catalog`] trait and relocations through [`Relocations`], so the broker
//! never depends on the conduit.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fluidcloud_plugins::{MigratorDescriptor, SiteInfo, Topology, TopologyDoc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::placement::{self, Request as MatchOptions};
use crate::runner::{RelocationRequest, RelocationView, Relocations, RunnerError};

/// Where the service gets its sites and migrators.
#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// Every site, with detected capabilities.
    async fn sites(&self) -> Vec<SiteInfo>;
    /// Every migrator available for chains.
    async fn migrators(&self) -> Vec<MigratorDescriptor>;
}

/// A catalog fixed at start-up.
#[derive(Debug, Clone, Default)]
pub struct StaticCatalog {
    /// The sites.
    pub sites: Vec<SiteInfo>,
    /// The migrators.
    pub migrators: Vec<MigratorDescriptor>,
}

#[async_trait]
impl Catalog for StaticCatalog {
    async fn sites(&self) -> Vec<SiteInfo> {
        self.sites.clone()
    }
    async fn migrators(&self) -> Vec<MigratorDescriptor> {
        self.migrators.clone()
    }
}

/// Service settings.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The bearer token; `None` disables authentication (local use only).
    pub token: Option<String>,
    /// Largest accepted request body, bytes.
    pub body_limit: usize,
    /// Longest a request may take.
    pub timeout: Duration,
    /// `Host` values (name and port, as a client sends them) answered
    /// when authentication is off; requests naming another host get 421.
    /// Empty with no token: every request is refused. See
    /// [`ServiceConfig::local_hosts`].
    pub hosts: Vec<String>,
    /// Requests going on at once from one client.
    pub max_requests_per_client: usize,
    /// Event streams open at once from one client.
    pub max_streams_per_client: usize,
    /// Event streams open at once in all.
    pub max_streams: usize,
    /// Whether the service speaks HTTPS: the dashboard's session cookie is
    /// then `Secure` (never sent in clear).
    pub secure_cookies: bool,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            token: None,
            body_limit: 4 << 20,
            timeout: Duration::from_secs(30),
            hosts: Vec::new(),
            max_requests_per_client: 32,
            max_streams_per_client: 8,
            max_streams: 64,
            secure_cookies: false,
        }
    }
}

impl ServiceConfig {
    /// The `Host` values of a service on `port` of this machine, also known
    /// as `names`: `localhost`, `127.0.0.1` and `[::1]` with the port, and
    /// each name with the port (without it too on the default ports 80 and
    /// 443, where clients leave it out).
    pub fn local_hosts(port: u16, names: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for n in ["localhost", "127.0.0.1", "[::1]"]
            .into_iter()
            .chain(names.iter().map(String::as_str))
        {
            let n = match n.parse::<Ipv6Addr>() {
                Ok(v6) => format!("[{v6}]"),
                Err(_) => n.to_ascii_lowercase(),
            };
            out.push(format!("{n}:{port}"));
            if port == 80 || port == 443 {
                out.push(n);
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// The client's address, as the listeners of [`serve`] and
/// [`crate::tls::serve_tls`] give it to the handlers
/// (`ConnectInfo<ClientAddr>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for ClientAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// The key a client is counted under: its IPv4 address, or the /64 of its
/// IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Client(IpAddr);

impl Client {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Self(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => Self(v4),
        }
    }
}

/// Things going on at once, per client and in all.
#[derive(Debug)]
struct Gauge {
    per_client: usize,
    total: usize,
    counts: Mutex<(usize, HashMap<Client, usize>)>,
}

/// Which limit was reached.
enum Over {
    Client,
    Total,
}

/// One unit of a [`Gauge`], given back when dropped.
struct Permit {
    gauge: Arc<Gauge>,
    client: Client,
}

impl Gauge {
    fn new(per_client: usize, total: usize) -> Arc<Self> {
        Arc::new(Self {
            per_client,
            total,
            counts: Mutex::new((0, HashMap::new())),
        })
    }

    fn acquire(self: &Arc<Self>, client: Client) -> Result<Permit, Over> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per) = &mut *c;
        let mine = per.entry(client).or_insert(0);
        if *mine >= self.per_client {
            if *mine == 0 {
                per.remove(&client);
            }
            return Err(Over::Client);
        }
        if *total >= self.total {
            if *mine == 0 {
                per.remove(&client);
            }
            return Err(Over::Total);
        }
        *mine += 1;
        *total += 1;
        Ok(Permit {
            gauge: self.clone(),
            client,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self
            .gauge
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, per) = &mut *c;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.client);
            }
        }
    }
}

#[derive(Clone)]
struct AppState {
    catalog: Arc<dyn Catalog>,
    relocations: Option<Arc<dyn Relocations>>,
    token_digest: Option<[u8; 32]>,
    /// The dashboard's session cookies (`None` without a token).
    sessions: Option<crate::ui::Sessions>,
    /// `Some` when authentication is off: the `Host` values answered.
    hosts: Option<Arc<Vec<String>>>,
    requests: Arc<Gauge>,
    streams: Arc<Gauge>,
}

/// Seconds a client is told to wait after a 429 for requests.
const RETRY_REQUESTS_SECS: u32 = 1;
/// Seconds a client is told to wait after a 429 for event streams (they
/// end when their relocation does, so a slot frees up less often).
const RETRY_STREAMS_SECS: u32 = 5;

fn too_many(kind: &str, detail: String, retry_after: u32) -> Response {
    let mut resp = Problem::new(StatusCode::TOO_MANY_REQUESTS, kind, detail).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    resp
}

/// What a request names as its host, with the port if it gives one: the
/// authority of an absolute URI, else the `Host` header.
pub fn requested_authority(req: &Request) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
}

/// Limits and the `Host` check, before anything else (see the module docs).
async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let ip = req
        .extensions()
        .get::<ConnectInfo<ClientAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.0.ip());
    let client = Client::of(ip);
    let _permit = match state.requests.acquire(client) {
        Ok(p) => p,
        Err(_) => {
            return too_many(
                "too-many-requests",
                format!(
                    "more than {} requests at once from {}",
                    state.requests.per_client, client.0
                ),
                RETRY_REQUESTS_SECS,
            );
        }
    };
    if let Some(hosts) = &state.hosts {
        let host = requested_authority(&req);
        let known = host
            .as_deref()
            .is_some_and(|h| hosts.iter().any(|k| k.eq_ignore_ascii_case(h)));
        if !known {
            return Problem::new(
                StatusCode::MISDIRECTED_REQUEST,
                "unknown-host",
                format!(
                    "this service runs without authentication and answers only for {}, not for Host `{}`",
                    hosts.join(", "),
                    host.as_deref().unwrap_or("")
                ),
            )
            .into_response();
        }
    }
    req.extensions_mut().insert(client);
    next.run(req).await
}

/// One field-level problem in a problem document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct FieldError {
    /// JSON pointer to the offending field (`/request/weights/cost`).
    pub pointer: String,
    /// What is wrong with it.
    pub detail: String,
}

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Problem {
    /// A URI naming the problem type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What happened, for people.
    pub detail: String,
    /// Field-level errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl Problem {
    fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Self {
            kind: format!("https://fluidcloud.dev/problems/{kind}"),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            status: status.as_u16(),
            // Errors may quote a config line or a URL.
            detail: fluidcloud_plugins::redact::string(&detail.into()),
            errors: Vec::new(),
        }
    }

    fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(mut self) -> Response {
        // A field error quotes the value it refuses, which may be a URL
        // with a password: redacted here, where every problem leaves.
        for e in &mut self.errors {
            e.detail = fluidcloud_plugins::redact::string(&e.detail);
        }
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// JSON body extractor whose errors are problem documents naming the field.
struct JsonBody<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim();
                v == "application/json" || v.ends_with("+json")
            });
        if !is_json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    status,
                    "body-too-large",
                    "the request body exceeds the size limit",
                )
            } else {
                Problem::new(status, "bad-body", e.body_text())
            }
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let pointer = pointer_of(e.path());
            let inner = e.inner();
            let syntax = inner.is_syntax() || inner.is_eof();
            let (status, kind) = if syntax {
                (StatusCode::BAD_REQUEST, "malformed-json")
            } else {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid-field")
            };
            let detail = format!("{inner}");
            Problem::new(status, kind, format!("invalid request body: {detail}"))
                .with_errors(vec![FieldError { pointer, detail }])
        })?;
        de.end().map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                format!("trailing data: {e}"),
            )
        })?;
        Ok(Self(value))
    }
}

/// `a.b[2].c` as a JSON pointer `/a/b/2/c`.
fn pointer_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        out.push('/');
        match seg {
            Segment::Seq { index } => out.push_str(&index.to_string()),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                out.push_str(&key.replace('~', "~0").replace('/', "~1"));
            }
            Segment::Unknown => out.push('?'),
        }
    }
    out
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token of an `Authorization: Bearer TOKEN` value; the scheme is
/// case-insensitive (RFC 9110, 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn auth(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(expected) = state.token_digest else {
        return next.run(req).await;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    match given {
        Some(t) if bool::from(digest(t).ct_eq(&expected)) => next.run(req).await,
        Some(_) => Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not valid",
        )
        .into_response(),
        None => match session(&state, &headers, req.method()) {
            Ok(()) => next.run(req).await,
            Err(p) => p.into_response(),
        },
    }
}

/// Whether a request without a bearer token comes with a valid session
/// cookie of the dashboard (and, when it changes something, with the
/// dashboard's header: see [`crate::ui`]).
fn session(state: &AppState, headers: &HeaderMap, method: &Method) -> Result<(), Problem> {
    let cookie = crate::ui::cookie(headers);
    let valid = cookie.is_some_and(|c| state.sessions.as_ref().is_some_and(|s| s.valid(c)));
    if !valid {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            if cookie.is_some() {
                "the session has expired or is not valid: log in again"
            } else {
                "send `Authorization: Bearer TOKEN`"
            },
        ));
    }
    let safe = matches!(*method, Method::GET | Method::HEAD);
    if !safe && !headers.contains_key(crate::ui::UI_HEADER) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "a request authenticated by the session cookie that changes something must carry `{}`",
                crate::ui::UI_HEADER
            ),
        ));
    }
    Ok(())
}

/// Body of `POST /ui/login`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

/// `POST /ui/login`: the token for a session cookie. Without
/// authentication there is nothing to log in to: 204 without a cookie.
async fn login(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<Login>,
) -> Result<Response, Problem> {
    let (Some(expected), Some(sessions)) = (state.token_digest, &state.sessions) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    if !bool::from(digest(body.token.trim()).ct_eq(&expected)) {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the token is not valid",
        ));
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&sessions.set_cookie()) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// `GET /ui/session`: whether this service wants a login, and whether the
/// browser's session cookie is valid (the page cannot read the cookie).
async fn ui_session(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> axum::Json<serde_json::Value> {
    let logged_in = crate::ui::cookie(&headers)
        .is_some_and(|c| state.sessions.as_ref().is_some_and(|s| s.valid(c)));
    axum::Json(serde_json::json!({
        "auth": state.token_digest.is_some(),
        "logged_in": logged_in,
    }))
}

/// `POST /ui/logout`: ends the browser's session (the cookie is cleared).
async fn logout(State(state): State<AppState>) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Some(v) = state
        .sessions
        .as_ref()
        .and_then(|s| HeaderValue::from_str(&s.clear_cookie()).ok())
    {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// Body of `POST /match`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchBody {
    /// The service's topology, as `fluidcloud introspect --format json`
    /// prints it; or leave it out and name the `service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<TopologyDoc>,
    /// A service on the source site, introspected by the service (when
    /// `topology` is left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Source site, constraints, users, weights.
    pub request: MatchOptions,
}

#[derive(Serialize, schemars::JsonSchema)]
struct Health {
    status: &'static str,
}

#[derive(Serialize, schemars::JsonSchema)]
struct Version {
    name: &'static str,
    version: &'static str,
}

async fn health() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

async fn version() -> axum::Json<Version> {
    axum::Json(Version {
        name: "fluidcloud",
        version: env!("CARGO_PKG_VERSION"),
    })
}

async fn sites(State(s): State<AppState>) -> axum::Json<Vec<SiteInfo>> {
    axum::Json(s.catalog.sites().await)
}

async fn site(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<axum::Json<SiteInfo>, Problem> {
    s.catalog
        .sites()
        .await
        .into_iter()
        .find(|x| x.name == name)
        .map(axum::Json)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "unknown-site",
                format!("no site named `{name}`"),
            )
        })
}

async fn migrators(State(s): State<AppState>) -> axum::Json<Vec<MigratorDescriptor>> {
    axum::Json(s.catalog.migrators().await)
}

async fn match_service(
    State(s): State<AppState>,
    JsonBody(body): JsonBody<MatchBody>,
) -> Result<axum::Json<placement::Placement>, Problem> {
    let doc = match (body.topology, &body.service, &s.relocations) {
        (Some(t), None, _) => t,
        (None, Some(service), Some(r)) => r
            .introspect(&body.request.source, service)
            .await
            .map_err(|e| match e {
                RunnerError::Invalid { pointer, detail } => invalid(
                    "invalid-field",
                    &detail,
                    match pointer.as_str() {
                        "/site" => "/request/source",
                        _ => "/service",
                    },
                ),
                e => runner_problem(e),
            })?,
        (None, Some(_), None) => {
            return Err(invalid(
                "invalid-field",
                "this service cannot introspect: send the `topology`",
                "/service",
            ));
        }
        (Some(_), Some(_), _) => {
            return Err(invalid(
                "invalid-field",
                "send either `topology` or `service`, not both",
                "/service",
            ));
        }
        (None, None, _) => {
            return Err(invalid(
                "invalid-field",
                "send the `topology`, or the `service` to introspect on the source site",
                "/topology",
            ));
        }
    };
    let topology = Topology::from_doc(doc).map_err(|e| {
        let errors = match &e {
            fluidcloud_plugins::Error::Invalid(d) => d
                .iter()
                .map(|d| FieldError {
                    pointer: format!(
                        "/topology/{}",
                        d.key
                            .as_deref()
                            .unwrap_or("")
                            .replace('[', "/")
                            .replace(']', "")
                            .replace('.', "/")
                    ),
                    detail: d.summary.clone(),
                })
                .collect(),
            _ => Vec::new(),
        };
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-topology",
            e.to_string(),
        )
        .with_errors(errors)
    })?;
    let sites = s.catalog.sites().await;
    let migrators = s.catalog.migrators().await;
    let request = body.request;
    // Matching is CPU-bound: keep it off the async workers.
    let result = tokio::task::spawn_blocking(move || {
        let units = placement::units(&topology);
        placement::solve(&units, &sites, &request, &migrators)
    })
    .await
    .map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("matching failed: {e}"),
        )
    })?;
    match result {
        Ok(p) => Ok(axum::Json(p)),
        Err(crate::Error::Infeasible { conflict }) => Err(Problem::new(
            StatusCode::CONFLICT,
            "infeasible",
            crate::Error::Infeasible {
                conflict: conflict.clone(),
            }
            .to_string(),
        )
        .with_errors(
            conflict
                .iter()
                .map(|c| FieldError {
                    pointer: "/request/constraints".to_owned(),
                    detail: c.to_string(),
                })
                .collect(),
        )),
        Err(crate::Error::Invalid(d)) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-request",
            d.first()
                .map_or_else(|| "invalid request".to_owned(), ToString::to_string),
        )
        .with_errors(
            d.iter()
                .map(|d| FieldError {
                    pointer: format!(
                        "/request/{}",
                        d.key
                            .as_deref()
                            .unwrap_or("")
                            .replace('[', "/")
                            .replace(']', "")
                    ),
                    detail: d.summary.clone(),
                })
                .collect(),
        )),
        Err(e) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no-placement",
            e.to_string(),
        )),
    }
}

/// A server-sent event carrying `v` as JSON, secrets redacted (the JSON
/// stays valid: only quoted values and URL passwords are replaced).
fn redacted_event(name: &str, v: &serde_json::Value) -> axum::response::sse::Event {
    axum::response::sse::Event::default()
        .event(name)
        .data(fluidcloud_plugins::redact::text(&v.to_string()))
}

/// A 422 problem naming one field.
fn invalid(kind: &str, detail: &str, pointer: &str) -> Problem {
    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, kind, detail).with_errors(vec![FieldError {
        pointer: pointer.to_owned(),
        detail: detail.to_owned(),
    }])
}

fn runner_problem(e: RunnerError) -> Problem {
    match e {
        RunnerError::NotFound(d) => Problem::new(StatusCode::NOT_FOUND, "unknown-relocation", d),
        RunnerError::Invalid { pointer, detail } => invalid("invalid-field", &detail, &pointer),
        RunnerError::Conflict(d) => Problem::new(StatusCode::CONFLICT, "conflict", d),
        RunnerError::Failed(d) => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "failed", d),
    }
}

fn runner(s: &AppState) -> Result<&Arc<dyn Relocations>, Problem> {
    s.relocations.as_ref().ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "this service does not run relocations",
        )
    })
}

/// 202 Accepted with `Location: /relocations/ID` and the relocation.
fn accepted(view: RelocationView) -> Response {
    let location = format!("/relocations/{}", view.id);
    let mut resp = (StatusCode::ACCEPTED, axum::Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// The checks of a relocation request the runner does not make.
fn check_request(body: &RelocationRequest) -> Result<(), Problem> {
    for (i, c) in body.constraints.iter().enumerate() {
        if let Err(d) = c.parse::<crate::Constraint>() {
            return Err(invalid(
                "invalid-constraint",
                &d.to_string(),
                &format!("/constraints/{i}"),
            ));
        }
    }
    if !body.constraints.is_empty() && body.to != "auto" {
        return Err(invalid(
            "invalid-field",
            "constraints apply to `to: auto`; with an explicit target site there is nothing to choose",
            "/constraints",
        ));
    }
    if let Some(b) = body.retry_budget_secs
        && !(b.is_finite() && (0.0..=86_400.0).contains(&b))
    {
        return Err(invalid(
            "invalid-field",
            "retry_budget_secs takes 0 to 86400 seconds",
            "/retry_budget_secs",
        ));
    }
    Ok(())
}

async fn start_relocation(
    State(s): State<AppState>,
    JsonBody(body): JsonBody<RelocationRequest>,
) -> Result<Response, Problem> {
    let r = runner(&s)?;
    check_request(&body)?;
    Ok(accepted(r.start(body).await.map_err(runner_problem)?))
}

/// `POST /plan`: the relocation `POST /relocations` would start, planned
/// and estimated, without running or recording anything.
async fn plan_relocation(
    State(s): State<AppState>,
    JsonBody(body): JsonBody<RelocationRequest>,
) -> Result<axum::Json<serde_json::Value>, Problem> {
    let r = runner(&s)?;
    check_request(&body)?;
    Ok(axum::Json(r.plan(body).await.map_err(runner_problem)?))
}

async fn list_relocations(
    State(s): State<AppState>,
) -> Result<axum::Json<Vec<RelocationView>>, Problem> {
    Ok(axum::Json(
        runner(&s)?.list().await.map_err(runner_problem)?,
    ))
}

async fn get_relocation(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<RelocationView>, Problem> {
    Ok(axum::Json(
        runner(&s)?.get(&id).await.map_err(runner_problem)?,
    ))
}

async fn cancel_relocation(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<RelocationView>, Problem> {
    Ok(axum::Json(
        runner(&s)?.cancel(&id).await.map_err(runner_problem)?,
    ))
}

/// `GET /metrics`: queue depth, running relocations, lease takeovers and
/// step latencies, in Prometheus text format (workers of a database).
async fn metrics(State(s): State<AppState>) -> Result<Response, Problem> {
    match runner(&s)?.metrics().await.map_err(runner_problem)? {
        Some(text) => Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response()),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "this service keeps no metrics (they come with `fluidcloud serve --database`)",
        )),
    }
}

/// `?force=true` of a rollback.
#[derive(Debug, Default, Deserialize)]
struct RollbackQuery {
    #[serde(default)]
    force: bool,
}

async fn rollback_relocation(
    State(s): State<AppState>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<RollbackQuery>,
) -> Result<Response, Problem> {
    Ok(accepted(
        runner(&s)?
            .rollback(&id, q.force)
            .await
            .map_err(runner_problem)?,
    ))
}

async fn resume_relocation(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    Ok(accepted(
        runner(&s)?.resume(&id).await.map_err(runner_problem)?,
    ))
}

/// `state` (the relocation now), then one event per progress event of the
/// run going on (named like its `event` field: `step-started`,
/// `step-progress`, `step-finished`, …), then `end` with the final state
/// once the runner closes the run's channel (after it recorded the end).
async fn relocation_events(
    State(s): State<AppState>,
    Extension(client): Extension<Client>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    use axum::response::sse::{KeepAlive, Sse};
    use futures::StreamExt as _;
    use tokio::sync::broadcast::error::RecvError;

    let r = runner(&s)?.clone();
    // Held by the stream, so given back when the client goes or the
    // stream ends.
    let permit = match s.streams.acquire(client) {
        Ok(p) => p,
        Err(over) => {
            let detail = match over {
                Over::Client => format!(
                    "more than {} event streams open from {}",
                    s.streams.per_client, client.0
                ),
                Over::Total => format!(
                    "more than {} event streams open on this service",
                    s.streams.total
                ),
            };
            return Ok(too_many("too-many-streams", detail, RETRY_STREAMS_SECS));
        }
    };
    let watch = r.watch(&id).await.map_err(runner_problem)?;
    let json_event = |name: &str, v: &RelocationView| {
        redacted_event(name, &serde_json::to_value(v).unwrap_or_default())
    };
    let first = futures::stream::once({
        let e = json_event("state", &watch.current);
        async move { e }
    });
    let rest = futures::stream::unfold(
        (watch.events, r, id, false),
        move |(events, r, id, done)| async move {
            if done {
                return None;
            }
            let end = |r: Arc<dyn Relocations>, id: String| async move {
                match r.get(&id).await {
                    Ok(v) => Some((json_event("end", &v), (None, r, id, true))),
                    Err(_) => None,
                }
            };
            let Some(mut rx) = events else {
                return end(r, id).await;
            };
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let v = serde_json::to_value(&ev).unwrap_or_default();
                        let name = v["event"].as_str().unwrap_or("progress").to_owned();
                        return Some((redacted_event(&name, &v), (Some(rx), r, id, false)));
                    }
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return end(r, id).await,
                }
            }
        },
    );
    let stream = first.chain(rest).map(move |e| {
        let _held = &permit;
        Ok::<_, std::convert::Infallible>(e)
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The OpenAPI 3.1 document of the service, built from the types the
/// handlers (de)serialize, so it cannot drift from them.
pub fn openapi() -> serde_json::Value {
    use schemars::generate::SchemaSettings;
    use serde_json::json;

    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let schema = |s: schemars::Schema| serde_json::to_value(s).unwrap_or_default();
    let health = schema(generator.subschema_for::<Health>());
    let version = schema(generator.subschema_for::<Version>());
    let sites = schema(generator.subschema_for::<Vec<SiteInfo>>());
    let site = schema(generator.subschema_for::<SiteInfo>());
    let migrators = schema(generator.subschema_for::<Vec<MigratorDescriptor>>());
    let match_body = schema(generator.subschema_for::<MatchBody>());
    let placement = schema(generator.subschema_for::<placement::Placement>());
    let problem = schema(generator.subschema_for::<Problem>());
    let reloc_req = schema(generator.subschema_for::<RelocationRequest>());
    let reloc = schema(generator.subschema_for::<RelocationView>());
    let relocs = schema(generator.subschema_for::<Vec<RelocationView>>());
    let defs = generator.take_definitions(true);

    let json_ok = |s: &serde_json::Value| json!({ "description": "OK", "content": { "application/json": { "schema": s } } });
    let problem_of = |what: &str| json!({ "description": what, "content": { "application/problem+json": { "schema": problem } } });
    // Every route is behind the guard (limits, Host check).
    let guarded = [
        (
            "421",
            "a Host this service does not answer for (only without authentication)",
        ),
        (
            "429",
            "too many requests (or event streams) at once; `Retry-After` says when to try again",
        ),
    ];
    let errors = |codes: &[(&str, &str)]| {
        let mut m = serde_json::Map::new();
        for (code, what) in guarded.iter().chain(codes) {
            m.insert((*code).to_owned(), problem_of(what));
        }
        m
    };
    let with = |ok: serde_json::Value, codes: &[(&str, &str)]| {
        let mut r = errors(codes);
        r.insert("200".into(), ok);
        serde_json::Value::Object(r)
    };
    let auth = [("401", "missing or invalid bearer token")];
    let id_param =
        json!([{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }]);
    let accepted = |codes: &[(&str, &str)]| {
        let mut r = errors(codes);
        r.insert(
            "202".into(),
            json!({
                "description": "started in the background; `Location` names the relocation",
                "headers": { "Location": { "schema": { "type": "string" } } },
                "content": { "application/json": { "schema": reloc } }
            }),
        );
        serde_json::Value::Object(r)
    };
    let by_id = |op: &str, codes: &[(&str, &str)]| {
        let mut c = vec![
            auth[0],
            ("404", "no such relocation"),
            ("409", "not possible in the relocation's state"),
        ];
        c.extend_from_slice(codes);
        json!({ "post": { "operationId": op, "parameters": id_param, "responses": accepted(&c) } })
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fluidcloud broker",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Matches services to sites (catalog, migrators, explained placement) and relocates them."
        },
        "security": [{ "bearer": [] }],
        "paths": {
            "/health": { "get": { "operationId": "health", "security": [], "responses": with(json_ok(&health), &[]) } },
            "/openapi.json": { "get": { "operationId": "openapi", "security": [], "responses": { "200": { "description": "this document", "content": { "application/json": {} } } } } },
            "/version": { "get": { "operationId": "version", "responses": with(json_ok(&version), &auth) } },
            "/sites": { "get": { "operationId": "listSites", "responses": with(json_ok(&sites), &auth) } },
            "/sites/{name}": { "get": {
                "operationId": "getSite",
                "parameters": [{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" } }],
                "responses": with(json_ok(&site), &[auth[0], ("404", "no such site")])
            } },
            "/migrators": { "get": { "operationId": "listMigrators", "responses": with(json_ok(&migrators), &auth) } },
            "/match": { "post": {
                "operationId": "match",
                "requestBody": { "required": true, "content": { "application/json": { "schema": match_body } } },
                "responses": with(json_ok(&placement), &[
                    auth[0],
                    ("400", "malformed JSON"),
                    ("409", "no placement satisfies the constraints"),
                    ("413", "body too large"),
                    ("415", "not JSON"),
                    ("422", "invalid field, topology or constraint"),
                ])
            } },
            "/relocations": {
                "get": { "operationId": "listRelocations", "responses": with(json_ok(&relocs), &auth) },
                "post": {
                    "operationId": "startRelocation",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": reloc_req } } },
                    "responses": accepted(&[
                        auth[0],
                        ("400", "malformed JSON"),
                        ("409", "no placement satisfies the constraints, or the source is busy"),
                        ("413", "body too large"),
                        ("415", "not JSON"),
                        ("422", "invalid field: unknown site or service, bad constraint"),
                        ("500", "a site failed while planning"),
                    ])
                }
            },
            "/plan": { "post": {
                "operationId": "planRelocation",
                "description": "What POST /relocations would run, planned and estimated, without running or recording anything: `{relocation, plan}`.",
                "requestBody": { "required": true, "content": { "application/json": { "schema": reloc_req } } },
                "responses": with(json_ok(&json!({ "type": "object", "required": ["relocation", "plan"] })), &[
                    auth[0],
                    ("400", "malformed JSON"),
                    ("409", "no placement satisfies the constraints"),
                    ("413", "body too large"),
                    ("415", "not JSON"),
                    ("422", "invalid field: unknown site or service, bad constraint"),
                    ("500", "a site failed while planning"),
                ])
            } },
            "/relocations/{id}": { "get": {
                "operationId": "getRelocation",
                "parameters": id_param,
                "responses": with(json_ok(&reloc), &[auth[0], ("404", "no such relocation")])
            } },
            "/relocations/{id}/events": { "get": {
                "operationId": "relocationEvents",
                "description": "Server-sent events: `state` (the relocation now), then the run's progress events (`step-started`, `step-progress` with bytes, `step-finished`, `step-rolled-back`, `run-finished`, …), then `end` with the final state.",
                "parameters": id_param,
                "responses": with(
                    json!({ "description": "an event stream", "content": { "text/event-stream": { "schema": { "type": "string" } } } }),
                    &[auth[0], ("404", "no such relocation")]
                )
            } },
            "/relocations/{id}/cancel": { "post": {
                "operationId": "cancelRelocation",
                "parameters": id_param,
                "responses": with(json_ok(&reloc), &[auth[0], ("404", "no such relocation"), ("409", "no run is going on")])
            } },
            "/relocations/{id}/resume": by_id("resumeRelocation", &[("500", "the state directory failed")]),
            "/relocations/{id}/rollback": by_id("rollbackRelocation", &[("500", "the state directory failed")])
        },
        "components": {
            "schemas": defs,
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } }
        }
    })
}

async fn openapi_json() -> axum::Json<serde_json::Value> {
    axum::Json(openapi())
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", "no such route")
}

/// The service's routes with authentication, limits and timeouts; without
/// relocations (their routes answer 404).
pub fn router(catalog: Arc<dyn Catalog>, config: &ServiceConfig) -> Router {
    build(catalog, None, config)
}

/// The service's routes, relocations run by `relocations`.
pub fn router_with(
    catalog: Arc<dyn Catalog>,
    relocations: Arc<dyn Relocations>,
    config: &ServiceConfig,
) -> Router {
    build(catalog, Some(relocations), config)
}

fn build(
    catalog: Arc<dyn Catalog>,
    relocations: Option<Arc<dyn Relocations>>,
    config: &ServiceConfig,
) -> Router {
    let state = AppState {
        catalog,
        relocations,
        token_digest: config.token.as_deref().map(digest),
        sessions: config
            .token
            .as_deref()
            .map(|t| crate::ui::Sessions::new(t, config.secure_cookies)),
        hosts: config
            .token
            .is_none()
            .then(|| Arc::new(config.hosts.clone())),
        requests: Gauge::new(config.max_requests_per_client, usize::MAX),
        streams: Gauge::new(config.max_streams_per_client, config.max_streams),
    };
    let protected = Router::new()
        .route("/version", get(version))
        .route("/sites", get(sites))
        .route("/sites/{name}", get(site))
        .route("/migrators", get(migrators))
        .route("/match", post(match_service))
        .route("/relocations", get(list_relocations).post(start_relocation))
        .route("/relocations/{id}", get(get_relocation))
        .route("/relocations/{id}/events", get(relocation_events))
        .route("/relocations/{id}/cancel", post(cancel_relocation))
        .route("/relocations/{id}/resume", post(resume_relocation))
        .route("/relocations/{id}/rollback", post(rollback_relocation))
        .route("/metrics", get(metrics))
        .route("/plan", post(plan_relocation))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_json))
        .route("/ui", get(crate::ui::to_index))
        .route("/ui/", get(crate::ui::index))
        .route("/ui/app.js", get(crate::ui::script))
        .route("/ui/app.css", get(crate::ui::style))
        .route("/ui/login", post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/session", get(ui_session))
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.timeout,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Serves `router` over plain HTTP on `listener` until `shutdown`
/// completes; the handlers see the client's address as [`ClientAddr`].
/// Over a network, use [`crate::tls::serve_tls`]: the bearer token would
/// travel in clear.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<ClientAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
