//! The qcow2 reader: versions 2 and 3, every cluster size QEMU opens,
//! zero clusters (with and without allocation), zlib and zstd compressed
//! clusters, extended L2 entries (subclusters), internal snapshots and
//! backing chains of any supported format.
//!
//! Refused with [`Error::Unsupported`]: encryption, external data files and
//! unknown incompatible feature bits. The dirty and corrupt bits are
//! accepted: they concern refcounts, which a reader never uses (QEMU also
//! opens such images read-only).
//!
//! L2 tables are cached (32 MiB at most, whatever the image size); the L1
//! table (QEMU caps it at 32 MiB) is read in pages as it is used, so an
//! image of 2^61 bytes costs a bounded cache ([`crate::image::limits`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fluidcloud_plugins::ImageFormat;
use serde::Serialize;

use super::{KNOWN_INCOMPATIBLE_FEATURES, MAGIC, OFLAG_COMPRESSED, OFLAG_ZERO};
use crate::error::{Error, Result};
use crate::image::reader::{Chain, Extent, ExtentKind, ImageReader, check_range, pread_full};

/// Bits 9..=55 of L1 and L2 entries: a host offset.
pub(super) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Incompatible feature bits.
pub(super) const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub(super) const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub(super) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Header extension types.
pub(super) const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub(super) const EXT_DATA_FILE: u32 = 0x4441_5441;
use crate::image::limits::{
    QCOW2_L2_CACHE_BYTES as L2_CACHE_BYTES, QCOW2_MAX_BACKING_NAME,
    QCOW2_MAX_L1_BYTES as MAX_L1_BYTES, QCOW2_MAX_SNAPSHOT_EXTRA as MAX_SNAPSHOT_EXTRA,
    QCOW2_MAX_SNAPSHOT_TABLE_BYTES as MAX_SNAPSHOT_TABLE_BYTES,
    QCOW2_MAX_SNAPSHOTS as MAX_SNAPSHOTS,
};
use crate::image::table::{Entry, PagedTable};

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Raw deflate, 4 KiB window (QEMU's default).
    Zlib,
    /// Zstandard (`compression_type=zstd`, qcow2 v3 only).
    Zstd,
}

/// An internal snapshot listed in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Unique id string.
    pub id: String,
    /// Name given by the user.
    pub name: String,
    /// Size of the disk when the snapshot was taken.
    pub virtual_size: u64,
    /// File offset of its L1 table.
    #[serde(skip)]
    l1_offset: u64,
    /// Entries of its L1 table.
    #[serde(skip)]
    l1_size: u32,
}

/// What the header says, for `image info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Qcow2Details {
    /// 2 or 3.
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Compression type of compressed clusters.
    pub compression: Compression,
    /// Whether L2 entries carry subcluster bitmaps.
    pub extended_l2: bool,
    /// Backing file name as written in the header.
    pub backing_file: Option<String>,
    /// Backing file format from the header extension, if any.
    pub backing_format: Option<String>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// The snapshot being read, if any.
    pub reading_snapshot: Option<String>,
    /// Incompatible feature bits that are set (dirty, corrupt...).
    pub incompatible_features: u64,
}

/// How one run of guest bytes is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Not here: read the backing image (or zeros).
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// At this host offset, contiguous for the run.
    Data(u64),
    /// A compressed cluster: where its bytes start and how many to read.
    Compressed { host: u64, len: u64 },
}

/// A qcow2 image opened for reading. See the module docs.
pub struct Qcow2Reader {
    file: File,
    path: PathBuf,
    file_len: u64,
    cluster_bits: u32,
    cluster_size: u64,
    virtual_size: u64,
    l1: PagedTable,
    extended_l2: bool,
    /// `cluster_bits - 8`, the width of the compressed sector count.
    csize_bits: u32,
    backing: Option<Box<dyn ImageReader>>,
    details: Qcow2Details,
    l2_cache: Mutex<HashMap<u64, Arc<[u64]>>>,
}

