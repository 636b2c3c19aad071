//! The copy engine: chunked, hashed, parallel, resumable, incremental.

use std::fs::{File, Metadata, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use fluidcloud_plugins::CancelFlag;
use serde::Serialize;

use super::manifest::{self, Leaf, Manifest, hex, manifest_path, stamp_matches};
use super::progress::{self, Header, Log, progress_path};
use crate::error::{Error, Result};
use crate::image::{ExtentKind, ImageReader, RawReader, open};

/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
/// Smallest chunk size accepted: 4 KiB.
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
/// Largest chunk size accepted: 64 MiB (two buffers of it per thread).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Zero detection granularity when writing: all-zero blocks of this size
/// stay holes in the target, as with `cp --sparse=always`.
const BLOCK: usize = 4096;
/// Sync the target and log progress after this many bytes written...
const SYNC_BYTES: u64 = 256 << 20;
/// ... or this much time, whichever comes first.
const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Data is read, hashed and written in pieces of this size, which stay in
/// the CPU's cache between those steps.
const PIECE: usize = 256 << 10;

/// How to copy a volume.
#[derive(Debug, Clone)]
pub struct VolumeCopyOptions {
    /// Chunk size in bytes: a power of two from [`MIN_CHUNK_SIZE`] to
    /// [`MAX_CHUNK_SIZE`]; [`DEFAULT_CHUNK_SIZE`] by default.
    pub chunk_size: u64,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Accept a pre-existing target that no volume copy wrote (no matching
    /// manifest or progress log): it is hashed and only differing chunks
    /// are written. Without it such a target is refused, so a wrong path
    /// never overwrites someone's file.
    pub overwrite: bool,
    /// Re-hash every target chunk at the end, not only those written in
    /// this run (the others were verified when written, or hashed now).
    pub verify_all: bool,
    /// Recorded as the creator in the sidecar files when this run creates
    /// the target, and kept by later runs; a rollback deletes the target
    /// only when it finds its own tag there. The migrator uses the step id.
    pub owner: String,
    /// Stop at the next chunk boundary when set; the work done so far is
    /// kept and the next run resumes from it.
    pub cancel: Option<CancelFlag>,
}

impl Default for VolumeCopyOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            threads: 0,
            overwrite: false,
            verify_all: false,
            owner: String::new(),
            cancel: None,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VolumeCopySummary {
    /// Merkle root of the volume (source and target), lowercase hex.
    pub root: String,
    /// Size of the volume in bytes.
    pub virtual_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Chunks written (or punched to a hole) at the target in this run.
    pub chunks_sent: u64,
    /// Chunks the target already held (identical), not written.
    pub chunks_skipped: u64,
    /// Chunks that are all zero at the source (sent or skipped).
    pub chunks_zero: u64,
    /// Length of the chunks sent.
    pub bytes_sent: u64,
    /// Length of the chunks skipped.
    pub bytes_skipped: u64,
    /// Bytes read from the source (holes and zero extents are not read).
    pub bytes_read: u64,
    /// Bytes read back from the target: written chunks re-hashed, and
    /// target chunks hashed when no trusted record of them existed.
    pub bytes_verified: u64,
    /// Bytes written to the target (all-zero blocks are not written).
    pub bytes_written: u64,
    /// Chunks whose target state came from the progress log of an
    /// interrupted earlier run.
    pub chunks_resumed: u64,
    /// Whether the target's manifest from an earlier copy was trusted.
    pub manifest_trusted: bool,
    /// Whether this run created the target file.
    pub created: bool,
    /// Wall-clock time of the copy.
    pub elapsed: Duration,
}

/// Checks a chunk size.
///
/// # Errors
///
/// [`Error::InvalidArgument`] naming `chunk_size` when it is not a power of
/// two from [`MIN_CHUNK_SIZE`] to [`MAX_CHUNK_SIZE`].
pub fn check_chunk_size(chunk_size: u64) -> Result<()> {
    if chunk_size.is_power_of_two() && (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "chunk_size {chunk_size} must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}"
        )))
    }
}

