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
//! `patch` (bool; needs `replaces`) is the warm path's final delta done
//! in place: when the output exists, was made by the step named in
//! `replaces` and is raw or qcow2, it is brought up to the input instead of
//! converted again. Each 1 MiB chunk that may differ (those holding data in
//! the input or the output, or, with `changes`, only those the change set
//! touches) is read from both, and where they differ the input's bytes are
//! written (qcow2 through [`Qcow2Patcher`], raw with `pwrite`). With
//! `verify` those chunks are compared again afterwards. The output is then
//! owned by this step, as with a conversion. `changes` is the path of a
//! [`ChangeSet`] file (its `virtual_size` must be the input's; when the
//! file does not exist, the source site did not track the disk and every
//! chunk holding data is compared). The fact `tracked` says whether a
//! change set chose the chunks. A qcow2
//! output the patcher refuses ([`crate::Error::Unsupported`]: a backing
//! file, snapshots...), an output of another format or size, is converted
//! again in full instead; the step says so in a progress message and in
//! the `patch` fact. The step's facts report `patch.mode` (`patch` or
//! `convert`), `bytes_compared` and `bytes_written`.
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

use crate::changes::ChangeSet;
use crate::image::qcow2::{Compression, Qcow2Options, Qcow2Patcher};
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
/// Patch mode compares and writes in chunks of this size.
const PATCH_CHUNK: u64 = 1 << 20;
/// Inside a chunk that differs, runs of this granularity that differ are
/// written.
const PATCH_BLOCK: usize = 4096;
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
    /// Compare the output with the input before it is renamed into place
    /// (after patching, in patch mode).
    verify: bool,
    /// Patch a replaceable raw or qcow2 output in place (`patch`).
    patch: bool,
    /// The change set limiting what patch mode reads (`changes`).
    changes: Option<PathBuf>,
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
    let patch = match p.get("patch") {
        None => false,
        Some(v) => v.as_bool().unwrap_or_else(|| {
            problems.push(Diagnostic::error("`patch` is true or false").at_key("params.patch"));
            false
        }),
    };
    if patch && replaces.is_none() && p.get("replaces").is_none() {
        problems.push(
            Diagnostic::error("`patch` needs `replaces` (the step whose output it patches)")
                .at_key("params.patch"),
        );
    }
    let changes = match p.get("changes") {
        None => None,
        Some(serde_json::Value::String(path)) if patch && !path.is_empty() => {
            Some(PathBuf::from(path))
        }
        Some(_) => {
            problems.push(
                Diagnostic::error("`changes` is the path of a change set file (needs `patch`)")
                    .at_key("params.changes"),
            );
            None
        }
    };
    match (input, format, output) {
        (Some(input), Some(format), Some(output)) if problems.is_empty() => Ok(Parsed {
            input: input.clone(),
            owner,
            replaces,
            verify,
            patch,
            changes,
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

/// What patch mode did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PatchReport {
    /// Guest bytes compared (read from the input and from the output).
    bytes_compared: u64,
    /// Guest bytes written to the output where it differed.
    bytes_written: u64,
    /// Chunks compared, and those that differed.
    chunks: u64,
    chunks_written: u64,
    /// Whether a change set chose the chunks.
    tracked: bool,
}

/// The output opened for patching.
enum Target {
    Qcow2(Box<Qcow2Patcher>),
    Raw(std::fs::File),
}

impl Target {
    fn read_at(&mut self, path: &Path, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        match self {
            Self::Qcow2(p) => p.read_at(offset, buf),
            Self::Raw(f) => crate::image::reader::pread_full(f, path, offset, buf),
        }
    }

    fn write_at(&mut self, path: &Path, offset: u64, data: &[u8]) -> crate::Result<()> {
        match self {
            Self::Qcow2(p) => p.write_at(offset, data),
            Self::Raw(f) => {
                std::os::unix::fs::FileExt::write_all_at(f, data, offset).map_err(|e| {
                    crate::Error::io(format!("writing at {offset} of {}", path.display()), e)
                })
            }
        }
    }

    fn finish(self, path: &Path) -> crate::Result<()> {
        match self {
            Self::Qcow2(p) => p.finish(true).map(|_| ()),
            Self::Raw(f) => f
                .sync_all()
                .map_err(|e| crate::Error::io(format!("syncing {}", path.display()), e)),
        }
    }
}

impl Parsed {
    /// Patch mode: brings the existing output up to `source` in place.
    /// `Ok(Err(why))` when the output cannot be patched and must be
    /// converted again.
    fn patch_output(
        &self,
        source: &dyn crate::image::ImageReader,
        progress: &dyn fluidcloud_plugins::ProgressSink,
        cancel: &fluidcloud_plugins::CancelFlag,
    ) -> SdkResult<Result<PatchReport, String>> {
        let out = self.output.as_path();
        let size = source.virtual_size();
        let changes = match &self.changes {
            Some(path) => ChangeSet::load_for(path, Path::new(&self.input.locator))?,
            None => None,
        };
        if let (Some(set), Some(path)) = (&changes, &self.changes)
            && set.virtual_size != size
        {
            return Err(crate::Error::InvalidArgument(format!(
                "change set {} is of a disk of {} bytes, but the input {} has {size}",
                path.display(),
                set.virtual_size,
                self.input.locator
            ))
            .into());
        }
        let (mut target, target_size) = match self.opts.format {
            ImageFormat::Qcow2 if crate::image::probe(out)?.format != ImageFormat::Qcow2 => {
                return Ok(Err(format!("{} is not a qcow2 image", out.display())));
            }
            ImageFormat::Qcow2 => match Qcow2Patcher::open(out) {
                Ok(p) => {
                    let s = p.virtual_size();
                    (Target::Qcow2(Box::new(p)), s)
                }
                Err(e @ crate::Error::Unsupported { .. }) => return Ok(Err(e.to_string())),
                Err(e) => return Err(e.into()),
            },
            ImageFormat::Raw => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(out)
                    .map_err(|e| SdkError::io(format!("opening {} to patch", out.display()), e))?;
                let len = f
                    .metadata()
                    .map_err(|e| SdkError::io(format!("stat {}", out.display()), e))?
                    .len();
                (Target::Raw(f), len)
            }
            other => return Ok(Err(format!("{other} outputs are not patched in place"))),
        };
        if target_size != size && target_size != size.next_multiple_of(512) {
            return Ok(Err(format!(
                "{} holds a disk of {target_size} bytes, the input one of {size}",
                out.display()
            )));
        }
        let chunks = match &changes {
            Some(set) => set.chunks(PATCH_CHUNK),
            None => {
                // Where either side holds data; elsewhere both read zeros.
                let written = open_with(
                    out,
                    &OpenOptions {
                        format: Some(self.opts.format),
                        ..OpenOptions::default()
                    },
                )?;
                let mut ranges = Vec::new();
                for reader in [source, written.as_ref()] {
                    for e in crate::image::extents(reader) {
                        let e = e?;
                        if e.kind == crate::image::ExtentKind::Data && e.offset < size {
                            ranges.push((e.offset, e.length.min(size - e.offset)));
                        }
                    }
                }
                ChangeSet::new(out.display().to_string(), size, ranges).chunks(PATCH_CHUNK)
            }
        };
        let mut report = PatchReport::default();
        let total = chunks.len() as u64 * PATCH_CHUNK;
        let mut want = vec![0u8; PATCH_CHUNK as usize];
        let mut have = vec![0u8; PATCH_CHUNK as usize];
        for (i, &chunk) in chunks.iter().enumerate() {
            if cancel.is_cancelled() {
                target.finish(out)?;
                return Err(SdkError::Transient(format!(
                    "cancelled while patching {}",
                    out.display()
                )));
            }
            let offset = chunk * PATCH_CHUNK;
            let len = PATCH_CHUNK.min(size - offset) as usize;
            let (want, have) = (&mut want[..len], &mut have[..len]);
            source.read_at(offset, want)?;
            target.read_at(out, offset, have)?;
            report.bytes_compared += len as u64;
            report.chunks += 1;
            if want != have {
                report.chunks_written += 1;
                // Write the runs of blocks that differ.
                let mut at = 0usize;
                while at < len {
                    let block_end = |a: usize| (a + PATCH_BLOCK).min(len);
                    if want[at..block_end(at)] == have[at..block_end(at)] {
                        at = block_end(at);
                        continue;
                    }
                    let start = at;
                    while at < len && want[at..block_end(at)] != have[at..block_end(at)] {
                        at = block_end(at);
                    }
                    target.write_at(out, offset + start as u64, &want[start..at])?;
                    report.bytes_written += (at - start) as u64;
                }
            }
            progress.progress((i as u64 + 1) * PATCH_CHUNK, Some(total));
        }
        target.finish(out)?;
        if self.verify {
            let written = open_with(
                out,
                &OpenOptions {
                    format: Some(self.opts.format),
                    ..OpenOptions::default()
                },
            )?;
            for &chunk in &chunks {
                let offset = chunk * PATCH_CHUNK;
                let len = PATCH_CHUNK.min(size - offset) as usize;
                let (want, have) = (&mut want[..len], &mut have[..len]);
                source.read_at(offset, want)?;
                written.read_at(offset, have)?;
                if let Some(i) = want.iter().zip(have.iter()).position(|(a, b)| a != b) {
                    return Err(crate::Error::Corrupt {
                        what: format!(
                            "{} (differs from its source {} after patching)",
                            out.display(),
                            self.input.locator
                        ),
                        offset: offset + i as u64,
                    }
                    .into());
                }
            }
        }
        report.tracked = changes.is_some();
        Ok(Ok(report))
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
        let (summary, file_size, patch) = blocking(move || {
            let reader = parsed.open_source()?;
            let replacing = match parsed.existing_output()? {
                Existing::None => false,
                Existing::Replaceable => true,
                Existing::Done(size) => return Ok((None, size, None)),
            };
            if cancel.is_cancelled() {
                return Err(SdkError::Transient("cancelled before starting".into()));
            }
            let mut fallback = None;
            if replacing && parsed.patch {
                match parsed.patch_output(reader.as_ref(), progress.as_ref(), &cancel)? {
                    Ok(report) => {
                        // Patched in place: the output is now this step's.
                        crate::owner::write(&parsed.output, &parsed.owner)?;
                        let size = std::fs::metadata(&parsed.output)
                            .map_err(|e| {
                                SdkError::io(format!("stat {}", parsed.output.display()), e)
                            })?
                            .len();
                        return Ok((None, size, Some(Ok(report))));
                    }
                    Err(why) => {
                        progress.message(&format!(
                            "patch mode: {why}; converting the whole image again"
                        ));
                        fallback = Some(why);
                    }
                }
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
            Ok((Some(summary), size, fallback.map(Err)))
        })
        .await?;
        let mut out = StepOutput::default();
        if let Some(s) = &summary {
            out.measured.bytes_read = s.bytes_read;
            out.measured.bytes_written = s.bytes_written;
        }
        match &patch {
            None => {}
            Some(Ok(r)) => {
                // Both sides of every chunk compared were read.
                out.measured.bytes_read = r.bytes_compared * 2;
                out.measured.bytes_written = r.bytes_written;
                out.facts.insert(
                    "patch".into(),
                    serde_json::json!({
                        "mode": "patch",
                        "bytes_compared": r.bytes_compared,
                        "bytes_written": r.bytes_written,
                        "chunks_compared": r.chunks,
                        "chunks_written": r.chunks_written,
                    }),
                );
                out.facts
                    .insert("tracked".into(), serde_json::json!(r.tracked));
            }
            Some(Err(why)) => {
                out.facts.insert("tracked".into(), serde_json::json!(false));
                out.facts.insert(
                    "patch".into(),
                    serde_json::json!({
                        "mode": "convert",
                        "fallback": why,
                        "bytes_compared": 0,
                        "bytes_written": out.measured.bytes_written,
                    }),
                );
            }
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
