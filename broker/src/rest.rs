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
//! | POST | `/match` | topology + request → placement with explanations |
//!
//! Every other route needs `Authorization: Bearer TOKEN`; tokens are
//! compared in constant time (SHA-256 digests compared with `subtle`).
//! Bodies are limited in size, requests in time, and every error is an
//! `application/problem+json` document (RFC 9457) whose `errors` name the
//! offending field by JSON pointer.
//!
//! The service holds no site drivers: the catalog is injected through the
//! [`Catalog`] trait, so the broker never depends on the conduit.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fluidcloud_plugins::{MigratorDescriptor, SiteInfo, Topology, TopologyDoc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::placement::{self, Request as MatchOptions};

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
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            token: None,
            body_limit: 4 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
struct AppState {
    catalog: Arc<dyn Catalog>,
    token_digest: Option<[u8; 32]>,
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
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    fn with_errors(mut self, errors: Vec<FieldError>) -> Self {
        self.errors = errors;
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
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
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if bool::from(digest(t).ct_eq(&expected)) => next.run(req).await,
        Some(_) => Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not valid",
        )
        .into_response(),
        None => Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer TOKEN`",
        )
        .into_response(),
    }
}

/// Body of `POST /match`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchBody {
    /// The service's topology, as `fluidcloud introspect --format json` prints it.
    pub topology: TopologyDoc,
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
    let topology = Topology::from_doc(body.topology).map_err(|e| {
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
    let defs = generator.take_definitions(true);

    let json_ok = |s: &serde_json::Value| json!({ "description": "OK", "content": { "application/json": { "schema": s } } });
    let problem_of = |what: &str| json!({ "description": what, "content": { "application/problem+json": { "schema": problem } } });
    let errors = |codes: &[(&str, &str)]| {
        let mut m = serde_json::Map::new();
        for (code, what) in codes {
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
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fluidcloud broker",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Matches services to sites: catalog, migrators and explained placement."
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
            } }
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

/// The service's routes with authentication, limits and timeouts.
pub fn router(catalog: Arc<dyn Catalog>, config: &ServiceConfig) -> Router {
    let state = AppState {
        catalog,
        token_digest: config.token.as_deref().map(digest),
    };
    let protected = Router::new()
        .route("/version", get(version))
        .route("/sites", get(sites))
        .route("/sites/{name}", get(site))
        .route("/migrators", get(migrators))
        .route("/match", post(match_service))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .route("/openapi.json", get(openapi_json))
        .merge(protected)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(config.body_limit))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.timeout,
        ))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes.
///
/// # Errors
/// When the listener fails.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
