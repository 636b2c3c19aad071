//! qcow2 version 3: on-disk constants and a streaming, uncompressed writer.
//! The reader lives in `qcow2/reader.rs`; [`Qcow2Patcher`] (in
//! `qcow2/patch.rs`) writes guest data into an existing image in place.
//!
//! # Layout the writer produces
//!
//! ```text
//! cluster 0          header (104 bytes) + end-of-extensions marker
//! clusters 1..       guest data clusters in guest order, each L2 table
//!                    right after the last data cluster it maps
//! then               the L1 table (contiguous)
//! then               the refcount table (contiguous)
//! then               the refcount blocks
//! ```
//!
//! Every cluster of the file is used exactly once and the file has no holes,
//! so every refcount is 1 for clusters `0..total` and 0 beyond. That makes the
//! refcount structures a pure function of the cluster count, computed once
//! at [`Qcow2Writer::finish`]; the only subtlety is that the refcount blocks
//! and table must count themselves, which a small fixed-point loop settles.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fluidcloud_plugins::ImageFormat;
use serde::Serialize;

use crate::error::{Error, Result};

mod patch;
mod reader;

pub use patch::{PatchSummary, Qcow2Patcher};
pub use reader::{Compression, Qcow2Details, Qcow2Reader, SnapshotInfo};

/// `QFI\xfb`, the first four bytes of every qcow2 file.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Bit 63 of L1 and L2 entries: the referenced cluster has refcount exactly 1.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: a compressed cluster.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of L2 entries: the cluster reads as zeros.
const OFLAG_ZERO: u64 = 1;
/// Header extension: backing file format name.
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Smallest cluster size qcow2 allows (`cluster_bits` 9).
pub const MIN_CLUSTER_SIZE: u32 = 512;
/// Largest cluster size QEMU opens (`cluster_bits` 21).
pub const MAX_CLUSTER_SIZE: u32 = 2 * 1024 * 1024;
/// Incompatible feature bits defined by the specification (dirty, corrupt,
/// external data file, compression type, extended L2 entries).
pub const KNOWN_INCOMPATIBLE_FEATURES: u64 = 0b1_1111;

/// Virtual sizes must be whole 512-byte sectors.
const SECTOR: u64 = 512;
/// Length of the version 3 header this writer emits.
const HEADER_LENGTH: u32 = 104;
/// `refcount_order` 4: 16-bit refcounts, the QEMU default.
const REFCOUNT_ORDER: u32 = 4;
use super::limits::{
    QCOW2_MAX_L1_BYTES as MAX_L1_BYTES, QCOW2_MAX_REFTABLE_BYTES as MAX_REFTABLE_BYTES,
};
/// L1/L2 entries keep host offsets in bits 9..=55.
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Pending output is written to the file in chunks of about this size.
const FLUSH_BYTES: usize = 2 * 1024 * 1024;

/// Options of a new qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Options {
    /// Cluster size in bytes: a power of two from 512 to 2 MiB. Default 64 KiB.
    pub cluster_size: u32,
    /// Compress data clusters with this algorithm (clusters that do not
    /// shrink are stored uncompressed, as QEMU does). Default: none.
    pub compression: Option<Compression>,
    /// Backing file name to record in the header (relative names are
    /// relative to the new image's directory). With a backing file, all-zero
    /// clusters written are stored as zero clusters (they must hide the
    /// backing data), and ranges never written read from the backing file.
    pub backing_file: Option<String>,
    /// Format of the backing file, recorded in a header extension.
    pub backing_format: Option<ImageFormat>,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Self {
            cluster_size: 64 * 1024,
            compression: None,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// What [`Qcow2Writer::finish`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteSummary {
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Size of the image file in bytes.
    pub file_size: u64,
    /// Number of guest data clusters stored (all-zero clusters are not).
    pub data_clusters: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
}

