//! The `volume-copy` migrator: [`super::copy`] as a workflow step.
//!
//! Request: input `volume` (a `volume` artifact, or a `disk-image` one for
//! an image-backed volume; the locator is an absolute path), params
//! `output` (absolute path of the target raw file, required), and
//! optionally `chunk_size` (bytes, a power of two from 4 KiB to 64 MiB),
//! `site` (the output artifact's site; the input's by default),
//! `overwrite` (accept a pre-existing target no volume copy wrote),
//! `relocation` (the relocation id: the creator tag becomes
//! `RELOCATION/STEP`, and a target another relocation made is refused),
//! `source_format` (how the input is read, as its site declares it: raw by
//! default for a `volume`, the artifact's format for a `disk-image`; never
//! probed), `backing` (`{root, allow_dirs}`: where the input's backing
//! files may be) and `changes` (the absolute path of a [`crate::changes`]
//! file of the input: only the chunks it names are read, when the target's
//! manifest of the earlier copy is trusted; when the file does not exist,
//! the source site did not track the disk and every chunk is compared; the
//! output's fact `tracked` says which).
//!
//! Output: artifact `volume` with the target path as locator, the virtual
//! size, and `checksum = "blake3-merkle:<root>"`.
//!
//! Running the step again resumes an interrupted copy; a new step onto an
//! existing target re-syncs it (only changed chunks are written), which is
//! how pre-copy and the final delta at cut-over are expressed. A rollback
//! deletes the target and its sidecar files only when this step created the
//! target (the step id is the creator tag in the sidecars); otherwise it
//! leaves everything in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error as SdkError, Estimate, ExecContext, ImageFormat,
    Migrator, MigratorDescriptor, Result as SdkResult, StepOutput, StepRequest,
};

use super::copy::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, VolumeCopyOptions, copy};
use super::manifest::{manifest_path, sidecar};
use super::progress::progress_path;
use crate::changes::ChangeSet;
use crate::image::{data_bytes, open_with};

/// Image formats accepted as an image-backed volume.
const IMAGES: [ImageFormat; 5] = [
    ImageFormat::Raw,
    ImageFormat::Qcow2,
    ImageFormat::Vmdk,
    ImageFormat::Vhd,
    ImageFormat::Vhdx,
];
/// Planning assumes this copy speed (hashing, writing, reading back).
const PLAN_BYTES_PER_SECOND: f64 = 500e6;
/// Params the migrator knows.
const PARAMS: [&str; 8] = [
    "output",
    "changes",
    "chunk_size",
    "site",
    "overwrite",
    "source_format",
    "backing",
    "relocation",
];

/// The `volume-copy` migrator. See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct VolumeCopy;

#[derive(Debug)]
struct Parsed {
    input: Artifact,
    output: PathBuf,
    site: String,
    opts: VolumeCopyOptions,
    /// The change set file (`changes`), read when the step runs.
    changes: Option<PathBuf>,
}

