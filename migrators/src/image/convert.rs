//! Image conversion: any [`ImageReader`] into a raw, qcow2, VMDK, VHD or
//! VHDX file.
//!
//! # Pipeline
//!
//! The calling thread walks the source's extent map and hands out chunks of
//! at most [`CHUNK`] bytes that hold data; holes and zero extents are never
//! read. Worker threads (one per core by default) read the chunks, which is
//! where compressed source clusters are decompressed, find the all-zero
//! blocks, and, for compressed qcow2 output, compress each target cluster.
//! A chunk stored unchanged and contiguously in the source file (every
//! chunk of a raw source, most of a qcow2 one) is not read into a buffer:
//! the source file is mapped ([`super::mapped`]) and the chunk's bytes are
//! scanned and written straight from the map, one copy instead of two.
//! The calling thread puts the chunks back in order and writes them (raw
//! output from a map excepted, see [`Work::process`]): the writers append
//! sequentially. At most `4 × threads` chunks are in flight,
//! so memory is bounded (tens of MiB) whatever the image size.
//!
//! In raw output (and fixed VHD), chunks that had to be computed
//! (decompressed qcow2 clusters, VMDK grains) are written with `O_DIRECT`
//! by the calling thread: the cores only decompress, the device copies the
//! bytes, and they do not fill the page cache. Chunks from the map go
//! through the page cache, each run preallocated first. A file system
//! without `O_DIRECT` gets buffered writes (see [`RawSink::write_at`]).
//!
//! With a backing file for the output (`qemu-img convert -B`), every chunk
//! is read from both the source and the backing image and only the target
//! clusters that differ are written; clusters that became zero are stored
//! as zero clusters so the backing data does not show through.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use fluidcloud_plugins::ImageFormat;
use serde::Serialize;

use super::mapped::FileMap;
use super::qcow2::{Compression, Qcow2Options, Qcow2Writer, compress_cluster};
use super::reader::{Extent, ImageReader, extents, open};
use super::upload::{PartUploader, part_size};
use super::vhd::DynamicVhdWriter;
use super::vhdx::VhdxWriter;
use super::vmdk::{
    MonolithicSparseWriter, STREAM_GRAIN, StreamOptimizedWriter, VmdkSubformat, compress_grain,
};
use crate::error::{Error, Result};

/// Largest piece of work handed to a worker.
pub const CHUNK: u64 = 1024 * 1024;
/// Zero detection granularity of raw output (as `qemu-img convert -S 4k`).
const RAW_BLOCK: u64 = 4096;
/// Alignment of memory, file offsets and lengths for `O_DIRECT` writes
/// (the file system's block; a device's logical block is at most this).
const DIRECT_ALIGN: usize = 4096;

/// How to convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertOptions {
    /// Output format: raw, qcow2, VHD (fixed) or VMDK (streamOptimized).
    pub format: ImageFormat,
    /// VHD output: round the virtual size up to a whole MiB, as Azure
    /// requires of the fixed VHDs it imports.
    pub azure: bool,
    /// VMDK output: streamOptimized (default) or monolithicSparse.
    pub vmdk_subformat: VmdkSubformat,
    /// VHD output: fixed (default) or dynamic.
    pub vhd_subformat: VhdSubformat,
    /// qcow2 output: cluster size, compression, backing file.
    pub qcow2: Qcow2Options,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Replace the output file if it exists.
    pub overwrite: bool,
    /// Sync the output to disk before returning (default). Without it the
    /// data may still sit in the page cache, as with `qemu-img convert`,
    /// whose default cache mode for the output is `unsafe`.
    pub sync: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            format: ImageFormat::Qcow2,
            azure: false,
            vmdk_subformat: VmdkSubformat::StreamOptimized,
            vhd_subformat: VhdSubformat::Fixed,
            qcow2: Qcow2Options::default(),
            threads: 0,
            overwrite: false,
            sync: true,
        }
    }
}

/// The kind of VHD to write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VhdSubformat {
    /// Every byte of the disk stored, footer at the end (what Azure
    /// imports).
    #[default]
    Fixed,
    /// Only allocated 2 MiB blocks stored, with a block allocation table.
    Dynamic,
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConvertSummary {
    /// Output format.
    pub format: ImageFormat,
    /// Size of the virtual disk.
    pub virtual_size: u64,
    /// Guest bytes read from the source (holes are not read).
    pub bytes_read: u64,
    /// Guest bytes written as data (zero blocks are not).
    pub bytes_written: u64,
    /// Length of the output file.
    pub file_size: u64,
    /// Disk space the output uses (`st_blocks × 512`).
    pub allocated_bytes: u64,
}

/// One chunk of work: a data range of the source.
#[derive(Debug, Clone, Copy)]
struct Job {
    seq: u64,
    offset: u64,
    len: u64,
}

