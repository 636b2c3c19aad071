//! Patching a qcow2 image in place: guest writes at any offset, for the
//! final delta of a warm relocation (the target was converted while the
//! source ran; only what changed since is written once it stopped).
//!
//! # What is supported
//!
//! qcow2 versions 2 and 3 with 16-bit refcounts (`refcount_order` 4, what
//! QEMU and [`super::Qcow2Writer`] write), any cluster size, zlib and zstd
//! compressed clusters. Refused with [`Error::Unsupported`], naming the
//! file and the feature, before anything is written: a backing file,
//! encryption, extended L2 entries, an external data file, internal
//! snapshots, persistent bitmaps or other autoclear features, the dirty or
//! corrupt bits, unknown incompatible features, other refcount widths, and
//! (while writing) a file whose refcount table would pass QEMU's limit of
//! 8 MiB. Callers fall back to converting the whole image again.
//!
//! # How a cluster is written
//!
//! - An allocated cluster whose refcount is 1 is overwritten in place (its
//!   L2 entry gains the COPIED flag if it lacked it). A preallocated zero
//!   cluster with refcount 1 is filled in place and loses its zero flag.
//! - An unallocated or zero cluster, a compressed one, or (never in images
//!   this accepts) a shared one gets a new host cluster appended to the
//!   file. A partial write fills the rest of the cluster with the guest
//!   content it had: zeros, the decompressed data or the old cluster. The
//!   old host clusters of a compressed cluster (possibly shared with other
//!   compressed clusters) lose one reference each.
//! - A missing L2 table is allocated; a file growing past what the
//!   existing refcount blocks cover gets new refcount blocks, each placed
//!   inside the range it covers so it counts itself. When the refcount
//!   table has no entry left for a new block, it is moved to a larger
//!   copy at the end of the file (see `grow_refcount_table` for its write
//!   order); the old table's clusters are freed.
//!
//! # Crash safety: the write order
//!
//! Data is written at once; metadata changes are collected in memory and
//! written by [`Qcow2Patcher::finish`] (and by a checkpoint whenever the
//! caches of changed tables reach their bound), in this order, with a sync
//! between steps when syncing:
//!
//! 1. data clusters (already written), new refcount blocks and new L2
//!    tables (not referenced by anything yet);
//! 2. refcount table entries of the new blocks, and the existing refcount
//!    blocks with every increment (a crash now leaks clusters at worst);
//! 3. existing L2 tables (an entry switches to a cluster whose data and
//!    refcount are on disk);
//! 4. L1 entries of new L2 tables;
//! 5. decrements of the host clusters no longer referenced (old compressed
//!    data): until then they are leaked, never referenced with a refcount
//!    too low.
//!
//! So after a crash at any point the image is valid, each cluster reads as
//! its old or its new content, and at worst some clusters leak (which
//! `qemu-img check -r leaks` repairs). An in-place overwrite is as atomic
//! as the file system's `pwrite`, like a write to a raw disk: a crash
//! during it can leave the cluster partly written; the relocation re-runs
//! the patch, which compares again. With `finish(false)` the order holds
//! against a crash of the process, not of the machine (checkpoints always
//! sync). Guest data is never written over the header, the L1 table or
//! the refcount table: an L2 entry pointing there is [`Error::Corrupt`].
//!
//! # Memory
//!
//! L2 tables and refcount blocks touched are cached up to
//! [`QCOW2_L2_CACHE_BYTES`] each; when a cache is full its changes are
//! written out (a checkpoint, in the order above) and it is emptied. The
//! L1 and refcount tables are read in pages ([`PagedTable`]).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::reader::{
    Compression, EXT_DATA_FILE, EXT_END, INCOMPAT_EXTENDED_L2, INCOMPAT_EXTERNAL_DATA, OFFSET_MASK,
    be_u32, be_u64, decompress_cluster, header_compression,
};
use super::{
    KNOWN_INCOMPATIBLE_FEATURES, MAGIC, MAX_HOST_OFFSET, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO, REFCOUNT_ORDER, RefcountLayout,
};
use crate::error::{Error, Result};
use crate::image::limits::{QCOW2_L2_CACHE_BYTES, QCOW2_MAX_L1_BYTES, QCOW2_MAX_REFTABLE_BYTES};
use crate::image::reader::{check_range, pread_full};
use crate::image::table::{Entry, PagedTable};

/// Incompatible feature bit 0: the refcounts may be stale.
const INCOMPAT_DIRTY: u64 = 1;
/// Incompatible feature bit 1: QEMU found the metadata corrupt.
const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Header extension: persistent bitmaps.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Refcount table entries keep the block's offset in bits 9..=63.
const REFT_OFFSET_MASK: u64 = !511;
/// Compressed data is addressed in 512-byte sectors.
const SECTOR: u64 = 512;
/// Host clusters whose reference is dropped that are kept before a
/// checkpoint writes them out.
const MAX_PENDING_FREES: usize = 1 << 20;

/// What [`Qcow2Patcher::finish`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PatchSummary {
    /// Writes to allocated clusters done in place (one per cluster each
    /// [`Qcow2Patcher::write_at`] touched).
    pub clusters_overwritten: u64,
    /// Host clusters appended for guest data (not counting L2 tables and
    /// refcount blocks).
    pub clusters_allocated: u64,
    /// Bytes written to the file, data and metadata.
    pub bytes_written: u64,
}

/// An L2 table or refcount block held in memory.
#[derive(Debug)]
struct Table<T> {
    /// Its file offset.
    host: u64,
    entries: Vec<T>,
    /// Changed since read (or created).
    dirty: bool,
    /// Allocated by this patcher and not yet written.
    new: bool,
}

