//! The `object-copy` migrator.
//!
//! Request: input `bucket` (a `bucket` artifact whose locator is a location
//! URL), params `target` (location URL; required unless `mode` is
//! `repoint`), `mode` (`copy`, the default, or `repoint`: nothing moves and
//! the output is the input bucket unchanged, for services that keep reading
//! the old bucket and only get their config adapted), and optionally
//! `concurrency` (objects in flight), `verify` (`checksums` or `reread`),
//! `retry_budget_ms` (how long one object is retried after transient
//! failures; 60 s by default) and `record_dir` (where the rollback record
//! goes; default `$TMPDIR/fluidcloud-object-copy`).
//!
//! Output: artifact `bucket` with the target URL as locator, the bytes as
//! size and the manifest digest as checksum; `measured` bytes read and
//! written. Re-running the step skips objects already verified-identical at
//! the target, so it is safe after an interruption.
//!
//! Rollback deletes only objects this step wrote (never those that were
//! already identical before it ran) and the bucket if the step created it.
//! What the step wrote is kept in a record file (JSON, per step id and
//! target); without one (the step died before writing it), S3 objects tagged
//! with the step id in their `fluidcloud-step` metadata are deleted.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error as SdkError, Estimate, ExecContext, Migrator,
    MigratorDescriptor, Result as SdkResult, StepOutput, StepRequest,
};
use serde::{Deserialize, Serialize};

use super::copy::{ObjectCopyOptions, Verify, copy_bucket, delete_objects, keys_tagged, usage};
use super::location::BucketLocation;

/// Planning assumes this throughput.
const PLAN_BYTES_PER_SECOND: f64 = 200e6;

/// The `object-copy` migrator. See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ObjectCopy;

#[derive(Debug, Clone)]
enum Mode {
    Copy(BucketLocation),
    Repoint,
}

#[derive(Debug)]
struct Parsed {
    input: Artifact,
    source: BucketLocation,
    mode: Mode,
    opts: ObjectCopyOptions,
    record_dir: PathBuf,
}

fn parse(request: &StepRequest) -> Result<Parsed, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    let input = request.inputs.get("bucket");
    let mut source = None;
    match input {
        None => problems
            .push(Diagnostic::error("needs an input named `bucket`").at_key("inputs.bucket")),
        Some(a) if a.kind != ArtifactKind::Bucket => problems.push(
            Diagnostic::error(format!("input `bucket` is a {}, not a bucket", a.kind))
                .at_key("inputs.bucket.kind"),
        ),
        Some(a) => match BucketLocation::parse(&a.locator) {
            Ok(l) => source = Some(l),
            Err(e) => {
                problems.push(Diagnostic::error(e.to_string()).at_key("inputs.bucket.locator"))
            }
        },
    }
    let p = &request.params;
    let mode = match p.get("mode").map(|v| v.as_str()) {
        None | Some(Some("copy")) => match p.get("target").and_then(|v| v.as_str()) {
            None => {
                problems.push(
                    Diagnostic::error("needs `target` (a bucket location URL) in copy mode")
                        .at_key("params.target"),
                );
                None
            }
            Some(t) => match BucketLocation::parse(t) {
                Ok(l) => Some(Mode::Copy(l)),
                Err(e) => {
                    problems.push(Diagnostic::error(e.to_string()).at_key("params.target"));
                    None
                }
            },
        },
        Some(Some("repoint")) => Some(Mode::Repoint),
        Some(other) => {
            problems.push(
                Diagnostic::error(format!(
                    "unknown mode {} (copy, repoint)",
                    other.unwrap_or("(not a string)")
                ))
                .at_key("params.mode"),
            );
            None
        }
    };
    if let (Some(Mode::Copy(t)), Some(s)) = (&mode, &source)
        && t.url() == s.url()
    {
        problems.push(
            Diagnostic::error("`target` is the source bucket itself").at_key("params.target"),
        );
    }
    let mut opts = ObjectCopyOptions {
        step_tag: Some(request.step_id.clone()),
        ..ObjectCopyOptions::default()
    };
    if let Some(c) = p.get("concurrency") {
        match c.as_u64() {
            Some(n @ 1..=1024) => opts.concurrency = usize::try_from(n).unwrap_or(1),
            _ => problems.push(
                Diagnostic::error("`concurrency` must be an integer from 1 to 1024")
                    .at_key("params.concurrency"),
            ),
        }
    }
    if let Some(b) = p.get("retry_budget_ms") {
        match b.as_u64() {
            Some(ms) => opts.retry_budget = std::time::Duration::from_millis(ms),
            None => problems.push(
                Diagnostic::error("`retry_budget_ms` must be a non-negative integer")
                    .at_key("params.retry_budget_ms"),
            ),
        }
    }
    match p.get("verify").map(|v| v.as_str()) {
        None | Some(Some("checksums")) => {}
        Some(Some("reread")) => opts.verify = Verify::Reread,
        Some(_) => problems.push(
            Diagnostic::error("`verify` must be `checksums` or `reread`").at_key("params.verify"),
        ),
    }
    let record_dir = match p.get("record_dir") {
        None => std::env::temp_dir().join("fluidcloud-object-copy"),
        Some(v) => match v.as_str() {
            Some(s) => PathBuf::from(s),
            None => {
                problems.push(
                    Diagnostic::error("`record_dir` must be a path").at_key("params.record_dir"),
                );
                PathBuf::new()
            }
        },
    };
    match (input, source, mode) {
        (Some(input), Some(source), Some(mode)) if problems.is_empty() => Ok(Parsed {
            input: input.clone(),
            source,
            mode,
            opts,
            record_dir,
        }),
        _ => Err(problems),
    }
}

