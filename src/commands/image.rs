//! `fluidcloud image info|convert|check|compare`: the disk-image tooling of
//! `fluidcloud-migrators` on the command line.
//!
//! Formats are detected from the content, never the file name, as
//! `qemu-img` does, unless `-f FORMAT` names it; a probed image that names
//! a backing file gets a warning (an image a guest wrote may be a raw disk
//! that merely begins with a header). Backing files and VMDK extents must
//! lie in the image's own directory, or in one given with
//! `--allow-backing-dir`. Library errors are turned into the SDK's error so
//! the exit code says what went wrong: corrupt image 8, unsupported
//! feature 6, bad argument 7, a refused backing path 10.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand, ValueEnum};
use fluidcloud_migrators::image::qcow2::{Compression, Qcow2Options};
use fluidcloud_migrators::image::vmdk::VmdkSubformat;
use fluidcloud_migrators::image::{
    self as img, BackingPolicy, ConvertOptions, ExtentKind, ImageReader, OpenOptions, VhdSubformat,
    extents, verify,
};
use fluidcloud_plugins::ImageFormat;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::print_json;
use crate::Globals;
use crate::output::bytes;

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// Format, sizes, backing chain, snapshots and allocation of an image.
    Info {
        /// The image file.
        path: PathBuf,
        /// Describe this internal snapshot (qcow2; id or name).
        #[arg(long, short = 's')]
        snapshot: Option<String>,
        #[command(flatten)]
        how: HowToOpen,
    },
    /// Convert an image to another format (raw, qcow2, VHD, VHDX, VMDK).
    Convert(ConvertArgs),
    /// Read every table and data cluster of an image; exit 8 if corrupt.
    Check {
        /// The image file.
        path: PathBuf,
        #[command(flatten)]
        how: HowToOpen,
    },
    /// Compare the guest content of two images (any formats); exit 1 if
    /// they differ.
    Compare {
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
        /// Format of the first image (skips probing it).
        #[arg(short = 'f', long = "format", value_name = "FORMAT")]
        format_a: Option<ImageFormat>,
        /// Format of the second image (skips probing it).
        #[arg(short = 'F', long = "format-b", value_name = "FORMAT")]
        format_b: Option<ImageFormat>,
        /// A directory backing files and extents may be in, besides each
        /// image's own (repeatable).
        #[arg(long = "allow-backing-dir", value_name = "DIR")]
        allow_backing_dirs: Vec<PathBuf>,
    },
}

