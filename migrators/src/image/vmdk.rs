//! VMDK reading: monolithicSparse and streamOptimized files (one hosted
//! sparse extent, `KDMV` magic; grains optionally deflate-compressed with
//! markers) and text descriptors naming FLAT, SPARSE and ZERO extents
//! (monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat), with paths
//! relative to the descriptor's directory.
//!
//! Refused with [`Error::Unsupported`]: images with a parent (delta
//! links), VMFS sparse / SESPARSE extents. Every grain directory and grain
//! table entry is bounds-checked; headers and descriptors are held to the
//! caps of [`super::limits`] (extent count, virtual size, grain and table
//! sizes), FLAT extents to the length of their file. Grain directories are
//! read in pages, and the grain-table caches of all the sparse extents of
//! a descriptor share one budget, so memory does not grow with the
//! virtual size or the number of extents.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fluidcloud_plugins::ImageFormat;

use super::limits::{
    TABLE_CACHE_BYTES, VMDK_GT_CACHE_BYTES, VMDK_MAX_DESCRIPTOR as MAX_DESCRIPTOR,
    VMDK_MAX_EXTENTS, VMDK_MAX_GD_ENTRIES, VMDK_MAX_GRAIN_SECTORS as MAX_GRAIN_SECTORS,
    VMDK_MAX_GT_ENTRIES as MAX_GT_ENTRIES, VMDK_MAX_SIZE, VMDK_MAX_SPARSE_EXTENT,
};
use super::reader::{
    BackingPolicy, Extent, ExtentKind, ImageReader, RawReader, check_range, pread_full,
};
use super::table::{Entry, PagedTable};
use crate::error::{Error, Result};

/// `KDMV` in the little-endian magic field.
const MAGIC: &[u8; 4] = b"KDMV";
/// Grain directory at the end (streamOptimized): read the footer.
const GD_AT_END: u64 = u64::MAX;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESSED: u32 = 1 << 16;

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// A hosted sparse extent.
#[derive(Debug)]
struct Sparse {
    file: File,
    path: PathBuf,
    file_len: u64,
    capacity: u64,
    grain: u64,
    gt_entries: u64,
    gd: PagedTable,
    compressed: bool,
    zero_grain: bool,
    cache: Mutex<HashMap<u32, Arc<[u32]>>>,
    /// Grain tables kept, in bytes (this extent's share of the image's).
    cache_bytes: u64,
}

/// How a grain is stored.
enum Grain {
    Unallocated,
    Zero,
    At(u64),
    Compressed(u64),
}

impl Sparse {
    /// Opens a sparse extent whose caches (grain directory pages and grain
    /// tables) may hold `share` of the image's budget (1: all of it).
    fn open(path: &Path, share: u64) -> Result<(Self, Option<String>)> {
        let (file, file_len) = crate::image::open_file(path)?;
        let corrupt = |what: &str, offset: u64| Error::Corrupt {
            what: format!("vmdk {what} of {}", path.display()),
            offset,
        };
        let mut h = [0u8; 512];
        pread_full(&file, path, 0, &mut h)?;
        if !h.starts_with(MAGIC) {
            return Err(corrupt("sparse extent header (no KDMV magic)", 0));
        }
        // The embedded descriptor (from the first header) may name a parent.
        let desc_at = le64(&h, 28).saturating_mul(512);
        let desc_len = le64(&h, 36).saturating_mul(512).min(MAX_DESCRIPTOR);
        let mut parent = None;
        if desc_at != 0 && desc_len != 0 && desc_at < file_len {
            let mut text = vec![0u8; desc_len as usize];
            pread_full(&file, path, desc_at, &mut text)?;
            parent = parse_descriptor(&text, path)?.parent;
        }
        if le64(&h, 56) == GD_AT_END {
            // streamOptimized: the real header is the footer, 1 KiB before
            // the end (followed by the end-of-stream marker).
            let at = file_len.saturating_sub(1024);
            pread_full(&file, path, at, &mut h)?;
            if !h.starts_with(MAGIC) {
                return Err(corrupt("footer (no KDMV magic)", at));
            }
        }
        let flags = le32(&h, 8);
        let sectors = le64(&h, 12);
        let capacity = sectors.saturating_mul(512);
        if capacity > VMDK_MAX_SIZE {
            return Err(corrupt(
                &format!(
                    "header field capacity ({sectors} sectors, over the {} TiB limit)",
                    VMDK_MAX_SIZE >> 40
                ),
                12,
            ));
        }
        let grain_sectors = le64(&h, 20);
        if !grain_sectors.is_power_of_two() || grain_sectors > MAX_GRAIN_SECTORS {
            return Err(corrupt(
                &format!(
                    "header field grainSize ({grain_sectors} sectors; a power of two up to \
                     {MAX_GRAIN_SECTORS})"
                ),
                20,
            ));
        }
        let gt_entries = u64::from(le32(&h, 44));
        if gt_entries == 0 || gt_entries > MAX_GT_ENTRIES {
            return Err(corrupt(
                &format!("header field numGTEsPerGT ({gt_entries} entries; 1 to {MAX_GT_ENTRIES})"),
                44,
            ));
        }
        let grain = grain_sectors * 512;
        let gd_entries = capacity.div_ceil(grain).div_ceil(gt_entries);
        let gd_at = le64(&h, 56).saturating_mul(512);
        if gd_entries > VMDK_MAX_GD_ENTRIES || gd_at.saturating_add(gd_entries * 4) > file_len {
            return Err(corrupt(
                &format!(
                    "header field gdOffset (grain directory of {gd_entries} entries at {gd_at}, \
                     past the end of the file or over {VMDK_MAX_GD_ENTRIES} entries)"
                ),
                56,
            ));
        }
        let share = share.max(1);
        let gd = PagedTable::with_cache(gd_at, gd_entries, Entry::Le32, TABLE_CACHE_BYTES / share);
        let compressed = flags & FLAG_COMPRESSED != 0;
        if compressed && u16::from_le_bytes([h[77], h[78]]) != 1 {
            return Err(Error::Unsupported {
                what: format!(
                    "vmdk compression algorithm {} in {}",
                    u16::from_le_bytes([h[77], h[78]]),
                    path.display()
                ),
            });
        }
        Ok((
            Self {
                file,
                path: path.to_owned(),
                file_len,
                capacity,
                grain,
                gt_entries,
                gd,
                compressed,
                zero_grain: flags & FLAG_ZERO_GRAIN != 0,
                cache: Mutex::new(HashMap::new()),
                cache_bytes: VMDK_GT_CACHE_BYTES / share,
            },
            parent,
        ))
    }