impl std::fmt::Debug for Qcow2Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Reader")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .field("details", &self.details)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(super) fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(super) fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl Qcow2Reader {
    /// Opens a qcow2 image and its backing chain; `snapshot` selects an
    /// internal snapshot by id or name.
    ///
    /// # Errors
    ///
    /// See [`crate::image::open`].
    pub fn open(path: &Path, snapshot: Option<&str>) -> Result<Self> {
        Self::open_in_chain(path, snapshot, &mut Chain::default())
    }

    pub(crate) fn open_in_chain(
        path: &Path,
        snapshot: Option<&str>,
        chain: &mut Chain,
    ) -> Result<Self> {
        let (file, file_len) = crate::image::open_file(path)?;
        let corrupt = |what: &str, offset: u64| Error::Corrupt {
            what: format!("qcow2 {what} of {}", path.display()),
            offset,
        };
        let unsupported = |what: String| Error::Unsupported {
            what: format!("{what} in {}", path.display()),
        };
        let mut head = vec![0u8; 4096.min(file_len) as usize];
        pread_full(&file, path, 0, &mut head)?;
        let truncated = || corrupt("header (file ends inside it)", file_len);
        if !head.starts_with(&MAGIC) {
            return Err(corrupt("header (no QFI magic)", 0));
        }
        let f32_ = |at| be_u32(&head, at).ok_or_else(truncated);
        let f64_ = |at| be_u64(&head, at).ok_or_else(truncated);
        let version = f32_(4)?;
        if version != 2 && version != 3 {
            return Err(unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = f32_(20)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(
                &format!("header (cluster_bits {cluster_bits})"),
                20,
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let virtual_size = f64_(24)?;
        let crypt = f32_(32)?;
        if crypt != 0 {
            return Err(unsupported(format!(
                "encrypted qcow2 (crypt_method {crypt})"
            )));
        }
        let (incompat, refcount_order, header_len) = if version == 3 {
            (f64_(72)?, f32_(96)?, f32_(100)?)
        } else {
            (0, 4, 72)
        };
        let unknown = incompat & !KNOWN_INCOMPATIBLE_FEATURES;
        if unknown != 0 {
            return Err(unsupported(format!(
                "qcow2 incompatible feature bits {unknown:#x}"
            )));
        }
        if incompat & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(unsupported("qcow2 external data file".into()));
        }
        if refcount_order > 6 {
            return Err(corrupt(
                &format!("header (refcount_order {refcount_order})"),
                96,
            ));
        }
        let compression =
            header_compression(&head, path, version, header_len, cluster_size, incompat)?;
        let extended_l2 = incompat & INCOMPAT_EXTENDED_L2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(corrupt(
                "header (extended L2 entries need clusters of at least 16 KiB)",
                20,
            ));
        }

        // Header extensions, up to the end of the first cluster.
        let mut backing_format = None;
        let mut at = header_len as usize;
        // A header without an end marker (extensions up to the end of
        // the buffer) is tolerated, as QEMU does.
        while let (Some(kind), Some(len)) = (be_u32(&head, at), be_u32(&head, at + 4)) {
            let data = head
                .get(at + 8..at + 8 + len as usize)
                .ok_or_else(|| corrupt("header extension (longer than the header)", at as u64))?;
            match kind {
                EXT_END => break,
                EXT_BACKING_FORMAT => {
                    backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_DATA_FILE => return Err(unsupported("qcow2 external data file".into())),
                _ => {}
            }
            at += 8 + (len as usize).div_ceil(8) * 8;
        }

        // Backing file name.
        let bf_offset = f64_(8)?;
        let bf_size = f32_(16)?;
        let backing_file = if bf_offset == 0 || bf_size == 0 {
            None
        } else {
            if bf_size > QCOW2_MAX_BACKING_NAME
                || bf_offset.saturating_add(u64::from(bf_size)) > cluster_size
            {
                return Err(corrupt("header (backing file name out of range)", 8));
            }
            let name = head
                .get(bf_offset as usize..(bf_offset + u64::from(bf_size)) as usize)
                .ok_or_else(truncated)?;
            Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| corrupt("backing file name (not UTF-8)", bf_offset))?,
            )
        };

        // Snapshots.
        let nb_snapshots = f32_(60)?;
        let snapshots_offset = f64_(64)?;
        let snapshots = read_snapshots(
            &file,
            path,
            file_len,
            nb_snapshots,
            snapshots_offset,
            cluster_size,
            virtual_size,
        )?;

        let (l1_offset, l1_size, virtual_size, reading_snapshot) = match snapshot {
            None => (f64_(40)?, u64::from(f32_(36)?), virtual_size, None),
            Some(want) => {
                let s = snapshots
                    .iter()
                    .find(|s| s.id == want)
                    .or_else(|| snapshots.iter().find(|s| s.name == want))
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "no snapshot `{want}` in {} (it has: {})",
                            path.display(),
                            snapshots
                                .iter()
                                .map(|s| s.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })?;
                (
                    s.l1_offset,
                    u64::from(s.l1_size),
                    s.virtual_size,
                    Some(s.name.clone()),
                )
            }
        };
        let l2_bytes_per_entry = if extended_l2 { 16 } else { 8 };
        let l2_entries = cluster_size / l2_bytes_per_entry;
        let needed_l1 = virtual_size.div_ceil(cluster_size).div_ceil(l2_entries);
        if l1_size.saturating_mul(8) > MAX_L1_BYTES {
            return Err(corrupt(
                &format!(
                    "header field l1_size ({l1_size} entries: an L1 table over QEMU's {} MiB limit)",
                    MAX_L1_BYTES >> 20
                ),
                36,
            ));
        }
        if l1_size < needed_l1 {
            return Err(corrupt(
                &format!(
                    "L1 table ({l1_size} entries, {needed_l1} needed for the virtual size {virtual_size})"
                ),
                36,
            ));
        }
        if l1_size > 0
            && (!l1_offset.is_multiple_of(cluster_size)
                || l1_offset.saturating_add(l1_size * 8) > file_len)
        {
            return Err(corrupt(
                &format!("L1 table offset {l1_offset} (unaligned or past the end of the file)"),
                40,
            ));
        }
        let l1 = PagedTable::new(l1_offset, l1_size, Entry::Be64);

        let backing = match &backing_file {
            None => None,
            Some(name) => {
                let bpath = chain.policy.resolve(path, "backing file", name)?;
                let fmt = match backing_format.as_deref() {
                    None => None,
                    Some(f) => Some(
                        f.parse::<ImageFormat>()
                            .map_err(|_| unsupported(format!("backing file format `{f}`")))?,
                    ),
                };
                Some(chain.open(&bpath, fmt, None)?)
            }
        };

        let details = Qcow2Details {
            version,
            cluster_size,
            refcount_bits: 1 << refcount_order,
            compression,
            extended_l2,
            backing_file,
            backing_format,
            snapshots,
            reading_snapshot,
            incompatible_features: incompat,
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            file_len,
            cluster_bits,
            cluster_size,
            virtual_size,
            l1,
            extended_l2,
            csize_bits: cluster_bits - 8,
            backing,
            details,
            l2_cache: Mutex::new(HashMap::new()),
        })
    }

    /// What the header says.
    pub fn details(&self) -> &Qcow2Details {
        &self.details
    }

    fn corrupt(&self, what: &str, offset: u64) -> Error {
        Error::Corrupt {
            what: format!("qcow2 {what} of {}", self.path.display()),
            offset,
        }
    }

    /// Entries (8 or 16 bytes each) per L2 table.
    fn l2_entries(&self) -> u64 {
        self.cluster_size / if self.extended_l2 { 16 } else { 8 }
    }

    /// The L2 table of L1 index `l1_index` as 64-bit words, `None` if not
    /// allocated.
    fn l2_table(&self, l1_index: u64) -> Result<Option<Arc<[u64]>>> {
        let entry = self.l1.get(&self.file, &self.path, l1_index)?.unwrap_or(0);
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if !offset.is_multiple_of(self.cluster_size)
            || offset.saturating_add(self.cluster_size) > self.file_len
        {
            return Err(self.corrupt(
                &format!("L1 entry {l1_index} (L2 table at {offset}, unaligned or past the end of the file)"),
                offset,
            ));
        }
        if let Some(t) = self.cache().get(&offset) {
            return Ok(Some(Arc::clone(t)));
        }
        let mut raw = vec![0u8; self.cluster_size as usize];
        pread_full(&self.file, &self.path, offset, &mut raw)?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let mut cache = self.cache();
        if (cache.len() as u64 + 1) * self.cluster_size > L2_CACHE_BYTES {
            cache.clear();
        }
        cache.insert(offset, Arc::clone(&table));
        Ok(Some(table))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<[u64]>>> {
        // A panic while holding the lock cannot leave the map inconsistent.
        self.l2_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How the guest bytes from `offset` are stored, and for how many bytes
    /// (at least 1, at most to the end of the L2 table's range and `limit`).
    fn map(&self, offset: u64, limit: u64) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size;
        let per_table = self.l2_entries();
        let cluster = offset >> self.cluster_bits;
        let l1_index = cluster / per_table;
        let table_end = (l1_index + 1)
            .saturating_mul(per_table)
            .saturating_mul(cs)
            .min(limit);
        let Some(table) = self.l2_table(l1_index)? else {
            return Ok((Mapping::Unallocated, table_end - offset));
        };
        let (first, first_len) = self.map_in_table(&table, offset, per_table)?;
        let mut len = first_len;
        // Extend over following clusters of the same table while the
        // mapping continues (contiguous data, or the same kind).
        if !matches!(first, Mapping::Compressed { .. }) {
            while offset + len < table_end {
                let (next, next_len) = self.map_in_table(&table, offset + len, per_table)?;
                let continues = match (first, next) {
                    (Mapping::Data(h), Mapping::Data(n)) => n == h + len,
                    (Mapping::Zero, Mapping::Zero)
                    | (Mapping::Unallocated, Mapping::Unallocated) => true,
                    _ => false,
                };
                if !continues {
                    break;
                }
                len += next_len;
            }
        }
        Ok((first, len.min(table_end - offset)))
    }

    /// The mapping of the (sub)cluster run holding `offset`, within one
    /// cluster.
    fn map_in_table(&self, table: &[u64], offset: u64, per_table: u64) -> Result<(Mapping, u64)> {
        let cs = self.cluster_size;
        let cluster = offset >> self.cluster_bits;
        let in_cluster = offset & (cs - 1);
        let index = (cluster % per_table) as usize;
        let words = if self.extended_l2 { 2 } else { 1 };
        let entry = table.get(index * words).copied().unwrap_or(0);
        let bitmap = if self.extended_l2 {
            table.get(index * 2 + 1).copied().unwrap_or(0)
        } else {
            0
        };
        let cluster_rest = cs - in_cluster;
        if entry & OFLAG_COMPRESSED != 0 {
            let shift = 62 - self.csize_bits;
            let host = entry & ((1u64 << shift) - 1);
            let sectors = ((entry >> shift) & ((1u64 << self.csize_bits) - 1)) + 1;
            let len = (sectors * 512).saturating_sub(host & 511);
            if host >= self.file_len {
                return Err(self.corrupt(
                    &format!("compressed cluster at {host} (past the end of the file)"),
                    host,
                ));
            }
            return Ok((Mapping::Compressed { host, len }, cluster_rest));
        }
        let host = entry & OFFSET_MASK;
        let check_host = |host: u64| -> Result<()> {
            if !host.is_multiple_of(cs) || host >= self.file_len {
                return Err(self.corrupt(
                    &format!(
                        "L2 entry for guest offset {} (data cluster at {host}, unaligned or past the end of the file)",
                        cluster * cs
                    ),
                    host,
                ));
            }
            Ok(())
        };
        if !self.extended_l2 {
            if entry & OFLAG_ZERO != 0 {
                return Ok((Mapping::Zero, cluster_rest));
            }
            if host == 0 {
                return Ok((Mapping::Unallocated, cluster_rest));
            }
            check_host(host)?;
            return Ok((Mapping::Data(host + in_cluster), cluster_rest));
        }
        // Extended L2: 32 subclusters, allocation bits 0..32, zero bits 32..64.
        let sc_size = cs / 32;
        let sc = (in_cluster / sc_size) as u32;
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(self.corrupt(
                &format!(
                    "extended L2 entry for guest offset {} (subcluster both allocated and zero)",
                    cluster * cs
                ),
                cluster * cs,
            ));
        }
        if host == 0 && alloc != 0 {
            return Err(self.corrupt(
                &format!(
                    "extended L2 entry for guest offset {} (allocated subclusters without a cluster)",
                    cluster * cs
                ),
                cluster * cs,
            ));
        }
        let kind_of = |i: u32| -> u8 {
            if alloc >> i & 1 != 0 {
                0
            } else if zero >> i & 1 != 0 {
                1
            } else {
                2
            }
        };
        let kind = kind_of(sc);
        let mut end = sc + 1;
        while end < 32 && kind_of(end) == kind {
            end += 1;
        }
        let run = u64::from(end) * sc_size - in_cluster;
        let mapping = match kind {
            0 => {
                check_host(host)?;
                Mapping::Data(host + in_cluster)
            }
            1 => Mapping::Zero,
            _ => Mapping::Unallocated,
        };
        Ok((mapping, run))
    }

    /// Reads `buf.len()` guest bytes at `offset` of the backing image, or
    /// zeros where there is none.
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            None => buf.fill(0),
            Some(b) => {
                let bsize = b.virtual_size();
                let inside = usize::try_from(bsize.saturating_sub(offset))
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                let (head, tail) = buf.split_at_mut(inside);
                if !head.is_empty() {
                    b.read_at(offset, head)?;
                }
                tail.fill(0);
            }
        }
        Ok(())
    }

    /// Decompresses the cluster stored at `host` (`len` bytes) into `out`
    /// (exactly one cluster).
    fn decompress(&self, host: u64, len: u64, out: &mut [u8]) -> Result<()> {
        decompress_cluster(
            &self.file,
            &self.path,
            self.file_len,
            self.details.compression,
            host,
            len,
            out,
        )
    }
}

