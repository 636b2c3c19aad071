//! Relocations behind the REST service: the [`Relocations`] trait the
//! service calls, and the types its routes read and write.
//!
//! The broker sits below the conduit in the dependency order, so it cannot
//! run a relocation itself: whoever starts the service (the `fluidcloud`
//! binary) injects an implementation. The types here are the API's own
//! view of a relocation — what a client needs to follow one — and carry
//! the full report, whose shape belongs to the conduit, as an opaque
//! document.

use async_trait::async_trait;
use fluidcloud_plugins::TopologyDoc;
use fluidcloud_viaduct::ProgressEvent;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// What to do with the service's buckets.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum BucketsMode {
    /// Copy every object to the target site.
    #[default]
    Copy,
    /// Leave objects where they are; configs keep pointing at them.
    Repoint,
}

fn auto() -> String {
    "auto".to_owned()
}

/// Body of `POST /relocations`: the same choices as `fluidcloud relocate`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RelocationRequest {
    /// The site the service runs on now.
    pub from: String,
    /// The target site, or `auto` to let the broker choose per instance and
    /// bucket.
    #[serde(default = "auto")]
    pub to: String,
    /// The service (default: the only service on the source site).
    #[serde(default)]
    pub service: Option<String>,
    /// Placement constraints for `to: auto`, in the command line's syntax
    /// (`jurisdiction(*; EU)`).
    #[serde(default)]
    pub constraints: Vec<String>,
    /// What to do with the service's buckets.
    #[serde(default)]
    pub buckets: BucketsMode,
    /// Seconds one object of a bucket copy keeps being retried after
    /// transient failures (0 to 86400; default 60).
    #[serde(default)]
    pub retry_budget_secs: Option<f64>,
    /// Relocate even though an earlier relocation of the service from the
    /// site is unfinished, or succeeded and stopped its source.
    #[serde(default)]
    pub force: bool,
    /// Who asks, for fair order when relocations wait for a worker
    /// (`serve --database`): tenants take turns. Default: the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// One step of a relocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepView {
    /// Step id (`precopy:db.qcow2`, `verify`).
    pub id: String,
    /// The migrator running it.
    pub migrator: String,
    /// The site it runs on.
    pub site: String,
    /// `pending`, `running`, `succeeded`, `failed`, `retry-wait`,
    /// `skipped`, `cancelled` or `rolled-back`.
    pub state: String,
    /// Attempts over all runs.
    pub attempts: u32,
    /// Bytes written at the target.
    pub bytes_written: u64,
    /// The last error, if it failed or retried.
    pub error: Option<String>,
    /// Ids of the steps it waits for (the workflow's edges).
    #[serde(default)]
    pub depends_on: Vec<String>,
}

/// A relocation as the service shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RelocationView {
    /// Its id.
    pub id: String,
    /// The service.
    pub service: String,
    /// The source site.
    pub from: String,
    /// The target sites.
    pub targets: Vec<String>,
    /// `running`, `rolling-back`, `succeeded`, `failed`, `cancelled`,
    /// `interrupted` (the process running it stopped: resume or roll
    /// back), `rolled-back` or `rollback-failed`.
    pub status: String,
    /// Bytes the plan said it would move.
    pub bytes_to_move: u64,
    /// Bytes written so far, all steps.
    pub bytes_written: u64,
    /// Steps in workflow order.
    pub steps: Vec<StepView>,
    /// The full report (times, checksums, endpoint map, config diffs,
    /// downtime) once no run is going on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
}

impl RelocationView {
    /// Whether a run (relocation or rollback) is going on, or waits for a
    /// worker (`queued`).
    pub fn is_active(&self) -> bool {
        matches!(self.status.as_str(), "queued" | "running" | "rolling-back")
    }
}

/// What `GET /relocations/{id}/events` streams from.
#[derive(Debug)]
pub struct Watch {
    /// The state now (sent first, so a late client starts complete).
    pub current: RelocationView,
    /// Events of the run going on; `None` when none is.
    pub events: Option<broadcast::Receiver<ProgressEvent>>,
}

/// Why a relocation operation failed, as the API answers it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RunnerError {
    /// No relocation with this id.
    #[error("{0}")]
    NotFound(String),
    /// The request names something that does not exist or is malformed;
    /// `pointer` is the JSON pointer of the offending field.
    #[error("{detail}")]
    Invalid {
        /// JSON pointer into the request body.
        pointer: String,
        /// What is wrong.
        detail: String,
    },
    /// The operation does not fit the relocation's state (rolling back a
    /// running one), or no placement satisfies the constraints.
    #[error("{0}")]
    Conflict(String),
    /// Anything else (a site failing, the state directory unwritable).
    #[error("{0}")]
    Failed(String),
}

/// Runs relocations for the service. Implemented where the site drivers
/// are (the `fluidcloud` binary).
#[async_trait]
pub trait Relocations: Send + Sync + 'static {
    /// Plans a relocation, records it, and starts running it in the
    /// background; returns its state as planned.
    async fn start(&self, request: RelocationRequest) -> Result<RelocationView, RunnerError>;
    /// Every relocation, oldest first (without reports).
    async fn list(&self) -> Result<Vec<RelocationView>, RunnerError>;
    /// One relocation.
    async fn get(&self, id: &str) -> Result<RelocationView, RunnerError>;
    /// The state now and the events of the run going on, if any.
    async fn watch(&self, id: &str) -> Result<Watch, RunnerError>;
    /// Asks the run going on to stop; steps end as cancelled.
    async fn cancel(&self, id: &str) -> Result<RelocationView, RunnerError>;
    /// Starts undoing a relocation that is not running, in the background;
    /// a succeeded one only with `force` (its target has run since).
    async fn rollback(&self, id: &str, force: bool) -> Result<RelocationView, RunnerError>;
    /// Continues an interrupted, cancelled or failed relocation in the
    /// background.
    async fn resume(&self, id: &str) -> Result<RelocationView, RunnerError>;
    /// The service's figures in Prometheus text format, for `GET /metrics`;
    /// `None` when it keeps none.
    async fn metrics(&self) -> Result<Option<String>, RunnerError> {
        Ok(None)
    }
    /// What [`Self::start`] would run for `request`, planned and estimated
    /// but neither run nor recorded: `{"relocation": …, "plan": …}` as
    /// `fluidcloud plan --json` prints it.
    async fn plan(&self, request: RelocationRequest) -> Result<serde_json::Value, RunnerError> {
        let _ = request;
        Err(RunnerError::NotFound(
            "this service does not plan relocations".into(),
        ))
    }
    /// The topology of `service` on `site`, for `POST /match` by name.
    async fn introspect(&self, site: &str, service: &str) -> Result<TopologyDoc, RunnerError>;
}
