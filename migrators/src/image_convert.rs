//! The `image-convert` migrator: converts a disk image artifact into
//! another format with [`crate::image::convert`].
//!
//! Request: input `image` (a `disk-image` artifact whose locator is a
//! path; raw, qcow2, VMDK, VHD or VHDX), params `format` (`raw`, `qcow2`,
//! `vhd`, `vhdx`, `vmdk`), `output` (path),
//! and optionally `cluster_size`, `compression` (`zlib`/`zstd`, qcow2),
//! `subformat` (VMDK: `streamOptimized`, the default, or
//! `monolithicSparse`; VHD: `fixed`, the default, or `dynamic`) and
//! `azure` (fixed VHD rounded up to a whole MiB), and `backing`
//! (`{root, allow_dirs}`: where the input's backing files and extents may
//! be; default: the input's own directory).
//!
//! The input is read in the format its artifact declares, never in one its
//! bytes suggest: a raw disk whose guest wrote a qcow2 header stays raw.
//!
//! `relocation` (the relocation id) makes the output's owner record
//! `RELOCATION/STEP` (`.OUTPUT.fcowner`, see [`crate::owner`]): an existing
//! output is returned only when this step made it, never adopted, and a
//! rollback deletes only what this step made.
//!
//! `replaces` (a step id of the same relocation; needs `relocation`) lets
//! the step replace that step's output: the warm path converts a disk while
//! its guest runs, then again once it stopped. `verify` (bool) compares the
//! output with the input, guest byte for guest byte, before it is renamed
//! into place.
//!
//! Idempotent by construction: the image is written to
//! `OUTPUT.partial-STEP_ID` and renamed to `OUTPUT` only when complete and
//! synced, so a re-run after a crash finds either nothing, a stale partial
//! file (replaced), or the finished output (returned as is).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error as SdkError, Estimate, ExecContext, ImageFormat,
    Migrator, MigratorDescriptor, Result as SdkResult, StepOutput, StepRequest,
};

use crate::image::qcow2::{Compression, Qcow2Options};
use crate::image::vmdk::VmdkSubformat;
use crate::image::{
    BackingPolicy, ConvertOptions, OpenOptions, VhdSubformat, data_bytes, open_with,
};

/// Formats the migrator reads.
const READS: [ImageFormat; 5] = [
    ImageFormat::Raw,
    ImageFormat::Qcow2,
    ImageFormat::Vmdk,
    ImageFormat::Vhd,
    ImageFormat::Vhdx,
];
/// Formats it writes (VMDK streamOptimized or monolithicSparse, VHD fixed
/// or dynamic, VHDX dynamic).
const WRITES: [ImageFormat; 5] = [
    ImageFormat::Raw,
    ImageFormat::Qcow2,
    ImageFormat::Vmdk,
    ImageFormat::Vhd,
    ImageFormat::Vhdx,
];
/// Planning assumes this conversion speed.
const PLAN_BYTES_PER_SECOND: f64 = 400e6;

/// The `image-convert` migrator. See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ImageConvert;

/// A validated request.
#[derive(Debug)]
struct Parsed {
    input: Artifact,
    /// The creator tag of the output: `RELOCATION/STEP` (the `relocation`
    /// param), or the step id.
    owner: String,
    /// The creator tag of an output this step may replace (`replaces`).
    replaces: Option<String>,
    /// Compare the output with the input before it is renamed into place.
    verify: bool,
    /// How the input is opened: in the format its artifact declares (never
    /// probed), its backing chain confined by the `backing` param.
    source: OpenOptions,
    output: PathBuf,
    opts: ConvertOptions,
}

impl Parsed {
    fn open_source(&self) -> crate::Result<Box<dyn crate::image::ImageReader>> {
        open_with(Path::new(&self.input.locator), &self.source)
    }
}