fn parse(request: &StepRequest) -> Result<Parsed, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    let input = request.inputs.get("volume");
    match input {
        None => problems
            .push(Diagnostic::error("needs an input named `volume`").at_key("inputs.volume")),
        Some(a) => {
            let ok = match a.kind {
                ArtifactKind::Volume => true,
                ArtifactKind::DiskImage { format } => IMAGES.contains(&format),
                _ => false,
            };
            if !ok {
                problems.push(
                    Diagnostic::error(format!(
                        "input `volume` is a {}, not a volume or readable disk image",
                        a.kind
                    ))
                    .at_key("inputs.volume.kind"),
                );
            }
            if !Path::new(&a.locator).is_absolute() {
                problems.push(
                    Diagnostic::error(format!(
                        "input `volume` locator `{}` is not an absolute path",
                        a.locator
                    ))
                    .at_key("inputs.volume.locator"),
                );
            }
        }
    }
    let p = &request.params;
    if let Some(map) = p.as_object() {
        for key in map.keys().filter(|k| !PARAMS.contains(&k.as_str())) {
            problems.push(
                Diagnostic::error(format!(
                    "unknown parameter `{key}` (known: {})",
                    PARAMS.join(", ")
                ))
                .at_key(format!("params.{key}")),
            );
        }
    } else if !p.is_null() {
        problems.push(Diagnostic::error("`params` must be an object").at_key("params"));
    }
    let output = match p.get("output").map(|v| v.as_str()) {
        None => {
            problems.push(Diagnostic::error("needs `output` (a path)").at_key("params.output"));
            None
        }
        Some(Some(o)) if Path::new(o).is_absolute() => Some(PathBuf::from(o)),
        Some(_) => {
            problems.push(
                Diagnostic::error("`output` must be an absolute path").at_key("params.output"),
            );
            None
        }
    };
    if let (Some(out), Some(a)) = (&output, input)
        && out == Path::new(&a.locator)
    {
        problems
            .push(Diagnostic::error("`output` is the input volume itself").at_key("params.output"));
    }
    let mut opts = VolumeCopyOptions {
        owner: request.step_id.clone(),
        ..VolumeCopyOptions::default()
    };
    if let Some(cs) = p.get("chunk_size") {
        match cs.as_u64() {
            Some(c) if c.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&c) => {
                opts.chunk_size = c
            }
            _ => problems.push(
                Diagnostic::error(format!(
                    "`chunk_size` must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
                ))
                .at_key("params.chunk_size"),
            ),
        }
    }
    let site = match p.get("site") {
        None => input.map(|a| a.site.clone()),
        Some(v) => match v.as_str() {
            Some(s) if !s.is_empty() => Some(s.to_owned()),
            _ => {
                problems.push(
                    Diagnostic::error("`site` must be a non-empty string").at_key("params.site"),
                );
                None
            }
        },
    };
    match p.get("overwrite") {
        None => {}
        Some(v) => match v.as_bool() {
            Some(b) => opts.overwrite = b,
            None => problems.push(
                Diagnostic::error("`overwrite` must be a boolean").at_key("params.overwrite"),
            ),
        },
    }
    opts.source_format = match (p.get("source_format"), input.map(|a| &a.kind)) {
        (Some(v), _) => match v.as_str().map(str::parse::<ImageFormat>) {
            Some(Ok(f)) => Some(f),
            _ => {
                problems.push(
                    Diagnostic::error("`source_format` is raw, qcow2, vmdk, vhd or vhdx")
                        .at_key("params.source_format"),
                );
                None
            }
        },
        (None, Some(ArtifactKind::DiskImage { format })) => Some(*format),
        (None, _) => Some(ImageFormat::Raw),
    };
    match p.get("relocation").map(|v| v.as_str()) {
        None => {}
        Some(Some(r)) if !r.is_empty() && !r.contains('/') => {
            opts.owner = format!("{r}/{}", request.step_id);
            opts.adopt = Some(format!("{r}/"));
        }
        Some(_) => problems.push(
            Diagnostic::error("`relocation` must be a relocation id (no `/`)")
                .at_key("params.relocation"),
        ),
    }
    if let Some(v) = p.get("backing") {
        match serde_json::from_value(v.clone()) {
            Ok(b) => opts.backing = b,
            Err(e) => problems.push(
                Diagnostic::error(format!("`backing` is {{root, allow_dirs}}: {e}"))
                    .at_key("params.backing"),
            ),
        }
    }
    let changes = match p.get("changes").map(|v| v.as_str()) {
        None => None,
        Some(Some(c)) if Path::new(c).is_absolute() => Some(PathBuf::from(c)),
        Some(_) => {
            problems.push(
                Diagnostic::error("`changes` must be the absolute path of a change set")
                    .at_key("params.changes"),
            );
            None
        }
    };
    match (input, output, site) {
        (Some(input), Some(output), Some(site)) if problems.is_empty() => Ok(Parsed {
            input: input.clone(),
            output,
            site,
            opts,
            changes,
        }),
        _ => Err(problems),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> SdkResult<T> + Send + 'static,
) -> SdkResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SdkError::Transient(format!("volume copy task failed: {e}")))?
}