/// Checks the header's `header_length` (version 3: at least 104 bytes,
/// inside the first cluster and the bytes read) and returns the
/// compression type it may hold, which must agree with its incompatible
/// feature bit. Shared by the reader and the patcher.
pub(super) fn header_compression(
    head: &[u8],
    path: &Path,
    version: u32,
    header_len: u32,
    cluster_size: u64,
    incompat: u64,
) -> Result<Compression> {
    let corrupt = |what: String, offset: u64| Error::Corrupt {
        what: format!("qcow2 {what} of {}", path.display()),
        offset,
    };
    if u64::from(header_len) > cluster_size
        || header_len < 72
        || (version == 3 && header_len < 104)
        || header_len as usize > head.len()
    {
        return Err(corrupt(format!("header (header_length {header_len})"), 100));
    }
    let compression = match head.get(104).copied() {
        _ if header_len <= 104 => Compression::Zlib,
        Some(0) => Compression::Zlib,
        Some(1) => Compression::Zstd,
        Some(t) => {
            return Err(Error::Unsupported {
                what: format!("qcow2 compression type {t} in {}", path.display()),
            });
        }
        None => {
            return Err(corrupt(
                "header (file ends inside it)".into(),
                head.len() as u64,
            ));
        }
    };
    if (compression != Compression::Zlib) != (incompat & INCOMPAT_COMPRESSION_TYPE != 0) {
        return Err(corrupt(
            "header (compression type and its feature bit disagree)".into(),
            72,
        ));
    }
    Ok(compression)
}