fn threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
    }
}

/// Whether `buf` holds only zeros; stops at the first non-zero 64 bytes.
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Reads and hashes chunk `off..off + len` of `reader`. Ranges the extent
/// map says are holes or zeros are not read; a chunk without data is
/// [`Leaf::Zero`] without touching `buf`. Data is read and hashed in
/// pieces of [`PIECE`] bytes while they are still in the CPU cache, and
/// each piece read is handed to `on_piece` (offset in the chunk, bytes).
/// With `keep`, `buf` ends up holding the whole chunk; without it, `buf`
/// only needs one piece. Returns the leaf and the bytes read.
fn hash_chunk(
    reader: &dyn ImageReader,
    off: u64,
    len: usize,
    buf: &mut Vec<u8>,
    keep: bool,
    ranges: &mut Vec<(usize, usize, bool)>,
    on_piece: &mut dyn FnMut(usize, &[u8]) -> Result<()>,
) -> Result<(Leaf, u64)> {
    let end = off + len as u64;
    ranges.clear();
    let mut pos = off;
    let mut any = false;
    while pos < end {
        let e = reader.extent_at(pos)?;
        let e_end = e.end().min(end);
        if e.offset != pos || e_end <= pos {
            return Err(Error::Corrupt {
                what: format!("extent map of {} (empty extent)", reader.path().display()),
                offset: pos,
            });
        }
        let data = e.kind == ExtentKind::Data;
        any |= data;
        ranges.push(((pos - off) as usize, (e_end - off) as usize, data));
        pos = e_end;
    }
    if !any {
        return Ok((Leaf::Zero, 0));
    }
    let need = if keep { len } else { len.min(PIECE) };
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let mut hasher = blake3::Hasher::new();
    let mut nonzero = false;
    let mut read = 0;
    for &(a, b, data) in ranges.iter() {
        let mut at = a;
        while at < b {
            let n = (b - at).min(PIECE);
            let slot = if keep { at } else { 0 };
            let Some(piece) = buf.get_mut(slot..slot + n) else {
                break;
            };
            if data {
                reader.read_at(off + at as u64, piece)?;
                read += n as u64;
                nonzero = nonzero || !is_zero(piece);
                on_piece(at, piece)?;
            } else {
                piece.fill(0);
            }
            hasher.update(piece);
            at += n;
        }
    }
    let leaf = if nonzero {
        Leaf::Data(*hasher.finalize().as_bytes())
    } else {
        Leaf::Zero
    };
    Ok((leaf, read))
}