/// A worker's result for one chunk.
#[derive(Debug)]
struct Done<'m> {
    seq: u64,
    offset: u64,
    data: Bytes<'m>,
    pieces: Vec<Piece>,
}

/// A chunk's guest bytes: read into a buffer, or where they are stored in
/// the source's map (no copy; see [`super::mapped`]).
#[derive(Debug)]
enum Bytes<'m> {
    Owned(Buf),
    Mapped { host: u64, bytes: &'m [u8] },
}

impl Bytes<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Owned(b) => b.as_slice(),
            Self::Mapped { bytes, .. } => bytes,
        }
    }
}

/// A chunk buffer whose bytes start on a [`DIRECT_ALIGN`] boundary, so
/// that it can be written with `O_DIRECT`: an over-allocated `Vec` and the
/// offset of the first aligned byte in it.
#[derive(Debug, Default)]
struct Buf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    /// This buffer (its old bytes, or zeros) resized to `len` bytes.
    fn sized(mut self, len: usize) -> Self {
        if self.vec.len() < len + DIRECT_ALIGN {
            self.vec.resize(len + DIRECT_ALIGN, 0);
        }
        let addr = self.vec.as_ptr().addr();
        self.start = addr.next_multiple_of(DIRECT_ALIGN) - addr;
        self.len = len;
        self
    }

    fn as_slice(&self) -> &[u8] {
        self.vec
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        self.vec
            .get_mut(self.start..self.start + self.len)
            .unwrap_or_default()
    }
}

/// The source's data file, mapped, with what is needed to notice it
/// shrinking during the conversion.
struct SourceMap<'a> {
    map: FileMap,
    path: &'a Path,
}

impl SourceMap<'_> {
    /// An error if a page of the map could not be read.
    fn check(&self) -> Result<()> {
        if self.map.faulted() {
            Err(source_changed(self.path))
        } else {
            Ok(())
        }
    }

    /// A write from a map page removed underneath fails with `EFAULT`: say
    /// what happened to the source rather than "bad address".
    fn explain(&self, e: Error) -> Error {
        match &e {
            Error::Io { source, .. } if source.raw_os_error() == Some(libc::EFAULT) => {
                source_changed(self.path)
            }
            _ => e,
        }
    }
}

/// The error for a source file that shrank (or could not be read) while
/// it was being converted.
fn source_changed(path: &Path) -> Error {
    Error::io(
        format!("reading image {}", path.display()),
        std::io::Error::other(
            "the file shrank, or part of it could not be read, during the conversion",
        ),
    )
}

/// What to write of a chunk.
#[derive(Debug)]
enum Piece {
    /// `len` bytes of the chunk's data at chunk offset `at`.
    Data { at: usize, len: usize },
    /// A target cluster, compressed.
    Compressed { at: usize, bytes: Vec<u8> },
    /// A target cluster that reads as zeros but must be recorded (output
    /// with a backing file).
    Zero { at: usize, len: usize },
}

/// The output being written.
enum Sink {
    Raw(RawSink),
    Qcow2(Box<Qcow2Writer>),
    Vmdk(Box<StreamOptimizedWriter>),
    VmdkSparse(Box<MonolithicSparseWriter>),
    VhdDynamic(Box<DynamicVhdWriter>),
    Vhdx(Box<VhdxWriter>),
    /// Raw or fixed VHD into an upload.
    Stream(Box<StreamSink>),
    /// streamOptimized VMDK into an upload.
    VmdkStream(Box<StreamOptimizedWriter<PartUploader>>),
}

/// Raw (or fixed VHD) bytes streamed front to back: holes become zeros.
struct StreamSink {
    w: PartUploader,
    /// Guest bytes written so far.
    pos: u64,
    size: u64,
    vhd_footer: bool,
}

impl StreamSink {
    fn zeros_to(&mut self, end: u64) -> Result<()> {
        use std::io::Write as _;
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        while self.pos < end {
            let n = (end - self.pos).min(ZEROS.len() as u64) as usize;
            self.w
                .write_all(&ZEROS[..n])
                .map_err(|e| Error::io("uploading zeros", e))?;
            self.pos += n as u64;
        }
        Ok(())
    }
}

/// A sparse raw output: only non-zero blocks are written. A fixed VHD is
/// the same with a footer after the data.
struct RawSink {
    file: File,
    /// The same file opened with `O_DIRECT`, where the file system allows
    /// it (see [`RawSink::write_at`]).
    direct: Option<File>,
    path: PathBuf,
    size: u64,
    vhd_footer: bool,
}