    fn corrupt(&self, what: String, offset: u64) -> Error {
        Error::Corrupt {
            what: format!("vmdk {what} of {}", self.path.display()),
            offset,
        }
    }

    fn grain_of(&self, offset: u64) -> Result<Grain> {
        let index = offset / self.grain;
        let gdi = index / self.gt_entries;
        let gt_sector = self.gd.get(&self.file, &self.path, gdi)?.unwrap_or(0);
        // Entries are 32-bit sector numbers.
        let gt_sector = u32::try_from(gt_sector).unwrap_or(0);
        if gt_sector == 0 {
            return Ok(Grain::Unallocated);
        }
        let table = self.table(gt_sector)?;
        let gte = table
            .get((index % self.gt_entries) as usize)
            .copied()
            .unwrap_or(0);
        Ok(match gte {
            0 => Grain::Unallocated,
            1 if self.zero_grain => Grain::Zero,
            s => {
                let at = u64::from(s) * 512;
                if at >= self.file_len {
                    return Err(self.corrupt(
                        format!("grain table entry for guest offset {offset} (past the end)"),
                        at,
                    ));
                }
                if self.compressed {
                    Grain::Compressed(at)
                } else {
                    Grain::At(at)
                }
            }
        })
    }

    fn table(&self, sector: u32) -> Result<Arc<[u32]>> {
        let lock = || {
            self.cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(t) = lock().get(&sector) {
            return Ok(Arc::clone(t));
        }
        let at = u64::from(sector) * 512;
        let len = self.gt_entries * 4;
        if at.saturating_add(len) > self.file_len {
            return Err(self.corrupt(format!("grain table at {at} (past the end)"), at));
        }
        let mut raw = vec![0u8; len as usize];
        pread_full(&self.file, &self.path, at, &mut raw)?;
        let t: Arc<[u32]> = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut cache = lock();
        if (cache.len() as u64 + 1) * len > self.cache_bytes {
            cache.clear();
        }
        cache.insert(sector, Arc::clone(&t));
        Ok(t)
    }

    /// Reads `buf` at extent offset `offset`, within one grain.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.grain_of(offset)? {
            Grain::Unallocated | Grain::Zero => buf.fill(0),
            Grain::At(at) => pread_full(&self.file, &self.path, at + offset % self.grain, buf)?,
            Grain::Compressed(at) => {
                // Marker: LBA (8 bytes), compressed size (4), then zlib data.
                let mut head = [0u8; 12];
                pread_full(&self.file, &self.path, at, &mut head)?;
                let size = u64::from(le32(&head, 8));
                if size == 0 || size > 2 * self.grain + 4096 || at + 12 + size > self.file_len {
                    return Err(self.corrupt(format!("compressed grain ({size} bytes)"), at));
                }
                let mut input = vec![0u8; size as usize];
                pread_full(&self.file, &self.path, at + 12, &mut input)?;
                let mut grain = vec![0u8; self.grain as usize];
                let mut d = libdeflater::Decompressor::new();
                match d.zlib_decompress(&input, &mut grain) {
                    // The last grain of a disk may inflate short.
                    Ok(n) => {
                        grain.truncate(n);
                        grain.resize(self.grain as usize, 0);
                    }
                    Err(_) => {
                        return Err(self.corrupt(
                            "compressed grain (bad deflate data or larger than a grain)".into(),
                            at,
                        ));
                    }
                }
                let within = (offset % self.grain) as usize;
                buf.copy_from_slice(grain.get(within..within + buf.len()).unwrap_or_default());
            }
        }
        Ok(())
    }

    /// What the extent holds at `offset`, and for how many bytes at least:
    /// to the end of its grain, or of its grain table's range when that
    /// table is not allocated (so a walk over an empty terabyte takes one
    /// step per grain table, not per grain).
    fn run(&self, offset: u64) -> Result<(ExtentKind, u64)> {
        let table_span = self.gt_entries * self.grain;
        let gdi = offset / table_span;
        if self.gd.get(&self.file, &self.path, gdi)?.unwrap_or(0) == 0 {
            return Ok((ExtentKind::Unallocated, table_span - offset % table_span));
        }
        let kind = match self.grain_of(offset)? {
            Grain::Unallocated => ExtentKind::Unallocated,
            Grain::Zero => ExtentKind::Zero,
            Grain::At(_) | Grain::Compressed(_) => ExtentKind::Data,
        };
        Ok((kind, self.grain - offset % self.grain))
    }
}