/// Writes a qcow2 v3 image front to back, in one pass.
///
/// Guest data must arrive in increasing offset order (see
/// [`write_at`](Self::write_at)); data clusters are appended to the file as
/// they complete, so the file is written sequentially in large chunks.
/// All-zero clusters are not stored at all: they stay unallocated and read as
/// zeros, which keeps images of mostly empty disks small.
///
/// # Memory
///
/// Independent of the virtual size: one L2 table and one partial cluster
/// (each at most 2 MiB), an output buffer of about 8 MiB, and 16 bytes per
/// L2 table written so far (an L2 table maps `cluster_size²/8` bytes of guest
/// data, e.g. 512 MiB with 64 KiB clusters). L2 tables are written out as
/// soon as the writes move past the guest range they map.
///
/// # Failure
///
/// The header is written last, by [`finish`](Self::finish). If a write
/// fails, or the writer is dropped without `finish`, the file is left behind
/// with a zeroed first cluster (so it is not a valid qcow2 image); removing
/// it is the caller's job. After an I/O error every later call fails too,
/// so a half-written image can never be finished as if it were whole.
/// Dropping the writer does nothing beyond closing the file.
pub struct Qcow2Writer {
    file: File,
    path: PathBuf,
    virtual_size: u64,
    cluster_size: u64,
    cluster_bits: u32,
    /// Entries per L2 table (`cluster_size / 8`).
    l2_entries: u64,
    l1_size: u64,
    /// Guest offset at which the previous write ended.
    cursor: u64,
    /// The guest cluster being filled by unaligned writes, if any.
    pending: Vec<u8>,
    pending_index: Option<u64>,
    /// The L2 table being filled and the L1 index it belongs to.
    l2: Vec<u64>,
    l2_index: Option<u64>,
    /// `(L1 index, L1 entry)` of every L2 table written, ascending.
    l1: Vec<(u64, u64)>,
    /// Bytes to append to the file after what was already written.
    out: Vec<u8>,
    /// Index of the next host cluster to allocate.
    next_cluster: u64,
    data_clusters: u64,
    /// Set by the first I/O error: the file no longer matches our state.
    failed: Option<(std::io::ErrorKind, String)>,
    /// Compression of `write_at` clusters, if any.
    compression: Option<Compression>,
    /// Backing file name and format for the header.
    backing: Option<(String, Option<ImageFormat>)>,
    /// Bytes used in the last host cluster when it holds compressed data
    /// and has room left (0: no such cluster).
    comp_tail: u64,
    /// Host cluster being filled with compressed data and how many
    /// compressed clusters touch it.
    comp_cluster: Option<(u64, u16)>,
    /// Host clusters whose refcount is not 1 (shared by several compressed
    /// clusters), ascending. Only compressed images have any.
    refcount_exceptions: Vec<(u64, u16)>,
    /// Bytes appended to the file so far (the output buffer follows them).
    flushed: u64,
}