/// What a step wrote at its target, for rollback.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    target: String,
    created: Vec<String>,
    created_bucket: bool,
}

fn record_path(dir: &std::path::Path, step_id: &str, target: &BucketLocation) -> PathBuf {
    let safe: String = step_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let h = blake3::hash(target.url().as_bytes()).to_hex();
    dir.join(format!("{safe}-{}.json", &h[..16]))
}

fn read_record(path: &std::path::Path) -> Option<Record> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_record(path: &std::path::Path, record: &Record) -> SdkResult<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| SdkError::io(format!("creating {}", dir.display()), e))?;
    }
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(record)
        .map_err(|e| SdkError::io("encoding the rollback record", std::io::Error::other(e)))?;
    std::fs::write(&tmp, body)
        .map_err(|e| SdkError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| SdkError::io(format!("writing {}", path.display()), e))
}

#[async_trait]
impl Migrator for ObjectCopy {
    fn describe(&self) -> MigratorDescriptor {
        MigratorDescriptor {
            name: "object-copy".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "copies a bucket (S3 or directory) object by object, verified and resumable; or repoints".into(),
            consumes: vec![ArtifactKind::Bucket],
            produces: vec![ArtifactKind::Bucket],
        }
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        parse(request).err().unwrap_or_default()
    }