fn parse(request: &StepRequest) -> Result<Parsed, Vec<Diagnostic>> {
    let mut problems = Vec::new();
    let input = request.inputs.get("image");
    match input {
        None => {
            problems.push(Diagnostic::error("needs an input named `image`").at_key("inputs.image"))
        }
        Some(a) if !matches!(a.kind, ArtifactKind::DiskImage { format } if READS.contains(&format)) =>
        {
            problems.push(
                Diagnostic::error(format!(
                    "input `image` is a {}, not a readable disk image",
                    a.kind
                ))
                .at_key("inputs.image.kind"),
            );
        }
        Some(_) => {}
    }
    let p = &request.params;
    let format = match p.get("format").and_then(|v| v.as_str()) {
        None => {
            problems.push(Diagnostic::error("needs `format`").at_key("params.format"));
            None
        }
        Some(f) => match f.parse::<ImageFormat>() {
            Ok(f) if WRITES.contains(&f) => Some(f),
            Ok(f) => {
                problems.push(
                    Diagnostic::error(format!("writing {f} is not supported"))
                        .at_key("params.format"),
                );
                None
            }
            Err(e) => {
                problems.push(Diagnostic::error(e).at_key("params.format"));
                None
            }
        },
    };
    let output = p.get("output").and_then(|v| v.as_str()).map(PathBuf::from);
    if output.is_none() {
        problems.push(Diagnostic::error("needs `output` (a path)").at_key("params.output"));
    }
    let mut qcow2 = Qcow2Options::default();
    if let Some(cs) = p.get("cluster_size") {
        match cs.as_u64().and_then(|c| u32::try_from(c).ok()) {
            Some(c) if c.is_power_of_two() && (512..=2 << 20).contains(&c) => {
                qcow2.cluster_size = c
            }
            _ => problems.push(
                Diagnostic::error("`cluster_size` must be a power of two from 512 to 2097152")
                    .at_key("params.cluster_size"),
            ),
        }
    }
    match p.get("compression").and_then(|v| v.as_str()) {
        None => {}
        Some("zlib") => qcow2.compression = Some(Compression::Zlib),
        Some("zstd") => qcow2.compression = Some(Compression::Zstd),
        Some(other) => problems.push(
            Diagnostic::error(format!("unknown compression `{other}` (zlib, zstd)"))
                .at_key("params.compression"),
        ),
    }
    let azure = p
        .get("azure")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    let mut vmdk_subformat = VmdkSubformat::default();
    let mut vhd_subformat = VhdSubformat::default();
    if let Some(sub) = p.get("subformat") {
        match (format, sub.as_str()) {
            (Some(ImageFormat::Vmdk), Some("streamOptimized")) => {}
            (Some(ImageFormat::Vmdk), Some("monolithicSparse")) => {
                vmdk_subformat = VmdkSubformat::MonolithicSparse;
            }
            (Some(ImageFormat::Vhd), Some("fixed")) => {}
            (Some(ImageFormat::Vhd), Some("dynamic")) if azure => problems.push(
                Diagnostic::error(
                    "Azure imports fixed VHDs only: leave out `azure` or `subformat`",
                )
                .at_key("params.subformat"),
            ),
            (Some(ImageFormat::Vhd), Some("dynamic")) => vhd_subformat = VhdSubformat::Dynamic,
            (Some(ImageFormat::Vmdk | ImageFormat::Vhd), _) => problems.push(
                Diagnostic::error(
                    "`subformat` is `streamOptimized` or `monolithicSparse` for vmdk, \
                     `fixed` or `dynamic` for vhd",
                )
                .at_key("params.subformat"),
            ),
            _ => problems.push(
                Diagnostic::error("`subformat` applies to vmdk and vhd output only")
                    .at_key("params.subformat"),
            ),
        }
    }
    let backing = match p.get("backing") {
        None => BackingPolicy::default(),
        Some(v) => match serde_json::from_value(v.clone()) {
            Ok(b) => b,
            Err(e) => {
                problems.push(
                    Diagnostic::error(format!("`backing` is {{root, allow_dirs}}: {e}"))
                        .at_key("params.backing"),
                );
                BackingPolicy::default()
            }
        },
    };
    let owner = match p.get("relocation").map(|v| v.as_str()) {
        None => request.step_id.clone(),
        Some(Some(r)) if !r.is_empty() && !r.contains('/') => format!("{r}/{}", request.step_id),
        Some(_) => {
            problems.push(
                Diagnostic::error("`relocation` must be a relocation id (no `/`)")
                    .at_key("params.relocation"),
            );
            String::new()
        }
    };
    let relocation = p.get("relocation").and_then(|v| v.as_str());
    let replaces = match (p.get("replaces"), relocation) {
        (None, _) => None,
        (Some(serde_json::Value::String(step)), Some(r)) if !step.is_empty() => {
            Some(format!("{r}/{step}"))
        }
        (Some(_), _) => {
            problems.push(
                Diagnostic::error(
                    "`replaces` is a step id of the same relocation (needs `relocation`)",
                )
                .at_key("params.replaces"),
            );
            None
        }
    };
    let verify = match p.get("verify") {
        None => false,
        Some(v) => v.as_bool().unwrap_or_else(|| {
            problems.push(Diagnostic::error("`verify` is true or false").at_key("params.verify"));
            false
        }),
    };
    match (input, format, output) {
        (Some(input), Some(format), Some(output)) if problems.is_empty() => Ok(Parsed {
            input: input.clone(),
            owner,
            replaces,
            verify,
            source: OpenOptions {
                format: match input.kind {
                    ArtifactKind::DiskImage { format } => Some(format),
                    _ => None,
                },
                snapshot: None,
                backing,
            },
            output,
            opts: ConvertOptions {
                format,
                azure,
                vmdk_subformat,
                vhd_subformat,
                qcow2,
                threads: 0,
                overwrite: true,
                sync: true,
            },
        }),
        _ => Err(problems),
    }
}

/// What is at the output path before a run.
enum Existing {
    /// Nothing.
    None,
    /// This step's finished output, of this size.
    Done(u64),
    /// The output of the step named by `replaces`.
    Replaceable,
}