impl fmt::Debug for Qcow2Writer {
    // The buffers are megabytes of guest data: leave them out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .field("cluster_size", &self.cluster_size)
            .field("cursor", &self.cursor)
            .field("data_clusters", &self.data_clusters)
            .field("next_cluster", &self.next_cluster)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Qcow2Writer {
    /// Creates a new image file at `path` for a disk of `virtual_size` bytes.
    ///
    /// The file must not exist yet. Nothing but a zeroed header cluster is
    /// written until data arrives. `virtual_size` must be a multiple of 512:
    /// QEMU rounds image sizes to whole sectors, so an unaligned size would
    /// lose its last bytes (round up before calling).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the cluster size is not a power of two
    /// between 512 and 2 MiB, if `virtual_size` is not a multiple of 512, or if `virtual_size` needs an L1 or refcount
    /// table larger than QEMU accepts for that cluster size (use a larger
    /// cluster size); [`Error::Io`] naming `path` if the file exists or
    /// cannot be created.
    pub fn create(path: &Path, virtual_size: u64, opts: &Qcow2Options) -> Result<Self> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(Error::InvalidArgument(format!(
                "qcow2 cluster size {cs} must be a power of two from {MIN_CLUSTER_SIZE} to \
                 {MAX_CLUSTER_SIZE} bytes"
            )));
        }
        if !virtual_size.is_multiple_of(SECTOR) {
            return Err(Error::InvalidArgument(format!(
                "virtual size {virtual_size} is not a multiple of {SECTOR} bytes: QEMU sees \
                 disks in whole sectors and would cut the tail off; round the size up"
            )));
        }
        let cluster_size = u64::from(cs);
        let cluster_bits = cs.trailing_zeros();
        if let Some(name) = &opts.backing_file {
            let header = encode_header(
                &Header {
                    cluster_bits,
                    virtual_size,
                    l1_size: 0,
                    l1_offset: 0,
                    refcount_table_offset: 0,
                    refcount_table_clusters: 0,
                },
                opts.compression,
                Some((name.as_str(), opts.backing_format)),
            );
            if name.is_empty() || name.len() > 1023 || header.len() as u64 > cluster_size {
                return Err(Error::InvalidArgument(format!(
                    "backing file name `{name}` must be 1 to 1023 bytes and fit in the first \
                     cluster ({cs} bytes)"
                )));
            }
        }
        let l2_entries = cluster_size / 8;
        let guest_clusters = virtual_size.div_ceil(cluster_size);
        let l1_size = guest_clusters.div_ceil(l2_entries);
        let too_large = |why: &str| {
            Error::InvalidArgument(format!(
                "virtual size {virtual_size} is too large for qcow2 cluster size {cs} ({}): \
                 {why}; use a larger cluster size",
                path.display()
            ))
        };
        if l1_size.saturating_mul(8) > MAX_L1_BYTES {
            return Err(too_large(
                "the L1 table would exceed QEMU's limit of 32 MiB",
            ));
        }
        // Worst case: every guest cluster holds data.
        let l1_clusters = (l1_size * 8).div_ceil(cluster_size);
        let worst_base = 1u64
            .saturating_add(guest_clusters)
            .saturating_add(l1_size)
            .saturating_add(l1_clusters);
        let worst = RefcountLayout::compute(worst_base, cluster_size);
        if worst.table_clusters.saturating_mul(cluster_size) > MAX_REFTABLE_BYTES {
            return Err(too_large(
                "the refcount table would exceed QEMU's limit of 8 MiB",
            ));
        }
        if worst.total_clusters().saturating_mul(cluster_size) > MAX_HOST_OFFSET {
            return Err(too_large("the file would pass qcow2's 64 PiB offset limit"));
        }

        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("creating qcow2 image {}", path.display()), e))?;
        let cs_usize = cs as usize;
        let mut out = Vec::with_capacity(FLUSH_BYTES + cs_usize);
        // Cluster 0 is the header, filled in by `finish`.
        out.resize(cs_usize, 0);
        Ok(Self {
            file,
            path: path.to_owned(),
            virtual_size,
            cluster_size,
            cluster_bits,
            l2_entries,
            l1_size,
            cursor: 0,
            pending: vec![0; cs_usize],
            pending_index: None,
            l2: vec![0; cs_usize / 8],
            l2_index: None,
            l1: Vec::new(),
            out,
            next_cluster: 1,
            data_clusters: 0,
            failed: None,
            compression: opts.compression,
            backing: opts
                .backing_file
                .clone()
                .map(|name| (name, opts.backing_format)),
            comp_tail: 0,
            comp_cluster: None,
            refcount_exceptions: Vec::new(),
            flushed: 0,
        })
    }

    /// Writes guest `data` at guest byte `offset`.
    ///
    /// Each write must start at or after the end of the previous one; bytes
    /// skipped between writes are a hole and read as zeros. `data` may have
    /// any length and need not be cluster-aligned. Clusters whose content is
    /// entirely zero are not allocated.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the write starts before the end of the
    /// previous one or ends past the virtual size (the writer stays usable);
    /// [`Error::Io`] if writing to the file fails now or failed before (the
    /// image is then unusable, see the type's docs).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        let end = u64::try_from(data.len())
            .ok()
            .and_then(|len| offset.checked_add(len))
            .filter(|&end| end <= self.virtual_size)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "write of {} bytes at offset {offset} ends past the virtual size {} of {}",
                    data.len(),
                    self.virtual_size,
                    self.path.display()
                ))
            })?;
        if offset < self.cursor {
            return Err(Error::InvalidArgument(format!(
                "write at offset {offset} starts before the end of the previous write ({}); \
                 writes to {} must come in increasing offset order without overlap",
                self.cursor,
                self.path.display()
            )));
        }
        if data.is_empty() {
            return Ok(());
        }
        self.cursor = end;

        let cs = self.cluster_size;
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let index = pos >> self.cluster_bits;
            // Below the cluster size, so it fits in usize.
            let within = (pos & (cs - 1)) as usize;
            let room = self.pending.len() - within;
            let take = rest.len().min(room);
            let (chunk, tail) = rest.split_at(take);
            if take == self.pending.len() && self.pending_index != Some(index) {
                // A whole cluster: store it straight from the caller's buffer.
                self.flush_pending()?;
                self.store_cluster(index, chunk, self.compression)?;
            } else {
                if self.pending_index != Some(index) {
                    self.flush_pending()?;
                    self.pending.fill(0);
                    self.pending_index = Some(index);
                }
                if let Some(dst) = self.pending.get_mut(within..within + take) {
                    dst.copy_from_slice(chunk);
                }
                if take == room {
                    // Later writes cannot touch this cluster again.
                    self.flush_pending()?;
                }
            }
            pos += take as u64;
            rest = tail;
        }
        Ok(())
    }

    /// Completes the image: stores the pending partial cluster, writes the
    /// last L2 table, the L1 table, the refcount table and blocks, then the
    /// header, and syncs the file to disk.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] naming the path if writing or syncing fails, now or in
    /// an earlier call (the file is then not a valid image and should be
    /// removed by the caller).
    pub fn finish(self) -> Result<WriteSummary> {
        self.finish_with(true)
    }

    /// [`finish`](Self::finish), syncing the file to disk only if `sync`
    /// (without it the data may still be in the page cache when this
    /// returns, as with `qemu-img convert`'s default `cache=unsafe`).
    ///
    /// # Errors
    ///
    /// As for [`finish`](Self::finish).
    pub fn finish_with(mut self, sync: bool) -> Result<WriteSummary> {
        self.check_usable()?;
        self.flush_pending()?;
        self.flush_l2()?;
        self.close_compressed();

        let cs = self.cluster_size;
        let l1_clusters = (self.l1_size * 8).div_ceil(cs);
        let l1_offset = if self.l1_size == 0 {
            0
        } else {
            self.next_cluster * cs
        };
        let base = self.next_cluster + l1_clusters;
        let layout = RefcountLayout::compute(base, cs);
        let total = layout.total_clusters();

        // L1 table, zero entries for L2 tables never written.
        let l1 = std::mem::take(&mut self.l1);
        let mut written = l1.iter().copied().peekable();
        for index in 0..self.l1_size {
            let entry = match written.peek() {
                Some(&(i, e)) if i == index => {
                    written.next();
                    e
                }
                _ => 0,
            };
            self.out.extend_from_slice(&entry.to_be_bytes());
            self.maybe_flush()?;
        }
        self.pad_to_cluster();

        // Refcount table: the blocks follow it.
        let first_block = base + layout.table_clusters;
        for k in 0..layout.block_clusters {
            self.out
                .extend_from_slice(&((first_block + k) * cs).to_be_bytes());
        }
        self.pad_to_cluster();
        self.maybe_flush()?;

        // Refcount blocks: 1 for every cluster of the file (more for
        // clusters shared by compressed clusters), 0 past its end.
        let per_block = layout.entries_per_block;
        let exceptions = std::mem::take(&mut self.refcount_exceptions);
        let mut exceptions = exceptions.iter().copied().peekable();
        for k in 0..layout.block_clusters {
            let used = total.saturating_sub(k * per_block).min(per_block);
            for i in 0..used {
                let cluster = k * per_block + i;
                let count = match exceptions.peek() {
                    Some(&(c, n)) if c == cluster => {
                        exceptions.next();
                        n
                    }
                    _ => 1,
                };
                self.out.extend_from_slice(&count.to_be_bytes());
            }
            self.pad_to_cluster();
            self.maybe_flush()?;
        }
        self.flush_out()?;

        let header = encode_header(
            &Header {
                cluster_bits: self.cluster_bits,
                virtual_size: self.virtual_size,
                l1_size: self.l1_size,
                l1_offset,
                refcount_table_offset: base * cs,
                refcount_table_clusters: layout.table_clusters,
            },
            self.compression,
            self.backing.as_ref().map(|(n, f)| (n.as_str(), *f)),
        );
        self.file
            .write_all_at(&header, 0)
            .map_err(|e| self.io_error("writing the header of", e))?;
        if sync {
            self.file
                .sync_all()
                .map_err(|e| self.io_error("syncing", e))?;
        }

        Ok(WriteSummary {
            virtual_size: self.virtual_size,
            file_size: total * cs,
            data_clusters: self.data_clusters,
            cluster_size: 1 << self.cluster_bits,
        })
    }

    /// Stores the pending partial cluster, if any.
    fn flush_pending(&mut self) -> Result<()> {
        if let Some(index) = self.pending_index.take() {
            let data = std::mem::take(&mut self.pending);
            let stored = self.store_cluster(index, &data, self.compression);
            self.pending = data;
            stored?;
        }
        Ok(())
    }

    /// Appends one full guest cluster unless it is all zeros (then, with a
    /// backing file, records a zero cluster), compressing it if asked and
    /// if that makes it smaller.
    fn store_cluster(
        &mut self,
        index: u64,
        data: &[u8],
        compression: Option<Compression>,
    ) -> Result<()> {
        if is_zero(data) {
            if self.backing.is_some() {
                self.set_l2(index, OFLAG_ZERO)?;
            }
            return Ok(());
        }
        if let Some(c) = compression
            && let Some(packed) = compress_cluster(data, self.pending.len(), c)
        {
            return self.store_compressed(index, &packed);
        }
        self.set_l2(index, 0)?;
        let host = self.allocate()?;
        self.out.extend_from_slice(data);
        self.set_l2(index, host | OFLAG_COPIED)?;
        self.data_clusters += 1;
        self.maybe_flush()
    }

    /// Sets the L2 entry of guest cluster `index`, switching tables first
    /// if it belongs to another one.
    fn set_l2(&mut self, index: u64, entry: u64) -> Result<()> {
        let l1_index = index / self.l2_entries;
        if self.l2_index != Some(l1_index) {
            self.flush_l2()?;
            self.l2.fill(0);
            self.l2_index = Some(l1_index);
        }
        // `index % l2_entries` is below the table length.
        if let Some(slot) = usize::try_from(index % self.l2_entries)
            .ok()
            .and_then(|i| self.l2.get_mut(i))
        {
            *slot = entry;
        }
        Ok(())
    }

    /// Writes one guest cluster given already compressed (by
    /// [`compress_cluster`] with this image's cluster size), e.g. by worker
    /// threads of a converter. `offset` must be cluster-aligned and not
    /// before the end of the previous write.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an unaligned or out-of-order offset or
    /// data not smaller than a cluster; [`Error::Io`] as for
    /// [`write_at`](Self::write_at).
    pub fn write_compressed(&mut self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.check_usable()?;
        self.check_cluster_write(offset)?;
        if compressed.is_empty() || compressed.len() as u64 >= self.cluster_size {
            return Err(Error::InvalidArgument(format!(
                "compressed cluster of {} bytes for {} (cluster size {})",
                compressed.len(),
                self.path.display(),
                self.cluster_size
            )));
        }
        self.flush_pending()?;
        self.cursor = (offset + self.cluster_size).min(self.virtual_size);
        self.store_compressed(offset >> self.cluster_bits, compressed)
    }

    /// Writes one whole guest cluster as it is, never compressed (for
    /// clusters a converter found incompressible). The last cluster of an
    /// image whose size is not a multiple of the cluster size may be short.
    ///
    /// # Errors
    ///
    /// As for [`write_compressed`](Self::write_compressed).
    pub fn write_uncompressed(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_usable()?;
        self.check_cluster_write(offset)?;
        let expected = (self.virtual_size - offset).min(self.cluster_size);
        if data.len() as u64 != expected {
            return Err(Error::InvalidArgument(format!(
                "cluster write of {} bytes at {offset} of {} (expected {expected})",
                data.len(),
                self.path.display()
            )));
        }
        self.flush_pending()?;
        self.cursor = offset + expected;
        if expected == self.cluster_size {
            self.store_cluster(offset >> self.cluster_bits, data, None)
        } else {
            let mut full = vec![0u8; self.pending.len()];
            full[..data.len()].copy_from_slice(data);
            self.store_cluster(offset >> self.cluster_bits, &full, None)
        }
    }

    /// [`write_at`](Self::write_at) without compression, whatever the
    /// options say (for data a converter already found incompressible).
    ///
    /// # Errors
    ///
    /// As for [`write_at`](Self::write_at).
    ///
    /// Whole clusters at a cluster-aligned offset are written to the file
    /// straight from `data`, without going through the output buffer.
    pub fn write_uncompressed_run(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset.saturating_add(data.len() as u64);
        let direct = self.backing.is_none()
            && self.pending_index.is_none()
            && offset.is_multiple_of(self.cluster_size)
            && offset >= self.cursor
            && end <= self.virtual_size;
        if !direct {
            let compression = self.compression.take();
            let r = self.write_at(offset, data);
            self.compression = compression;
            return r;
        }
        self.check_usable()?;
        let cs = self.pending.len();
        let mut i = 0usize;
        while i < data.len() {
            let Some(cluster) = data.get(i..i + cs) else {
                // A partial last cluster: through the buffer.
                self.cursor = offset + i as u64;
                let compression = self.compression.take();
                let r = self.write_at(offset + i as u64, data.get(i..).unwrap_or_default());
                self.compression = compression;
                return r;
            };
            if is_zero(cluster) {
                i += cs;
                continue;
            }
            let index = (offset + i as u64) >> self.cluster_bits;
            // Switch L2 tables first: that allocates, and the data clusters
            // of the run must be contiguous.
            self.set_l2(index, 0)?;
            let table_end = (index / self.l2_entries + 1) * self.l2_entries;
            let start = i;
            while let Some(cluster) = data.get(i..i + cs) {
                let index = (offset + i as u64) >> self.cluster_bits;
                if index >= table_end || is_zero(cluster) {
                    break;
                }
                let host = self.allocate()?;
                self.set_l2(index, host | OFLAG_COPIED)?;
                self.data_clusters += 1;
                i += cs;
            }
            self.flush_out()?;
            let run = data.get(start..i).unwrap_or_default();
            crate::fsx::preallocate(&self.file, self.flushed, run.len() as u64);
            if let Err(e) = self.file.write_all(run) {
                return Err(self.io_error("writing", e));
            }
            self.flushed += run.len() as u64;
        }
        self.cursor = end;
        Ok(())
    }

    fn check_cluster_write(&self, offset: u64) -> Result<()> {
        if !offset.is_multiple_of(self.cluster_size)
            || offset < self.cursor
            || offset >= self.virtual_size
        {
            return Err(Error::InvalidArgument(format!(
                "cluster write at {offset} of {}: must be cluster-aligned, inside the disk and \
                 not before the end of the previous write ({})",
                self.path.display(),
                self.cursor
            )));
        }
        Ok(())
    }

    /// Appends compressed cluster data right after the previous compressed
    /// data (sharing host clusters, as QEMU does) and maps guest cluster
    /// `index` to it.
    fn store_compressed(&mut self, index: u64, packed: &[u8]) -> Result<()> {
        let cs = self.cluster_size;
        self.set_l2(index, 0)?;
        if matches!(self.comp_cluster, Some((_, n)) if n == u16::MAX) {
            self.close_compressed();
        }
        if self.comp_tail == 0 {
            self.close_compressed();
            let host = self.allocate()?;
            self.comp_cluster = Some((host / cs, 0));
        }
        let start = (self.next_cluster - 1) * cs + self.comp_tail;
        if let Some((_, n)) = &mut self.comp_cluster {
            *n += 1;
        }
        let mut remaining = packed.len() as u64;
        let room = cs - self.comp_tail;
        if remaining < room {
            self.comp_tail += remaining;
        } else {
            remaining -= room;
            self.comp_tail = 0;
            // The data runs into the following host clusters.
            while remaining > 0 {
                self.close_compressed();
                let host = self.allocate()?;
                self.comp_cluster = Some((host / cs, 1));
                if remaining < cs {
                    self.comp_tail = remaining;
                    remaining = 0;
                } else {
                    remaining -= cs;
                }
            }
            if self.comp_tail == 0 {
                self.close_compressed();
            }
        }
        self.out.extend_from_slice(packed);
        let csize_bits = self.cluster_bits - 8;
        let shift = 62 - csize_bits;
        let end = start + packed.len() as u64 - 1;
        let sectors = (end >> 9) - (start >> 9);
        let entry = OFLAG_COMPRESSED | (sectors << shift) | start;
        self.set_l2(index, entry)?;
        self.data_clusters += 1;
        self.maybe_flush()
    }

    /// Ends the host cluster holding compressed data, if any: pads it and
    /// records its refcount.
    fn close_compressed(&mut self) {
        if self.comp_tail != 0 {
            let pad = (self.cluster_size - self.comp_tail) as usize;
            self.out.resize(self.out.len() + pad, 0);
            self.comp_tail = 0;
        }
        if let Some((cluster, count)) = self.comp_cluster.take()
            && count != 1
        {
            self.refcount_exceptions.push((cluster, count));
        }
    }

    /// Appends the current L2 table, if any, and records it for the L1 table.
    fn flush_l2(&mut self) -> Result<()> {
        if let Some(l1_index) = self.l2_index.take() {
            let host = self.allocate()?;
            for entry in &self.l2 {
                self.out.extend_from_slice(&entry.to_be_bytes());
            }
            self.l1.push((l1_index, host | OFLAG_COPIED));
            self.maybe_flush()?;
        }
        Ok(())
    }

    /// Takes the next host cluster and returns its byte offset.
    fn allocate(&mut self) -> Result<u64> {
        if self.comp_tail != 0 {
            self.close_compressed();
        }
        let offset = self.next_cluster * self.cluster_size;
        if offset >= MAX_HOST_OFFSET {
            return Err(Error::InvalidArgument(format!(
                "{} would pass qcow2's 64 PiB host offset limit",
                self.path.display()
            )));
        }
        self.next_cluster += 1;
        Ok(offset)
    }

    /// Zero-pads the output to the next cluster boundary.
    fn pad_to_cluster(&mut self) {
        let cs = self.pending.len();
        // The buffer starts at `flushed`, which compressed data can leave
        // in the middle of a cluster.
        let rem = (self.flushed as usize + self.out.len()) % cs;
        if rem != 0 {
            self.out.resize(self.out.len() + cs - rem, 0);
        }
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.out.len() >= FLUSH_BYTES {
            self.flush_out()?;
        }
        Ok(())
    }

    /// Appends the output buffer to the file. The buffer always starts at
    /// the file's current end, and the file position is only ever moved by
    /// these appends (the header goes in with a positioned write).
    fn flush_out(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            let res = self.file.write_all(&self.out);
            self.flushed += self.out.len() as u64;
            self.out.clear();
            res.map_err(|e| self.io_error("writing", e))?;
        }
        Ok(())
    }

    /// Records an I/O error so that every later call fails too.
    fn io_error(&mut self, doing: &str, e: std::io::Error) -> Error {
        self.failed = Some((e.kind(), e.to_string()));
        Error::io(format!("{doing} qcow2 image {}", self.path.display()), e)
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some((kind, msg)) => Err(Error::io(
                format!(
                    "qcow2 image {} is unusable after an earlier write error",
                    self.path.display()
                ),
                std::io::Error::new(*kind, msg.clone()),
            )),
        }
    }
}