    async fn plan(&self, request: &StepRequest) -> SdkResult<Estimate> {
        let parsed = parse(request).map_err(SdkError::Invalid)?;
        if matches!(parsed.mode, Mode::Repoint) {
            return Ok(Estimate::default());
        }
        let (_, bytes) = usage(&parsed.source).await?;
        Ok(Estimate {
            bytes_read: bytes,
            bytes_sent: bytes,
            bytes_written: bytes,
            seconds: bytes as f64 / PLAN_BYTES_PER_SECOND,
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let parsed = parse(request).map_err(SdkError::Invalid)?;
        let target = match parsed.mode {
            Mode::Repoint => {
                let mut out = StepOutput::default();
                out.artifacts.insert("bucket".into(), parsed.input.clone());
                return Ok(out);
            }
            Mode::Copy(t) => t,
        };
        if ctx.cancel.is_cancelled() {
            return Err(SdkError::Transient("cancelled before starting".into()));
        }
        let record_file = record_path(&parsed.record_dir, &request.step_id, &target);
        let mut record = read_record(&record_file).unwrap_or_default();
        let summary = copy_bucket(
            &parsed.source,
            &target,
            &parsed.opts,
            Arc::clone(&ctx.progress),
        )
        .await?;
        // Merge with an earlier run of this step: what it created stays
        // ours even though this run found it identical.
        record.target = target.url().to_owned();
        record.created_bucket |= summary.created_bucket;
        record.created.extend(summary.created.iter().cloned());
        record.created.sort();
        record.created.dedup();
        write_record(&record_file, &record)?;
        ctx.progress.message(&format!(
            "{} objects: {} copied ({} server-side), {} skipped, {} failed",
            summary.objects,
            summary.copied,
            summary.server_side,
            summary.skipped,
            summary.failures.len()
        ));
        if let Some(e) = summary.failure_error() {
            return Err(e.into());
        }
        let mut out = StepOutput::default();
        out.measured.bytes_read = summary.bytes_read;
        out.measured.bytes_sent = summary.bytes_written;
        out.measured.bytes_written = summary.bytes_written;
        out.artifacts.insert(
            "bucket".into(),
            Artifact {
                kind: ArtifactKind::Bucket,
                site: request
                    .params
                    .get("target_site")
                    .and_then(|v| v.as_str())
                    .unwrap_or(&parsed.input.site)
                    .to_owned(),
                locator: target.url().to_owned(),
                size: Some(summary.bytes_total),
                checksum: Some(summary.manifest),
            },
        );
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let parsed = parse(request).map_err(SdkError::Invalid)?;
        let Mode::Copy(target) = parsed.mode else {
            return Ok(());
        };
        let record_file = record_path(&parsed.record_dir, &request.step_id, &target);
        let (keys, bucket) = match read_record(&record_file) {
            Some(r) => (r.created, r.created_bucket),
            None => (keys_tagged(&target, &request.step_id).await?, false),
        };
        delete_objects(&target, &keys, bucket).await?;
        match std::fs::remove_file(&record_file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SdkError::io(
                format!("removing {}", record_file.display()),
                e,
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn request(params: serde_json::Value, locator: &str) -> StepRequest {
        let mut inputs = BTreeMap::new();
        inputs.insert(
            "bucket".into(),
            Artifact {
                kind: ArtifactKind::Bucket,
                site: "old".into(),
                locator: locator.into(),
                size: None,
                checksum: None,
            },
        );
        StepRequest {
            step_id: "copy-1".into(),
            params,
            inputs,
        }
    }

    #[test]
    fn validation_points_at_the_bad_param() {
        let m = ObjectCopy;
        let ok = request(serde_json::json!({"target": "file:///b"}), "file:///a");
        assert!(m.validate(&ok).is_empty());
        let repoint = request(serde_json::json!({"mode": "repoint"}), "file:///a");
        assert!(m.validate(&repoint).is_empty());
        for (params, key) in [
            (serde_json::json!({}), "params.target"),
            (serde_json::json!({"target": "nope://x"}), "params.target"),
            (serde_json::json!({"target": "file:///a"}), "params.target"),
            (
                serde_json::json!({"target": "file:///b", "mode": "move"}),
                "params.mode",
            ),
            (
                serde_json::json!({"target": "file:///b", "concurrency": 0}),
                "params.concurrency",
            ),
            (
                serde_json::json!({"target": "file:///b", "verify": "yes"}),
                "params.verify",
            ),
            (
                serde_json::json!({"target": "file:///b", "retry_budget_ms": -1}),
                "params.retry_budget_ms",
            ),
        ] {
            let d = m.validate(&request(params.clone(), "file:///a"));
            assert_eq!(d.len(), 1, "{params}: {d:?}");
            assert_eq!(d[0].key.as_deref(), Some(key), "{params}");
        }
        let budget = request(
            serde_json::json!({"target": "file:///b", "retry_budget_ms": 1500}),
            "file:///a",
        );
        assert_eq!(
            parse(&budget).unwrap().opts.retry_budget,
            std::time::Duration::from_millis(1500)
        );
        let d = m.validate(&request(
            serde_json::json!({"target": "file:///b"}),
            "s3://X",
        ));
        assert_eq!(d[0].key.as_deref(), Some("inputs.bucket.locator"));
    }

    #[tokio::test]
    async fn repoint_moves_nothing_and_returns_the_input() {
        let req = request(
            serde_json::json!({"mode": "repoint"}),
            "file:///nonexistent/a",
        );
        let out = ObjectCopy
            .execute(&req, &ExecContext::quiet())
            .await
            .unwrap();
        assert_eq!(out.artifacts["bucket"], req.inputs["bucket"]);
        assert_eq!(out.measured.bytes_written, 0);
    }
}
