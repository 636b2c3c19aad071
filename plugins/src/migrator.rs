//! The `Migrator` trait: one task of a relocation.
//!
//! A migrator follows *validate, plan, apply*: [`Migrator::validate`] is pure
//! (no I/O) and returns diagnostics; [`Migrator::plan`] estimates the bytes
//! and time a step will take; [`Migrator::execute`] does the work, reporting
//! progress, and must be idempotent or keyed by the step id so that the
//! viaduct can re-run an interrupted step safely; [`Migrator::rollback`]
//! removes what `execute` created at the target and never touches the source.
//!
//! Steps exchange typed [`Artifact`]s: a migrator declares in its
//! [`MigratorDescriptor`] which [`ArtifactKind`]s it consumes and produces,
//! which is how the broker chains migrators (qcow2 image → raw image → ...).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::diagnostic::Diagnostic;
use crate::error::Result;
use crate::resource::ImageFormat;

/// The type of a value flowing between steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ArtifactKind {
    /// A disk image in a given format.
    DiskImage {
        /// Its container format.
        format: ImageFormat,
    },
    /// A block volume on a block store.
    Volume,
    /// A bucket on an object store.
    Bucket,
    /// A configuration file.
    ConfigFile,
    /// A defined instance on a compute site.
    Instance,
    /// The map of old endpoints to new ones.
    EndpointMap,
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DiskImage { format } => write!(f, "disk-image({format})"),
            Self::Volume => f.write_str("volume"),
            Self::Bucket => f.write_str("bucket"),
            Self::ConfigFile => f.write_str("config-file"),
            Self::Instance => f.write_str("instance"),
            Self::EndpointMap => f.write_str("endpoint-map"),
        }
    }
}

/// A concrete value produced or consumed by a step: "qcow2 image at site X,
/// path P, checksum C".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Its type.
    pub kind: ArtifactKind,
    /// The site holding it.
    pub site: String,
    /// Where on the site (path, bucket name, instance name).
    pub locator: String,
    /// Size in bytes, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Content checksum as `algorithm:hex`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// What a migrator is and what it works on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct MigratorDescriptor {
    /// Unique name, e.g. `image-convert`.
    pub name: String,
    /// Semantic version of the implementation.
    pub version: String,
    /// One line for `fluidcloud migrators list`.
    pub summary: String,
    /// Input artifact kinds.
    pub consumes: Vec<ArtifactKind>,
    /// Output artifact kinds.
    pub produces: Vec<ArtifactKind>,
}

/// One invocation of a migrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StepRequest {
    /// Stable id of the step in its workflow; use it as the idempotency key.
    pub step_id: String,
    /// Migrator-specific parameters.
    #[serde(default)]
    pub params: serde_json::Value,
    /// Named inputs.
    #[serde(default)]
    pub inputs: BTreeMap<String, Artifact>,
}

/// A migrator's estimate of a step's cost.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Estimate {
    /// Bytes read at the source.
    pub bytes_read: u64,
    /// Bytes sent over the network between sites.
    pub bytes_sent: u64,
    /// Bytes written at the target.
    pub bytes_written: u64,
    /// Expected duration in seconds.
    pub seconds: f64,
}

/// What a finished step produced.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StepOutput {
    /// Named output artifacts.
    pub artifacts: BTreeMap<String, Artifact>,
    /// Bytes actually read, sent and written.
    pub measured: Estimate,
    /// What the step observed, by name, for the report (the conduit's
    /// `source-stop` and `cutover` record when the source was seen stopped
    /// and the target seen running). Absent from older plugins' replies.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facts: BTreeMap<String, serde_json::Value>,
}

/// Receives progress of a running step.
pub trait ProgressSink: Send + Sync {
    /// `done` of `total` bytes (or items) are finished.
    fn progress(&self, done: u64, total: Option<u64>);
    /// A human-readable message about the step.
    fn message(&self, text: &str);
    /// Blocks until everything reported so far has been delivered, where
    /// delivery is asynchronous (a plugin's reports travel through a writer
    /// thread): call it before exiting the process abruptly.
    fn flush(&self) {}
}

/// A sink that drops everything; for callers that do not show progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn progress(&self, _done: u64, _total: Option<u64>) {}
    fn message(&self, _text: &str) {}
}

/// Cooperative cancellation: the engine sets it, migrators check it at safe
/// points (between chunks) and stop with their work resumable.
#[derive(Debug, Default, Clone)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// A flag that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop at the next safe point.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the engine hands a running step.
#[derive(Clone)]
pub struct ExecContext {
    /// Where progress goes.
    pub progress: Arc<dyn ProgressSink>,
    /// Set when the step should stop at a safe point.
    pub cancel: CancelFlag,
}

impl ExecContext {
    /// A context that shows no progress and is never cancelled.
    pub fn quiet() -> Self {
        Self {
            progress: Arc::new(NoProgress),
            cancel: CancelFlag::new(),
        }
    }
}

impl fmt::Debug for ExecContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecContext")
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// One task of a relocation. See the module docs for the contract.
#[async_trait]
pub trait Migrator: Send + Sync {
    /// Name, version, and the artifact kinds consumed and produced.
    fn describe(&self) -> MigratorDescriptor;