/// One extent of the disk.
#[derive(Debug)]
enum Part {
    /// A FLAT (or VMFS) extent: bytes of a raw file from `offset`; holes
    /// of the file are reported as such.
    Flat {
        raw: RawReader,
        offset: u64,
    },
    Sparse(Box<Sparse>),
    Zero,
}

/// A VMDK opened for reading.
#[derive(Debug)]
pub struct VmdkReader {
    path: PathBuf,
    size: u64,
    /// `(guest start, length, part)`, ascending and contiguous.
    parts: Vec<(u64, u64, Part)>,
}

/// What a descriptor says.
#[derive(Debug, Default)]
struct Descriptor {
    /// `(sectors, kind, file, offset in sectors)`.
    extents: Vec<(u64, String, Option<String>, u64)>,
    parent: Option<String>,
}

/// Parses the descriptor text of `path` (a descriptor file, or a sparse
/// extent with one embedded); errors name `path` and the line.
fn parse_descriptor(text: &[u8], path: &Path) -> Result<Descriptor> {
    let text = text.split(|&b| b == 0).next().unwrap_or_default();
    let text = String::from_utf8_lossy(text);
    let mut d = Descriptor::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        if let Some("RW" | "RDONLY" | "NOACCESS") = words.next() {
            let bad = || Error::Corrupt {
                what: format!("vmdk extent line `{line}` of {}", path.display()),
                offset: 0,
            };
            if d.extents.len() >= VMDK_MAX_EXTENTS {
                return Err(Error::Corrupt {
                    what: format!(
                        "vmdk descriptor {} (more than {VMDK_MAX_EXTENTS} extent lines)",
                        path.display()
                    ),
                    offset: 0,
                });
            }
            let sectors: u64 = words.next().and_then(|w| w.parse().ok()).ok_or_else(bad)?;
            let kind = words.next().ok_or_else(bad)?.to_owned();
            // The file name is quoted and may hold spaces.
            let (file, rest) = match line.split_once('"') {
                Some((_, after)) => match after.split_once('"') {
                    Some((name, rest)) => (Some(name.to_owned()), rest),
                    None => return Err(bad()),
                },
                None => (None, ""),
            };
            let offset = rest
                .split_whitespace()
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or(0);
            d.extents.push((sectors, kind, file, offset));
        } else if let Some((key, value)) = line.split_once('=')
            && key.trim() == "parentFileNameHint"
        {
            let v = value.trim().trim_matches('"');
            if !v.is_empty() {
                d.parent = Some(v.to_owned());
            }
        }
    }
    Ok(d)
}