/// Sizes of the refcount structures for a file whose other contents take
/// `base` clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefcountLayout {
    base: u64,
    table_clusters: u64,
    block_clusters: u64,
    entries_per_block: u64,
}

impl RefcountLayout {
    /// The smallest table and block counts that cover every cluster of the
    /// file, themselves included.
    fn compute(base: u64, cluster_size: u64) -> Self {
        let entries_per_block = cluster_size * 8 / (1 << REFCOUNT_ORDER);
        let (mut table, mut blocks) = (0u64, 0u64);
        // Each round can only grow the counts, and by a factor of at most
        // 1/256 of the previous growth, so this settles in a few rounds.
        loop {
            let total = base.saturating_add(table).saturating_add(blocks);
            let new_blocks = total.div_ceil(entries_per_block);
            let new_table = new_blocks.saturating_mul(8).div_ceil(cluster_size);
            if (new_table, new_blocks) == (table, blocks) {
                break;
            }
            (table, blocks) = (new_table, new_blocks);
        }
        Self {
            base,
            table_clusters: table,
            block_clusters: blocks,
            entries_per_block,
        }
    }

    fn total_clusters(&self) -> u64 {
        self.base
            .saturating_add(self.table_clusters)
            .saturating_add(self.block_clusters)
    }
}