/// How an image is opened: its format, and where its chain may reach.
#[derive(Debug, Clone, Args)]
pub(crate) struct HowToOpen {
    /// The image's format (raw, qcow2, vmdk, vhd, vhdx): skips probing. Use
    /// it for disks a guest wrote: `-f raw` reads a raw disk as raw even
    /// when it begins with an image header.
    #[arg(short = 'f', long = "format", value_name = "FORMAT")]
    input_format: Option<ImageFormat>,
    /// A directory backing files and extents may be in, besides the
    /// image's own (repeatable; absolute names are accepted there).
    #[arg(long = "allow-backing-dir", value_name = "DIR")]
    allow_backing_dirs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct ConvertArgs {
    /// Source image (format detected from its content unless `-f`).
    source: PathBuf,
    #[command(flatten)]
    how: HowToOpen,
    /// Output image: a file, or an object
    /// `s3://BUCKET/KEY?endpoint=URL&region=R&access_key_id_env=VAR&secret_access_key_env=VAR`
    /// uploaded in parts as it is produced (raw, fixed VHD, streamOptimized
    /// VMDK).
    output: PathBuf,
    /// Output format.
    #[arg(short = 'O', long = "output-format", value_name = "FORMAT")]
    format: OutFormat,
    /// qcow2 cluster size in bytes (512 to 2M; suffixes K and M accepted).
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    cluster_size: u64,
    /// Compress qcow2 clusters.
    #[arg(short = 'c', long, value_name = "ALGORITHM", num_args = 0..=1, default_missing_value = "zlib")]
    compress: Option<CompressArg>,
    /// Backing file for qcow2 output: only what differs from it is stored
    /// (relative names are relative to the output's directory).
    #[arg(short = 'B', long, value_name = "FILE")]
    backing: Option<String>,
    /// Convert this internal snapshot of the source (qcow2; id or name).
    #[arg(long, short = 's')]
    snapshot: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// VHD output: round the virtual size up to a whole MiB, as Azure
    /// requires.
    #[arg(long)]
    azure: bool,
    /// VMDK output: `streamOptimized` (default; vSphere, OVA) or
    /// `monolithicSparse`; VHD output: `fixed` (default) or `dynamic`.
    #[arg(long, value_name = "SUBFORMAT")]
    subformat: Option<SubformatArg>,
    /// Replace the output if it exists.
    #[arg(long)]
    force: bool,
    /// Sync the output to disk before exiting (by default, as with
    /// qemu-img convert, the kernel writes it back in its own time).
    #[arg(long)]
    sync: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OutFormat {
    Raw,
    Qcow2,
    /// VHD (fixed unless `--subformat dynamic`).
    Vhd,
    /// Dynamic VHDX.
    Vhdx,
    /// VMDK (streamOptimized unless `--subformat monolithicSparse`).
    Vmdk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SubformatArg {
    #[value(name = "streamOptimized")]
    StreamOptimized,
    #[value(name = "monolithicSparse")]
    MonolithicSparse,
    #[value(name = "fixed")]
    Fixed,
    #[value(name = "dynamic")]
    Dynamic,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompressArg {
    Zlib,
    Zstd,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1024),
        Some('M') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a size (e.g. 65536, 64K, 2M)"))
}

/// Library errors become SDK errors, which `exit_code` maps.
fn sdk(e: fluidcloud_migrators::Error) -> anyhow::Error {
    anyhow::Error::new(fluidcloud_plugins::Error::from(e))
}

/// Opens `path` as `how` says; warns on stderr when a probed image names
/// a backing file.
fn open(path: &Path, snapshot: Option<String>, how: &HowToOpen) -> Result<Box<dyn ImageReader>> {
    let reader = img::open_with(
        path,
        &OpenOptions {
            format: how.input_format,
            snapshot,
            backing: BackingPolicy {
                root: None,
                allow_dirs: how.allow_backing_dirs.clone(),
            },
        },
    )
    .map_err(sdk)?;
    if how.input_format.is_none()
        && let Some(b) = reader.backing()
    {
        eprintln!(
            "warning: {} was probed as {} and reads backing file {}; if a guest wrote this image, \
             pass -f raw (probing lets an image's own bytes choose which files are read)",
            path.display(),
            reader.format(),
            b.path().display()
        );
    }
    Ok(reader)
}

pub(crate) async fn run(g: &Globals, c: ImageCommand) -> Result<()> {
    let json = g.json;
    // Image work is blocking I/O and CPU: keep it off the async workers.
    tokio::task::spawn_blocking(move || match c {
        ImageCommand::Info {
            path,
            snapshot,
            how,
        } => info(json, &path, snapshot, &how),
        ImageCommand::Convert(a) => convert(json, a),
        ImageCommand::Check { path, how } => check(json, &path, &how),
        ImageCommand::Compare {
            a,
            b,
            format_a,
            format_b,
            allow_backing_dirs,
        } => {
            let how = |input_format| HowToOpen {
                input_format,
                allow_backing_dirs: allow_backing_dirs.clone(),
            };
            compare(json, (&a, &how(format_a)), (&b, &how(format_b)))
        }
    })
    .await?
}

fn progress_bar(json: bool, what: &str) -> ProgressBar {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

#[derive(Serialize)]
struct InfoDoc<'a> {
    path: String,
    format: ImageFormat,
    virtual_size: u64,
    file_size: u64,
    allocated_bytes: u64,
    data_bytes: u64,
    zero_bytes: u64,
    unallocated_bytes: u64,
    chain: Vec<verify::ChainEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qcow2: Option<&'a img::qcow2::Qcow2Details>,
}

fn info(json: bool, path: &Path, snapshot: Option<String>, how: &HowToOpen) -> Result<()> {
    let probed = img::probe(path).map_err(sdk)?;
    let reader = open(path, snapshot, how)?;
    let (mut data, mut zero, mut unalloc) = (0, 0, 0);
    for e in extents(reader.as_ref()) {
        let e = e.map_err(sdk)?;
        match e.kind {
            ExtentKind::Data => data += e.length,
            ExtentKind::Zero => zero += e.length,
            ExtentKind::Unallocated => unalloc += e.length,
        }
    }
    let doc = InfoDoc {
        path: path.display().to_string(),
        format: reader.format(),
        virtual_size: reader.virtual_size(),
        file_size: probed.file_size,
        allocated_bytes: probed.allocated_bytes,
        data_bytes: data,
        zero_bytes: zero,
        unallocated_bytes: unalloc,
        chain: verify::chain(reader.as_ref()),
        qcow2: reader.qcow2_details(),
    };
    if json {
        return print_json(&doc);
    }
    outln!("image:          {}", doc.path)?;
    outln!("format:         {}", doc.format)?;
    outln!(
        "virtual size:   {} ({} bytes)",
        bytes(doc.virtual_size),
        doc.virtual_size
    )?;
    outln!("file size:      {}", bytes(doc.file_size))?;
    outln!("disk usage:     {}", bytes(doc.allocated_bytes))?;
    outln!(
        "content:        {} data, {} zero, {} unallocated",
        bytes(data),
        bytes(zero),
        bytes(unalloc)
    )?;
    if let Some(q) = doc.qcow2 {
        outln!("qcow2 version:  {}", q.version)?;
        outln!("cluster size:   {}", bytes(q.cluster_size))?;
        outln!("refcount bits:  {}", q.refcount_bits)?;
        outln!(
            "compression:    {}",
            match q.compression {
                Compression::Zlib => "zlib",
                Compression::Zstd => "zstd",
            }
        )?;
        outln!(
            "extended L2:    {}",
            if q.extended_l2 { "yes" } else { "no" }
        )?;
        if let Some(s) = &q.reading_snapshot {
            outln!("snapshot shown: {s}")?;
        }
        for s in &q.snapshots {
            outln!(
                "snapshot:       id {} `{}` ({})",
                s.id,
                s.name,
                bytes(s.virtual_size)
            )?;
        }
    }
    for (depth, entry) in doc.chain.iter().enumerate().skip(1) {
        outln!(
            "backing {depth}:      {} ({}, {})",
            entry.path,
            entry.format,
            bytes(entry.virtual_size)
        )?;
    }
    Ok(())
}

#[derive(Serialize)]
struct ConvertDoc {
    source: String,
    output: String,
    #[serde(flatten)]
    summary: img::ConvertSummary,
    seconds: f64,
}

fn convert(json: bool, a: ConvertArgs) -> Result<()> {
    let fits = match (a.format, a.subformat) {
        (_, None) => true,
        (OutFormat::Vmdk, Some(s)) => {
            matches!(
                s,
                SubformatArg::StreamOptimized | SubformatArg::MonolithicSparse
            )
        }
        (OutFormat::Vhd, Some(s)) => matches!(s, SubformatArg::Fixed | SubformatArg::Dynamic),
        (OutFormat::Vhdx, Some(s)) => s == SubformatArg::Dynamic,
        (OutFormat::Raw | OutFormat::Qcow2, Some(_)) => false,
    };
    if !fits {
        return Err(anyhow!(fluidcloud_plugins::Error::Precondition(format!(
            "--subformat {:?} does not apply to {:?} output (VMDK: streamOptimized, \
             monolithicSparse; VHD: fixed, dynamic; VHDX: dynamic)",
            a.subformat.unwrap_or(SubformatArg::Fixed),
            a.format
        ))));
    }
    let reader = open(&a.source, a.snapshot.clone(), &a.how)?;
    let cluster_size = u32::try_from(a.cluster_size).map_err(|_| {
        anyhow!(fluidcloud_plugins::Error::Precondition(format!(
            "cluster size {} is too large",
            a.cluster_size
        )))
    })?;
    let opts = ConvertOptions {
        format: match a.format {
            OutFormat::Raw => ImageFormat::Raw,
            OutFormat::Qcow2 => ImageFormat::Qcow2,
            OutFormat::Vhd => ImageFormat::Vhd,
            OutFormat::Vhdx => ImageFormat::Vhdx,
            OutFormat::Vmdk => ImageFormat::Vmdk,
        },
        azure: a.azure,
        vmdk_subformat: match a.subformat {
            Some(SubformatArg::MonolithicSparse) => VmdkSubformat::MonolithicSparse,
            _ => VmdkSubformat::StreamOptimized,
        },
        vhd_subformat: match a.subformat {
            Some(SubformatArg::Dynamic) => VhdSubformat::Dynamic,
            _ => VhdSubformat::Fixed,
        },
        qcow2: Qcow2Options {
            cluster_size,
            compression: a.compress.map(|c| match c {
                CompressArg::Zlib => Compression::Zlib,
                CompressArg::Zstd => Compression::Zstd,
            }),
            backing_format: match &a.backing {
                Some(b) => {
                    let path = img::reader::backing_of_output(&a.output, b);
                    Some(img::probe(&path).map_err(sdk)?.format)
                }
                None => None,
            },
            backing_file: a.backing.clone(),
        },
        threads: a.threads,
        overwrite: a.force,
        sync: a.sync,
    };
    let bar = progress_bar(json, "convert");
    let start = Instant::now();
    let report = |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let summary = match a.output.to_str() {
        // An object: uploaded in parts as it is produced.
        Some(url) if url.starts_with("s3://") => {
            let location =
                fluidcloud_migrators::objects::BucketLocation::parse(url).map_err(sdk)?;
            img::convert_to_object(reader.as_ref(), &location, &opts, &report)
        }
        _ => img::convert(reader.as_ref(), &a.output, &opts, &report),
    };
    bar.finish_and_clear();
    let summary = summary.map_err(sdk)?;
    let doc = ConvertDoc {
        source: a.source.display().to_string(),
        output: a.output.display().to_string(),
        summary,
        seconds: start.elapsed().as_secs_f64(),
    };
    if json {
        return print_json(&doc);
    }
    outln!(
        "converted {} ({}) to {} ({}) in {:.2} s: {} virtual, {} read, {} file, {} on disk",
        doc.source,
        reader.format(),
        doc.output,
        doc.summary.format,
        doc.seconds,
        bytes(doc.summary.virtual_size),
        bytes(doc.summary.bytes_read),
        bytes(doc.summary.file_size),
        bytes(doc.summary.allocated_bytes),
    )?;
    Ok(())
}

fn check(json: bool, path: &Path, how: &HowToOpen) -> Result<()> {
    let reader = open(path, None, how)?;
    let bar = progress_bar(json, "check");
    let report = verify::check(reader.as_ref(), 0, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report.map_err(sdk)?;
    if json {
        return print_json(&report);
    }
    outln!(
        "No errors were found in {} ({}): {} data, {} zero, {} unallocated, {} image(s) in the chain",
        path.display(),
        reader.format(),
        bytes(report.data_bytes),
        bytes(report.zero_bytes),
        bytes(report.unallocated_bytes),
        report.chain.len()
    )?;
    Ok(())
}

#[derive(Serialize)]
struct CompareDoc {
    identical: bool,
    first_difference: Option<u64>,
    a_virtual_size: u64,
    b_virtual_size: u64,
}

fn compare(
    json: bool,
    (a, how_a): (&Path, &HowToOpen),
    (b, how_b): (&Path, &HowToOpen),
) -> Result<()> {
    let ra = open(a, None, how_a)?;
    let rb = open(b, None, how_b)?;
    let bar = progress_bar(json, "compare");
    let diff = verify::compare(ra.as_ref(), rb.as_ref(), 0, &|done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let diff = diff.map_err(sdk)?;
    let doc = CompareDoc {
        identical: diff.is_none(),
        first_difference: diff,
        a_virtual_size: ra.virtual_size(),
        b_virtual_size: rb.virtual_size(),
    };
    if json {
        print_json(&doc)?;
    } else if diff.is_none() {
        outln!("Images are identical.")?;
    }
    match diff {
        None => Ok(()),
        Some(at) => Err(anyhow!(
            "images {} and {} differ at guest offset {at}",
            a.display(),
            b.display()
        )),
    }
}