    /// Checks a request without I/O. An empty list, or only warnings, means
    /// the request may be planned and executed.
    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic>;

    /// Estimates the cost of the step, using the same calls `execute` will.
    ///
    /// # Errors
    /// When the inputs cannot be inspected.
    async fn plan(&self, request: &StepRequest) -> Result<Estimate>;

    /// Does the work. Must be safe to call again with the same request after
    /// an interruption.
    ///
    /// # Errors
    /// Any failure, classified for retry.
    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> Result<StepOutput>;

    /// Undoes what `execute` created at the target. `output` is what the step
    /// produced, or `None` when it was interrupted before finishing.
    ///
    /// # Errors
    /// When the target cannot be cleaned; the source is never touched.
    async fn rollback(
        &self,
        request: &StepRequest,
        output: Option<&StepOutput>,
        ctx: &ExecContext,
    ) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::Diagnostic;
    use crate::error::Error;

    /// A real migrator: copies one file. Exercises the trait end to end.
    struct CopyFile;

    fn paths(req: &StepRequest) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        let from = req.inputs.get("file")?.locator.clone();
        let to = req.params.get("to")?.as_str()?.to_owned();
        Some((from.into(), to.into()))
    }

    #[async_trait]
    impl Migrator for CopyFile {
        fn describe(&self) -> MigratorDescriptor {
            MigratorDescriptor {
                name: "copy-file".into(),
                version: "1.0.0".into(),
                summary: "copies a config file".into(),
                consumes: vec![ArtifactKind::ConfigFile],
                produces: vec![ArtifactKind::ConfigFile],
            }
        }

        fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
            match paths(request) {
                Some(_) => vec![],
                None => {
                    vec![Diagnostic::error("needs input `file` and param `to`").at_key("params.to")]
                }
            }
        }

        async fn plan(&self, request: &StepRequest) -> Result<Estimate> {
            let (from, _) = paths(request).ok_or_else(|| Error::Invalid(self.validate(request)))?;
            let len = std::fs::metadata(&from)
                .map_err(|e| Error::io(format!("stat {}", from.display()), e))?
                .len();
            Ok(Estimate {
                bytes_read: len,
                bytes_written: len,
                ..Estimate::default()
            })
        }

        async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> Result<StepOutput> {
            let (from, to) =
                paths(request).ok_or_else(|| Error::Invalid(self.validate(request)))?;
            let n = std::fs::copy(&from, &to).map_err(|e| Error::io("copy", e))?;
            ctx.progress.progress(n, Some(n));
            let mut out = StepOutput::default();
            out.measured.bytes_written = n;
            out.artifacts.insert(
                "file".into(),
                Artifact {
                    kind: ArtifactKind::ConfigFile,
                    site: "target".into(),
                    locator: to.display().to_string(),
                    size: Some(n),
                    checksum: None,
                },
            );
            Ok(out)
        }

        async fn rollback(
            &self,
            request: &StepRequest,
            _output: Option<&StepOutput>,
            _ctx: &ExecContext,
        ) -> Result<()> {
            if let Some((_, to)) = paths(request) {
                match std::fs::remove_file(&to) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io("remove", e));
                    }
                    _ => {}
                }
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_migrator_validates_plans_executes_and_rolls_back() {
        let dir = std::env::temp_dir().join(format!("fc-migrator-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("a.conf");
        std::fs::write(&src, b"x = 1\n").unwrap();
        let dst = dir.join("b.conf");
        let m: Box<dyn Migrator> = Box::new(CopyFile);
        let mut req = StepRequest {
            step_id: "s1".into(),
            params: serde_json::json!({}),
            inputs: BTreeMap::new(),
        };
        assert_eq!(m.validate(&req).len(), 1);
        req.params = serde_json::json!({ "to": dst.to_str().unwrap() });
        req.inputs.insert(
            "file".into(),
            Artifact {
                kind: ArtifactKind::ConfigFile,
                site: "source".into(),
                locator: src.to_str().unwrap().into(),
                size: None,
                checksum: None,
            },
        );
        assert!(m.validate(&req).is_empty());
        assert_eq!(m.plan(&req).await.unwrap().bytes_read, 6);
        let out = m.execute(&req, &ExecContext::quiet()).await.unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"x = 1\n");
        assert_eq!(out.artifacts["file"].size, Some(6));
        m.rollback(&req, Some(&out), &ExecContext::quiet())
            .await
            .unwrap();
        assert!(!dst.exists());
        assert!(src.exists(), "rollback must not touch the source");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn artifact_kinds_display_and_serialize() {
        let k = ArtifactKind::DiskImage {
            format: ImageFormat::Qcow2,
        };
        assert_eq!(k.to_string(), "disk-image(qcow2)");
        assert_eq!(
            serde_json::to_string(&k).unwrap(),
            r#"{"type":"disk-image","format":"qcow2"}"#
        );
        let flag = CancelFlag::new();
        let clone = flag.clone();
        clone.cancel();
        assert!(flag.is_cancelled());
    }
}