/// Decompresses the compressed cluster stored at `host` (`len` bytes,
/// cut to the file and to two clusters) of `file` into `out` (exactly one
/// cluster). Shared by the reader and the patcher.
pub(super) fn decompress_cluster(
    file: &File,
    path: &Path,
    file_len: u64,
    compression: Compression,
    host: u64,
    len: u64,
    out: &mut [u8],
) -> Result<()> {
    let corrupt = |what: String| Error::Corrupt {
        what: format!(
            "qcow2 compressed cluster at {host} ({what}) of {}",
            path.display()
        ),
        offset: host,
    };
    if host >= file_len {
        return Err(corrupt("past the end of the file".into()));
    }
    let len = len.min(file_len - host).min(2 * out.len() as u64);
    let ok = INPUT.with(|cell| -> Result<bool> {
        let mut input = cell.borrow_mut();
        input.resize(len as usize, 0);
        pread_full(file, path, host, &mut input)?;
        Ok(match compression {
            Compression::Zlib => inflate_cluster(&input, out),
            Compression::Zstd => unzstd_cluster(&input, out),
        })
    })?;
    if ok {
        Ok(())
    } else {
        Err(corrupt(format!(
            "{} data that does not inflate to exactly one cluster",
            match compression {
                Compression::Zlib => "deflate",
                Compression::Zstd => "zstd",
            }
        )))
    }
}