impl RawSink {
    /// Writes `data` at `offset`: with `O_DIRECT` when asked, possible and
    /// when memory, offset and length are whole blocks; through the page
    /// cache otherwise. A file system that refuses a direct write
    /// (`EINVAL`) gets every later write through the page cache.
    ///
    /// Why direct: once the cores are busy decompressing, copying each
    /// byte into the page cache costs them a quarter of their time or more
    /// (perf), and on a VM whose host takes back free memory (this
    /// project's benchmark machine) filling fresh page-cache pages costs
    /// 2–5x more again; the device's DMA copies a direct write instead
    /// (docs/images.md, "Speed").
    fn write_at(&mut self, data: &[u8], offset: u64, direct: bool) -> Result<()> {
        let block = DIRECT_ALIGN as u64;
        let aligned = offset.is_multiple_of(block)
            && data.len().is_multiple_of(DIRECT_ALIGN)
            && data.as_ptr().addr().is_multiple_of(DIRECT_ALIGN);
        if let Some(d) = self.direct.as_ref().filter(|_| direct && aligned) {
            match d.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
                Err(e) => {
                    return Err(Error::io(
                        format!("writing {} at {offset}", self.path.display()),
                        e,
                    ));
                }
            }
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io(format!("writing {} at {offset}", self.path.display()), e))
    }
}

