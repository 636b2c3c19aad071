//! The `config-adapt` migrator: adapts one configuration file to the new
//! site with [`adapt`](super::adapt).
//!
//! Request:
//!
//! - input `config`: a `config-file` artifact whose locator is the absolute
//!   path of the source file;
//! - params `output`: absolute path to write; may equal the source path to
//!   adapt in place at cut-over;
//! - params `map`: the endpoint map (JSON, see [`EndpointMap`]), or instead
//!   an input `map`: an `endpoint-map` artifact whose locator is the path
//!   of a JSON file holding it;
//! - optional params `rules` (array of [`Rule`]s; each must name this
//!   step's source file), `format` (`yaml`, `json`, `toml`, `ini`, `env`,
//!   `text`; detected otherwise), `dry_run` (bool: report the diff, write
//!   nothing), `site` (site of the output artifact; the input's otherwise).
//!
//! Output: artifact `config` (`config-file`, locator = `output`, size and
//! `sha256:` checksum of the new content). The unified diff goes to the
//! progress sink as a message (the step output has no place for text);
//! callers that want it as data call [`unified_diff`](super::unified_diff).
//!
//! Idempotent: the new content is computed from the original every time —
//! for an in-place edit the original is kept as `OUTPUT.fluidcloud-orig`
//! before the first write and read from there on re-runs — and an output
//! that already holds the new content is not written again.
//!
//! Rollback restores `OUTPUT.fluidcloud-orig` over the output when it
//! exists (an in-place edit, or an output that held other content before),
//! and otherwise removes an output this step created. It never touches the
//! source of a copy.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, CancelFlag, Diagnostic, Error as SdkError, Estimate, ExecContext,
    Migrator, MigratorDescriptor, ProgressSink, Result as SdkResult, StepOutput, StepRequest,
};

use super::{EndpointMap, Format, Rule, adapt, checksum, unified_diff, write_atomic_mode};

/// The `config-adapt` migrator. See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConfigAdapt;

/// Where the endpoint map comes from.
#[derive(Debug, Clone)]
enum MapSource {
    Inline(EndpointMap),
    File(PathBuf),
}

/// A validated request.
#[derive(Debug, Clone)]
struct Parsed {
    source: PathBuf,
    output: PathBuf,
    map: MapSource,
    rules: Vec<Rule>,
    format: Option<Format>,
    dry_run: bool,
    site: String,
    /// Rollback removes the directories left empty between the output and
    /// this one (which stays).
    prune_up_to: Option<PathBuf>,
}

