//! An in-process test harness for plugin authors.
//!
//! [`Harness::new`] serves a migrator on a thread of the test process and
//! connects the real host to it through OS pipes: every call goes through
//! the same JSON lines, the same `serve` loop and the same host as in
//! production, but no executable has to be built or spawned.
//!
//! ```
//! # use fluidcloud_plugins::*;
//! # use fluidcloud_plugins::harness::Harness;
//! # struct Echo;
//! # #[async_trait::async_trait]
//! # impl Migrator for Echo {
//! #     fn describe(&self) -> MigratorDescriptor { MigratorDescriptor { name: "echo".into(), version: "0.1.0".into(), summary: "s".into(), consumes: vec![], produces: vec![] } }
//! #     fn validate(&self, _: &StepRequest) -> Vec<Diagnostic> { vec![] }
//! #     async fn plan(&self, _: &StepRequest) -> Result<Estimate> { Ok(Estimate { bytes_read: 7, ..Default::default() }) }
//! #     async fn execute(&self, _: &StepRequest, c: &ExecContext) -> Result<StepOutput> { c.progress.progress(1, Some(1)); Ok(StepOutput::default()) }
//! #     async fn rollback(&self, _: &StepRequest, _: Option<&StepOutput>, _: &ExecContext) -> Result<()> { Ok(()) }
//! # }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let h = Harness::new(Echo).unwrap();
//! let req = Harness::request("s1", serde_json::json!({}));
//! assert_eq!(h.migrator().plan(&req).await.unwrap().bytes_read, 7);
//! let (out, events) = h.execute_recorded(&req).await;
//! assert!(out.is_ok());
//! assert_eq!(events, [fluidcloud_plugins::harness::Event::Progress { done: 1, total: Some(1) }]);
//! # }
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::host::{HostConfig, PluginMigrator};
use crate::migrator::{CancelFlag, ExecContext, Migrator, ProgressSink, StepOutput, StepRequest};
use crate::serve::Plugin;

/// What a running call reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A progress notification.
    Progress {
        /// Done so far.
        done: u64,
        /// The total, when known.
        total: Option<u64>,
    },
    /// A message notification.
    Message(String),
}

/// A [`ProgressSink`] that records what it receives.
#[derive(Debug, Default, Clone)]
pub struct Recorder(Arc<Mutex<Vec<Event>>>);

impl Recorder {
    /// What was recorded so far.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn push(&self, e: Event) {
        if let Ok(mut v) = self.0.lock() {
            v.push(e);
        }
    }
}

impl ProgressSink for Recorder {
    fn progress(&self, done: u64, total: Option<u64>) {
        self.push(Event::Progress { done, total });
    }

    fn message(&self, text: &str) {
        self.push(Event::Message(text.to_owned()));
    }
}

/// A migrator served in-process behind the real protocol.
#[derive(Debug)]
pub struct Harness {
    migrator: PluginMigrator,
}

impl Harness {
    /// Serves `migrator` with the default host configuration.
    ///
    /// # Errors
    /// When the handshake fails (which would be a bug in the SDK).
    pub fn new(migrator: impl Migrator + 'static) -> Result<Self> {
        Self::with_plugin(Plugin::new(migrator), HostConfig::default())
    }

    /// Serves `plugin` (e.g. with declared secrets) with `config` (e.g.
    /// with secret values, or short timeouts).
    ///
    /// # Errors
    /// When the handshake fails.
    pub fn with_plugin(plugin: Plugin, config: HostConfig) -> Result<Self> {
        Ok(Self {
            migrator: PluginMigrator::in_process(plugin, config)?,
        })
    }

    /// The host side: call it as any [`Migrator`].
    pub fn migrator(&self) -> &PluginMigrator {
        &self.migrator
    }

    /// A request with `step_id`, `params` and no inputs.
    pub fn request(step_id: &str, params: serde_json::Value) -> StepRequest {
        StepRequest {
            step_id: step_id.into(),
            params,
            inputs: BTreeMap::new(),
        }
    }

    /// Executes `request`, recording progress and messages.
    pub async fn execute_recorded(
        &self,
        request: &StepRequest,
    ) -> (Result<StepOutput>, Vec<Event>) {
        self.execute_cancellable(request, &CancelFlag::new()).await
    }

    /// Executes `request` with a cancel flag the test controls.
    pub async fn execute_cancellable(
        &self,
        request: &StepRequest,
        cancel: &CancelFlag,
    ) -> (Result<StepOutput>, Vec<Event>) {
        let rec = Recorder::default();
        let ctx = ExecContext {
            progress: Arc::new(rec.clone()),
            cancel: cancel.clone(),
        };
        let out = self.migrator.execute(request, &ctx).await;
        (out, rec.events())
    }
}