/// Converts `source` into a new image at `output`; `progress(done, total)`
/// is called as guest bytes are written (`total` is the virtual size).
///
/// # Errors
///
/// [`Error::InvalidArgument`] for an output format not written yet, options
/// the writer refuses, or an existing output without `overwrite`;
/// [`Error::Io`], [`Error::Corrupt`] from reading the source or writing the
/// output. On error the partial output file is removed.
pub fn convert(
    source: &dyn ImageReader,
    output: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ConvertSummary> {
    if !matches!(
        opts.format,
        ImageFormat::Raw
            | ImageFormat::Qcow2
            | ImageFormat::Vhd
            | ImageFormat::Vhdx
            | ImageFormat::Vmdk
    ) {
        return Err(Error::Unsupported {
            what: format!("writing {} images", opts.format),
        });
    }
    if output.exists() {
        if !opts.overwrite {
            return Err(Error::InvalidArgument(format!(
                "{} exists; remove it or ask to overwrite it",
                output.display()
            )));
        }
        std::fs::remove_file(output)
            .map_err(|e| Error::io(format!("removing {}", output.display()), e))?;
    }
    let backing = match (&opts.format, &opts.qcow2.backing_file) {
        (ImageFormat::Qcow2, Some(name)) => {
            let path = super::reader::backing_of_output(output, name);
            Some(open(&path)?)
        }
        _ => None,
    };
    let result = run(source, backing.as_deref(), output, opts, progress);
    if result.is_err() {
        let _ = std::fs::remove_file(output);
    }
    result
}

/// Converts `source` into the object `location` names (an `s3://BUCKET/KEY`
/// or a `file:///DIR/KEY` location of [`crate::objects`]; the key is the
/// location's prefix), uploaded in parts as it is produced, without a
/// temporary file. Only formats written front to back can be streamed:
/// raw, fixed VHD and streamOptimized VMDK. `file_size` and
/// `allocated_bytes` of the summary are the object's size.
///
/// # Errors
///
/// [`Error::Unsupported`] for qcow2, dynamic VHD, VHDX and monolithicSparse
/// VMDK output (they seek back to fill in tables) and for a backing file;
/// [`Error::BadLocation`] for a location without a key;
/// [`Error::InvalidArgument`] if the object exists and not `overwrite`;
/// [`Error::MissingCredential`], [`Error::ObjectStore`] from the store;
/// [`Error::Io`], [`Error::Corrupt`] from reading the source. On error the
/// upload is aborted, so no object is created.
pub fn convert_to_object(
    source: &dyn ImageReader,
    location: &crate::objects::BucketLocation,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ConvertSummary> {
    let streamable = match opts.format {
        ImageFormat::Raw => true,
        ImageFormat::Vhd => opts.vhd_subformat == VhdSubformat::Fixed,
        ImageFormat::Vmdk => opts.vmdk_subformat == VmdkSubformat::StreamOptimized,
        _ => false,
    };
    if !streamable {
        return Err(Error::Unsupported {
            what: format!(
                "uploading {} output without a temporary file: only raw, fixed VHD and \
                 streamOptimized VMDK are written front to back; convert to a file and \
                 copy it instead",
                describe(opts)
            ),
        });
    }
    if opts.qcow2.backing_file.is_some() && opts.format == ImageFormat::Qcow2 {
        return Err(Error::Unsupported {
            what: "a backing file for an uploaded image".into(),
        });
    }
    let key = location.prefix();
    if key.is_empty() {
        return Err(Error::BadLocation {
            url: location.url().to_owned(),
            reason: "name the object: s3://BUCKET/KEY?...".into(),
        });
    }
    let size = source.virtual_size();
    let target = match opts.format {
        ImageFormat::Vhd if opts.azure => size.div_ceil(1 << 20) << 20,
        ImageFormat::Vhd => size.div_ceil(512) * 512,
        _ => size,
    };
    let store = crate::objects::open_store(location)?;
    // A streamOptimized VMDK is at most a little larger than the disk.
    let expected = target + target / 64 + (1 << 20);
    let what = location.url().to_owned();
    let up = PartUploader::start(store, key, part_size(expected), &what, opts.overwrite)?;
    let mut sink = if opts.format == ImageFormat::Vmdk {
        match StreamOptimizedWriter::to_stream(up, Path::new(key), size) {
            Ok(w) => Sink::VmdkStream(Box::new(w)),
            Err(e) => return Err(e),
        }
    } else {
        Sink::Stream(Box::new(StreamSink {
            w: up,
            pos: 0,
            size: target,
            vhd_footer: opts.format == ImageFormat::Vhd,
        }))
    };
    let grain = match sink {
        Sink::VmdkStream(_) => STREAM_GRAIN,
        _ => RAW_BLOCK,
    };
    let pumped = pump(source, None, &mut sink, grain, opts, progress);
    let (bytes_read, bytes_written) = match pumped {
        Ok(v) => v,
        Err(e) => {
            match sink {
                Sink::Stream(st) => st.w.abort(),
                Sink::VmdkStream(w) => w.into_inner().abort(),
                _ => {}
            }
            return Err(e);
        }
    };
    let file_size = match sink {
        Sink::Stream(mut st) => {
            use std::io::Write as _;
            let tail = st.zeros_to(st.size).and_then(|()| {
                if st.vhd_footer {
                    let footer = super::vhd::fixed_footer(st.size);
                    st.w.write_all(&footer)
                        .map_err(|e| Error::io("uploading the VHD footer", e))
                } else {
                    Ok(())
                }
            });
            if let Err(e) = tail {
                st.w.abort();
                return Err(e);
            }
            st.w.finish()?
        }
        Sink::VmdkStream(w) => {
            let (up, _) = w.finish_stream()?;
            up.finish()?
        }
        _ => 0,
    };
    progress(size, size);
    Ok(ConvertSummary {
        format: opts.format,
        virtual_size: size,
        bytes_read,
        bytes_written,
        file_size,
        allocated_bytes: file_size,
    })
}

/// The output kind, for messages.
fn describe(opts: &ConvertOptions) -> String {
    match opts.format {
        ImageFormat::Vhd => format!("{:?} VHD", opts.vhd_subformat).to_lowercase(),
        ImageFormat::Vmdk => format!("{:?} VMDK", opts.vmdk_subformat),
        f => f.to_string(),
    }
}

fn run(
    source: &dyn ImageReader,
    backing: Option<&dyn ImageReader>,
    output: &Path,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<ConvertSummary> {
    let size = source.virtual_size();
    let (mut sink, grain) = match opts.format {
        ImageFormat::Vmdk if opts.vmdk_subformat == VmdkSubformat::MonolithicSparse => (
            Sink::VmdkSparse(Box::new(MonolithicSparseWriter::create(output, size)?)),
            STREAM_GRAIN,
        ),
        ImageFormat::Vmdk => (
            Sink::Vmdk(Box::new(StreamOptimizedWriter::create(output, size)?)),
            STREAM_GRAIN,
        ),
        ImageFormat::Vhd if opts.vhd_subformat == VhdSubformat::Dynamic => {
            if opts.azure {
                return Err(Error::InvalidArgument(
                    "Azure imports fixed VHDs only; leave out the Azure option or write a fixed VHD"
                        .into(),
                ));
            }
            (
                Sink::VhdDynamic(Box::new(DynamicVhdWriter::create(output, size)?)),
                RAW_BLOCK,
            )
        }
        ImageFormat::Vhdx => (
            Sink::Vhdx(Box::new(VhdxWriter::create(output, size)?)),
            RAW_BLOCK,
        ),
        ImageFormat::Qcow2 => {
            // qcow2 sizes are whole sectors.
            let vsize = size.div_ceil(512) * 512;
            let w = Qcow2Writer::create(output, vsize, &opts.qcow2)?;
            (Sink::Qcow2(Box::new(w)), u64::from(opts.qcow2.cluster_size))
        }
        _ => {
            let vhd = opts.format == ImageFormat::Vhd;
            let target = if !vhd {
                size
            } else if opts.azure {
                size.div_ceil(1 << 20) << 20
            } else {
                size.div_ceil(512) * 512
            };
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(output)
                .map_err(|e| Error::io(format!("creating {}", output.display()), e))?;
            let len = if vhd {
                target + super::vhd::FOOTER_LEN
            } else {
                target
            };
            file.set_len(len)
                .map_err(|e| Error::io(format!("sizing {}", output.display()), e))?;
            let direct = {
                use std::os::unix::fs::OpenOptionsExt as _;
                OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(output)
                    .ok()
            };
            (
                Sink::Raw(RawSink {
                    file,
                    direct,
                    path: output.to_owned(),
                    size: target,
                    vhd_footer: vhd,
                }),
                RAW_BLOCK,
            )
        }
    };
    let (bytes_read, bytes_written) = pump(source, backing, &mut sink, grain, opts, progress)?;
    let file_size = match sink {
        Sink::Qcow2(w) => w.finish_with(opts.sync)?.file_size,
        Sink::Vmdk(w) => w.finish(opts.sync)?,
        Sink::VmdkSparse(w) => w.finish(opts.sync)?,
        Sink::VhdDynamic(w) => w.finish(opts.sync)?,
        Sink::Vhdx(w) => w.finish(opts.sync)?,
        Sink::Stream(_) | Sink::VmdkStream(_) => {
            return Err(Error::InvalidArgument(
                "an upload sink in a file conversion".into(),
            ));
        }
        Sink::Raw(r) => {
            if r.vhd_footer {
                let footer = super::vhd::fixed_footer(r.size);
                r.file.write_all_at(&footer, r.size).map_err(|e| {
                    Error::io(format!("writing the VHD footer of {}", r.path.display()), e)
                })?;
            }
            if opts.sync {
                r.file
                    .sync_all()
                    .map_err(|e| Error::io(format!("syncing {}", r.path.display()), e))?;
            }
            if r.vhd_footer {
                r.size + super::vhd::FOOTER_LEN
            } else {
                r.size
            }
        }
    };
    progress(size, size);
    let allocated_bytes = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(output)
            .map_err(|e| Error::io(format!("reading metadata of {}", output.display()), e))?
            .blocks()
            .saturating_mul(512)
    };
    Ok(ConvertSummary {
        format: opts.format,
        virtual_size: size,
        bytes_read,
        bytes_written,
        file_size,
        allocated_bytes,
    })
}

/// Runs the pipeline: reads the source on worker threads and writes into
/// `sink`; returns the bytes read and the data bytes written.
fn pump(
    source: &dyn ImageReader,
    backing: Option<&dyn ImageReader>,
    sink: &mut Sink,
    grain: u64,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(u64, u64)> {
    let compression = match opts.format {
        ImageFormat::Qcow2 => opts.qcow2.compression,
        _ => None,
    };
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
    } else {
        opts.threads
    };
    let chunk = CHUNK.max(grain);
    let mut jobs = JobGen::new(source, backing.is_some(), grain, chunk);
    let size = source.virtual_size();
    let pool: Mutex<Vec<Buf>> = Mutex::new(Vec::new());
    let raw_file = match &*sink {
        Sink::Raw(r) => {
            let clone = |f: &File| {
                f.try_clone()
                    .map_err(|e| Error::io(format!("opening {}", r.path.display()), e))
            };
            Some((clone(&r.file)?, r.path.clone()))
        }
        _ => None,
    };
    let direct_written = std::sync::atomic::AtomicU64::new(0);
    let data_file = source.data_file();
    let data_len_before = data_file.and_then(|f| f.metadata().ok()).map(|m| m.len());
    let map = data_file.and_then(FileMap::new).map(|map| SourceMap {
        map,
        path: source.path(),
    });
    let work = Work {
        raw_out: raw_file.as_ref().map(|(file, path)| RawOut { file, path }),
        map: map.as_ref(),
        written: &direct_written,
        source,
        backing,
        grain,
        compression,
        with_backing: backing.is_some(),
        vmdk: matches!(sink, Sink::Vmdk(_) | Sink::VmdkStream(_)),
        pool: &pool,
    };
    let max_in_flight = 4 * threads as u64;
    let mut bytes_read = 0u64;
    let mut bytes_written = 0u64;

    let outcome: Result<()> = std::thread::scope(|scope| {
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Result<Done>>();
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let done_tx = done_tx.clone();
            let work = &work;
            scope.spawn(move || {
                loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    if done_tx.send(work.process(job)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let mut sent = 0u64;
        let mut next = 0u64;
        let mut ready: BTreeMap<u64, Done<'_>> = BTreeMap::new();
        let mut exhausted = false;
        loop {
            while !exhausted && sent - next < max_in_flight {
                match jobs.next_job()? {
                    Some(job) => {
                        bytes_read += job.len;
                        if job_tx.send(job).is_err() {
                            return Err(Error::InvalidArgument(
                                "conversion workers stopped".into(),
                            ));
                        }
                        sent += 1;
                    }
                    None => exhausted = true,
                }
            }
            if next == sent {
                break;
            }
            let done = done_rx
                .recv()
                .map_err(|_| Error::InvalidArgument("conversion workers stopped".into()))??;
            ready.insert(done.seq, done);
            while let Some(done) = ready.remove(&next) {
                bytes_written += write_done(sink, &done, map.as_ref())?;
                let len = done.data.as_slice().len() as u64;
                progress(done.offset + len, size);
                match done.data {
                    Bytes::Owned(buf) => recycle(&pool, buf),
                    Bytes::Mapped { host, bytes } => {
                        // (write_done checked the map.)
                        if let Some(m) = &map {
                            m.map.release(host, bytes.len());
                        }
                    }
                }
                next += 1;
            }
        }
        drop(job_tx);
        Ok(())
    });
    outcome?;
    // Through a buffer, a source that shrinks reads as zeros past its new
    // end (as QEMU's file driver reads it): refuse that output too.
    let data_len_after = data_file.and_then(|f| f.metadata().ok()).map(|m| m.len());
    if let (Some(before), Some(after)) = (data_len_before, data_len_after)
        && after < before
    {
        return Err(source_changed(source.path()));
    }
    bytes_written += direct_written.load(std::sync::atomic::Ordering::Relaxed);
    Ok((bytes_read, bytes_written))
}

fn recycle(pool: &Mutex<Vec<Buf>>, buf: Buf) {
    if let Ok(mut p) = pool.lock()
        && p.len() < 64
    {
        p.push(buf);
    }
}

/// Writes one finished chunk; returns the data bytes written.
fn write_done(sink: &mut Sink, done: &Done<'_>, map: Option<&SourceMap<'_>>) -> Result<u64> {
    let result = write_chunk(sink, done);
    match (map, &done.data) {
        (Some(m), Bytes::Mapped { .. }) => {
            m.check()?;
            result.map_err(|e| m.explain(e))
        }
        _ => result,
    }
}

fn write_chunk(sink: &mut Sink, done: &Done<'_>) -> Result<u64> {
    let data = done.data.as_slice();
    if let Sink::Stream(st) = sink {
        use std::io::Write as _;
        st.zeros_to(done.offset)?;
        st.w.write_all(data)
            .map_err(|e| Error::io(format!("uploading bytes at {}", done.offset), e))?;
        st.pos = done.offset + data.len() as u64;
        return Ok(done
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Data { len, .. } => *len as u64,
                _ => 0,
            })
            .sum());
    }
    let mut written = 0u64;
    for piece in &done.pieces {
        match (piece, &mut *sink) {
            (Piece::Data { at, len }, Sink::Raw(r)) => {
                let data = data.get(*at..at + len).unwrap_or_default();
                let offset = done.offset + *at as u64;
                // (Chunks from the map were written by the workers.)
                r.write_at(data, offset, matches!(done.data, Bytes::Owned(_)))?;
                written += *len as u64;
            }
            (Piece::Data { at, len }, Sink::Qcow2(w)) => {
                let data = data.get(*at..at + len).unwrap_or_default();
                w.write_uncompressed_run(done.offset + *at as u64, data)?;
                written += *len as u64;
            }
            (Piece::Compressed { at, bytes }, Sink::Qcow2(w)) => {
                w.write_compressed(done.offset + *at as u64, bytes)?;
                written += bytes.len() as u64;
            }
            (Piece::Zero { at, len }, Sink::Qcow2(w)) => {
                w.write_at(done.offset + *at as u64, &vec![0u8; *len])?;
            }
            (Piece::Compressed { at, bytes }, Sink::Vmdk(w)) => {
                w.write_grain(done.offset + *at as u64, bytes)?;
                written += bytes.len() as u64;
            }
            (Piece::Compressed { at, bytes }, Sink::VmdkStream(w)) => {
                w.write_grain(done.offset + *at as u64, bytes)?;
                written += bytes.len() as u64;
            }
            (Piece::Data { at, len }, Sink::VmdkSparse(w)) => {
                let data = data.get(*at..at + len).unwrap_or_default();
                w.write_grains(done.offset + *at as u64, data)?;
                written += *len as u64;
            }
            (Piece::Data { at, len }, Sink::VhdDynamic(w)) => {
                let data = data.get(*at..at + len).unwrap_or_default();
                w.write_at(done.offset + *at as u64, data)?;
                written += *len as u64;
            }
            (Piece::Data { at, len }, Sink::Vhdx(w)) => {
                let data = data.get(*at..at + len).unwrap_or_default();
                w.write_at(done.offset + *at as u64, data)?;
                written += *len as u64;
            }
            (
                Piece::Compressed { .. } | Piece::Zero { .. },
                Sink::Raw(_) | Sink::VmdkSparse(_) | Sink::VhdDynamic(_) | Sink::Vhdx(_),
            )
            | (Piece::Data { .. } | Piece::Zero { .. }, Sink::Vmdk(_) | Sink::VmdkStream(_))
            | (_, Sink::Stream(_)) => {}
        }
    }
    Ok(written)
}

/// What the workers share.
struct Work<'a> {
    /// Raw and fixed-VHD output: position-independent, so the workers
    /// write the chunks they took from the source's map themselves, in
    /// any order (see [`Work::process`]).
    raw_out: Option<RawOut<'a>>,
    /// The source's data file, mapped, when it has one.
    map: Option<&'a SourceMap<'a>>,
    /// Data bytes the workers wrote themselves.
    written: &'a std::sync::atomic::AtomicU64,
    source: &'a dyn ImageReader,
    backing: Option<&'a dyn ImageReader>,
    grain: u64,
    compression: Option<Compression>,
    with_backing: bool,
    vmdk: bool,
    pool: &'a Mutex<Vec<Buf>>,
}

/// Raw (or fixed VHD) output, for the workers.
#[derive(Clone, Copy)]
struct RawOut<'a> {
    file: &'a File,
    path: &'a Path,
}

impl<'a> Work<'a> {
    fn buffer(&self, len: usize) -> Buf {
        self.pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default()
            .sized(len)
    }

    fn process(&self, job: Job) -> Result<Done<'a>> {
        let len = job.len as usize;
        let mapped = match self.map {
            Some(m) => self
                .source
                .stored_at(job.offset, job.len)?
                .and_then(|host| m.map.get(host, len).map(|bytes| (host, bytes))),
            None => None,
        };
        let data = match mapped {
            Some((host, bytes)) => Bytes::Mapped { host, bytes },
            None => {
                let mut buf = self.buffer(len);
                self.source.read_at(job.offset, buf.as_mut_slice())?;
                Bytes::Owned(buf)
            }
        };
        let bytes = data.as_slice();
        let grain = self.grain as usize;
        let mut pieces = Vec::new();
        let mut base = Buf::default();
        if let Some(b) = self.backing {
            base = self.buffer(len);
            let base = base.as_mut_slice();
            let inside = usize::try_from(b.virtual_size().saturating_sub(job.offset))
                .unwrap_or(usize::MAX)
                .min(len);
            if let Some(head) = base.get_mut(..inside)
                && !head.is_empty()
            {
                b.read_at(job.offset, head)?;
            }
            if let Some(tail) = base.get_mut(inside..) {
                tail.fill(0);
            }
        }
        let mut at = 0usize;
        while at < len {
            let n = grain.min(len - at);
            let block = bytes.get(at..at + n).unwrap_or_default();
            if self.with_backing && base.as_slice().get(at..at + n) == Some(block) {
                // Same as the backing file: leave unallocated.
            } else if is_zero(block) {
                if self.with_backing {
                    pieces.push(Piece::Zero { at, len: n });
                }
            } else if self.vmdk {
                pieces.push(Piece::Compressed {
                    at,
                    bytes: compress_grain(block),
                });
            } else if let Some(c) = self.compression {
                match compress_cluster(block, grain, c) {
                    Some(bytes) => pieces.push(Piece::Compressed { at, bytes }),
                    None => push_data(&mut pieces, at, n),
                }
            } else {
                push_data(&mut pieces, at, n);
            }
            at += n;
        }
        if !base.vec.is_empty() {
            recycle(self.pool, base);
        }
        if let (Some(m), Bytes::Mapped { .. }) = (self.map, &data) {
            m.check()?;
        }
        // Raw output is position-independent. A chunk from the source's map
        // costs its worker nothing but the write, so the worker writes it
        // itself, through the page cache (both cores copy, taking turns on
        // the file's lock). A chunk that had to be computed (decompressed)
        // goes to the calling thread, which writes it with `O_DIRECT` (see
        // [`RawSink::write_at`]), so that a worker never waits on the disk
        // when it could be decompressing the next chunk.
        if let (Some(out), Bytes::Mapped { .. }) = (self.raw_out, &data) {
            for piece in pieces.drain(..) {
                if let Piece::Data { at, len } = piece {
                    let offset = job.offset + at as u64;
                    let run = bytes.get(at..at + len).unwrap_or_default();
                    crate::fsx::preallocate(out.file, offset, len as u64);
                    out.file.write_all_at(run, offset).map_err(|e| {
                        let e = Error::io(format!("writing {} at {offset}", out.path.display()), e);
                        match self.map {
                            Some(m) => m.explain(e),
                            None => e,
                        }
                    })?;
                    self.written.fetch_add(len as u64, Relaxed);
                }
            }
        }
        Ok(Done {
            seq: job.seq,
            offset: job.offset,
            data,
            pieces,
        })
    }
}