fn remove_if_present(path: &Path) -> SdkResult<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SdkError::io(format!("removing {}", path.display()), e)),
    }
}

#[async_trait]
impl Migrator for VolumeCopy {
    fn describe(&self) -> MigratorDescriptor {
        let mut consumes = vec![ArtifactKind::Volume];
        consumes.extend(
            IMAGES
                .iter()
                .map(|&format| ArtifactKind::DiskImage { format }),
        );
        MigratorDescriptor {
            name: "volume-copy".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "copies a block volume into a sparse raw file, chunk-hashed, resumable and incremental".into(),
            consumes,
            produces: vec![ArtifactKind::Volume],
        }
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        parse(request).err().unwrap_or_default()
    }

    async fn plan(&self, request: &StepRequest) -> SdkResult<Estimate> {
        let parsed = parse(request).map_err(SdkError::Invalid)?;
        let path = PathBuf::from(&parsed.input.locator);
        let how = parsed.opts.source_open();
        let data = blocking(move || Ok(data_bytes(open_with(&path, &how)?.as_ref())?)).await?;
        // An upper bound: a re-sync writes only the chunks that changed,
        // which is unknown until the source is hashed.
        let cross_site = parsed.site != parsed.input.site;
        Ok(Estimate {
            bytes_read: data,
            bytes_sent: if cross_site { data } else { 0 },
            bytes_written: data,
            seconds: data as f64 / PLAN_BYTES_PER_SECOND,
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let parsed = parse(request).map_err(SdkError::Invalid)?;
        let progress = Arc::clone(&ctx.progress);
        let mut opts = parsed.opts.clone();
        opts.cancel = Some(ctx.cancel.clone());
        let source = PathBuf::from(&parsed.input.locator);
        let output = parsed.output.clone();
        let changes = parsed.changes.clone();
        let summary = blocking(move || {
            if let Some(path) = &changes {
                opts.changes = ChangeSet::load_for(path, &source)?;
            }
            let s = copy(&source, &output, &opts, &|done, total| {
                progress.progress(done, Some(total))
            })?;
            progress.message(&format!(
                "volume {}: {} of {} chunks sent ({} bytes written), {} skipped, {} zero{}",
                output.display(),
                s.chunks_sent,
                s.chunks,
                s.bytes_written,
                s.chunks_skipped,
                s.chunks_zero,
                match (&opts.changes, s.tracked) {
                    (Some(c), true) => format!("; only the {} bytes the guest wrote were read", c.bytes()),
                    (Some(_), false) => "; the change set was not used (no trusted manifest of the earlier copy): every chunk compared".to_owned(),
                    (None, _) if changes.is_some() => "; no change set (the source did not track this disk): every chunk compared".to_owned(),
                    (None, _) => String::new(),
                }
            ));
            Ok(s)
        })
        .await?;
        let mut out = StepOutput::default();
        out.facts
            .insert("tracked".into(), serde_json::json!(summary.tracked));
        out.measured.bytes_read = summary.bytes_read;
        out.measured.bytes_written = summary.bytes_written;
        if parsed.site != parsed.input.site {
            out.measured.bytes_sent = summary.bytes_written;
        }
        out.artifacts.insert(
            "volume".into(),
            Artifact {
                kind: ArtifactKind::Volume,
                site: parsed.site,
                locator: parsed.output.display().to_string(),
                size: Some(summary.virtual_size),
                checksum: Some(format!("blake3-merkle:{}", summary.root)),
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
        let target = parsed.output;
        let owner = parsed.opts.owner.clone();
        blocking(move || {
            let ours = super::created_by(&target)?.is_some_and(|tag| tag == owner);
            if !ours {
                // Not created by this step: another step's (or someone's)
                // volume stays, with the sidecars that describe it.
                return Ok(());
            }
            remove_if_present(&target)?;
            remove_if_present(&progress_path(&target))?;
            remove_if_present(&sidecar(&target, ".fcmerkle.tmp"))?;
            remove_if_present(&manifest_path(&target))?;
            crate::volume::manifest::sync_parent(&target)?;
            Ok(())
        })
        .await
    }
}