/// `fallocate(PUNCH_HOLE)`; `false` when the file system cannot punch.
fn punch(file: &File, off: u64, len: u64) -> std::io::Result<bool> {
    crate::fsx::fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

/// Starts writing `off..off + len` of `file` back to disk without waiting,
/// so the periodic sync finds little left to do and the copy overlaps the
/// disk writes. Only a hint: failures surface at the sync.
fn start_writeback(file: &File, off: u64, len: u64) {
    let (Ok(o), Ok(l)) = (libc::off64_t::try_from(off), libc::off64_t::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Writes the non-zero blocks of `buf` at `off`; returns the bytes written.
fn write_blocks(file: &File, buf: &[u8], off: u64) -> std::io::Result<u64> {
    let n = buf.len();
    let zero_at = |i: usize| is_zero(buf.get(i..(i + BLOCK).min(n)).unwrap_or_default());
    let mut written = 0;
    let mut i = 0;
    while i < n {
        while i < n && zero_at(i) {
            i += BLOCK;
        }
        let start = i;
        while i < n && !zero_at(i) {
            i += BLOCK;
        }
        let end = i.min(n);
        if end > start {
            file.write_all_at(buf.get(start..end).unwrap_or_default(), off + start as u64)?;
            written += (end - start) as u64;
        }
    }
    Ok(written)
}

/// Result of one chunk.
#[derive(Debug)]
struct Done {
    index: u64,
    source: Leaf,
    target: Leaf,
    sent: bool,
    read: u64,
    verified: u64,
    written: u64,
}

/// What the workers share.
struct Work<'a> {
    source: &'a dyn ImageReader,
    target_reader: &'a dyn ImageReader,
    target: &'a File,
    target_path: &'a Path,
    chunk_size: u64,
    virtual_size: u64,
    known: &'a [Option<Leaf>],
    recorded: &'a [bool],
    log: &'a Mutex<Log>,
    next: AtomicU64,
    stop: AtomicBool,
    cancel: Option<&'a CancelFlag>,
    can_punch: AtomicBool,
}

impl Work<'_> {
    fn chunks(&self) -> u64 {
        Manifest::chunks_for(self.virtual_size, self.chunk_size)
    }

    fn claim(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) || self.cancel.is_some_and(CancelFlag::is_cancelled) {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.chunks()).then_some(i)
    }

    fn io(&self, what: &str, off: u64, e: std::io::Error) -> Error {
        Error::io(
            format!(
                "{what} target {} at offset {off}",
                self.target_path.display()
            ),
            e,
        )
    }

    /// Makes `off..off + len` of the target read as zeros.
    fn clear(&self, off: u64, len: u64) -> Result<u64> {
        if self.can_punch.load(Ordering::Relaxed) {
            match punch(self.target, off, len) {
                Ok(true) => return Ok(0),
                Ok(false) => self.can_punch.store(false, Ordering::Relaxed),
                Err(e) => return Err(self.io("punching a hole in", off, e)),
            }
        }
        let zeros = vec![0u8; len as usize];
        self.target
            .write_all_at(&zeros, off)
            .map_err(|e| self.io("writing zeros to", off, e))?;
        Ok(len)
    }

    fn process(&self, index: u64, src: &mut Vec<u8>, tgt: &mut Vec<u8>) -> Result<Done> {
        let mut ranges = Vec::new();
        let off = index * self.chunk_size;
        let len = (self.virtual_size - off).min(self.chunk_size) as usize;
        let idx = index as usize;
        let known = self.known.get(idx).copied().flatten();
        let mut written = 0;
        let (source, read) = if known == Some(Leaf::Zero) && !self.recorded_at(idx) {
            // The target reads as zeros here: any non-zero piece will be
            // sent, so it is written at once, while in cache.
            hash_chunk(
                self.source,
                off,
                len,
                src,
                false,
                &mut ranges,
                &mut |at, piece| {
                    written += write_blocks(self.target, piece, off + at as u64)
                        .map_err(|e| self.io("writing", off + at as u64, e))?;
                    Ok(())
                },
            )?
        } else {
            // Hash only, through a piece-sized buffer that stays in cache:
            // most chunks turn out to be at the target already.
            hash_chunk(
                self.source,
                off,
                len,
                src,
                false,
                &mut ranges,
                &mut |_, _| Ok(()),
            )?
        };
        let mut verified = 0;
        let before = match known {
            Some(l) => l,
            None => {
                let (l, n) = hash_chunk(
                    self.target_reader,
                    off,
                    len,
                    tgt,
                    false,
                    &mut ranges,
                    &mut |_, _| Ok(()),
                )?;
                verified += n;
                l
            }
        };
        let (mut source, mut read) = (source, read);
        if before != source && written == 0 && source != Leaf::Zero {
            // Read the chunk again, whole this time, to write it; what is
            // written is what is hashed now (the source may be running).
            let (again, n) = hash_chunk(
                self.source,
                off,
                len,
                src,
                true,
                &mut ranges,
                &mut |_, _| Ok(()),
            )?;
            source = again;
            read += n;
        }
        let mut done = Done {
            index,
            source,
            target: source,
            sent: written > 0,
            read,
            verified,
            written,
        };
        if before == source && !done.sent {
            return Ok(done);
        }
        if !done.sent {
            if self.recorded_at(idx) {
                // The log holds a record of this chunk from an interrupted
                // run: withdraw it before the data changes under it.
                self.log
                    .lock()
                    .map_err(|_| Error::InvalidArgument("progress log lock poisoned".into()))?
                    .append(&[(index, None)])?;
            }
            match source {
                Leaf::Zero => done.written = self.clear(off, len as u64)?,
                Leaf::Data(_) => {
                    let data = src.get(..len).unwrap_or_default();
                    if before != Leaf::Zero {
                        // Old data under the zero blocks must go.
                        done.written = self.clear(off, len as u64)?;
                    }
                    done.written += write_blocks(self.target, data, off)
                        .map_err(|e| self.io("writing", off, e))?;
                }
            }
        }
        if done.written > 0 {
            start_writeback(self.target, off, len as u64);
        }
        // Verify what the target now holds by reading it back.
        let (after, n) = hash_chunk(
            self.target_reader,
            off,
            len,
            tgt,
            false,
            &mut ranges,
            &mut |_, _| Ok(()),
        )?;
        done.verified += n;
        done.target = after;
        done.sent = true;
        if after != source {
            return Err(Error::Corrupt {
                what: format!(
                    "target {} (chunk {index} reads back differently after writing)",
                    self.target_path.display()
                ),
                offset: off,
            });
        }
        Ok(done)
    }

    fn recorded_at(&self, idx: usize) -> bool {
        self.recorded.get(idx).copied().unwrap_or(false)
    }
}