/// Appends a data run, merging it with the previous one when adjacent.
fn push_data(pieces: &mut Vec<Piece>, at: usize, len: usize) {
    if let Some(Piece::Data { at: a, len: l }) = pieces.last_mut()
        && *a + *l == at
    {
        *l += len;
        return;
    }
    pieces.push(Piece::Data { at, len });
}

/// Whether `buf` holds only zeros (blocks whose OR the compiler
/// vectorises, stopping at the first non-zero block).
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Generates the chunks to read, front to back, aligned to the output's
/// grain so that no target cluster is split between two chunks.
struct JobGen<'a> {
    extents: super::reader::Extents<'a>,
    size: u64,
    all: bool,
    grain: u64,
    chunk: u64,
    current: Option<Extent>,
    pos: u64,
    seq: u64,
}

impl<'a> JobGen<'a> {
    fn new(source: &'a dyn ImageReader, all: bool, grain: u64, chunk: u64) -> Self {
        Self {
            extents: extents(source),
            size: source.virtual_size(),
            all,
            grain,
            chunk,
            current: None,
            pos: 0,
            seq: 0,
        }
    }

    fn next_job(&mut self) -> Result<Option<Job>> {
        loop {
            if self.all {
                // Every chunk of the disk (output with a backing file).
                if self.pos >= self.size {
                    return Ok(None);
                }
                let end = ((self.pos / self.chunk + 1) * self.chunk).min(self.size);
                return Ok(Some(self.job(end)));
            }
            let extent = match self.current {
                Some(e) if e.end() > self.pos => e,
                _ => match self.extents.next() {
                    None => return Ok(None),
                    Some(e) => {
                        let e = e?;
                        self.current = Some(e);
                        continue;
                    }
                },
            };
            if extent.kind.reads_as_zero() {
                self.current = None;
                continue;
            }
            // Start at the grain boundary, but never before what the
            // previous job covered.
            let start = (extent.offset.max(self.pos) / self.grain * self.grain).max(self.pos);
            self.pos = start;
            let end = ((start / self.chunk + 1) * self.chunk)
                .min(extent.end().div_ceil(self.grain) * self.grain)
                .min(self.size);
            if end <= start {
                self.current = None;
                continue;
            }
            return Ok(Some(self.job(end)));
        }
    }