thread_local! {
    static INFLATE: RefCell<Option<libdeflater::Decompressor>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
    static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Inflates raw deflate `input` into `out`; true if the stream ends after
/// exactly `out.len()` bytes (trailing input is padding and ignored).
/// Output is bounded by `out`: data that inflates past it fails.
pub(crate) fn inflate_cluster(input: &[u8], out: &mut [u8]) -> bool {
    INFLATE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot.get_or_insert_with(libdeflater::Decompressor::new);
        matches!(d.deflate_decompress(input, out), Ok(n) if n == out.len())
    })
}

/// Decompresses the zstd frame at the start of `input` into `out`; true if
/// it holds exactly `out.len()` bytes (trailing input is ignored).
pub(crate) fn unzstd_cluster(input: &[u8], out: &mut [u8]) -> bool {
    let Ok(frame) = zstd::zstd_safe::find_frame_compressed_size(input) else {
        return false;
    };
    let Some(frame) = input.get(..frame) else {
        return false;
    };
    ZSTD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let d = slot.get_or_insert_with(zstd::zstd_safe::DCtx::create);
        matches!(d.decompress(out, frame), Ok(n) if n == out.len())
    })
}

impl ImageReader for Qcow2Reader {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, self.virtual_size, offset, buf.len())?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        let mut cluster_buf: Vec<u8> = Vec::new();
        while pos < end {
            let (mapping, len) = self.map(pos, end)?;
            let len = len.min(end - pos);
            let at = (pos - offset) as usize;
            let dst = buf
                .get_mut(at..at + len as usize)
                .ok_or_else(|| self.corrupt("mapping (run out of range)", pos))?;
            match mapping {
                Mapping::Zero => dst.fill(0),
                Mapping::Unallocated => self.read_backing(pos, dst)?,
                Mapping::Data(host) => pread_full(&self.file, &self.path, host, dst)?,
                Mapping::Compressed { host, len: clen } => {
                    let cs = self.cluster_size as usize;
                    let in_cluster = (pos & (self.cluster_size - 1)) as usize;
                    if in_cluster == 0 && dst.len() == cs {
                        self.decompress(host, clen, dst)?;
                    } else {
                        cluster_buf.resize(cs, 0);
                        self.decompress(host, clen, &mut cluster_buf)?;
                        dst.copy_from_slice(&cluster_buf[in_cluster..in_cluster + dst.len()]);
                    }
                }
            }
            pos += len;
        }
        Ok(())
    }

    fn extent_at(&self, offset: u64) -> Result<Extent> {
        check_range(&self.path, self.virtual_size, offset, 1)?;
        let (mapping, len) = self.map(offset, self.virtual_size)?;
        let len = len.min(self.virtual_size - offset);
        let kind = match mapping {
            Mapping::Data(_) | Mapping::Compressed { .. } => ExtentKind::Data,
            Mapping::Zero => ExtentKind::Zero,
            Mapping::Unallocated => match &self.backing {
                Some(b) if offset < b.virtual_size() => {
                    let e = b.extent_at(offset)?;
                    return Ok(Extent {
                        offset,
                        length: e.length.min(len).max(1),
                        kind: e.kind,
                    });
                }
                _ => ExtentKind::Unallocated,
            },
        };
        Ok(Extent {
            offset,
            length: len.max(1),
            kind,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn backing(&self) -> Option<&dyn ImageReader> {
        self.backing.as_deref()
    }

    fn qcow2_details(&self) -> Option<&Qcow2Details> {
        Some(&self.details)
    }

    fn data_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn stored_at(&self, offset: u64, len: u64) -> Result<Option<u64>> {
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.virtual_size) else {
            return Ok(None);
        };
        let mut first = None;
        let mut pos = offset;
        while pos < end {
            let (mapping, run) = self.map(pos, end)?;
            let Mapping::Data(host) = mapping else {
                return Ok(None);
            };
            let start = *first.get_or_insert(host);
            if host != start + (pos - offset) {
                return Ok(None);
            }
            pos += run.max(1);
        }
        Ok(first)
    }
}

/// Reads the snapshot table (bounded by QEMU's limits).
fn read_snapshots(
    file: &File,
    path: &Path,
    file_len: u64,
    count: u32,
    offset: u64,
    cluster_size: u64,
    header_size: u64,
) -> Result<Vec<SnapshotInfo>> {
    let corrupt = |what: String, at: u64| Error::Corrupt {
        what: format!("qcow2 {what} of {}", path.display()),
        offset: at,
    };
    if count == 0 {
        return Ok(Vec::new());
    }
    if count > MAX_SNAPSHOTS {
        return Err(corrupt(
            format!("header field nb_snapshots ({count}, more than QEMU's {MAX_SNAPSHOTS})"),
            60,
        ));
    }
    if !offset.is_multiple_of(cluster_size) || offset >= file_len {
        return Err(corrupt(format!("snapshot table offset {offset}"), 64));
    }
    let mut out = Vec::new();
    let mut at = offset;
    for i in 0..count {
        let mut fixed = [0u8; 40];
        if at.saturating_add(40) > file_len {
            return Err(corrupt(
                format!("snapshot {i} (past the end of the file)"),
                at,
            ));
        }
        pread_full(file, path, at, &mut fixed)?;
        let l1_offset = be_u64(&fixed, 0).unwrap_or(0);
        let l1_size = be_u32(&fixed, 8).unwrap_or(0);
        let id_len = u64::from(be_u16(&fixed, 12).unwrap_or(0));
        let name_len = u64::from(be_u16(&fixed, 14).unwrap_or(0));
        let extra_len = be_u32(&fixed, 36).unwrap_or(0);
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(corrupt(
                format!("snapshot {i} (extra data of {extra_len} bytes)"),
                at + 36,
            ));
        }
        let var_len = u64::from(extra_len) + id_len + name_len;
        // Ids and names are kept: the whole table is held to QEMU's cap.
        if (at + 40 + var_len).saturating_sub(offset) > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(corrupt(
                format!(
                    "snapshot {i} (the snapshot table passes QEMU's limit of {} MiB)",
                    MAX_SNAPSHOT_TABLE_BYTES >> 20
                ),
                at,
            ));
        }
        if (at + 40).saturating_add(var_len) > file_len {
            return Err(corrupt(
                format!("snapshot {i} (past the end of the file)"),
                at,
            ));
        }
        let mut var = vec![0u8; var_len as usize];
        pread_full(file, path, at + 40, &mut var)?;
        let extra = extra_len as usize;
        let disk_size = if extra >= 16 {
            be_u64(&var, 8).unwrap_or(header_size)
        } else {
            header_size
        };
        let id =
            String::from_utf8_lossy(var.get(extra..extra + id_len as usize).unwrap_or_default())
                .into_owned();
        let name_start = extra + id_len as usize;
        let name = String::from_utf8_lossy(
            var.get(name_start..name_start + name_len as usize)
                .unwrap_or_default(),
        )
        .into_owned();
        out.push(SnapshotInfo {
            id,
            name,
            virtual_size: disk_size,
            l1_offset,
            l1_size,
        });
        at = (at + 40 + var_len).div_ceil(8) * 8;
    }
    Ok(out)
}
