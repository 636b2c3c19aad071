//! Two small, real migrators for tests, benchmarks and demonstrations of
//! the engine: [`Noop`] (does nothing, configurably slowly or failing) and
//! [`ChunkCopy`] (copies local files in chunks, resumably).
//!
//! They implement the real [`Migrator`] trait; the engine treats them like
//! any other migrator.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error, Estimate, ExecContext, ImageFormat, Migrator,
    MigratorDescriptor, Result, StepOutput, StepRequest,
};

use crate::workflow::Registry;

fn all_kinds() -> Vec<ArtifactKind> {
    let mut kinds = vec![
        ArtifactKind::Volume,
        ArtifactKind::Bucket,
        ArtifactKind::ConfigFile,
        ArtifactKind::Instance,
    ];
    kinds.extend(ImageFormat::ALL.map(|format| ArtifactKind::DiskImage { format }));
    kinds
}

/// What [`Noop`] observed: concurrency high-water marks, attempts, rollbacks.
#[derive(Debug, Default)]
pub struct NoopLog {
    running: usize,
    running_by_site: HashMap<String, usize>,
    /// Highest number of steps running at once.
    pub max_running: usize,
    /// Highest number running at once on one site, by site.
    pub max_by_site: HashMap<String, usize>,
    /// Number of `execute` calls by step id.
    pub attempts: HashMap<String, u32>,
    /// Step ids in the order their rollback ran.
    pub rolled_back: Vec<String>,
}

/// A migrator that does nothing, for tests and the benchmark.
///
/// Parameters (all optional): `sleep_ms` (time to take, checking for
/// cancellation every few milliseconds unless `ignore_cancel` is true),
/// `fail` (number of first attempts that fail), `error` (`"transient"` or
/// `"never"`: the classification of those failures), `site` (for the
/// concurrency log), `outputs` (`{name: kind}` to produce).
#[derive(Debug, Default)]
pub struct Noop {
    log: Mutex<NoopLog>,
}

impl Noop {
    /// The registry name.
    pub const NAME: &'static str = "noop";

    /// A new one with an empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the log.
    pub fn with_log<T>(&self, f: impl FnOnce(&NoopLog) -> T) -> T {
        f(&self.log.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn log(&self) -> std::sync::MutexGuard<'_, NoopLog> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A registry holding one [`Noop`].
pub fn noop_registry() -> Registry {
    Registry::new().with(Arc::new(Noop::new()))
}

struct Gauge<'a> {
    noop: &'a Noop,
    site: String,
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        let mut log = self.noop.log();
        log.running -= 1;
        if let Some(n) = log.running_by_site.get_mut(&self.site) {
            *n -= 1;
        }
    }
}

#[async_trait]
impl Migrator for Noop {
    fn describe(&self) -> MigratorDescriptor {
        MigratorDescriptor {
            name: Self::NAME.into(),
            version: "1.0.0".into(),
            summary: "does nothing (tests and benchmarks)".into(),
            consumes: all_kinds(),
            produces: all_kinds(),
        }
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        let mut d = Vec::new();
        for key in ["sleep_ms", "fail"] {
            if let Some(v) = request.params.get(key)
                && !v.is_u64()
            {
                d.push(
                    Diagnostic::error(format!("`{key}` must be a whole number"))
                        .at_key(format!("params.{key}")),
                );
            }
        }
        d
    }