impl Parsed {
    fn existing_output(&self) -> SdkResult<Existing> {
        if !self.output.exists() {
            return Ok(Existing::None);
        }
        let tag = crate::owner::read(&self.output)?;
        if tag.as_deref() == Some(self.owner.as_str()) {
            let size = std::fs::metadata(&self.output)
                .map_err(|e| SdkError::io(format!("stat {}", self.output.display()), e))?
                .len();
            return Ok(Existing::Done(size));
        }
        if tag.is_some() && tag == self.replaces {
            return Ok(Existing::Replaceable);
        }
        // Anything else is not ours to replace.
        Err(SdkError::Precondition(format!(
            "{} exists, {}; it is not overwritten",
            self.output.display(),
            crate::owner::describe(tag.as_deref())
        )))
    }

    /// Compares the converted `partial` with the source; a difference
    /// removes `partial` and names the first differing offset.
    fn verify_output(
        &self,
        source: &dyn crate::image::ImageReader,
        partial: &Path,
    ) -> SdkResult<()> {
        let written = open_with(
            partial,
            &OpenOptions {
                format: Some(self.opts.format),
                ..OpenOptions::default()
            },
        )?;
        match crate::image::compare(source, written.as_ref(), 0, &|_, _| {})? {
            None => Ok(()),
            Some(offset) => {
                let _ = std::fs::remove_file(partial);
                Err(crate::Error::Corrupt {
                    what: format!(
                        "{} (differs from its source {} after conversion)",
                        partial.display(),
                        self.input.locator
                    ),
                    offset,
                }
                .into())
            }
        }
    }
}

fn partial_path(output: &Path, step_id: &str) -> PathBuf {
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
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".partial-{safe}"));
    output.with_file_name(name)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> SdkResult<T> + Send + 'static,
) -> SdkResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SdkError::Transient(format!("conversion task failed: {e}")))?
}

#[async_trait]
impl Migrator for ImageConvert {
    fn describe(&self) -> MigratorDescriptor {
        MigratorDescriptor {
            name: "image-convert".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "converts a disk image between raw, qcow2, VMDK and VHD".into(),
            consumes: READS
                .iter()
                .map(|&format| ArtifactKind::DiskImage { format })
                .collect(),
            produces: WRITES
                .iter()
                .map(|&format| ArtifactKind::DiskImage { format })
                .collect(),
        }
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        parse(request).err().unwrap_or_default()
    }

    async fn plan(&self, request: &StepRequest) -> SdkResult<Estimate> {
        let parsed = parse(request).map_err(SdkError::Invalid)?;
        let data = blocking(move || Ok(data_bytes(parsed.open_source()?.as_ref())?)).await?;
        Ok(Estimate {
            bytes_read: data,
            bytes_sent: 0,
            bytes_written: data,
            seconds: data as f64 / PLAN_BYTES_PER_SECOND,
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let parsed = parse(request).map_err(SdkError::Invalid)?;
        let partial = partial_path(&parsed.output, &request.step_id);
        let progress = Arc::clone(&ctx.progress);
        let cancel = ctx.cancel.clone();
        let format = parsed.opts.format;
        let output = parsed.output.clone();
        let (summary, file_size) = blocking(move || {
            let reader = parsed.open_source()?;
            let replacing = match parsed.existing_output()? {
                Existing::None => false,
                Existing::Replaceable => true,
                Existing::Done(size) => return Ok((None, size)),
            };
            if cancel.is_cancelled() {
                return Err(SdkError::Transient("cancelled before starting".into()));
            }
            let summary =
                crate::image::convert(reader.as_ref(), &partial, &parsed.opts, &|done, total| {
                    progress.progress(done, Some(total))
                })?;
            if parsed.verify {
                parsed.verify_output(reader.as_ref(), &partial)?;
            }
            // A new output is claimed before it appears under its name; a
            // replaced one keeps the replaced step's tag until the new
            // bytes are in place, so a crash in between converts again.
            if !replacing {
                crate::owner::write(&parsed.output, &parsed.owner)?;
            }
            std::fs::rename(&partial, &parsed.output).map_err(|e| {
                SdkError::io(format!("renaming {} into place", partial.display()), e)
            })?;
            if replacing {
                crate::owner::write(&parsed.output, &parsed.owner)?;
            }
            let size = summary.file_size;
            Ok((Some(summary), size))
        })
        .await?;
        let mut out = StepOutput::default();
        if let Some(s) = &summary {
            out.measured.bytes_read = s.bytes_read;
            out.measured.bytes_written = s.bytes_written;
        }
        out.artifacts.insert(
            "image".into(),
            Artifact {
                kind: ArtifactKind::DiskImage { format },
                site: request
                    .inputs
                    .get("image")
                    .map(|a| a.site.clone())
                    .unwrap_or_default(),
                locator: output.display().to_string(),
                size: Some(file_size),
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
    ) -> SdkResult<()> {
        let parsed = parse(request).map_err(SdkError::Invalid)?;
        let mut doomed = vec![partial_path(&parsed.output, &request.step_id)];
        // The output only when this step created it.
        if crate::owner::read(&parsed.output)?.as_deref() == Some(parsed.owner.as_str()) {
            doomed.push(parsed.output.clone());
        }
        for path in doomed {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SdkError::io(format!("removing {}", path.display()), e)),
            }
        }
        if !parsed.output.exists() {
            crate::owner::remove(&parsed.output)?;
        }
        Ok(())
    }
}