impl VmdkReader {
    /// Opens a VMDK: a sparse extent file or a text descriptor.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] for malformed headers, descriptors or tables;
    /// [`Error::Unsupported`] for parents and extent types not read;
    /// [`Error::Refused`] for extents outside the descriptor's directory.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_policy(path, &BackingPolicy::default())
    }

    /// [`open`](Self::open), with extent files confined by `policy`.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open).
    pub fn open_with_policy(path: &Path, policy: &BackingPolicy) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("opening image {}", path.display()), e))?;
        let mut magic = [0u8; 4];
        pread_full(&file, path, 0, &mut magic)?;
        if &magic == MAGIC {
            let (sparse, parent) = Sparse::open(path, 1)?;
            if let Some(p) = parent {
                return Err(Error::Unsupported {
                    what: format!("vmdk with a parent ({p}) in {}", path.display()),
                });
            }
            let size = sparse.capacity;
            return Ok(Self {
                path: path.to_owned(),
                size,
                parts: vec![(0, size, Part::Sparse(Box::new(sparse)))],
            });
        }
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading metadata of image {}", path.display()), e))?
            .len();
        if len > MAX_DESCRIPTOR {
            return Err(Error::Corrupt {
                what: format!("vmdk descriptor {} (longer than 1 MiB)", path.display()),
                offset: MAX_DESCRIPTOR,
            });
        }
        let mut text = vec![0u8; len as usize];
        pread_full(&file, path, 0, &mut text)?;
        let desc = parse_descriptor(&text, path)?;
        if let Some(p) = desc.parent {
            return Err(Error::Unsupported {
                what: format!("vmdk with a parent ({p}) in {}", path.display()),
            });
        }
        let corrupt = |what: String| Error::Corrupt {
            what: format!("vmdk descriptor {} ({what})", path.display()),
            offset: 0,
        };
        // Sizes first, before any extent file is opened.
        let mut total = 0u64;
        for (i, (sectors, ..)) in desc.extents.iter().enumerate() {
            total = sectors
                .checked_mul(512)
                .and_then(|len| total.checked_add(len))
                .filter(|&t| t <= VMDK_MAX_SIZE)
                .ok_or_else(|| {
                    corrupt(format!(
                        "extent line {} of {sectors} sectors takes the disk past the {} TiB \
                         limit",
                        i + 1,
                        VMDK_MAX_SIZE >> 40
                    ))
                })?;
        }
        let sparse_extents = desc
            .extents
            .iter()
            .filter(|(_, kind, ..)| kind == "SPARSE")
            .count() as u64;
        let mut parts = Vec::new();
        let mut pos = 0u64;
        for (i, (sectors, kind, name, offset)) in desc.extents.into_iter().enumerate() {
            let length = sectors * 512;
            let part = match (kind.as_str(), name) {
                ("ZERO", _) => Part::Zero,
                ("FLAT" | "VMFS", Some(name)) => {
                    let p = policy.resolve(path, "extent", &name)?;
                    let raw = RawReader::open(&p)?;
                    let start = offset.saturating_mul(512);
                    if start.saturating_add(length) > raw.virtual_size() {
                        return Err(corrupt(format!(
                            "extent line {}: {sectors} sectors from sector {offset} of {} end \
                             past its {} bytes",
                            i + 1,
                            p.display(),
                            raw.virtual_size()
                        )));
                    }
                    Part::Flat { raw, offset: start }
                }
                ("SPARSE", Some(name)) => {
                    let p = policy.resolve(path, "extent", &name)?;
                    let (s, _) = Sparse::open(&p, sparse_extents)?;
                    Part::Sparse(Box::new(s))
                }
                (k, _) => {
                    return Err(Error::Unsupported {
                        what: format!("vmdk extent type {k} in {}", path.display()),
                    });
                }
            };
            if length > 0 {
                parts.push((pos, length, part));
            }
            pos += length;
        }
        Ok(Self {
            path: path.to_owned(),
            size: pos,
            parts,
        })
    }

    /// The part holding `offset`, its index and the offset within it.
    fn part(&self, offset: u64) -> Option<(&(u64, u64, Part), u64)> {
        let i = self
            .parts
            .partition_point(|(start, len, _)| start + len <= offset);
        self.parts.get(i).map(|p| (p, offset - p.0))
    }
}