fn parse(request: &StepRequest) -> Result<Parsed, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    let source = match request.inputs.get("config") {
        None => {
            problems
                .push(Diagnostic::error("needs an input named `config`").at_key("inputs.config"));
            None
        }
        Some(a) if a.kind != ArtifactKind::ConfigFile => {
            problems.push(
                Diagnostic::error(format!("input `config` is a {}, not a config-file", a.kind))
                    .at_key("inputs.config.kind"),
            );
            None
        }
        Some(a) if !Path::new(&a.locator).is_absolute() => {
            problems.push(
                Diagnostic::error(format!("`{}` is not an absolute path", a.locator))
                    .at_key("inputs.config.locator"),
            );
            None
        }
        Some(a) => Some(a),
    };
    let p = &request.params;
    let output = match p.get("output").and_then(|v| v.as_str()) {
        Some(o) if Path::new(o).is_absolute() => Some(PathBuf::from(o)),
        Some(o) => {
            problems.push(
                Diagnostic::error(format!("`{o}` is not an absolute path")).at_key("params.output"),
            );
            None
        }
        None => {
            problems.push(
                Diagnostic::error("needs `output` (an absolute path)").at_key("params.output"),
            );
            None
        }
    };
    let map = match (p.get("map"), request.inputs.get("map")) {
        (Some(_), Some(_)) => {
            problems.push(
                Diagnostic::error(
                    "give the endpoint map as `params.map` or `inputs.map`, not both",
                )
                .at_key("params.map"),
            );
            None
        }
        (Some(v), None) => match EndpointMap::from_json(v) {
            Ok(m) => Some(MapSource::Inline(m)),
            Err(e) => {
                problems.push(Diagnostic::error(e.to_string()).at_key("params.map"));
                None
            }
        },
        (None, Some(a)) if a.kind == ArtifactKind::EndpointMap => {
            Some(MapSource::File(PathBuf::from(&a.locator)))
        }
        (None, Some(a)) => {
            problems.push(
                Diagnostic::error(format!("input `map` is a {}, not an endpoint-map", a.kind))
                    .at_key("inputs.map.kind"),
            );
            None
        }
        (None, None) => {
            problems.push(
                Diagnostic::error("needs the endpoint map: `params.map` or an input `map`")
                    .at_key("params.map"),
            );
            None
        }
    };
    let mut rules = Vec::new();
    match p.get("rules") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(list)) => {
            for (i, r) in list.iter().enumerate() {
                match serde_json::from_value::<Rule>(r.clone()) {
                    Ok(rule) => {
                        if let Some(src) = source
                            && !rule.applies_to(&src.locator)
                        {
                            problems.push(
                                Diagnostic::error(format!(
                                    "rule names `{}`, but this step adapts `{}`",
                                    rule.file, src.locator
                                ))
                                .at_key(format!("params.rules[{i}].file")),
                            );
                        }
                        rules.push(rule);
                    }
                    Err(e) => problems.push(
                        Diagnostic::error(e.to_string()).at_key(format!("params.rules[{i}]")),
                    ),
                }
            }
        }
        Some(_) => {
            problems.push(Diagnostic::error("`rules` must be an array").at_key("params.rules"))
        }
    }
    let format = match p.get("format") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match v.as_str().map(str::parse::<Format>) {
            Some(Ok(f)) => Some(f),
            Some(Err(e)) => {
                problems.push(Diagnostic::error(e).at_key("params.format"));
                None
            }
            None => {
                problems
                    .push(Diagnostic::error("`format` must be a string").at_key("params.format"));
                None
            }
        },
    };
    let dry_run = match p.get("dry_run") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => {
            problems.push(
                Diagnostic::error("`dry_run` must be true or false").at_key("params.dry_run"),
            );
            false
        }
    };
    let site = match p.get("site").map(|v| v.as_str()) {
        Some(Some(s)) => Some(s.to_owned()),
        Some(None) => {
            problems.push(Diagnostic::error("`site` must be a string").at_key("params.site"));
            None
        }
        None => source.map(|a| a.site.clone()),
    };
    let prune_up_to = match p.get("prune_up_to") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => match (v.as_str().map(PathBuf::from), &output) {
            (Some(dir), Some(out)) if dir.is_absolute() && out.starts_with(&dir) => Some(dir),
            (Some(dir), Some(out)) => {
                problems.push(
                    Diagnostic::error(format!(
                        "`{}` is not an absolute directory above the output {}",
                        dir.display(),
                        out.display()
                    ))
                    .at_key("params.prune_up_to"),
                );
                None
            }
            (Some(_), None) => None,
            (None, _) => {
                problems.push(
                    Diagnostic::error("`prune_up_to` must be a string")
                        .at_key("params.prune_up_to"),
                );
                None
            }
        },
    };
    match (source, output, map, site) {
        (Some(src), Some(output), Some(map), Some(site)) if problems.is_empty() => Ok(Parsed {
            source: PathBuf::from(&src.locator),
            output,
            map,
            rules,
            format,
            dry_run,
            site,
            prune_up_to,
        }),
        _ => Err(problems),
    }
}

/// Where the original of an in-place (or overwriting) edit is kept.
fn backup_path(output: &Path) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(".fluidcloud-orig");
    output.with_file_name(name)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn read_text(path: &Path) -> SdkResult<String> {
    let bytes =
        std::fs::read(path).map_err(|e| SdkError::io(format!("reading {}", path.display()), e))?;
    String::from_utf8(bytes).map_err(|e| {
        SdkError::Invalid(vec![
            Diagnostic::error(format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ))
            .in_file(path),
        ])
    })
}

fn read_optional(path: &Path) -> SdkResult<Option<String>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SdkError::io(format!("reading {}", path.display()), e)),
    }
}

fn mode_of(path: &Path) -> SdkResult<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .map_err(|e| SdkError::io(format!("stat {}", path.display()), e))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> SdkResult<T> + Send + 'static,
) -> SdkResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SdkError::Transient(format!("config adaptation task failed: {e}")))?
}

/// What one run computed and did.
struct Run {
    read: u64,
    written: u64,
    content: String,
}