    fn job(&mut self, end: u64) -> Job {
        let job = Job {
            seq: self.seq,
            offset: self.pos,
            len: end - self.pos,
        };
        self.seq += 1;
        self.pos = end;
        job
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buffers_start_on_a_block_and_keep_their_bytes_when_resized() {
        let mut buf = Buf::default().sized(10_000);
        assert_eq!(buf.as_slice().len(), 10_000);
        assert_eq!(buf.as_slice().as_ptr().addr() % DIRECT_ALIGN, 0);
        buf.as_mut_slice().fill(7);
        let buf = buf.sized(5000);
        assert_eq!(buf.as_slice(), &[7u8; 5000][..]);
        let buf = buf.sized(3 << 20);
        assert_eq!(buf.as_slice().len(), 3 << 20);
        assert_eq!(buf.as_slice().as_ptr().addr() % DIRECT_ALIGN, 0);
    }

    fn sink(path: &Path) -> RawSink {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = File::create(path).unwrap();
        file.set_len(1 << 20).unwrap();
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        RawSink {
            file,
            direct,
            path: path.to_owned(),
            size: 1 << 20,
            vhd_footer: false,
        }
    }

    #[test]
    fn raw_writes_that_are_not_whole_blocks_go_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.raw");
        let mut s = sink(&path);
        let could_direct = s.direct.is_some();
        let mut buf = Buf::default().sized(3 * DIRECT_ALIGN);
        buf.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        let whole = buf.as_slice();
        // Whole blocks (direct when the file system allows it), then an
        // odd offset, an odd length and memory off a block boundary: each
        // would be EINVAL with O_DIRECT.
        s.write_at(whole, 0, true).unwrap();
        s.write_at(&whole[..DIRECT_ALIGN], 4 * DIRECT_ALIGN as u64 + 512, true)
            .unwrap();
        s.write_at(&whole[..1000], 8 * DIRECT_ALIGN as u64, true)
            .unwrap();
        s.write_at(&whole[1..=DIRECT_ALIGN], 12 * DIRECT_ALIGN as u64, true)
            .unwrap();
        // None of them made the sink give up direct writes.
        assert_eq!(s.direct.is_some(), could_direct);
        drop(s);
        let back = std::fs::read(&path).unwrap();
        let at = |o: usize, n: usize| &back[o..o + n];
        assert_eq!(at(0, whole.len()), whole);
        assert_eq!(
            at(4 * DIRECT_ALIGN + 512, DIRECT_ALIGN),
            &whole[..DIRECT_ALIGN]
        );
        assert_eq!(at(8 * DIRECT_ALIGN, 1000), &whole[..1000]);
        assert_eq!(
            at(12 * DIRECT_ALIGN, DIRECT_ALIGN),
            &whole[1..=DIRECT_ALIGN]
        );
        assert!(at(3 * DIRECT_ALIGN, DIRECT_ALIGN).iter().all(|&b| b == 0));
    }
}