/// A qcow2 image opened for in-place writes. See the module docs.
pub struct Qcow2Patcher {
    file: File,
    path: PathBuf,
    cluster_bits: u32,
    cluster_size: u64,
    virtual_size: u64,
    compression: Compression,
    /// Entries per L2 table.
    l2_entries: u64,
    /// Entries per refcount block.
    rc_entries: u64,
    l1: PagedTable,
    l1_offset: u64,
    l1_size: u64,
    rt: PagedTable,
    rt_offset: u64,
    rt_entries: u64,
    /// End of the file, counting clusters allocated so far.
    file_end: u64,
    /// Index of the first host cluster not yet looked at for allocation.
    next_free: u64,
    /// L2 tables by L1 index.
    l2_cache: HashMap<u64, Table<u64>>,
    /// Refcount blocks by refcount table index.
    rc_cache: HashMap<u64, Table<u16>>,
    /// L1 entries not yet written.
    l1_dirty: BTreeMap<u64, u64>,
    /// Refcount table entries not yet written.
    rt_dirty: BTreeMap<u64, u64>,
    /// References to drop once nothing points at them: host cluster index
    /// and how many.
    frees: BTreeMap<u64, u64>,
    summary: PatchSummary,
    /// Set by the first failed write: memory no longer matches the file.
    failed: Option<String>,
    /// Bytes each of the L2 and refcount block caches may hold before a
    /// checkpoint.
    cache_bytes: u64,
    /// Tests: stop writing metadata after this step of a flush, as if the
    /// process died there.
    #[cfg(test)]
    crash_after: Option<u32>,
}