fn run(p: &Parsed, progress: &dyn ProgressSink, cancel: &CancelFlag) -> SdkResult<Run> {
    let in_place = same_file(&p.source, &p.output);
    let backup = backup_path(&p.output);
    let backup_exists = backup.exists();
    // The original: for an in-place edit already done, the kept copy.
    let original = if in_place && backup_exists {
        read_text(&backup)?
    } else {
        read_text(&p.source)?
    };
    let map = match &p.map {
        MapSource::Inline(m) => m.clone(),
        MapSource::File(path) => {
            let text = read_text(path)?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                SdkError::Invalid(vec![
                    Diagnostic::error(format!("invalid JSON: {e}"))
                        .in_file(path)
                        .at_line(u32::try_from(e.line()).unwrap_or(0)),
                ])
            })?;
            EndpointMap::from_json(&v)?
        }
    };
    let name = p.source.display().to_string();
    let format = p
        .format
        .unwrap_or_else(|| Format::detect(&p.source, &original));
    let adapted = adapt(&name, &original, format, &map, &p.rules)?;
    let current = read_optional(&p.output)?;
    let before = current.as_deref().unwrap_or("");
    let diff = unified_diff(&p.output.display().to_string(), before, &adapted.content);
    let summary = if diff.is_empty() {
        format!("{} is up to date", p.output.display())
    } else if p.dry_run {
        format!(
            "dry run: would write {} ({} change(s))\n{diff}",
            p.output.display(),
            adapted.changes.len()
        )
    } else {
        format!(
            "writing {} ({} change(s))\n{diff}",
            p.output.display(),
            adapted.changes.len()
        )
    };
    progress.message(&summary);
    let read = original.len() as u64;
    if p.dry_run || current.as_deref() == Some(adapted.content.as_str()) {
        return Ok(Run {
            read,
            written: 0,
            content: adapted.content,
        });
    }
    if cancel.is_cancelled() {
        return Err(SdkError::Transient("cancelled before writing".into()));
    }
    if let Some(old) = &current
        && !backup_exists
    {
        // Keep what the output held, so rollback can put it back.
        write_atomic_mode(&backup, old.as_bytes(), mode_of(&p.output)?)?;
    }
    let mode = mode_of(&p.source)?;
    // A new site's config tree starts empty: make the file's directory.
    if let Some(dir) = p.output.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| SdkError::io(format!("creating {}", dir.display()), e))?;
    }
    write_atomic_mode(&p.output, adapted.content.as_bytes(), mode)?;
    let written = adapted.content.len() as u64;
    progress.progress(written, Some(written));
    Ok(Run {
        read,
        written,
        content: adapted.content,
    })
}

#[async_trait]
impl Migrator for ConfigAdapt {
    fn describe(&self) -> MigratorDescriptor {
        MigratorDescriptor {
            name: "config-adapt".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary:
                "rewrites a config file's endpoints (hosts, IPs, URLs, buckets) for the new site"
                    .into(),
            consumes: vec![ArtifactKind::ConfigFile, ArtifactKind::EndpointMap],
            produces: vec![ArtifactKind::ConfigFile],
        }
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        parse(request).err().unwrap_or_default()
    }

    async fn plan(&self, request: &StepRequest) -> SdkResult<Estimate> {
        let p = parse(request).map_err(SdkError::Invalid)?;
        let len = std::fs::metadata(&p.source)
            .map_err(|e| SdkError::io(format!("stat {}", p.source.display()), e))?
            .len();
        Ok(Estimate {
            bytes_read: len,
            bytes_sent: 0,
            bytes_written: if p.dry_run { 0 } else { len },
            seconds: 0.01,
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p = parse(request).map_err(SdkError::Invalid)?;
        let progress = Arc::clone(&ctx.progress);
        let cancel = ctx.cancel.clone();
        let parsed = p.clone();
        let done = blocking(move || run(&parsed, progress.as_ref(), &cancel)).await?;
        let mut out = StepOutput::default();
        out.measured.bytes_read = done.read;
        out.measured.bytes_written = done.written;
        out.artifacts.insert(
            "config".into(),
            Artifact {
                kind: ArtifactKind::ConfigFile,
                site: p.site,
                locator: p.output.display().to_string(),
                size: Some(done.content.len() as u64),
                checksum: Some(checksum(done.content.as_bytes())),
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
        let p = parse(request).map_err(SdkError::Invalid)?;
        if p.dry_run {
            return Ok(());
        }
        blocking(move || {
            let backup = backup_path(&p.output);
            if backup.exists() {
                std::fs::rename(&backup, &p.output).map_err(|e| {
                    SdkError::io(
                        format!("restoring {} from {}", p.output.display(), backup.display()),
                        e,
                    )
                })?;
                return Ok(());
            }
            if same_file(&p.source, &p.output) {
                // Never edited: nothing to undo, and the source stays.
                return Ok(());
            }
            match std::fs::remove_file(&p.output) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(SdkError::io(format!("removing {}", p.output.display()), e));
                }
            }
            if let Some(top) = &p.prune_up_to {
                // Directories execute made for the output, now empty; the
                // first one still holding something stops the walk.
                let mut dir = p.output.parent();
                while let Some(d) = dir.filter(|d| *d != top.as_path() && d.starts_with(top)) {
                    if std::fs::remove_dir(d).is_err() {
                        break;
                    }
                    dir = d.parent();
                }
            }
            Ok(())
        })
        .await
    }
}