    async fn plan(&self, request: &StepRequest) -> Result<Estimate> {
        let ms = request
            .params
            .get("sleep_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let bytes = request
            .params
            .get("bytes")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        Ok(Estimate {
            bytes_written: bytes,
            seconds: ms as f64 / 1000.0,
            ..Estimate::default()
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> Result<StepOutput> {
        let p = &request.params;
        let site = p
            .get("site")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_owned();
        let attempt = {
            let mut log = self.log();
            log.running += 1;
            log.max_running = log.max_running.max(log.running);
            let n = log.running_by_site.entry(site.clone()).or_default();
            *n += 1;
            let n = *n;
            let max = log.max_by_site.entry(site.clone()).or_default();
            *max = (*max).max(n);
            let a = log.attempts.entry(request.step_id.clone()).or_default();
            *a += 1;
            *a
        };
        let _gauge = Gauge { noop: self, site };
        let ms = p
            .get("sleep_ms")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if ms > 0 {
            let ignore = p
                .get("ignore_cancel")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            let until = tokio::time::Instant::now() + Duration::from_millis(ms);
            while tokio::time::Instant::now() < until {
                if !ignore && ctx.cancel.is_cancelled() {
                    return Err(Error::Transient("cancelled at a safe point".into()));
                }
                tokio::time::sleep(
                    Duration::from_millis(2).min(until - tokio::time::Instant::now()),
                )
                .await;
            }
        } else {
            tokio::task::yield_now().await;
        }
        let fail = p
            .get("fail")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if u64::from(attempt) <= fail {
            return Err(match p.get("error").and_then(|e| e.as_str()) {
                Some("never") => Error::Precondition(format!("attempt {attempt} refused")),
                _ => Error::Transient(format!("attempt {attempt} failed")),
            });
        }
        let mut out = StepOutput::default();
        if let Some(outputs) = p.get("outputs").and_then(|o| o.as_object()) {
            for (name, kind) in outputs {
                let kind: ArtifactKind = serde_json::from_value(kind.clone())
                    .map_err(|e| Error::Precondition(format!("output `{name}`: {e}")))?;
                out.artifacts.insert(
                    name.clone(),
                    Artifact {
                        kind,
                        site: "noop".into(),
                        locator: format!("noop://{}/{name}", request.step_id),
                        size: None,
                        checksum: None,
                    },
                );
            }
        }
        ctx.progress.progress(1, Some(1));
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> Result<()> {
        self.log().rolled_back.push(request.step_id.clone());
        Ok(())
    }
}

/// Copies local files in fixed-size chunks, resumably and countably.
///
/// Inputs: any number of [`ArtifactKind::Volume`] artifacts whose locator
/// is a local path; they are concatenated in input-name order. Parameters:
/// `to` (target path), `chunk` (bytes, default 64 KiB), `delay_ms` (pause
/// after each chunk, to make runs long enough to interrupt), `log` (a file
/// that gets one line `STEP chunk N` appended per chunk written: the side
/// effects a crash test counts), `site` (site of the output artifact).
/// Output: `file`, a volume at `to`.
///
/// It is keyed by its target: data goes to `TO.part`, and after each chunk
/// the number of finished chunks is written atomically (write, rename) to
/// `TO.progress`. A re-run continues after the last finished chunk; at the
/// end `TO.part` is renamed to `TO` and the progress file says `done`, so a
/// re-run after that writes nothing. A crash between writing a chunk and
/// recording it re-applies that one chunk, never more.
#[derive(Debug, Default)]
pub struct ChunkCopy;

impl ChunkCopy {
    /// The registry name.
    pub const NAME: &'static str = "chunk-copy";
}

struct CopyParams {
    to: PathBuf,
    chunk: u64,
    delay: Duration,
    log: Option<PathBuf>,
    site: String,
}

fn copy_params(request: &StepRequest) -> std::result::Result<CopyParams, Vec<Diagnostic>> {
    let p = &request.params;
    let Some(to) = p.get("to").and_then(|t| t.as_str()) else {
        return Err(vec![
            Diagnostic::error("needs `to`, the target path").at_key("params.to"),
        ]);
    };
    let chunk = p
        .get("chunk")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(64 * 1024);
    if chunk == 0 {
        return Err(vec![
            Diagnostic::error("`chunk` must be positive").at_key("params.chunk"),
        ]);
    }
    Ok(CopyParams {
        to: to.into(),
        chunk,
        delay: Duration::from_millis(
            p.get("delay_ms")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
        ),
        log: p.get("log").and_then(|l| l.as_str()).map(PathBuf::from),
        site: p
            .get("site")
            .and_then(|s| s.as_str())
            .unwrap_or("target")
            .to_owned(),
    })
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

/// Reads `len` bytes at `offset` of the concatenation of `inputs`.
fn read_span(inputs: &[(PathBuf, u64)], mut offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    for (path, size) in inputs {
        if offset >= *size {
            offset -= size;
            continue;
        }
        let want = (len - buf.len() as u64).min(size - offset);
        let mut f = std::fs::File::open(path).map_err(io(format!("open {}", path.display())))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(io(format!("seek {}", path.display())))?;
        let start = buf.len();
        buf.resize(start + usize::try_from(want).unwrap_or(0), 0);
        f.read_exact(&mut buf[start..])
            .map_err(io(format!("read {}", path.display())))?;
        offset = 0;
        if buf.len() as u64 == len {
            break;
        }
    }
    Ok(buf)
}

#[async_trait]
impl Migrator for ChunkCopy {
    fn describe(&self) -> MigratorDescriptor {
        MigratorDescriptor {
            name: Self::NAME.into(),
            version: "1.0.0".into(),
            summary: "copies local files in resumable chunks".into(),
            consumes: vec![ArtifactKind::Volume],
            produces: vec![ArtifactKind::Volume],
        }
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        copy_params(request).err().unwrap_or_default()
    }

    async fn plan(&self, request: &StepRequest) -> Result<Estimate> {
        let mut total = 0;
        for a in request.inputs.values() {
            total += std::fs::metadata(&a.locator)
                .map_err(io(format!("stat {}", a.locator)))?
                .len();
        }
        Ok(Estimate {
            bytes_read: total,
            bytes_written: total,
            ..Estimate::default()
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> Result<StepOutput> {
        let p = copy_params(request).map_err(Error::Invalid)?;
        let mut inputs = Vec::new();
        for a in request.inputs.values() {
            let size = std::fs::metadata(&a.locator)
                .map_err(io(format!("stat {}", a.locator)))?
                .len();
            inputs.push((PathBuf::from(&a.locator), size));
        }
        let total: u64 = inputs.iter().map(|(_, s)| s).sum();
        let part = with_suffix(&p.to, ".part");
        let progress = with_suffix(&p.to, ".progress");
        let done_chunks = match std::fs::read_to_string(&progress) {
            Ok(s) if s.trim() == "done" => None,
            Ok(s) => Some(s.trim().parse::<u64>().map_err(|_| Error::Corrupt {
                what: format!("progress file {}", progress.display()),
                offset: 0,
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
            Err(e) => return Err(Error::io(format!("read {}", progress.display()), e)),
        };
        if let Some(first) = done_chunks {
            let chunks = total.div_ceil(p.chunk);
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&part)
                .map_err(io(format!("open {}", part.display())))?;
            for i in first..chunks {
                if ctx.cancel.is_cancelled() {
                    return Err(Error::Transient(format!("cancelled after chunk {i}")));
                }
                let off = i * p.chunk;
                let data = read_span(&inputs, off, p.chunk.min(total - off))?;
                out.seek(SeekFrom::Start(off))
                    .map_err(io(format!("seek {}", part.display())))?;
                out.write_all(&data)
                    .map_err(io(format!("write {}", part.display())))?;
                if let Some(log) = &p.log {
                    let mut l = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(log)
                        .map_err(io(format!("open {}", log.display())))?;
                    l.write_all(format!("{} chunk {i}\n", request.step_id).as_bytes())
                        .map_err(io(format!("append {}", log.display())))?;
                }
                write_atomically(&progress, (i + 1).to_string().as_bytes())?;
                ctx.progress.progress(off + data.len() as u64, Some(total));
                if !p.delay.is_zero() {
                    tokio::time::sleep(p.delay).await;
                }
            }
            out.set_len(total)
                .map_err(io(format!("truncate {}", part.display())))?;
            drop(out);
            std::fs::rename(&part, &p.to).map_err(io(format!("rename {}", part.display())))?;
            write_atomically(&progress, b"done")?;
        }
        let mut out = StepOutput::default();
        out.measured.bytes_read = total;
        out.measured.bytes_written = total;
        out.artifacts.insert(
            "file".into(),
            Artifact {
                kind: ArtifactKind::Volume,
                site: p.site,
                locator: p.to.display().to_string(),
                size: Some(total),
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
        let p = copy_params(request).map_err(Error::Invalid)?;
        for path in [
            with_suffix(&p.to, ".part"),
            with_suffix(&p.to, ".progress"),
            p.to,
        ] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("remove {}", path.display()), e));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = with_suffix(path, ".tmp");
    std::fs::write(&tmp, data).map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("rename {}", tmp.display())))
}

/// Counts the lines of a [`ChunkCopy`] side-effect log: `(step, chunk)` →
/// times applied.
///
/// # Errors
/// When the log cannot be read.
pub fn count_side_effects(log: &Path) -> std::io::Result<BTreeMap<(String, u64), u32>> {
    let mut counts = BTreeMap::new();
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    for line in text.lines() {
        if let Some((step, n)) = line.split_once(" chunk ")
            && let Ok(n) = n.parse()
        {
            *counts.entry((step.to_owned(), n)).or_default() += 1;
        }
    }
    Ok(counts)
}