/// Hashes every chunk of `reader` on `threads` threads.
fn hash_all(
    reader: &dyn ImageReader,
    chunk_size: u64,
    threads: usize,
    cancel: Option<&CancelFlag>,
    progress: &dyn Fn(u64, u64),
) -> Result<(Vec<Leaf>, u64)> {
    let size = reader.virtual_size();
    let n = Manifest::chunks_for(size, chunk_size);
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut leaves = vec![None; n as usize];
    let mut read = 0;
    let mut done_bytes = 0;
    let mut first_err = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..threads.min(n as usize).max(1) {
            let tx = tx.clone();
            let (next, stop) = (&next, &stop);
            scope.spawn(move || {
                let (mut buf, mut ranges) = (Vec::new(), Vec::new());
                loop {
                    if stop.load(Ordering::Relaxed) || cancel.is_some_and(CancelFlag::is_cancelled)
                    {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let off = i * chunk_size;
                    let len = (size - off).min(chunk_size) as usize;
                    let r = hash_chunk(
                        reader,
                        off,
                        len,
                        &mut buf,
                        false,
                        &mut ranges,
                        &mut |_, _| Ok(()),
                    );
                    if r.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    if tx.send((i, len, r)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for (i, len, r) in rx {
            match r {
                Ok((leaf, n)) => {
                    if let Some(slot) = leaves.get_mut(i as usize) {
                        *slot = Some(leaf);
                    }
                    read += n;
                    done_bytes += len as u64;
                    progress(done_bytes, size);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = first_err {
        return Err(e);
    }
    let leaves: Option<Vec<Leaf>> = leaves.into_iter().collect();
    match leaves {
        Some(l) => Ok((l, read)),
        None => Err(cancelled(reader.path(), "hashing")),
    }
}

fn cancelled(path: &Path, what: &str) -> Error {
    Error::io(
        format!(
            "{what} {} was cancelled; run again to resume",
            path.display()
        ),
        std::io::ErrorKind::Interrupted.into(),
    )
}

/// The Merkle manifest of the volume or image at `path` (raw, qcow2, VMDK,
/// VHD or VHDX), hashed on every core. Holes and zero extents are not read.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for a bad chunk size; otherwise as
/// [`crate::image::open`] and [`ImageReader::read_at`].
pub fn manifest_of(path: &Path, chunk_size: u64) -> Result<Manifest> {
    check_chunk_size(chunk_size)?;
    let reader = open(path)?;
    let (leaves, _) = hash_all(reader.as_ref(), chunk_size, threads(0), None, &|_, _| {})?;
    Ok(Manifest {
        chunk_size,
        virtual_size: reader.virtual_size(),
        leaves,
    })
}

fn same_file(dev: u64, ino: u64, meta: &Metadata) -> bool {
    dev == meta.dev() && ino == meta.ino()
}

/// Copies the volume or image at `source` into the sparse raw file
/// `target`, sending only the chunks the target does not already hold.
/// See the module docs for resume and re-sync. `progress` gets the bytes
/// of the volume processed so far and the volume's size.
///
/// # Errors
///
/// - [`Error::InvalidArgument`] for a bad chunk size (naming `chunk_size`),
///   a target that is not a regular file, is the source itself, or exists
///   without a manifest of ours while `overwrite` is off.
/// - [`Error::Io`] naming the file for a missing source or target
///   directory and any failed read, write or sync; kind `Interrupted`
///   when cancelled (the next run resumes).
/// - [`Error::Corrupt`] / [`Error::Unsupported`] for a source image that
///   cannot be read, or a target chunk that reads back differently.
pub fn copy(
    source: &Path,
    target: &Path,
    opts: &VolumeCopyOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<VolumeCopySummary> {
    let started = Instant::now();
    let cs = opts.chunk_size;
    check_chunk_size(cs)?;
    let reader = open(source)?;
    let size = reader.virtual_size();
    let n = Manifest::chunks_for(size, cs);
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::io(
            format!(
                "target directory {} of {} does not exist",
                dir.display(),
                target.display()
            ),
            std::io::ErrorKind::NotFound.into(),
        ));
    }
    let existing = match std::fs::metadata(target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Error::io(
                format!("reading metadata of target {}", target.display()),
                e,
            ));
        }
    };
    let log_path = progress_path(target);
    let mpath = manifest_path(target);
    let old_log = progress::load(&log_path)?;
    let old_manifest = manifest::load_with_stamp(&mpath).ok();

    let mut known: Vec<Option<Leaf>> = vec![None; n as usize];
    let mut recorded = vec![false; n as usize];
    let mut manifest_trusted = false;
    let mut chunks_resumed = 0;
    let created = existing.is_none();
    let (file, created_by, log) = match &existing {
        None => {
            // Claim the target in a log before creating it, so a crash in
            // between still leaves it recognisably ours.
            let mut header = Header {
                chunk_size: cs,
                virtual_size: size,
                created_by: Some(opts.owner.clone()),
                dev: 0,
                ino: 0,
            };
            Log::create(&log_path, &header, true)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(target)
                .map_err(|e| {
                    // Someone else's file appeared: withdraw the claim.
                    let _ = std::fs::remove_file(&log_path);
                    Error::io(format!("creating target {}", target.display()), e)
                })?;
            let io = |what: &str, e| Error::io(format!("{what} target {}", target.display()), e);
            file.set_len(size).map_err(|e| io("sizing", e))?;
            file.sync_all().map_err(|e| io("syncing", e))?;
            manifest::sync_parent(target)?;
            let meta = file.metadata().map_err(|e| io("reading metadata of", e))?;
            header.dev = meta.dev();
            header.ino = meta.ino();
            let log = Log::create(&log_path, &header, true)?;
            known.fill(Some(Leaf::Zero));
            (file, header.created_by, log)
        }
        Some(meta) => {
            if !meta.is_file() {
                return Err(Error::InvalidArgument(format!(
                    "target {} is not a regular file",
                    target.display()
                )));
            }
            if let Ok(src_meta) = std::fs::metadata(source)
                && same_file(src_meta.dev(), src_meta.ino(), meta)
            {
                return Err(Error::InvalidArgument(format!(
                    "target {} is the source itself",
                    target.display()
                )));
            }
            let log_owns = old_log.as_ref().filter(|l| {
                (l.header.ino == 0 && l.records.is_empty())
                    || same_file(l.header.dev, l.header.ino, meta)
            });
            let stamp = old_manifest
                .as_ref()
                .and_then(|(m, s)| s.as_ref().map(|s| (m, s)))
                .filter(|(_, s)| same_file(s.dev, s.ino, meta));
            let created_by = if let Some(l) = log_owns {
                l.header.created_by.clone()
            } else if let Some((_, s)) = stamp {
                s.created_by.clone()
            } else if opts.overwrite || mpath.exists() {
                // A manifest that no longer describes the target (or cannot
                // be read) still says a volume copy wrote here: hash the
                // target, but claim no ownership.
                None
            } else {
                return Err(Error::InvalidArgument(format!(
                    "target {} exists and no volume copy wrote it (no matching {}); \
                     remove it or set overwrite",
                    target.display(),
                    mpath.display()
                )));
            };
            if let Some((m, s)) = stamp
                && m.chunk_size == cs
                && m.virtual_size == size
                && stamp_matches(s, meta, &mpath)
            {
                for (k, l) in known.iter_mut().zip(&m.leaves) {
                    *k = Some(*l);
                }
                manifest_trusted = true;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(target)
                .map_err(|e| Error::io(format!("opening target {}", target.display()), e))?;
            if meta.len() != size {
                file.set_len(size)
                    .map_err(|e| Error::io(format!("sizing target {}", target.display()), e))?;
            }
            let reusable = log_owns.filter(|l| {
                l.header.ino != 0 && l.header.chunk_size == cs && l.header.virtual_size == size
            });
            let log = match reusable {
                Some(l) => {
                    for &(i, leaf) in &l.records {
                        if let (Some(k), Some(r)) =
                            (known.get_mut(i as usize), recorded.get_mut(i as usize))
                        {
                            *k = leaf;
                            *r = true;
                        }
                    }
                    chunks_resumed = recorded.iter().filter(|r| **r).count() as u64;
                    Log::reopen(&log_path, l.valid_len)?
                }
                // The manifest (if any) still records ownership, and a
                // lost log only costs hashing the target: no sync here.
                None => Log::create(
                    &log_path,
                    &Header {
                        chunk_size: cs,
                        virtual_size: size,
                        created_by: created_by.clone(),
                        dev: meta.dev(),
                        ino: meta.ino(),
                    },
                    stamp.is_none(),
                )?,
            };
            (file, created_by, log)
        }
    };
    let target_reader = RawReader::open(target)?;
    let log = Mutex::new(log);
    let work = Work {
        source: reader.as_ref(),
        target_reader: &target_reader,
        target: &file,
        target_path: target,
        chunk_size: cs,
        virtual_size: size,
        known: &known,
        recorded: &recorded,
        log: &log,
        next: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        cancel: opts.cancel.as_ref(),
        can_punch: AtomicBool::new(true),
    };

    let mut summary = VolumeCopySummary {
        root: String::new(),
        virtual_size: size,
        chunk_size: cs,
        chunks: n,
        chunks_sent: 0,
        chunks_skipped: 0,
        chunks_zero: 0,
        bytes_sent: 0,
        bytes_skipped: 0,
        bytes_read: 0,
        bytes_verified: 0,
        bytes_written: 0,
        chunks_resumed,
        manifest_trusted,
        created,
        elapsed: Duration::ZERO,
    };
    let mut src_leaves: Vec<Option<Leaf>> = vec![None; n as usize];
    let mut tgt_leaves: Vec<Option<Leaf>> = vec![None; n as usize];
    let mut first_err: Option<Error> = None;
    let commit = |pending: &mut Vec<(u64, Option<Leaf>)>| -> Result<()> {
        file.sync_data()
            .map_err(|e| Error::io(format!("syncing target {}", target.display()), e))?;
        log.lock()
            .map_err(|_| Error::InvalidArgument("progress log lock poisoned".into()))?
            .append(pending)?;
        pending.clear();
        Ok(())
    };
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Result<Done>>();
        for _ in 0..threads(opts.threads).min(n as usize).max(1) {
            let tx = tx.clone();
            let work = &work;
            scope.spawn(move || {
                let (mut src, mut tgt) = (Vec::new(), Vec::new());
                while let Some(i) = work.claim() {
                    let r = work.process(i, &mut src, &mut tgt);
                    if r.is_err() {
                        work.stop.store(true, Ordering::Relaxed);
                    }
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut pending = Vec::new();
        let mut unsynced = 0u64;
        let mut last = Instant::now();
        let mut done_bytes = 0u64;
        for r in rx {
            let d = match r {
                Ok(d) => d,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            let len = (size - d.index * cs).min(cs);
            let i = d.index as usize;
            if let (Some(s), Some(t)) = (src_leaves.get_mut(i), tgt_leaves.get_mut(i)) {
                *s = Some(d.source);
                *t = Some(d.target);
            }
            summary.bytes_read += d.read;
            summary.bytes_verified += d.verified;
            summary.bytes_written += d.written;
            if d.source == Leaf::Zero {
                summary.chunks_zero += 1;
            }
            if d.sent {
                summary.chunks_sent += 1;
                summary.bytes_sent += len;
            } else {
                summary.chunks_skipped += 1;
                summary.bytes_skipped += len;
            }
            // Skipped chunks are logged too: a resumed run then trusts the
            // target there without hashing it again.
            if !(recorded.get(i).copied().unwrap_or(false)
                && known.get(i).copied().flatten() == Some(d.target))
            {
                pending.push((d.index, Some(d.target)));
            }
            unsynced += d.written;
            done_bytes += len;
            if first_err.is_none()
                && !pending.is_empty()
                && (unsynced >= SYNC_BYTES || last.elapsed() >= SYNC_EVERY)
            {
                if let Err(e) = commit(&mut pending) {
                    work.stop.store(true, Ordering::Relaxed);
                    first_err = Some(e);
                }
                unsynced = 0;
                last = Instant::now();
            }
            progress(done_bytes, size);
        }
        // Whatever happened, what finished is made durable for the next run.
        if let Err(e) = commit(&mut pending) {
            first_err.get_or_insert(e);
        }
    });
    if let Some(e) = first_err {
        return Err(e);
    }
    let (Some(src_leaves), Some(mut tgt_leaves)) = (
        src_leaves.into_iter().collect::<Option<Vec<Leaf>>>(),
        tgt_leaves.into_iter().collect::<Option<Vec<Leaf>>>(),
    ) else {
        return Err(cancelled(target, "copying to"));
    };
    if opts.verify_all {
        let (leaves, n) = hash_all(
            &target_reader,
            cs,
            threads(opts.threads),
            opts.cancel.as_ref(),
            &|_, _| {},
        )?;
        summary.bytes_verified += n;
        tgt_leaves = leaves;
    }
    let src = Manifest {
        chunk_size: cs,
        virtual_size: size,
        leaves: src_leaves,
    };
    let tgt = Manifest {
        leaves: tgt_leaves,
        ..src.clone()
    };
    let (src_root, tgt_root) = (src.root(), tgt.root());
    if src_root != tgt_root {
        let first = src
            .leaves
            .iter()
            .zip(&tgt.leaves)
            .position(|(a, b)| a != b)
            .unwrap_or(0) as u64;
        return Err(Error::Corrupt {
            what: format!(
                "target {} (root {} differs from the source's {}; first at chunk {first})",
                target.display(),
                hex(&tgt_root),
                hex(&src_root)
            ),
            offset: first * cs,
        });
    }
    manifest::store(target, &tgt, created_by)?;
    drop(log);
    // Not synced: a log that survives a crash still tells the truth.
    match std::fs::remove_file(&log_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::io(
                format!("removing progress log {}", log_path.display()),
                e,
            ));
        }
    }
    summary.root = hex(&tgt_root);
    summary.elapsed = started.elapsed();
    Ok(summary)
}