/// The header fields that vary between images.
struct Header {
    cluster_bits: u32,
    virtual_size: u64,
    l1_size: u64,
    l1_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u64,
}

/// The v3 header (104 bytes, 112 with a compression type), the backing
/// format extension if any, the end-of-extensions marker, then the backing
/// file name if any.
fn encode_header(
    h: &Header,
    compression: Option<Compression>,
    backing: Option<(&str, Option<ImageFormat>)>,
) -> Vec<u8> {
    let zstd = compression == Some(Compression::Zstd);
    let header_length = if zstd {
        HEADER_LENGTH + 8
    } else {
        HEADER_LENGTH
    };
    let mut ext = Vec::new();
    if let Some((_, Some(format))) = backing {
        let name = format.as_str().as_bytes();
        ext.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        ext.extend_from_slice(&(name.len() as u32).to_be_bytes());
        ext.extend_from_slice(name);
        ext.resize(ext.len().div_ceil(8) * 8, 0);
    }
    ext.extend_from_slice(&[0; 8]); // end of header extensions
    let (bf_offset, bf_size) = match backing {
        Some((name, _)) => (
            u64::from(header_length) + ext.len() as u64,
            name.len() as u32,
        ),
        None => (0, 0),
    };
    let mut b = Vec::with_capacity(header_length as usize + 8);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&3u32.to_be_bytes()); // version
    b.extend_from_slice(&bf_offset.to_be_bytes()); // backing_file_offset
    b.extend_from_slice(&bf_size.to_be_bytes()); // backing_file_size
    b.extend_from_slice(&h.cluster_bits.to_be_bytes());
    b.extend_from_slice(&h.virtual_size.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    // Both fit: `create` bounds the L1 and refcount tables to a few MiB.
    b.extend_from_slice(&(h.l1_size as u32).to_be_bytes());
    b.extend_from_slice(&h.l1_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_offset.to_be_bytes());
    b.extend_from_slice(&(h.refcount_table_clusters as u32).to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    b.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    let incompatible: u64 = if zstd { 1 << 3 } else { 0 };
    b.extend_from_slice(&incompatible.to_be_bytes()); // incompatible_features
    b.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
    b.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
    b.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    b.extend_from_slice(&header_length.to_be_bytes());
    if zstd {
        b.push(1); // compression_type zstd
        b.extend_from_slice(&[0; 7]);
    }
    b.extend_from_slice(&ext);
    if let Some((name, _)) = backing {
        b.extend_from_slice(name.as_bytes());
    }
    b
}

thread_local! {
    static DEFLATE: std::cell::RefCell<Option<flate2::Compress>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_C: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses one guest cluster the way QEMU does (raw deflate with a
/// 4 KiB window at the default level, or zstd at its default level), padding
/// a short last cluster with zeros to `cluster_size`. `None` if the result
/// would not be smaller than a cluster: store the cluster uncompressed.
pub fn compress_cluster(data: &[u8], cluster_size: usize, c: Compression) -> Option<Vec<u8>> {
    let padded;
    let data = if data.len() < cluster_size {
        let mut p = vec![0u8; cluster_size];
        p.get_mut(..data.len())?.copy_from_slice(data);
        padded = p;
        &padded[..]
    } else {
        data
    };
    let limit = cluster_size.checked_sub(1)?;
    match c {
        Compression::Zlib => DEFLATE.with(|cell| {
            let mut slot = cell.borrow_mut();
            let z = slot.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            z.reset();
            let mut out = Vec::with_capacity(limit);
            match z.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) if out.len() < limit => Some(out),
                _ => None,
            }
        }),
        Compression::Zstd => ZSTD_C.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = zstd::bulk::Compressor::new(zstd::DEFAULT_COMPRESSION_LEVEL).ok();
            }
            let z = slot.as_mut()?;
            let mut out = Vec::with_capacity(limit);
            match z.compress_to_buffer(data, &mut out) {
                Ok(n) if n < limit => Some(out),
                _ => None,
            }
        }),
    }
}