impl ImageReader for VmdkReader {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vmdk
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let Some(((_, len, part), within)) = self.part(pos) else {
                buf.get_mut(done..).unwrap_or_default().fill(0);
                break;
            };
            let mut n = (len - within).min((buf.len() - done) as u64);
            if let Part::Sparse(s) = part {
                n = n.min(s.grain - within % s.grain);
            }
            let dst = buf.get_mut(done..done + n as usize).unwrap_or_default();
            match part {
                Part::Zero => dst.fill(0),
                Part::Flat { raw, offset } => raw.read_at(offset + within, dst)?,
                Part::Sparse(s) => {
                    if within >= s.capacity {
                        dst.fill(0);
                    } else {
                        s.read(within, dst)?;
                    }
                }
            }
            done += n as usize;
        }
        Ok(())
    }

    fn extent_at(&self, offset: u64) -> Result<Extent> {
        check_range(&self.path, self.size, offset, 1)?;
        let Some(((_, len, part), within)) = self.part(offset) else {
            return Ok(Extent {
                offset,
                length: self.size - offset,
                kind: ExtentKind::Unallocated,
            });
        };
        let rest = len - within;
        let (kind, length) = match part {
            Part::Zero => (ExtentKind::Zero, rest),
            Part::Flat { raw, offset } => {
                let e = raw.extent_at(offset + within)?;
                (e.kind, e.length.min(rest))
            }
            Part::Sparse(s) => {
                let (kind, mut l) = s.run(within)?;
                // Merge a bounded number of following runs of one kind.
                let mut steps = 0;
                while l < rest && steps < 1024 {
                    let (k, more) = s.run(within + l)?;
                    if k != kind {
                        break;
                    }
                    l += more;
                    steps += 1;
                }
                (kind, l.min(rest))
            }
        };
        Ok(Extent {
            offset,
            length,
            kind,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Which kind of VMDK to write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum VmdkSubformat {
    /// Compressed grains with markers (vSphere imports, OVA packages).
    #[default]
    StreamOptimized,
    /// Hosted sparse extent with uncompressed grains (Workstation, QEMU).
    MonolithicSparse,
}

/// Grain size of the streamOptimized images we write (QEMU's and VMware's).
pub const STREAM_GRAIN: u64 = 64 * 1024;
/// Grain table entries per table.
const STREAM_GT_ENTRIES: u64 = 512;
/// Sectors before the first grain: header, descriptor, padding.
const STREAM_OVERHEAD: u64 = 128;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// Compresses one grain (zero-padded to [`STREAM_GRAIN`]) for a
/// streamOptimized image: zlib format, as VMware and QEMU read it.
pub fn compress_grain(data: &[u8]) -> Vec<u8> {
    let padded;
    let data = if (data.len() as u64) < STREAM_GRAIN {
        let mut grain = vec![0u8; STREAM_GRAIN as usize];
        if let Some(dst) = grain.get_mut(..data.len()) {
            dst.copy_from_slice(data);
        }
        padded = grain;
        &padded[..]
    } else {
        data
    };
    let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    let mut out = vec![0u8; c.zlib_compress_bound(data.len())];
    let n = c.zlib_compress(data, &mut out).unwrap_or(0);
    out.truncate(n);
    out
}

/// Writes a streamOptimized VMDK (the format vSphere and OVA packages
/// import) front to back: compressed grains with markers, each grain table
/// after its grains, then the grain directory, a footer holding the real
/// header, and the end-of-stream marker. Memory: one grain table and 4
/// bytes per 32 MiB of disk.
#[derive(Debug)]
pub struct StreamOptimizedWriter<W = File> {
    file: W,
    path: PathBuf,
    capacity: u64,
    out: Vec<u8>,
    flushed: u64,
    gt: Vec<u32>,
    gt_index: Option<u64>,
    gd: Vec<u32>,
    next_grain: u64,
}

impl StreamOptimizedWriter<File> {
    /// Creates the image at `path` (which must not exist) for a disk of
    /// `size` bytes (rounded up to whole sectors).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file exists or cannot be created;
    /// [`Error::InvalidArgument`] for sizes VMDK cannot describe.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        Self::check_size(path, size)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("creating vmdk image {}", path.display()), e))?;
        Self::to_stream(file, path, size)
    }

    /// Writes the last grain table, the grain directory, the footer and
    /// the end-of-stream marker; syncs if `sync`. Returns the file size.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if writing or syncing fails.
    pub fn finish(self, sync: bool) -> Result<u64> {
        let path = self.path.clone();
        let (file, len) = self.finish_stream()?;
        if sync {
            file.sync_all()
                .map_err(|e| Error::io(format!("syncing vmdk image {}", path.display()), e))?;
        }
        Ok(len)
    }
}

impl<W: std::io::Write> StreamOptimizedWriter<W> {
    /// The grain directory is held in memory (4 bytes per 32 MiB): sizes
    /// are held to [`VMDK_MAX_SIZE`] (2 MiB of directory) before anything is
    /// allocated.
    fn check_size(path: &Path, size: u64) -> Result<()> {
        if size > VMDK_MAX_SIZE {
            return Err(Error::InvalidArgument(format!(
                "virtual size {size} is too large for a streamOptimized VMDK ({}: {} TiB at most, \
                 above VMware's limit of 62 TB)",
                path.display(),
                VMDK_MAX_SIZE >> 40
            )));
        }
        Ok(())
    }

    /// Writes the image front to back into `out` (a file, a pipe, an
    /// upload), which is never seeked; `path` names the extent in the
    /// embedded descriptor (its file name) and the image in errors.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for sizes VMDK cannot describe or a name
    /// too long for the descriptor.
    pub fn to_stream(out: W, path: &Path, size: u64) -> Result<Self> {
        Self::check_size(path, size)?;
        let file = out;
        let sectors = size.div_ceil(512);
        let gd_entries = sectors
            .div_ceil(STREAM_GRAIN / 512)
            .div_ceil(STREAM_GT_ENTRIES);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut out = header(sectors, u64::MAX);
        let cylinders = (sectors / (16 * 63)).min(16383);
        let cid = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()) as u32;
        let descriptor = format!(
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
             createType=\"streamOptimized\"\n\n# Extent description\n\
             RW {sectors} SPARSE \"{name}\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
             ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"ide\"\nddb.toolsInstallType = \"4\"\n"
        );
        out.extend_from_slice(descriptor.as_bytes());
        if out.len() as u64 > STREAM_OVERHEAD * 512 {
            return Err(Error::InvalidArgument(format!(
                "file name of {} is too long for the embedded descriptor",
                path.display()
            )));
        }
        out.resize((STREAM_OVERHEAD * 512) as usize, 0);
        Ok(Self {
            file,
            path: path.to_owned(),
            capacity: sectors * 512,
            out,
            flushed: 0,
            gt: vec![0; STREAM_GT_ENTRIES as usize],
            gt_index: None,
            gd: vec![0; gd_entries as usize],
            next_grain: 0,
        })
    }

    fn sector(&self) -> u64 {
        (self.flushed + self.out.len() as u64) / 512
    }

    fn pad(&mut self) {
        let len =
            (self.flushed as usize + self.out.len()).div_ceil(512) * 512 - self.flushed as usize;
        self.out.resize(len, 0);
    }

    fn marker(&mut self, sectors: u64, kind: u32) {
        self.out.extend_from_slice(&sectors.to_le_bytes());
        self.out.extend_from_slice(&0u32.to_le_bytes());
        self.out.extend_from_slice(&kind.to_le_bytes());
        self.pad_marker();
    }

    fn pad_marker(&mut self) {
        let len = self.out.len() + 512 - 16;
        self.out.resize(len, 0);
    }

    /// Stores the grain at guest `offset` (grain-aligned, ascending), given
    /// compressed by [`compress_grain`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an unaligned, repeated or
    /// out-of-range offset; [`Error::Io`] if writing fails.
    pub fn write_grain(&mut self, offset: u64, compressed: &[u8]) -> Result<()> {
        let index = offset / STREAM_GRAIN;
        if !offset.is_multiple_of(STREAM_GRAIN)
            || index < self.next_grain
            || offset >= self.capacity
        {
            return Err(Error::InvalidArgument(format!(
                "grain write at {offset} of {}: unaligned, out of order or past the end",
                self.path.display()
            )));
        }
        self.next_grain = index + 1;
        let table = index / STREAM_GT_ENTRIES;
        if self.gt_index != Some(table) {
            self.flush_gt();
            self.gt_index = Some(table);
        }
        let sector = self.sector();
        if let Some(e) = self.gt.get_mut((index % STREAM_GT_ENTRIES) as usize) {
            *e = u32::try_from(sector).map_err(|_| {
                Error::InvalidArgument(format!("{} passes 2 TiB of data", self.path.display()))
            })?;
        }
        self.out.extend_from_slice(&(offset / 512).to_le_bytes());
        self.out
            .extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        self.out.extend_from_slice(compressed);
        self.pad();
        if self.out.len() >= 2 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush_gt(&mut self) {
        if let Some(table) = self.gt_index.take() {
            self.marker(STREAM_GT_ENTRIES * 4 / 512, MARKER_GT);
            let at = self.sector() as u32;
            if let Some(e) = self.gd.get_mut(table as usize) {
                *e = at;
            }
            let gt = std::mem::replace(&mut self.gt, vec![0; STREAM_GT_ENTRIES as usize]);
            for e in gt {
                self.out.extend_from_slice(&e.to_le_bytes());
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        if !self.out.is_empty() {
            self.file
                .write_all(&self.out)
                .map_err(|e| Error::io(format!("writing vmdk image {}", self.path.display()), e))?;
            self.flushed += self.out.len() as u64;
            self.out.clear();
        }
        Ok(())
    }

    /// The output, as it is (for aborting an upload).
    pub fn into_inner(self) -> W {
        self.file
    }

    /// Writes the last grain table, the grain directory, the footer and
    /// the end-of-stream marker; returns the output and the image size.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if writing fails.
    pub fn finish_stream(mut self) -> Result<(W, u64)> {
        self.flush_gt();
        let gd_sectors = (self.gd.len() as u64 * 4).div_ceil(512);
        self.marker(gd_sectors, MARKER_GD);
        let gd_at = self.sector();
        let gd = std::mem::take(&mut self.gd);
        for e in gd {
            self.out.extend_from_slice(&e.to_le_bytes());
        }
        self.pad();
        self.marker(1, MARKER_FOOTER);
        let footer = header(self.capacity / 512, gd_at);
        self.out.extend_from_slice(&footer);
        self.out.extend_from_slice(&[0u8; 512]); // end of stream
        self.flush()?;
        Ok((self.file, self.flushed))
    }
}

/// The 512-byte sparse extent header of a streamOptimized image.
fn header(sectors: u64, gd_offset: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&3u32.to_le_bytes()); // version
    // Newline detection, compressed grains, markers.
    h.extend_from_slice(&(1u32 | FLAG_COMPRESSED | (1 << 17)).to_le_bytes());
    h.extend_from_slice(&sectors.to_le_bytes()); // capacity
    h.extend_from_slice(&(STREAM_GRAIN / 512).to_le_bytes()); // grain size
    h.extend_from_slice(&1u64.to_le_bytes()); // descriptor offset
    h.extend_from_slice(&(STREAM_OVERHEAD - 1).to_le_bytes()); // descriptor size
    h.extend_from_slice(&(STREAM_GT_ENTRIES as u32).to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes()); // redundant GD: none
    h.extend_from_slice(&gd_offset.to_le_bytes());
    h.extend_from_slice(&STREAM_OVERHEAD.to_le_bytes()); // overhead
    h.push(0); // clean shutdown
    h.extend_from_slice(b"\n \r\n");
    h.extend_from_slice(&1u16.to_le_bytes()); // deflate
    h.resize(512, 0);
    h
}

/// Writes a monolithicSparse VMDK (hosted, uncompressed grains) front to
/// back. The grain directory and every grain table have reserved places
/// after the header; a grain table is written when the writes move past
/// the range it maps, so only one is held in memory. All-zero grains are
/// not stored.
#[derive(Debug)]
pub struct MonolithicSparseWriter {
    file: File,
    path: PathBuf,
    capacity: u64,
    /// Sector of the first grain table.
    gt_base: u64,
    /// Sector where the next grain goes.
    next_sector: u64,
    gt: Vec<u32>,
    gt_index: Option<u64>,
    next_grain: u64,
}

impl MonolithicSparseWriter {
    /// Creates the image at `path` (which must not exist) for a disk of
    /// `size` bytes (rounded up to whole sectors).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file exists or cannot be written;
    /// [`Error::InvalidArgument`] for sizes VMDK cannot describe.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        use std::os::unix::fs::FileExt as _;
        if size > VMDK_MAX_SPARSE_EXTENT {
            return Err(Error::InvalidArgument(format!(
                "virtual size {size} is too large for a monolithicSparse VMDK ({}: 2 TiB at most, \
                 QEMU's limit for one sparse extent)",
                path.display()
            )));
        }
        let sectors = size.div_ceil(512);
        let grain_sectors = STREAM_GRAIN / 512;
        let gd_entries = sectors.div_ceil(grain_sectors).div_ceil(STREAM_GT_ENTRIES);
        let desc_sectors = 20u64;
        let gd_at = 1 + desc_sectors;
        let gd_sectors = (gd_entries * 4).div_ceil(512);
        let gt_base = gd_at + gd_sectors;
        let gt_sectors = gd_entries * (STREAM_GT_ENTRIES * 4 / 512);
        let overhead = (gt_base + gt_sectors).div_ceil(grain_sectors) * grain_sectors;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("creating vmdk image {}", path.display()), e))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut h = Vec::with_capacity(512);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&1u32.to_le_bytes()); // version
        h.extend_from_slice(&1u32.to_le_bytes()); // newline detection
        h.extend_from_slice(&sectors.to_le_bytes());
        h.extend_from_slice(&grain_sectors.to_le_bytes());
        h.extend_from_slice(&1u64.to_le_bytes()); // descriptor offset
        h.extend_from_slice(&desc_sectors.to_le_bytes());
        h.extend_from_slice(&(STREAM_GT_ENTRIES as u32).to_le_bytes());
        h.extend_from_slice(&0u64.to_le_bytes()); // no redundant GD
        h.extend_from_slice(&gd_at.to_le_bytes());
        h.extend_from_slice(&overhead.to_le_bytes());
        h.push(0);
        h.extend_from_slice(b"\n \r\n");
        h.extend_from_slice(&0u16.to_le_bytes());
        h.resize(512, 0);
        let cylinders = (sectors / (16 * 63)).min(16383);
        let cid = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()) as u32;
        let descriptor = format!(
            "# Disk DescriptorFile\nversion=1\nCID={cid:08x}\nparentCID=ffffffff\n\
             createType=\"monolithicSparse\"\n\n# Extent description\n\
             RW {sectors} SPARSE \"{name}\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
             ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"ide\"\n"
        );
        if descriptor.len() as u64 > desc_sectors * 512 {
            return Err(Error::InvalidArgument(format!(
                "file name of {} is too long for the embedded descriptor",
                path.display()
            )));
        }
        h.extend_from_slice(descriptor.as_bytes());
        h.resize(((1 + desc_sectors) * 512) as usize, 0);
        // The grain directory: every table at its reserved place.
        for t in 0..gd_entries {
            let at = gt_base + t * (STREAM_GT_ENTRIES * 4 / 512);
            h.extend_from_slice(&(at as u32).to_le_bytes());
        }
        let io = |e| Error::io(format!("writing vmdk image {}", path.display()), e);
        file.write_all_at(&h, 0).map_err(io)?;
        file.set_len(overhead * 512).map_err(io)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            capacity: sectors * 512,
            gt_base,
            next_sector: overhead,
            gt: vec![0; STREAM_GT_ENTRIES as usize],
            gt_index: None,
            next_grain: 0,
        })
    }

    /// Writes whole grains of guest data starting at grain-aligned
    /// `offset` (ascending; the last grain of the disk may be short);
    /// all-zero grains are skipped.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] for an unaligned, repeated or
    /// out-of-range offset; [`Error::Io`] if writing fails.
    pub fn write_grains(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        let first = offset / STREAM_GRAIN;
        if !offset.is_multiple_of(STREAM_GRAIN)
            || first < self.next_grain
            || offset.saturating_add(data.len() as u64) > self.capacity
        {
            return Err(Error::InvalidArgument(format!(
                "grain write at {offset} of {}: unaligned, out of order or past the end",
                self.path.display()
            )));
        }
        for (k, grain) in data.chunks(STREAM_GRAIN as usize).enumerate() {
            let index = first + k as u64;
            self.next_grain = index + 1;
            if grain.iter().all(|&b| b == 0) {
                continue;
            }
            let table = index / STREAM_GT_ENTRIES;
            if self.gt_index != Some(table) {
                self.flush_gt()?;
                self.gt_index = Some(table);
            }
            let sector = u32::try_from(self.next_sector).map_err(|_| {
                Error::InvalidArgument(format!("{} passes 2 TiB of data", self.path.display()))
            })?;
            if let Some(e) = self.gt.get_mut((index % STREAM_GT_ENTRIES) as usize) {
                *e = sector;
            }
            let mut buf;
            let bytes = if (grain.len() as u64) < STREAM_GRAIN {
                buf = vec![0u8; STREAM_GRAIN as usize];
                buf[..grain.len()].copy_from_slice(grain);
                &buf[..]
            } else {
                grain
            };
            self.file
                .write_all_at(bytes, self.next_sector * 512)
                .map_err(|e| Error::io(format!("writing vmdk image {}", self.path.display()), e))?;
            self.next_sector += STREAM_GRAIN / 512;
        }
        Ok(())
    }

    fn flush_gt(&mut self) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        if let Some(table) = self.gt_index.take() {
            let at = (self.gt_base + table * (STREAM_GT_ENTRIES * 4 / 512)) * 512;
            let bytes: Vec<u8> = self.gt.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.file
                .write_all_at(&bytes, at)
                .map_err(|e| Error::io(format!("writing vmdk image {}", self.path.display()), e))?;
            self.gt.fill(0);
        }
        Ok(())
    }

    /// Writes the last grain table and syncs if `sync`; returns the file
    /// size.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if writing or syncing fails.
    pub fn finish(mut self, sync: bool) -> Result<u64> {
        self.flush_gt()?;
        if sync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(format!("syncing vmdk image {}", self.path.display()), e))?;
        }
        Ok(self.next_sector * 512)
    }
}
