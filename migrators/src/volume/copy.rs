//! The copy engine: chunked, hashed, parallel, resumable, incremental.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, Metadata, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use fluidcloud_plugins::CancelFlag;
use serde::Serialize;

use super::manifest::{self, Leaf, Manifest, hex, manifest_path, stamp_matches};
use super::progress::{self, Header, Log, progress_path};
use crate::changes::ChangeSet;
use crate::error::{Error, Result};
use crate::image::{BackingPolicy, ExtentKind, ImageReader, RawReader, open, open_with};
use fluidcloud_plugins::ImageFormat;

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
    /// only when it finds its own tag there. The migrator uses
    /// `RELOCATION/STEP` (or the step id outside a relocation).
    pub owner: String,
    /// When set, an existing target is taken over only if its creator tag
    /// starts with this (`RELOCATION/`: the same relocation's pre-copy and
    /// final delta share a target); a target another relocation created,
    /// or one no copy of ours can vouch for, is refused, naming its owner.
    pub adopt: Option<String>,
    /// Stop at the next chunk boundary when set; the work done so far is
    /// kept and the next run resumes from it.
    pub cancel: Option<CancelFlag>,
    /// The source's format as its site declares it; `None` probes the
    /// content (for `fluidcloud` commands run on a user's own files, never
    /// in a relocation).
    pub source_format: Option<ImageFormat>,
    /// Where the source's backing files and extents may be.
    pub backing: BackingPolicy,
    /// What the source's guest wrote since the target's last copy, as the
    /// source site's change tracking saw it: with a trusted manifest of
    /// that copy, only these chunks are read, hashed and sent, and every
    /// other chunk keeps the manifest's leaf on both sides. Without a
    /// trusted manifest the whole volume is compared, as without it.
    ///
    /// Sound only when the source did not change outside these ranges
    /// since that copy, which tracking that began before it guarantees.
    pub changes: Option<ChangeSet>,
}

impl VolumeCopyOptions {
    /// How the source is opened.
    pub fn source_open(&self) -> crate::image::OpenOptions {
        crate::image::OpenOptions {
            format: self.source_format,
            snapshot: None,
            backing: self.backing.clone(),
        }
    }
}

impl Default for VolumeCopyOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            threads: 0,
            overwrite: false,
            verify_all: false,
            owner: String::new(),
            adopt: None,
            cancel: None,
            source_format: None,
            backing: BackingPolicy::default(),
            changes: None,
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
    /// Whether only the chunks of a change set were looked at
    /// ([`VolumeCopyOptions::changes`]).
    pub tracked: bool,
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

/// What is known of the target, chunk by chunk. A chunk not in `known`
/// reads as zeros (a new target, a hole of the target file, or a zero leaf
/// of a trusted manifest): memory follows the data, not the volume size.
#[derive(Debug, Default)]
struct TargetState {
    /// `Some(leaf)`: what the chunk holds; `None`: unknown (hash it).
    known: BTreeMap<u64, Option<Leaf>>,
    /// Chunks the progress log of an interrupted run recorded.
    recorded: BTreeSet<u64>,
}

impl TargetState {
    fn known(&self, index: u64) -> Option<Leaf> {
        self.known.get(&index).copied().unwrap_or(Some(Leaf::Zero))
    }

    fn recorded(&self, index: u64) -> bool {
        self.recorded.contains(&index)
    }

    /// Marks every chunk overlapping a data extent of `target` unknown.
    fn unknown_where_data(&mut self, target: &dyn ImageReader, chunk_size: u64) -> Result<()> {
        for i in data_chunks(target, chunk_size)? {
            self.known.insert(i, None);
        }
        Ok(())
    }
}

/// The chunks overlapping data extents of `reader`, in order: the only
/// ones that can hold anything but zeros. Costs time and memory in
/// proportion to the allocated data, whatever the virtual size.
fn data_chunks(reader: &dyn ImageReader, chunk_size: u64) -> Result<BTreeSet<u64>> {
    let mut out = BTreeSet::new();
    for e in crate::image::extents(reader) {
        let e = e?;
        if e.kind == ExtentKind::Data {
            let (first, last) = (e.offset / chunk_size, (e.end() - 1) / chunk_size);
            out.extend(first..=last);
        }
    }
    Ok(out)
}