impl std::fmt::Debug for Qcow2Patcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Patcher")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .field("cluster_size", &self.cluster_size)
            .field("summary", &self.summary)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Qcow2Patcher {
    /// Opens `path` read-write for patching. Nothing is written until
    /// [`write_at`](Self::write_at).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] naming the file and the feature for the
    /// images listed in the module docs (the file is left untouched);
    /// [`Error::Corrupt`] naming the file and the offset for a malformed
    /// header or tables out of the file; [`Error::Io`] naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                Error::io(
                    format!("opening qcow2 image {} to patch", path.display()),
                    e,
                )
            })?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading metadata of {}", path.display()), e))?
            .len();
        let corrupt = |what: String, offset: u64| Error::Corrupt {
            what: format!("qcow2 {what} of {}", path.display()),
            offset,
        };
        let unsupported = |what: &str| Error::Unsupported {
            what: format!("patching a qcow2 image with {what} ({})", path.display()),
        };
        let mut head = vec![0u8; 4096.min(file_len) as usize];
        pread_full(&file, path, 0, &mut head)?;
        if !head.starts_with(&MAGIC) {
            return Err(corrupt("header (no QFI magic)".into(), 0));
        }
        let truncated = || corrupt("header (file ends inside it)".into(), file_len);
        let f32_ = |at| be_u32(&head, at).ok_or_else(truncated);
        let f64_ = |at| be_u64(&head, at).ok_or_else(truncated);
        let version = f32_(4)?;
        if version != 2 && version != 3 {
            return Err(unsupported(&format!("version {version}")));
        }
        let cluster_bits = f32_(20)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(format!("header (cluster_bits {cluster_bits})"), 20));
        }
        let cluster_size = 1u64 << cluster_bits;
        if f64_(8)? != 0 && f32_(16)? != 0 {
            return Err(unsupported("a backing file"));
        }
        let crypt = f32_(32)?;
        if crypt != 0 {
            return Err(unsupported(&format!("encryption (crypt_method {crypt})")));
        }
        if f32_(60)? != 0 {
            return Err(unsupported("internal snapshots"));
        }
        let (incompat, autoclear, refcount_order, header_len) = if version == 3 {
            (f64_(72)?, f64_(88)?, f32_(96)?, f32_(100)?)
        } else {
            (0, 0, REFCOUNT_ORDER, 72)
        };
        for (bit, what) in [
            (INCOMPAT_DIRTY, "the dirty bit set (refcounts may be stale)"),
            (INCOMPAT_CORRUPT, "the corrupt bit set"),
            (INCOMPAT_EXTERNAL_DATA, "an external data file"),
            (INCOMPAT_EXTENDED_L2, "extended L2 entries"),
        ] {
            if incompat & bit != 0 {
                return Err(unsupported(what));
            }
        }
        let unknown = incompat & !KNOWN_INCOMPATIBLE_FEATURES;
        if unknown != 0 {
            return Err(unsupported(&format!(
                "unknown incompatible feature bits {unknown:#x}"
            )));
        }
        if autoclear != 0 {
            return Err(unsupported(&format!(
                "autoclear feature bits {autoclear:#x} (persistent bitmaps or a raw data file)"
            )));
        }
        if refcount_order != REFCOUNT_ORDER {
            return Err(unsupported(&format!(
                "{}-bit refcounts (only 16-bit refcounts are patched)",
                1u64 << refcount_order.min(63)
            )));
        }
        let compression =
            header_compression(&head, path, version, header_len, cluster_size, incompat)?;
        let mut at = header_len as usize;
        while at < head.len() {
            let (Some(kind), Some(len)) = (be_u32(&head, at), be_u32(&head, at + 4)) else {
                break;
            };
            match kind {
                EXT_END => break,
                EXT_DATA_FILE => return Err(unsupported("an external data file")),
                EXT_BITMAPS => return Err(unsupported("persistent bitmaps")),
                _ => {}
            }
            at = at
                .saturating_add(8)
                .saturating_add((len as usize).div_ceil(8) * 8);
        }

        let virtual_size = f64_(24)?;
        let l1_size = u64::from(f32_(36)?);
        let l1_offset = f64_(40)?;
        let rt_offset = f64_(48)?;
        let rt_clusters = u64::from(f32_(56)?);
        let l2_entries = cluster_size / 8;
        let needed_l1 = virtual_size.div_ceil(cluster_size).div_ceil(l2_entries);
        if l1_size.saturating_mul(8) > QCOW2_MAX_L1_BYTES || l1_size < needed_l1 {
            return Err(corrupt(
                format!(
                    "header field l1_size ({l1_size} entries, {needed_l1} needed for the \
                     virtual size {virtual_size}, at most {})",
                    QCOW2_MAX_L1_BYTES / 8
                ),
                36,
            ));
        }
        if l1_size > 0
            && (!l1_offset.is_multiple_of(cluster_size)
                || l1_offset.saturating_add(l1_size * 8) > file_len)
        {
            return Err(corrupt(
                format!("L1 table offset {l1_offset} (unaligned or past the end of the file)"),
                40,
            ));
        }
        let rt_bytes = rt_clusters.saturating_mul(cluster_size);
        if rt_clusters == 0
            || rt_bytes > QCOW2_MAX_REFTABLE_BYTES
            || !rt_offset.is_multiple_of(cluster_size)
            || rt_offset.saturating_add(rt_bytes) > file_len.next_multiple_of(cluster_size)
        {
            return Err(corrupt(
                format!(
                    "refcount table ({rt_clusters} clusters at {rt_offset}: empty, over QEMU's \
                     {} MiB limit, unaligned or past the end of the file)",
                    QCOW2_MAX_REFTABLE_BYTES >> 20
                ),
                48,
            ));
        }
        let rt_entries = rt_bytes / 8;
        Ok(Self {
            file,
            path: path.to_owned(),
            cluster_bits,
            cluster_size,
            virtual_size,
            compression,
            l2_entries,
            rc_entries: cluster_size * 8 / (1 << REFCOUNT_ORDER),
            l1: PagedTable::new(l1_offset, l1_size, Entry::Be64),
            l1_offset,
            l1_size,
            rt: PagedTable::new(rt_offset, rt_entries, Entry::Be64),
            rt_offset,
            rt_entries,
            file_end: file_len,
            next_free: file_len.div_ceil(cluster_size),
            l2_cache: HashMap::new(),
            rc_cache: HashMap::new(),
            l1_dirty: BTreeMap::new(),
            rt_dirty: BTreeMap::new(),
            frees: BTreeMap::new(),
            summary: PatchSummary::default(),
            failed: None,
            cache_bytes: QCOW2_L2_CACHE_BYTES,
            #[cfg(test)]
            crash_after: None,
        })
    }

    /// Size of the disk the guest sees, in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes guest `data` at guest byte `offset`: any offset and length
    /// inside the virtual size, in any order.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for a range past the virtual size (the
    /// patcher stays usable); [`Error::Unsupported`] if the refcount table
    /// would have to grow past 8 MiB; [`Error::Corrupt`] naming the file and
    /// offset for bad metadata met on the way; [`Error::Io`]. After one of
    /// these (but `InvalidArgument`) the patcher refuses further calls; the
    /// file is a valid image holding at least what was written before the
    /// last checkpoint.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.virtual_size)
        {
            return Err(Error::InvalidArgument(format!(
                "write of {} bytes at offset {offset} ends past the virtual size {} of {}",
                data.len(),
                self.virtual_size,
                self.path.display()
            )));
        }
        self.check_usable()?;
        let r = self.write_inner(offset, data);
        self.poison_on_error(r)
    }

    /// Reads guest bytes at `offset` as the image holds them now, this
    /// patcher's unfinished writes included.
    ///
    /// # Errors
    ///
    /// As for [`write_at`](Self::write_at).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, self.virtual_size, offset, buf.len())?;
        self.check_usable()?;
        let cs = self.cluster_size;
        let mut pos = offset;
        let mut done = 0usize;
        let mut cluster = Vec::new();
        while done < buf.len() {
            let within = pos & (cs - 1);
            let take = ((cs - within) as usize).min(buf.len() - done);
            let index = pos >> self.cluster_bits;
            self.make_room()?;
            let dst = buf
                .get_mut(done..done + take)
                .ok_or_else(|| self.corrupt("read (out of range)".into(), pos))?;
            match self.l2_entry(index, false)? {
                Some(entry) if entry & OFLAG_COMPRESSED != 0 => {
                    cluster.resize(cs as usize, 0);
                    self.decompress(entry, &mut cluster)?;
                    let from = within as usize;
                    dst.copy_from_slice(cluster.get(from..from + take).unwrap_or_default());
                }
                Some(entry) if entry & OFLAG_ZERO == 0 && entry & OFFSET_MASK != 0 => {
                    let host = self.data_host(entry, index)?;
                    pread_full(&self.file, &self.path, host + within, dst)?;
                }
                _ => dst.fill(0),
            }
            done += take;
            pos += take as u64;
        }
        Ok(())
    }

    /// Writes every metadata change out (see the module docs for the
    /// order), syncing the file between steps and at the end if `sync`.
    ///
    /// # Errors
    ///
    /// As for [`write_at`](Self::write_at); the image is then valid but
    /// may lack the last writes.
    pub fn finish(mut self, sync: bool) -> Result<PatchSummary> {
        self.check_usable()?;
        let r = self.flush(sync);
        self.poison_on_error(r)?;
        Ok(self.summary.clone())
    }

    fn write_inner(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size;
        let mut pos = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let within = pos & (cs - 1);
            let take = ((cs - within) as usize).min(rest.len());
            let (piece, tail) = rest.split_at(take);
            self.write_cluster(pos >> self.cluster_bits, within, piece)?;
            pos += take as u64;
            rest = tail;
        }
        Ok(())
    }

    /// Writes `piece` at byte `within` of guest cluster `index`.
    fn write_cluster(&mut self, index: u64, within: u64, piece: &[u8]) -> Result<()> {
        self.make_room()?;
        let cs = self.cluster_size;
        let entry = self.l2_entry(index, true)?.unwrap_or(0);
        let whole = within == 0 && piece.len() as u64 == cs;
        let compressed = entry & OFLAG_COMPRESSED != 0;
        let host = if compressed { 0 } else { entry & OFFSET_MASK };
        let zero = entry & OFLAG_ZERO != 0;
        if host != 0 {
            let host = self.data_host(entry, index)?;
            if self.refcount(host >> self.cluster_bits)? == 1 {
                if zero && !whole {
                    let mut full = vec![0u8; cs as usize];
                    overlay(&mut full, within, piece);
                    self.pwrite(host, &full)?;
                } else {
                    self.pwrite(host + within, piece)?;
                }
                if entry != host | OFLAG_COPIED {
                    self.set_l2_entry(index, host | OFLAG_COPIED)?;
                }
                self.summary.clusters_overwritten += 1;
                return Ok(());
            }
        }
        // A new host cluster, filled with the guest content around `piece`.
        let mut full = Vec::new();
        let data = if whole {
            piece
        } else {
            full.resize(cs as usize, 0);
            if compressed {
                self.decompress(entry, &mut full)?;
            } else if host != 0 && !zero {
                pread_full(&self.file, &self.path, host, &mut full)?;
            }
            overlay(&mut full, within, piece);
            &full
        };
        let new = self.allocate()?;
        self.pwrite(new, data)?;
        self.set_l2_entry(index, new | OFLAG_COPIED)?;
        self.summary.clusters_allocated += 1;
        if compressed {
            let (start, len) = self.compressed_range(entry);
            let first = (start & !(SECTOR - 1)) >> self.cluster_bits;
            let last = (start + len - 1) >> self.cluster_bits;
            for c in first..=last {
                *self.frees.entry(c).or_insert(0) += 1;
            }
        } else if host != 0 {
            *self.frees.entry(host >> self.cluster_bits).or_insert(0) += 1;
        }
        Ok(())
    }

    /// The L2 entry of guest cluster `index`; `None` when its L2 table is
    /// not allocated and `create` is false. With `create`, a missing table
    /// is allocated.
    fn l2_entry(&mut self, index: u64, create: bool) -> Result<Option<u64>> {
        let l1_index = index / self.l2_entries;
        if !self.load_l2(l1_index, create)? {
            return Ok(None);
        }
        let slot = (index % self.l2_entries) as usize;
        Ok(self
            .l2_cache
            .get(&l1_index)
            .and_then(|t| t.entries.get(slot))
            .copied())
    }

    fn set_l2_entry(&mut self, index: u64, entry: u64) -> Result<()> {
        let l1_index = index / self.l2_entries;
        let slot = (index % self.l2_entries) as usize;
        let table = self
            .l2_cache
            .get_mut(&l1_index)
            .and_then(|t| {
                t.dirty = true;
                t.entries.get_mut(slot)
            })
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "L2 table {l1_index} of {} is not loaded (a bug in the patcher)",
                    self.path.display()
                ))
            })?;
        *table = entry;
        Ok(())
    }

    /// Brings the L2 table of `l1_index` into the cache; false if it is
    /// not allocated (and `create` is false).
    fn load_l2(&mut self, l1_index: u64, create: bool) -> Result<bool> {
        if self.l2_cache.contains_key(&l1_index) {
            return Ok(true);
        }
        let entry = match self.l1_dirty.get(&l1_index) {
            Some(&e) => e,
            None => self.l1.get(&self.file, &self.path, l1_index)?.unwrap_or(0),
        };
        let host = entry & OFFSET_MASK;
        let entry_at = self.l1_offset + l1_index * 8;
        if host == 0 {
            if !create {
                return Ok(false);
            }
            let host = self.allocate()?;
            self.l2_cache.insert(
                l1_index,
                Table {
                    host,
                    entries: vec![0; self.l2_entries as usize],
                    dirty: true,
                    new: true,
                },
            );
            self.l1_dirty.insert(l1_index, host | OFLAG_COPIED);
            return Ok(true);
        }
        if !host.is_multiple_of(self.cluster_size)
            || host.saturating_add(self.cluster_size) > self.file_end
        {
            return Err(self.corrupt(
                format!("L1 entry {l1_index} (L2 table at {host}, unaligned or past the end of the file)"),
                entry_at,
            ));
        }
        match self.refcount(host >> self.cluster_bits)? {
            1 => {}
            0 => {
                return Err(self.corrupt(
                    format!("L1 entry {l1_index} (L2 table at {host} has refcount 0)"),
                    entry_at,
                ));
            }
            n => {
                return Err(Error::Unsupported {
                    what: format!(
                        "patching a qcow2 image whose L2 table at {host} is shared \
                         (refcount {n}) ({})",
                        self.path.display()
                    ),
                });
            }
        }
        let table = self.read_table(host, u64::from_be_bytes)?;
        self.l2_cache.insert(l1_index, table);
        Ok(true)
    }

    /// The cluster at `host` read as a table of big-endian entries of `N`
    /// bytes (L2 entries, refcounts), as it is on disk.
    fn read_table<T, const N: usize>(
        &self,
        host: u64,
        decode: fn([u8; N]) -> T,
    ) -> Result<Table<T>> {
        let mut raw = vec![0u8; self.cluster_size as usize];
        pread_full(&self.file, &self.path, host, &mut raw)?;
        let entries = raw
            .chunks_exact(N)
            .map(|c| decode(c.try_into().unwrap_or([0; N])))
            .collect();
        Ok(Table {
            host,
            entries,
            dirty: false,
            new: false,
        })
    }

    /// The host offset of standard cluster `entry` (guest cluster
    /// `index`), checked.
    fn data_host(&self, entry: u64, index: u64) -> Result<u64> {
        let host = entry & OFFSET_MASK;
        if !host.is_multiple_of(self.cluster_size)
            || host.saturating_add(self.cluster_size)
                > self.file_end.next_multiple_of(self.cluster_size)
        {
            return Err(self.corrupt(
                format!(
                    "L2 entry for guest offset {} (data cluster at {host}, unaligned or past the end of the file)",
                    index << self.cluster_bits
                ),
                host,
            ));
        }
        if self.is_metadata(host) {
            return Err(self.corrupt(
                format!(
                    "L2 entry for guest offset {} (data cluster at {host} overlaps the image's \
                     header, L1 table or refcount table)",
                    index << self.cluster_bits
                ),
                host,
            ));
        }
        Ok(host)
    }

    /// Whether the cluster at `host` holds the header, the L1 table or
    /// the refcount table: guest data is never written over them (a part
    /// of QEMU's overlap check that costs no lookups).
    fn is_metadata(&self, host: u64) -> bool {
        let cs = self.cluster_size;
        let within = |at: u64, bytes: u64| bytes > 0 && host + cs > at && host < at + bytes;
        host < cs
            || within(self.l1_offset, self.l1_size * 8)
            || within(self.rt_offset, self.rt_entries * 8)
    }

    /// Start and length in the file of compressed cluster `entry`.
    fn compressed_range(&self, entry: u64) -> (u64, u64) {
        let csize_bits = self.cluster_bits - 8;
        let shift = 62 - csize_bits;
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << csize_bits) - 1)) + 1;
        (host, (sectors * SECTOR).saturating_sub(host & (SECTOR - 1)))
    }

    /// Decompresses compressed cluster `entry` into `out` (one cluster).
    fn decompress(&self, entry: u64, out: &mut [u8]) -> Result<()> {
        let (host, len) = self.compressed_range(entry);
        decompress_cluster(
            &self.file,
            &self.path,
            self.file_end,
            self.compression,
            host,
            len,
            out,
        )
    }

    /// The refcount table entry `index`: the block's offset, or 0.
    fn block_host(&self, index: u64) -> Result<u64> {
        if let Some(&h) = self.rt_dirty.get(&index) {
            return Ok(h);
        }
        Ok(self.rt.get(&self.file, &self.path, index)?.unwrap_or(0) & REFT_OFFSET_MASK)
    }

    /// Brings refcount block `index` into the cache; false if it is not
    /// allocated.
    fn load_block(&mut self, index: u64) -> Result<bool> {
        if self.rc_cache.contains_key(&index) {
            return Ok(true);
        }
        let host = self.block_host(index)?;
        if host == 0 {
            return Ok(false);
        }
        if !host.is_multiple_of(self.cluster_size)
            || host.saturating_add(self.cluster_size)
                > self.file_end.next_multiple_of(self.cluster_size)
        {
            return Err(self.corrupt(
                format!("refcount table entry {index} (block at {host}, unaligned or past the end of the file)"),
                self.rt_offset + index * 8,
            ));
        }
        let table = self.read_table(host, u16::from_be_bytes)?;
        self.rc_cache.insert(index, table);
        Ok(true)
    }

    /// The refcount of host cluster `cluster` (increments of this patcher
    /// included, decrements not yet).
    fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let index = cluster / self.rc_entries;
        if index >= self.rt_entries || !self.load_block(index)? {
            return Ok(0);
        }
        let slot = (cluster % self.rc_entries) as usize;
        Ok(self
            .rc_cache
            .get(&index)
            .and_then(|b| b.entries.get(slot))
            .map_or(0, |&n| u64::from(n)))
    }

    /// Adds `delta` (may be negative) to the refcount of `cluster`, whose
    /// block must exist.
    fn add_refcount(&mut self, cluster: u64, delta: i64) -> Result<()> {
        let index = cluster / self.rc_entries;
        let slot = (cluster % self.rc_entries) as usize;
        let loaded = index < self.rt_entries && self.load_block(index)?;
        let at = cluster << self.cluster_bits;
        let block_host = self.rc_cache.get(&index).map_or(0, |b| b.host);
        let value = self
            .rc_cache
            .get_mut(&index)
            .filter(|_| loaded)
            .and_then(|b| {
                b.dirty = true;
                b.entries.get_mut(slot)
            });
        let new = value
            .as_deref()
            .and_then(|&v| i64::from(v).checked_add(delta))
            .and_then(|v| u16::try_from(v).ok());
        match (value, new) {
            (Some(v), Some(n)) => {
                *v = n;
                Ok(())
            }
            _ => Err(Error::Corrupt {
                what: format!(
                    "qcow2 refcount of the cluster at {at} of {} (missing, or {} by {delta} \
                     leaves the 16-bit range)",
                    self.path.display(),
                    if delta < 0 {
                        "lowering it"
                    } else {
                        "raising it"
                    }
                ),
                offset: block_host + slot as u64 * 2,
            }),
        }
    }

    /// Takes a free host cluster at the end of the file, refcount 1, and
    /// returns its offset. Allocates a refcount block first if the cluster
    /// has none (in the cluster itself, so the block counts itself).
    fn allocate(&mut self) -> Result<u64> {
        let cs = self.cluster_size;
        loop {
            let cluster = self.next_free;
            let offset = cluster
                .checked_mul(cs)
                .filter(|&o| o.saturating_add(cs) <= MAX_HOST_OFFSET)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{} would pass qcow2's 64 PiB host offset limit",
                        self.path.display()
                    ))
                })?;
            self.next_free += 1;
            let index = cluster / self.rc_entries;
            if index >= self.rt_entries {
                self.grow_refcount_table(cluster)?;
                continue;
            }
            if self.block_host(index)? == 0 {
                let mut entries = vec![0u16; self.rc_entries as usize];
                if let Some(own) = entries.get_mut((cluster % self.rc_entries) as usize) {
                    *own = 1;
                }
                self.rc_cache.insert(
                    index,
                    Table {
                        host: offset,
                        entries,
                        dirty: true,
                        new: true,
                    },
                );
                self.rt_dirty.insert(index, offset);
                self.file_end = self.file_end.max(offset + cs);
                continue;
            }
            let count = self.refcount(cluster)?;
            if count != 0 {
                return Err(self.corrupt(
                    format!(
                        "refcount {count} of the cluster at {offset}, past the end of the file"
                    ),
                    offset,
                ));
            }
            self.add_refcount(cluster, 1)?;
            self.file_end = self.file_end.max(offset + cs);
            return Ok(offset);
        }
    }

    /// Moves the refcount table to a larger copy at the end of the file,
    /// from host cluster `start` on: new refcount blocks first (covering
    /// themselves and the table), then the table. Everything pending is
    /// written out first; then new blocks and table → sync → header fields
    /// `refcount_table_offset` and `refcount_table_clusters` (one write)
    /// → sync → the old table's clusters are freed. A crash before the
    /// header write leaves the new clusters unreferenced, after it the old
    /// table leaked at worst.
    fn grow_refcount_table(&mut self, start: u64) -> Result<()> {
        self.flush(true)?;
        let cs = self.cluster_size;
        let per_block = self.rc_entries;
        // A table and blocks for the whole file as if its first `start`
        // clusters were taken: the blocks below `start` exist already (or
        // cover nothing), so this over-counts blocks, never under-counts.
        let layout = RefcountLayout::compute(start, cs);
        let first_block = start / per_block;
        let new_blocks = layout.block_clusters.saturating_sub(first_block).max(1);
        let table_clusters = layout.table_clusters;
        let table_bytes = table_clusters.saturating_mul(cs);
        if table_bytes > QCOW2_MAX_REFTABLE_BYTES {
            return Err(Error::Unsupported {
                what: format!(
                    "growing the refcount table of {} past QEMU's limit of {} MiB",
                    self.path.display(),
                    QCOW2_MAX_REFTABLE_BYTES >> 20
                ),
            });
        }
        let table_at = start + new_blocks;
        let end = table_at + table_clusters;
        let entries = table_bytes / 8;
        if (first_block + new_blocks) * per_block < end || entries < first_block + new_blocks {
            return Err(Error::InvalidArgument(format!(
                "refcount layout for {} does not cover itself (start cluster {start})",
                self.path.display()
            )));
        }
        let mut table = Vec::with_capacity(entries as usize);
        for i in 0..self.rt_entries {
            table.push(self.rt.get(&self.file, &self.path, i)?.unwrap_or(0));
        }
        table.resize(entries as usize, 0);
        for k in 0..new_blocks {
            let b = first_block + k;
            if let Some(slot) = table.get_mut(b as usize) {
                *slot = (start + k) * cs;
            }
            let mut counts = vec![0u16; per_block as usize];
            for c in (b * per_block).max(start)..((b + 1) * per_block).min(end) {
                if let Some(n) = counts.get_mut((c - b * per_block) as usize) {
                    *n = 1;
                }
            }
            self.pwrite((start + k) * cs, &encode_u16(&counts))?;
        }
        self.pwrite(table_at * cs, &encode_u64(&table))?;
        self.sync(true)?;
        self.crash_point(10)?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&(table_at * cs).to_be_bytes());
        // At most 8 MiB of table: the cluster count fits in 32 bits.
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.pwrite(48, &fields)?;
        self.sync(true)?;
        self.crash_point(11)?;
        let old_first = self.rt_offset / cs;
        let old_clusters = (self.rt_entries * 8).div_ceil(cs);
        self.rt = PagedTable::new(table_at * cs, entries, Entry::Be64);
        self.rt_offset = table_at * cs;
        self.rt_entries = entries;
        self.file_end = self.file_end.max(end * cs);
        self.next_free = self.next_free.max(end);
        for c in old_first..old_first + old_clusters {
            self.add_refcount(c, -1)?;
        }
        self.write_dirty_blocks()?;
        self.sync(true)
    }

    /// Writes the refcount blocks changed in memory.
    fn write_dirty_blocks(&mut self) -> Result<()> {
        let mut writes = Vec::new();
        for t in self.rc_cache.values_mut().filter(|t| t.dirty) {
            writes.push((t.host, encode_u16(&t.entries)));
            t.dirty = false;
        }
        self.pwrite_all(&writes)
    }

    /// Empties the caches when one is full, writing their changes out
    /// first (a checkpoint) if there are any.
    fn make_room(&mut self) -> Result<()> {
        if self.caches_full() {
            let dirty = self.l2_cache.values().any(|t| t.dirty)
                || self.rc_cache.values().any(|t| t.dirty)
                || !self.frees.is_empty();
            if dirty {
                self.flush(true)?;
            }
            self.l2_cache.clear();
            self.rc_cache.clear();
        }
        Ok(())
    }

    fn caches_full(&self) -> bool {
        let cs = self.cluster_size;
        (self.l2_cache.len() as u64 + 1).saturating_mul(cs) > self.cache_bytes
            || (self.rc_cache.len() as u64 + 1).saturating_mul(cs) > self.cache_bytes
            || self.frees.len() >= MAX_PENDING_FREES
    }

    /// Writes every change out in the crash-safe order of the module docs.
    fn flush(&mut self, sync: bool) -> Result<()> {
        let dirty = self.l2_cache.values().any(|t| t.dirty)
            || self.rc_cache.values().any(|t| t.dirty)
            || !self.frees.is_empty();
        if !dirty {
            return self.sync(sync);
        }
        if self.crashed(0) {
            return Ok(());
        }
        // 1. New refcount blocks and L2 tables: nothing points at them yet.
        let mut writes = Vec::new();
        for t in self.rc_cache.values_mut().filter(|t| t.new) {
            writes.push((t.host, encode_u16(&t.entries)));
            t.new = false;
            t.dirty = false;
        }
        for t in self.l2_cache.values_mut().filter(|t| t.new) {
            writes.push((t.host, encode_u64(&t.entries)));
            t.new = false;
            t.dirty = false;
        }
        self.pwrite_all(&writes)?;
        self.sync(sync)?;
        if self.crashed(1) {
            return Ok(());
        }
        // 2. Refcount table entries of new blocks; increments.
        let mut writes = Vec::new();
        for (&index, &host) in &self.rt_dirty {
            writes.push((self.rt_offset + index * 8, host.to_be_bytes().to_vec()));
        }
        for t in self.rc_cache.values_mut().filter(|t| t.dirty) {
            writes.push((t.host, encode_u16(&t.entries)));
            t.dirty = false;
        }
        self.pwrite_all(&writes)?;
        for (index, host) in std::mem::take(&mut self.rt_dirty) {
            self.rt.set(index, host);
        }
        self.sync(sync)?;
        if self.crashed(2) {
            return Ok(());
        }
        // 3. Existing L2 tables.
        let mut writes = Vec::new();
        for t in self.l2_cache.values_mut().filter(|t| t.dirty) {
            writes.push((t.host, encode_u64(&t.entries)));
            t.dirty = false;
        }
        self.pwrite_all(&writes)?;
        self.sync(sync)?;
        if self.crashed(3) {
            return Ok(());
        }
        // 4. L1 entries of new L2 tables.
        let mut writes = Vec::new();
        for (&index, &entry) in &self.l1_dirty {
            writes.push((self.l1_offset + index * 8, entry.to_be_bytes().to_vec()));
        }
        self.pwrite_all(&writes)?;
        for (index, entry) in std::mem::take(&mut self.l1_dirty) {
            self.l1.set(index, entry);
        }
        self.sync(sync)?;
        if self.crashed(4) {
            return Ok(());
        }
        // 5. Decrements: nothing references these clusters any more.
        if !self.frees.is_empty() {
            for (cluster, n) in std::mem::take(&mut self.frees) {
                let delta = i64::try_from(n).unwrap_or(i64::MAX);
                self.add_refcount(cluster, -delta)?;
            }
            self.write_dirty_blocks()?;
            self.sync(sync)?;
        }
        Ok(())
    }

    /// Tests: whether a simulated crash happens after flush step `step`.
    #[cfg(test)]
    fn crashed(&self, step: u32) -> bool {
        self.crash_after.is_some_and(|k| k <= step)
    }

    #[cfg(not(test))]
    fn crashed(&self, _step: u32) -> bool {
        false
    }

    /// Tests: fails (poisoning the patcher, as a dead process would stop)
    /// at a simulated crash after step `step` of a refcount table move.
    fn crash_point(&self, step: u32) -> Result<()> {
        if self.crashed(step) {
            return Err(Error::InvalidArgument(format!(
                "simulated crash after step {step} in {}",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn pwrite_all(&mut self, writes: &[(u64, Vec<u8>)]) -> Result<()> {
        for (at, bytes) in writes {
            self.pwrite(*at, bytes)?;
        }
        Ok(())
    }

    fn pwrite(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, at).map_err(|e| {
            Error::io(
                format!(
                    "writing {} bytes at {at} of {}",
                    bytes.len(),
                    self.path.display()
                ),
                e,
            )
        })?;
        self.summary.bytes_written += bytes.len() as u64;
        Ok(())
    }

    fn sync(&self, sync: bool) -> Result<()> {
        if sync {
            self.file
                .sync_data()
                .map_err(|e| Error::io(format!("syncing {}", self.path.display()), e))?;
        }
        Ok(())
    }

    fn corrupt(&self, what: String, offset: u64) -> Error {
        Error::Corrupt {
            what: format!("qcow2 {what} of {}", self.path.display()),
            offset,
        }
    }

    fn poison_on_error<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(Error::io(
                format!(
                    "qcow2 image {} is not patched further after an earlier error",
                    self.path.display()
                ),
                std::io::Error::other(why.clone()),
            )),
        }
    }
}

/// Copies `piece` into `cluster` at `within`.
fn overlay(cluster: &mut [u8], within: u64, piece: &[u8]) {
    let at = within as usize;
    if let Some(dst) = cluster.get_mut(at..at + piece.len()) {
        dst.copy_from_slice(piece);
    }
}

fn encode_u64(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

fn encode_u16(entries: &[u16]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::image::qcow2::{Qcow2Options, Qcow2Writer};
    use std::process::Command;

    const MIB: u64 = 1 << 20;
    const SIZE: u64 = 12 * MIB;
    const CS: u64 = 4096;

    /// Runs qemu-img, the oracle; a missing qemu-img fails the test.
    fn qemu_img(args: &[&str]) -> std::process::Output {
        Command::new("/usr/bin/qemu-img")
            .args(args)
            .output()
            .expect("qemu-img (/usr/bin/qemu-img) is these tests' oracle: install qemu-utils")
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// xorshift bytes, never a zero 8-byte word.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&(x | 1).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// A 12 MiB image with 4 KiB clusters from our writer: random data at
    /// 0..2 MiB (stored plainly), a compressible pattern at 4..5 MiB
    /// (compressed clusters), holes elsewhere. Returns its guest bytes.
    fn image(path: &Path) -> Vec<u8> {
        let mut guest = vec![0u8; SIZE as usize];
        guest[..2 * MIB as usize].copy_from_slice(&noise(1, 2 * MIB as usize));
        for (i, b) in guest[4 * MIB as usize..5 * MIB as usize]
            .iter_mut()
            .enumerate()
        {
            *b = (i / 300) as u8 | 1;
        }
        let opts = Qcow2Options {
            cluster_size: CS as u32,
            compression: Some(Compression::Zlib),
            ..Qcow2Options::default()
        };
        let mut w = Qcow2Writer::create(path, SIZE, &opts).unwrap();
        w.write_at(0, &guest).unwrap();
        w.finish().unwrap();
        guest
    }

    /// Writes into data, into compressed clusters and into holes, the
    /// last one large enough to cross a refcount block's 8 MiB coverage.
    fn writes() -> Vec<(u64, Vec<u8>)> {
        vec![
            (MIB + 5, noise(2, 70_000)),
            (4 * MIB + 100, noise(3, 10_000)),
            (4 * MIB + 300_000, vec![0; 5000]),
            (6 * MIB + 1, noise(4, 6 * MIB as usize - 1)),
            (3 * MIB, noise(5, 3)),
        ]
    }

    fn guest_of(img: &Path) -> Vec<u8> {
        let raw = img.with_extension("raw");
        let out = qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(img), s(&raw)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&raw).unwrap();
        std::fs::remove_file(&raw).unwrap();
        bytes
    }

    /// `qemu-img check`'s exit code: 0 clean, 2 corrupt, 3 leaks only.
    fn check(img: &Path) -> (i32, String) {
        let out = qemu_img(&["check", "-f", "qcow2", s(img)]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    #[test]
    fn a_crash_at_any_step_leaves_a_valid_image_of_old_or_new_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let pristine = dir.path().join("pristine.qcow2");
        let old = image(&pristine);
        let mut new = old.clone();
        for (at, data) in writes() {
            new[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
        for step in 0..=5u32 {
            let img = dir.path().join(format!("crash{step}.qcow2"));
            std::fs::copy(&pristine, &img).unwrap();
            let mut p = Qcow2Patcher::open(&img).unwrap();
            p.crash_after = (step < 5).then_some(step);
            for (at, data) in writes() {
                p.write_at(at, &data).unwrap();
            }
            p.finish(true).unwrap();
            let (code, text) = check(&img);
            assert!(code == 0 || code == 3, "step {step}: exit {code}\n{text}");
            if step == 5 {
                assert_eq!(code, 0, "{text}");
            }
            let got = guest_of(&img);
            for (i, c) in got.chunks(CS as usize).enumerate() {
                let r = i * CS as usize..(i + 1) * CS as usize;
                assert!(
                    c == &old[r.clone()] || c == &new[r],
                    "step {step}: cluster {i} is neither old nor new"
                );
            }
            if step >= 4 {
                assert!(got == new, "step {step}: not all new");
            }
        }
    }

    #[test]
    fn a_crash_while_moving_the_refcount_table_leaves_a_valid_image() {
        let dir = tempfile::tempdir().unwrap();
        let pristine = dir.path().join("pristine512.qcow2");
        let size = 16 * MIB;
        let opts = Qcow2Options {
            cluster_size: 512,
            ..Qcow2Options::default()
        };
        let old = noise(7, MIB as usize);
        let mut w = Qcow2Writer::create(&pristine, size, &opts).unwrap();
        w.write_at(0, &old).unwrap();
        w.finish().unwrap();
        for step in [10u32, 11] {
            let img = dir.path().join(format!("move{step}.qcow2"));
            std::fs::copy(&pristine, &img).unwrap();
            let mut p = Qcow2Patcher::open(&img).unwrap();
            p.crash_after = Some(step);
            // 512-byte clusters: one table cluster covers 8 MiB of file.
            let data = noise(8, 12 * MIB as usize);
            let e = p.write_at(2 * MIB, &data).unwrap_err();
            assert!(e.to_string().contains("simulated crash"), "{e}");
            drop(p);
            let (code, text) = check(&img);
            assert!(code == 0 || code == 3, "step {step}: exit {code}\n{text}");
            let got = guest_of(&img);
            assert!(got[..MIB as usize] == old[..], "step {step}");
            for (i, c) in got[2 * MIB as usize..].chunks(512).enumerate() {
                let r = i * 512..(i + 1) * 512;
                assert!(
                    c.iter().all(|&b| b == 0) || c == &data[r],
                    "step {step}: cluster {i} of the write is neither old nor new"
                );
            }
        }
    }

    #[test]
    fn small_caches_checkpoint_and_stay_correct() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("small.qcow2");
        let mut guest = image(&img);
        let mut p = Qcow2Patcher::open(&img).unwrap();
        p.cache_bytes = 3 * CS;
        for (at, data) in writes().into_iter().rev() {
            // In small pieces, so tables come and go through the caches.
            for (k, piece) in data.chunks(40_000).enumerate() {
                let at = at + (k * 40_000) as u64;
                p.write_at(at, piece).unwrap();
                guest[at as usize..at as usize + piece.len()].copy_from_slice(piece);
                assert!(p.l2_cache.len() <= 4 && p.rc_cache.len() <= 8);
            }
        }
        let mut back = vec![0u8; SIZE as usize];
        p.read_at(0, &mut back).unwrap();
        assert!(back == guest);
        // Reading every table does not grow the caches past their bound.
        assert!(p.l2_cache.len() <= 4 && p.rc_cache.len() <= 8);
        p.finish(false).unwrap();
        let (code, text) = check(&img);
        assert_eq!(code, 0, "{text}");
        assert!(guest_of(&img) == guest);
    }

    #[test]
    fn errors_poison_the_patcher() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("p.qcow2");
        image(&img);
        let mut p = Qcow2Patcher::open(&img).unwrap();
        // A read-only handle makes the next write fail.
        p.file = File::open(&img).unwrap();
        let e = p.write_at(0, b"abc").unwrap_err();
        assert!(
            matches!(e, Error::Io { .. }) && e.to_string().contains("p.qcow2"),
            "{e}"
        );
        let e = p.write_at(8 * MIB, b"abc").unwrap_err();
        assert!(e.to_string().contains("earlier error"), "{e}");
        assert!(p.finish(true).is_err());
        let (code, text) = check(&img);
        assert_eq!(code, 0, "{text}");
    }
}