/// Whether `buf` holds only zero bytes. Scans in blocks whose OR the
/// compiler vectorises, stopping at the first non-zero block.
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 10_000]));
        let mut buf = vec![0u8; 10_000];
        buf[9_999] = 1;
        assert!(!is_zero(&buf));
        buf[9_999] = 0;
        buf[0] = 0x80;
        assert!(!is_zero(&buf));
    }

    #[test]
    fn refcount_layout_covers_itself() {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            let per_block = cs / 2;
            for base in (1..3000).chain([per_block - 1, per_block, per_block + 1, 1 << 20]) {
                let l = RefcountLayout::compute(base, cs);
                let total = l.total_clusters();
                assert!(l.block_clusters * per_block >= total, "cs {cs} base {base}");
                assert!(l.table_clusters * cs / 8 >= l.block_clusters);
                // Minimal: one block fewer would not cover the file.
                assert!((l.block_clusters - 1) * per_block < total);
            }
        }
    }

    #[test]
    fn refcount_layout_at_block_boundary() {
        // 256 entries per block: 254 + 1 table + 1 block = 256 fits in one
        // block; 255 base clusters need a second block.
        let l = RefcountLayout::compute(254, 512);
        assert_eq!((l.table_clusters, l.block_clusters), (1, 1));
        let l = RefcountLayout::compute(255, 512);
        assert_eq!((l.table_clusters, l.block_clusters), (1, 2));
    }

    #[test]
    fn header_fields_sit_where_the_spec_says() {
        let h = encode_header(
            &Header {
                cluster_bits: 16,
                virtual_size: 0x1234_5678_9abc,
                l1_size: 3,
                l1_offset: 0x30000,
                refcount_table_offset: 0x40000,
                refcount_table_clusters: 1,
            },
            None,
            None,
        );
        assert_eq!(h.len(), 112);
        assert_eq!(&h[0..4], b"QFI\xfb");
        assert_eq!(&h[4..8], &3u32.to_be_bytes());
        assert_eq!(&h[20..24], &16u32.to_be_bytes());
        assert_eq!(&h[24..32], &0x1234_5678_9abcu64.to_be_bytes());
        assert_eq!(&h[36..40], &3u32.to_be_bytes());
        assert_eq!(&h[40..48], &0x30000u64.to_be_bytes());
        assert_eq!(&h[48..56], &0x40000u64.to_be_bytes());
        assert_eq!(&h[56..60], &1u32.to_be_bytes());
        assert_eq!(&h[96..100], &4u32.to_be_bytes());
        assert_eq!(&h[100..104], &104u32.to_be_bytes());
        assert_eq!(&h[104..112], &[0; 8]);
    }

    #[test]
    fn an_io_error_poisons_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("poisoned.qcow2");
        let mut w = Qcow2Writer::create(&path, 64 << 20, &Qcow2Options::default()).unwrap();
        // Swap in a read-only handle so the next flush fails.
        w.file = File::open(&path).unwrap();
        let data = vec![1u8; FLUSH_BYTES + 65536];
        let e = w.write_at(0, &data).unwrap_err();
        assert!(matches!(&e, Error::Io { context, .. } if context.starts_with("writing")));
        // Even a write that would not touch the file is refused now.
        let e = w.write_at(FLUSH_BYTES as u64 + 65536, &[1]).unwrap_err();
        assert!(
            matches!(&e, Error::Io { context, .. } if context.contains("earlier write error")),
            "{e}"
        );
        let e = w.finish().unwrap_err();
        assert!(matches!(&e, Error::Io { context, .. } if context.contains("earlier write error")));
    }

    #[test]
    fn debug_output_leaves_out_the_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let w = Qcow2Writer::create(
            &dir.path().join("d.qcow2"),
            1 << 20,
            &Qcow2Options::default(),
        )
        .unwrap();
        let text = format!("{w:?}");
        assert!(text.len() < 500, "{text}");
        assert!(text.contains("d.qcow2"));
    }

    #[test]
    fn options_default_to_64k() {
        assert_eq!(Qcow2Options::default().cluster_size, 65536);
    }
}