/// What the workers share.
struct Work<'a> {
    source: &'a dyn ImageReader,
    target_reader: &'a dyn ImageReader,
    target: &'a File,
    target_path: &'a Path,
    chunk_size: u64,
    virtual_size: u64,
    state: &'a TargetState,
    /// The chunks to look at, in order; every other chunk is zero on both
    /// sides.
    todo: &'a [u64],
    log: &'a Mutex<Log>,
    next: AtomicUsize,
    stop: AtomicBool,
    cancel: Option<&'a CancelFlag>,
    can_punch: AtomicBool,
}

impl Work<'_> {
    fn claim(&self) -> Option<u64> {
        if self.stop.load(Ordering::Relaxed) || self.cancel.is_some_and(CancelFlag::is_cancelled) {
            return None;
        }
        self.todo
            .get(self.next.fetch_add(1, Ordering::Relaxed))
            .copied()
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
        let known = self.state.known(index);
        let mut written = 0;
        let (source, read) = if known == Some(Leaf::Zero) && !self.state.recorded(index) {
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
            if self.state.recorded(index) {
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
}

/// Hashes `reader` on `threads` threads: the chunks overlapping its data
/// extents are read, every other chunk is zero without reading.
fn hash_all(
    reader: &dyn ImageReader,
    chunk_size: u64,
    threads: usize,
    cancel: Option<&CancelFlag>,
    progress: &dyn Fn(u64, u64),
) -> Result<(Manifest, u64)> {
    let size = reader.virtual_size();
    let todo: Vec<u64> = data_chunks(reader, chunk_size)?.into_iter().collect();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut m = Manifest::zero(chunk_size, size);
    let mut read = 0;
    let mut hashed = 0usize;
    let todo_bytes: u64 = todo.iter().map(|&i| m.chunk_len(i)).sum();
    let mut done_bytes = size - todo_bytes;
    progress(done_bytes, size);
    let mut first_err = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..threads.min(todo.len()).max(1) {
            let tx = tx.clone();
            let (next, stop, todo) = (&next, &stop, &todo);
            scope.spawn(move || {
                let (mut buf, mut ranges) = (Vec::new(), Vec::new());
                loop {
                    if stop.load(Ordering::Relaxed) || cancel.is_some_and(CancelFlag::is_cancelled)
                    {
                        return;
                    }
                    let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return;
                    };
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
                    m.set(i, leaf);
                    hashed += 1;
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
    if hashed < todo.len() {
        return Err(cancelled(reader.path(), "hashing"));
    }
    Ok((m, read))
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
    let (m, _) = hash_all(reader.as_ref(), chunk_size, threads(0), None, &|_, _| {})?;
    Ok(m)
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
    let reader = open_with(source, &opts.source_open())?;
    let size = reader.virtual_size();
    let prepared = prepare_target(source, target, opts, size)?;
    let target_reader = RawReader::open(target)?;
    let mut state = prepared.state;
    if !prepared.manifest_trusted && !prepared.created {
        // Only the target's data can differ from zeros: hash just those
        // chunks (a resumed run's records stand).
        let recorded = std::mem::take(&mut state.recorded);
        let records: Vec<(u64, Option<Leaf>)> =
            recorded.iter().map(|&i| (i, state.known(i))).collect();
        state.unknown_where_data(&target_reader, cs)?;
        for (i, l) in records {
            state.known.insert(i, l);
        }
        state.recorded = recorded;
    }
    let tracked = match &opts.changes {
        Some(c) if c.virtual_size != size => {
            return Err(Error::InvalidArgument(format!(
                "change set of {} says {} bytes, the source {} has {size}",
                c.disk,
                c.virtual_size,
                source.display()
            )));
        }
        Some(c) => prepared.manifest_trusted.then_some(c),
        None => None,
    };
    let (todo, base) = match tracked {
        Some(c) => tracked_work(c, &state, cs, size),
        None => (
            untracked_work(reader.as_ref(), &state, cs)?,
            Manifest::zero(cs, size),
        ),
    };
    let log = Mutex::new(prepared.log);
    let work = Work {
        source: reader.as_ref(),
        target_reader: &target_reader,
        target: &prepared.file,
        target_path: target,
        chunk_size: cs,
        virtual_size: size,
        state: &state,
        todo: &todo,
        log: &log,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        cancel: opts.cancel.as_ref(),
        can_punch: AtomicBool::new(true),
    };
    let mut summary = VolumeCopySummary {
        root: String::new(),
        virtual_size: size,
        chunk_size: cs,
        chunks: Manifest::chunks_for(size, cs),
        chunks_sent: 0,
        chunks_skipped: 0,
        chunks_zero: 0,
        bytes_sent: 0,
        bytes_skipped: 0,
        bytes_read: 0,
        bytes_verified: 0,
        bytes_written: 0,
        chunks_resumed: state.recorded.len() as u64,
        manifest_trusted: prepared.manifest_trusted,
        tracked: tracked.is_some(),
        created: prepared.created,
        elapsed: Duration::ZERO,
    };
    let (src, mut tgt) = run_workers(&work, base, threads(opts.threads), &mut summary, progress)?;
    summary.chunks_zero = src.zero_chunks();
    summary.chunks_skipped = summary.chunks - summary.chunks_sent;
    summary.bytes_skipped = size - summary.bytes_sent;
    if opts.verify_all {
        let (m, n) = hash_all(
            &target_reader,
            cs,
            threads(opts.threads),
            opts.cancel.as_ref(),
            &|_, _| {},
        )?;
        summary.bytes_verified += n;
        tgt = m;
    }
    let (src_root, tgt_root) = (src.root(), tgt.root());
    if src_root != tgt_root {
        let first = src.first_difference(&tgt).unwrap_or(0);
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
    manifest::store(target, &tgt, prepared.created_by)?;
    drop(log);
    // Not synced: a log that survives a crash still tells the truth.
    let log_path = progress_path(target);
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

/// The chunks to look at without a change set: those with data at the
/// source, or anything but known zeros at the target; the rest is zero on
/// both sides.
fn untracked_work(source: &dyn ImageReader, state: &TargetState, cs: u64) -> Result<Vec<u64>> {
    let mut todo = data_chunks(source, cs)?;
    todo.extend(
        state
            .known
            .iter()
            .filter(|(_, l)| **l != Some(Leaf::Zero))
            .map(|(i, _)| *i),
    );
    Ok(todo.into_iter().collect())
}

/// The chunks to look at with a change set and a trusted manifest: the
/// changed ones, and those an interrupted run recorded; every other chunk
/// is what the manifest says, at the source as at the target.
fn tracked_work(
    changes: &ChangeSet,
    state: &TargetState,
    cs: u64,
    size: u64,
) -> (Vec<u64>, Manifest) {
    let mut todo: BTreeSet<u64> = changes.chunks(cs).into_iter().collect();
    todo.extend(state.recorded.iter().copied());
    let mut base = Manifest::zero(cs, size);
    for (&i, leaf) in &state.known {
        if let Some(l) = leaf {
            base.set(i, *l);
        }
    }
    (todo.into_iter().collect(), base)
}

/// The target opened for the copy, and what is known of it.
struct Prepared {
    file: File,
    created_by: Option<String>,
    log: Log,
    state: TargetState,
    manifest_trusted: bool,
    created: bool,
}

/// Opens or creates `target` and finds out what it holds: nothing (a new
/// file, claimed in a log before it exists), what a trusted manifest says,
/// what the log of an interrupted run recorded, or unknown.
fn prepare_target(
    source: &Path,
    target: &Path,
    opts: &VolumeCopyOptions,
    size: u64,
) -> Result<Prepared> {
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
    match std::fs::metadata(target) {
        Ok(meta) => prepare_existing(source, target, opts, size, &meta),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_target(target, opts, size),
        Err(e) => Err(Error::io(
            format!("reading metadata of target {}", target.display()),
            e,
        )),
    }
}

/// Creates `target`, claimed in a progress log first, so a crash in
/// between still leaves it recognisably ours.
fn create_target(target: &Path, opts: &VolumeCopyOptions, size: u64) -> Result<Prepared> {
    let log_path = progress_path(target);
    let mut header = Header {
        chunk_size: opts.chunk_size,
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
    Ok(Prepared {
        file,
        created_by: header.created_by,
        log,
        state: TargetState::default(),
        manifest_trusted: false,
        created: true,
    })
}

/// An existing `target`: ours (a log or manifest of ours describes it),
/// a copy's (a stale manifest), or refused unless `overwrite`.
fn prepare_existing(
    source: &Path,
    target: &Path,
    opts: &VolumeCopyOptions,
    size: u64,
    meta: &Metadata,
) -> Result<Prepared> {
    let cs = opts.chunk_size;
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
    let log_path = progress_path(target);
    let mpath = manifest_path(target);
    let old_log = progress::load(&log_path)?;
    let old_manifest = manifest::load_with_stamp(&mpath).ok();
    let log_owns = old_log.as_ref().filter(|l| {
        (l.header.ino == 0 && l.records.is_empty()) || same_file(l.header.dev, l.header.ino, meta)
    });
    let stamp = old_manifest
        .as_ref()
        .and_then(|(m, s)| s.as_ref().map(|s| (m, s)))
        .filter(|(_, s)| same_file(s.dev, s.ino, meta));
    let created_by = if let Some(l) = log_owns {
        l.header.created_by.clone()
    } else if let Some((_, s)) = stamp {
        s.created_by.clone()
    } else if opts.adopt.is_some() && !opts.overwrite {
        return Err(Error::InvalidArgument(format!(
            "target {} exists and no copy of this relocation wrote it; it is not overwritten",
            target.display()
        )));
    } else if opts.overwrite || mpath.exists() {
        // A manifest that no longer describes the target (or cannot be
        // read) still says a volume copy wrote here: hash the target, but
        // claim no ownership.
        None
    } else {
        return Err(Error::InvalidArgument(format!(
            "target {} exists and no volume copy wrote it (no matching {}); \
             remove it or set overwrite",
            target.display(),
            mpath.display()
        )));
    };
    if let Some(prefix) = &opts.adopt
        && !opts.overwrite
        && !created_by
            .as_deref()
            .is_some_and(|c| c.starts_with(prefix.as_str()))
    {
        return Err(Error::InvalidArgument(format!(
            "target {} exists, created by {}; not overwritten (never adopt what another relocation made)",
            target.display(),
            created_by
                .as_deref()
                .map_or_else(|| "no relocation".to_owned(), |c| format!("`{c}`"))
        )));
    }
    let mut state = TargetState::default();
    let mut manifest_trusted = false;
    if let Some((m, s)) = stamp
        && m.chunk_size == cs
        && m.virtual_size == size
        && stamp_matches(s, meta, &mpath)
    {
        state.known = m
            .data
            .iter()
            .map(|(i, h)| (*i, Some(Leaf::Data(*h))))
            .collect();
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
                state.known.insert(i, leaf);
                state.recorded.insert(i);
            }
            Log::reopen(&log_path, l.valid_len)?
        }
        // The manifest (if any) still records ownership, and a lost log
        // only costs hashing the target: no sync here.
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
    Ok(Prepared {
        file,
        created_by,
        log,
        state,
        manifest_trusted,
        created: false,
    })
}

/// Runs the workers over `work.todo`; returns the source's and the
/// target's manifests (chunks not in `todo` are `base`'s on both sides).
/// Progress records are synced and logged in batches as they come.
fn run_workers(
    work: &Work<'_>,
    base: Manifest,
    threads: usize,
    summary: &mut VolumeCopySummary,
    progress: &dyn Fn(u64, u64),
) -> Result<(Manifest, Manifest)> {
    let size = work.virtual_size;
    let mut src = base.clone();
    let mut tgt = base;
    let mut first_err: Option<Error> = None;
    let mut processed = 0usize;
    let commit = |pending: &mut Vec<(u64, Option<Leaf>)>| -> Result<()> {
        work.target
            .sync_data()
            .map_err(|e| Error::io(format!("syncing target {}", work.target_path.display()), e))?;
        work.log
            .lock()
            .map_err(|_| Error::InvalidArgument("progress log lock poisoned".into()))?
            .append(pending)?;
        pending.clear();
        Ok(())
    };
    let todo_bytes: u64 = work.todo.iter().map(|&i| src.chunk_len(i)).sum();
    let mut done_bytes = size - todo_bytes;
    progress(done_bytes, size);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<Result<Done>>();
        for _ in 0..threads.min(work.todo.len()).max(1) {
            let tx = tx.clone();
            scope.spawn(move || {
                let (mut sbuf, mut tbuf) = (Vec::new(), Vec::new());
                while let Some(i) = work.claim() {
                    let r = work.process(i, &mut sbuf, &mut tbuf);
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
        for r in rx {
            let d = match r {
                Ok(d) => d,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            processed += 1;
            let len = src.chunk_len(d.index);
            src.set(d.index, d.source);
            tgt.set(d.index, d.target);
            summary.bytes_read += d.read;
            summary.bytes_verified += d.verified;
            summary.bytes_written += d.written;
            if d.sent {
                summary.chunks_sent += 1;
                summary.bytes_sent += len;
            }
            // Skipped chunks are logged too: a resumed run then trusts the
            // target there without hashing it again.
            if !(work.state.recorded(d.index) && work.state.known(d.index) == Some(d.target)) {
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
    if processed < work.todo.len() {
        return Err(cancelled(work.target_path, "copying to"));
    }
    Ok((src, tgt))
}
