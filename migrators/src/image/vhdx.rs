//! VHDX: fixed and dynamic images are read, dynamic ones written
//! ([`VhdxWriter`]) (Hyper-V's format).
//!
//! The current header is the valid one (signature and CRC-32C) with the
//! highest sequence number; images whose log still holds entries to replay
//! are refused, as QEMU refuses them read-only. The region table (either
//! copy) gives the BAT and metadata regions; the metadata gives the block
//! size, the virtual size and the logical sector size, which sets how many
//! payload blocks share a sector-bitmap entry in the BAT (the chunk
//! ratio). Differencing images (with a parent) are refused for now.
//!
//! The BAT is read in pages as it is used ([`super::limits`]): a 64 TiB
//! image in 1 MiB blocks has a 512 MiB BAT, which is never loaded whole.

use std::fs::File;
use std::path::{Path, PathBuf};

use fluidcloud_plugins::ImageFormat;

use super::limits::{
    VHDX_MAX_BAT_BYTES, VHDX_MAX_BLOCK, VHDX_MAX_METADATA_BYTES, VHDX_MAX_SIZE, VHDX_MIN_BLOCK,
};
use super::probe::{crc32c, guid};
use super::reader::{Extent, ExtentKind, ImageReader, check_range, pread_full};
use super::table::{Cursor, Entry, PagedTable};
use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;
/// Fuzzing builds (`scripts/fuzz`) accept bad CRC-32C checksums: random
/// mutations almost never keep them right, and the fuzzer would rarely get
/// past the headers to the region tables, metadata and BAT.
pub(crate) const SKIP_CHECKSUMS: bool = cfg!(fuzzing);
pub(crate) const REGION_TABLES: [u64; 2] = [0x3_0000, 0x4_0000];
const HEADERS: [u64; 2] = [0x1_0000, 0x2_0000];
pub(crate) const TABLE_LEN: usize = 64 * 1024;
pub(crate) const MAX_ENTRIES: usize = 2047;

const REGION_BAT: [u8; 16] = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
pub(crate) const REGION_METADATA: [u8; 16] = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const META_FILE_PARAMETERS: [u8; 16] = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
pub(crate) const META_VIRTUAL_SIZE: [u8; 16] = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const META_PAGE83: [u8; 16] = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const META_PHYSICAL_SECTOR: [u8; 16] = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const META_LOGICAL_SECTOR: [u8; 16] = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);

fn le16(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 2)
        .map_or(0, |s| u64::from(u16::from_le_bytes([s[0], s[1]])))
}

fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, |a| u64::from(u32::from_le_bytes(a)))
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// A VHDX opened for reading.
#[derive(Debug)]
pub struct VhdxReader {
    file: File,
    path: PathBuf,
    file_len: u64,
    size: u64,
    block: u64,
    chunk_ratio: u64,
    bat: PagedTable,
}

impl VhdxReader {
    /// Opens a fixed or dynamic VHDX.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] for bad headers, region tables, metadata or BAT
    /// entries; [`Error::Unsupported`] for a log to replay or a parent.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, file_len) = crate::image::open_file(path)?;
        let corrupt = |what: &str, offset: u64| Error::Corrupt {
            what: format!("vhdx {what} of {}", path.display()),
            offset,
        };
        // Current header: valid, highest sequence number.
        let mut best: Option<(u64, Vec<u8>)> = None;
        for at in HEADERS {
            let mut h = vec![0u8; 4096];
            pread_full(&file, path, at, &mut h)?;
            if !h.starts_with(b"head") {
                continue;
            }
            let stored = le32(&h, 4) as u32;
            let mut z = h.clone();
            z[4..8].fill(0);
            if crc32c(&z) != stored && !SKIP_CHECKSUMS {
                continue;
            }
            let seq = le64(&h, 8);
            if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                best = Some((seq, h));
            }
        }
        let (_, header) = best.ok_or_else(|| corrupt("headers (no valid copy)", HEADERS[0]))?;
        if header
            .get(48..64)
            .is_some_and(|g| g.iter().any(|&b| b != 0))
        {
            return Err(Error::Unsupported {
                what: format!(
                    "VHDX with a log to replay (open it once with Hyper-V or qemu-img \
                     read-write) in {}",
                    path.display()
                ),
            });
        }
        // Region table.
        let mut regions = None;
        for at in REGION_TABLES {
            let mut t = vec![0u8; TABLE_LEN];
            pread_full(&file, path, at, &mut t)?;
            if !t.starts_with(b"regi") {
                continue;
            }
            let stored = le32(&t, 4) as u32;
            let mut z = t.clone();
            z[4..8].fill(0);
            if crc32c(&z) != stored && !SKIP_CHECKSUMS {
                continue;
            }
            let count = (le32(&t, 8) as usize).min(MAX_ENTRIES);
            let find = |g: &[u8; 16]| {
                (0..count)
                    .filter_map(|i| t.get(16 + i * 32..48 + i * 32))
                    .find(|e| e.starts_with(g))
                    .map(|e| (le64(e, 16), le32(e, 24)))
            };
            if let (Some(bat), Some(meta)) = (find(&REGION_BAT), find(&REGION_METADATA)) {
                regions = Some((bat, meta));
                break;
            }
        }
        let ((bat_at, bat_len), (meta_at, meta_len)) =
            regions.ok_or_else(|| corrupt("region tables (no valid copy)", REGION_TABLES[0]))?;
        for (at, len, cap, what) in [
            (bat_at, bat_len, VHDX_MAX_BAT_BYTES, "BAT region"),
            (
                meta_at,
                meta_len,
                VHDX_MAX_METADATA_BYTES,
                "metadata region",
            ),
        ] {
            if at.saturating_add(len) > file_len || len > cap {
                return Err(corrupt(
                    &format!(
                        "region table entry of the {what} ({len} bytes at {at}: past the end of \
                         the file or over {} MiB)",
                        cap >> 20
                    ),
                    at,
                ));
            }
        }
        // Metadata.
        let mut meta = vec![0u8; (meta_len as usize).min(TABLE_LEN)];
        pread_full(&file, path, meta_at, &mut meta)?;
        if !meta.starts_with(b"metadata") {
            return Err(corrupt("metadata table (bad signature)", meta_at));
        }
        let count = (le16(&meta, 10) as usize).min(MAX_ENTRIES);
        let item = |g: &[u8; 16], len: usize| -> Result<Vec<u8>> {
            let e = (0..count)
                .filter_map(|i| meta.get(32 + i * 32..64 + i * 32))
                .find(|e| e.starts_with(g))
                .ok_or_else(|| corrupt("metadata table (a required item is missing)", meta_at))?;
            let (off, l) = (le32(e, 16), le32(e, 20));
            if (l as usize) < len || off + len as u64 > meta_len {
                return Err(corrupt("metadata item (out of its region)", meta_at + off));
            }
            let mut v = vec![0u8; len];
            pread_full(&file, path, meta_at + off, &mut v)?;
            Ok(v)
        };
        let params = item(&META_FILE_PARAMETERS, 8)?;
        let block = le32(&params, 0);
        if le32(&params, 4) & 2 != 0 {
            return Err(Error::Unsupported {
                what: format!("differencing VHDX {}", path.display()),
            });
        }
        if !block.is_power_of_two() || !(VHDX_MIN_BLOCK..=VHDX_MAX_BLOCK).contains(&block) {
            return Err(corrupt(
                &format!("metadata item file parameters (block size {block})"),
                meta_at,
            ));
        }
        let size = le64(&item(&META_VIRTUAL_SIZE, 8)?, 0);
        let sector = le32(&item(&META_LOGICAL_SECTOR, 4)?, 0);
        if sector != 512 && sector != 4096 {
            return Err(corrupt(&format!("logical sector size {sector}"), meta_at));
        }
        if size > VHDX_MAX_SIZE {
            return Err(corrupt(
                &format!(
                    "metadata item virtual disk size ({size} bytes, over the specification's {} \
                     TiB)",
                    VHDX_MAX_SIZE >> 40
                ),
                meta_at,
            ));
        }
        let chunk_ratio = ((1u64 << 23) * sector) / block;
        let blocks = size.div_ceil(block);
        // Payload entries, with one sector-bitmap entry after every
        // `chunk_ratio` of them (the last one may be left out).
        let entries = blocks + blocks.saturating_sub(1) / chunk_ratio.max(1);
        if entries * 8 > bat_len {
            return Err(corrupt(
                &format!("BAT region ({bat_len} bytes, {entries} entries needed)"),
                bat_at,
            ));
        }
        let bat = PagedTable::new(bat_at, entries, Entry::Le64);
        Ok(Self {
            file,
            path: path.to_owned(),
            file_len,
            size,
            block,
            chunk_ratio: chunk_ratio.max(1),
            bat,
        })
    }

    /// Host offset of guest `offset` (`None`: reads as zeros), its kind and
    /// the bytes left in its block.
    fn map(&self, offset: u64, bat: &mut Cursor<'_>) -> Result<(Option<u64>, ExtentKind, u64)> {
        let index = offset / self.block;
        let within = offset % self.block;
        let rest = self.block - within;
        let bat_index = index + index / self.chunk_ratio;
        let entry = bat.get(bat_index)?.unwrap_or(0);
        match entry & 7 {
            0 => Ok((None, ExtentKind::Unallocated, rest)),
            1..=3 => Ok((None, ExtentKind::Zero, rest)),
            6 => {
                let host = (entry >> 20) << 20;
                if host < MIB || host.saturating_add(self.block) > self.file_len {
                    return Err(Error::Corrupt {
                        what: format!(
                            "vhdx BAT entry {bat_index} (block at {host}, outside the file) of {}",
                            self.path.display()
                        ),
                        offset: host,
                    });
                }
                Ok((Some(host + within), ExtentKind::Data, rest))
            }
            s => Err(Error::Corrupt {
                what: format!(
                    "vhdx BAT entry {bat_index} (state {s}) of {}",
                    self.path.display()
                ),
                offset: index,
            }),
        }
    }
}

impl ImageReader for VhdxReader {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vhdx
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        let mut bat = Cursor::new(&self.bat, &self.file, &self.path);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (host, _, rest) = self.map(pos, &mut bat)?;
            let n = usize::try_from(rest)
                .unwrap_or(usize::MAX)
                .min(buf.len() - done);
            let dst = buf.get_mut(done..done + n).unwrap_or_default();
            match host {
                Some(h) => pread_full(&self.file, &self.path, h, dst)?,
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn extent_at(&self, offset: u64) -> Result<Extent> {
        check_range(&self.path, self.size, offset, 1)?;
        let mut bat = Cursor::new(&self.bat, &self.file, &self.path);
        let (_, kind, mut len) = self.map(offset, &mut bat)?;
        // Merge following blocks of the same kind: bounded work per call,
        // one cache lookup per page of the BAT.
        let mut steps = 0;
        while offset + len < self.size && steps < 1 << 16 {
            let (_, k, more) = self.map(offset + len, &mut bat)?;
            if k != kind {
                break;
            }
            len += more;
            steps += 1;
        }
        Ok(Extent {
            offset,
            length: len.min(self.size - offset),
            kind,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Block size of the VHDX images we write (Hyper-V's default).
pub const WRITE_BLOCK: u64 = 32 * MIB;
/// Largest VHDX virtual size (the specification's 64 TiB).
pub const MAX_SIZE: u64 = VHDX_MAX_SIZE;
/// Layout of the images we write, as QEMU and Hyper-V lay them out:
/// identifier, two headers, two region tables in the first MiB, a 1 MiB
/// log (empty), 1 MiB of metadata, then the BAT and the payload blocks.
const LOG_AT: u64 = MIB;
const METADATA_AT: u64 = 2 * MIB;
const BAT_AT: u64 = 3 * MIB;

/// Writes a dynamic VHDX (512-byte logical sectors, 32 MiB blocks) front
/// to back: payload blocks are allocated at the end of the file in the
/// order they are first written; parts never written stay holes in the
/// file and read as zeros (the block is "fully present"), blocks never
/// touched are "not present". The BAT is kept in memory (8 bytes per 32
/// MiB) and written with the headers, region tables and metadata by
/// [`VhdxWriter::finish`].
#[derive(Debug)]
pub struct VhdxWriter {
    file: File,
    path: PathBuf,
    size: u64,
    /// Payload block offsets (0: not allocated).
    blocks: Vec<u64>,
    bat_len: u64,
    next: u64,
}

impl VhdxWriter {
    /// Creates the image at `path` (which must not exist) for a disk of
    /// `size` bytes (rounded up to whole sectors).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file exists or cannot be created;
    /// [`Error::InvalidArgument`] for a size over 64 TiB (checked before
    /// the file is created or the BAT allocated).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        if size > MAX_SIZE {
            return Err(Error::InvalidArgument(format!(
                "virtual size {size} is too large for a VHDX ({}: 64 TiB at most, the VHDX \
                 specification's limit)",
                path.display()
            )));
        }
        let size = size.div_ceil(512) * 512;
        let blocks = size.div_ceil(WRITE_BLOCK);
        let chunk_ratio = ((1u64 << 23) * 512) / WRITE_BLOCK;
        let entries = blocks + blocks.saturating_sub(1) / chunk_ratio;
        let bat_len = (entries * 8).div_ceil(MIB).max(1) * MIB;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("creating vhdx image {}", path.display()), e))?;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            blocks: vec![0; blocks as usize],
            bat_len,
            next: BAT_AT + bat_len,
        })
    }

    /// Writes guest `data` at `offset`, allocating the blocks it touches.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] past the end of the disk; [`Error::Io`]
    /// if writing fails.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt as _;
        if offset.saturating_add(data.len() as u64) > self.size {
            return Err(Error::InvalidArgument(format!(
                "write of {} bytes at {offset} past the end of {}",
                data.len(),
                self.path.display()
            )));
        }
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let index = (pos / WRITE_BLOCK) as usize;
            let within = pos % WRITE_BLOCK;
            let n = ((WRITE_BLOCK - within) as usize).min(data.len() - done);
            let Some(slot) = self.blocks.get_mut(index) else {
                break;
            };
            if *slot == 0 {
                *slot = self.next;
                self.next += WRITE_BLOCK;
            }
            let at = *slot + within;
            let chunk = data.get(done..done + n).unwrap_or_default();
            self.file
                .write_all_at(chunk, at)
                .map_err(|e| Error::io(format!("writing vhdx image {}", self.path.display()), e))?;
            done += n;
        }
        Ok(())
    }

    /// Writes the metadata and syncs if `sync`; returns the file size.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if writing or syncing fails.
    pub fn finish(self, sync: bool) -> Result<u64> {
        use std::os::unix::fs::FileExt as _;
        let io = |e| Error::io(format!("writing vhdx image {}", self.path.display()), e);
        // File type identifier.
        let mut ident = vec![0u8; 64 * 1024];
        ident[..8].copy_from_slice(b"vhdxfile");
        for (i, u) in "fluidcloud".encode_utf16().enumerate() {
            ident[8 + 2 * i..10 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
        self.file.write_all_at(&ident, 0).map_err(io)?;
        // Two headers with distinct sequence numbers (QEMU refuses equal
        // ones); the second is current. No log GUID: nothing to replay.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        for (k, at) in HEADERS.into_iter().enumerate() {
            let mut h = vec![0u8; 4096];
            h[..4].copy_from_slice(b"head");
            h[8..16].copy_from_slice(&(k as u64 + 1).to_le_bytes());
            h[16..24].copy_from_slice(&seed.to_le_bytes()); // file write GUID
            h[24..32].copy_from_slice(&seed.rotate_left(17).to_le_bytes());
            h[32..40].copy_from_slice(&seed.rotate_left(31).to_le_bytes()); // data write GUID
            h[40..48].copy_from_slice(&seed.rotate_left(47).to_le_bytes());
            h[66..68].copy_from_slice(&1u16.to_le_bytes()); // version
            h[68..72].copy_from_slice(&(MIB as u32).to_le_bytes()); // log length
            h[72..80].copy_from_slice(&LOG_AT.to_le_bytes());
            let sum = crc32c(&h);
            h[4..8].copy_from_slice(&sum.to_le_bytes());
            self.file.write_all_at(&h, at).map_err(io)?;
        }
        // Region tables (both copies the same).
        let mut t = vec![0u8; TABLE_LEN];
        t[..4].copy_from_slice(b"regi");
        t[8..12].copy_from_slice(&2u32.to_le_bytes());
        for (i, (g, at, len)) in [
            (REGION_BAT, BAT_AT, self.bat_len),
            (REGION_METADATA, METADATA_AT, MIB),
        ]
        .into_iter()
        .enumerate()
        {
            let e = 16 + 32 * i;
            t[e..e + 16].copy_from_slice(&g);
            t[e + 16..e + 24].copy_from_slice(&at.to_le_bytes());
            t[e + 24..e + 28].copy_from_slice(&(len as u32).to_le_bytes());
            t[e + 28..e + 32].copy_from_slice(&1u32.to_le_bytes()); // required
        }
        let sum = crc32c(&t);
        t[4..8].copy_from_slice(&sum.to_le_bytes());
        for at in REGION_TABLES {
            self.file.write_all_at(&t, at).map_err(io)?;
        }
        // Metadata: the table, then the items from 64 KiB on.
        let mut m = vec![0u8; TABLE_LEN + 4096];
        m[..8].copy_from_slice(b"metadata");
        let mut page83 = [0u8; 16];
        page83[..8].copy_from_slice(&seed.rotate_left(7).to_le_bytes());
        page83[8..].copy_from_slice(&seed.rotate_left(53).to_le_bytes());
        let items: [([u8; 16], Vec<u8>, u32); 5] = [
            (
                META_FILE_PARAMETERS,
                [(WRITE_BLOCK as u32).to_le_bytes(), 0u32.to_le_bytes()].concat(),
                4,
            ),
            (META_VIRTUAL_SIZE, self.size.to_le_bytes().to_vec(), 6),
            (META_PAGE83, page83.to_vec(), 6),
            (META_LOGICAL_SECTOR, 512u32.to_le_bytes().to_vec(), 6),
            (META_PHYSICAL_SECTOR, 4096u32.to_le_bytes().to_vec(), 6),
        ];
        m[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut off = TABLE_LEN;
        for (i, (g, value, flags)) in items.iter().enumerate() {
            let e = 32 + 32 * i;
            m[e..e + 16].copy_from_slice(g);
            m[e + 16..e + 20].copy_from_slice(&(off as u32).to_le_bytes());
            m[e + 20..e + 24].copy_from_slice(&(value.len() as u32).to_le_bytes());
            m[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
            m[off..off + value.len()].copy_from_slice(value);
            off += value.len();
        }
        self.file.write_all_at(&m, METADATA_AT).map_err(io)?;
        // BAT: a sector-bitmap entry (not present) after every chunk.
        // Written in pieces of at most 1 MiB, not built whole.
        let chunk_ratio = (((1u64 << 23) * 512) / WRITE_BLOCK) as usize;
        let mut bat = Vec::with_capacity(MIB as usize);
        let mut at = BAT_AT;
        for (i, &block) in self.blocks.iter().enumerate() {
            if i > 0 && i % chunk_ratio == 0 {
                bat.extend_from_slice(&0u64.to_le_bytes());
            }
            let entry = if block == 0 { 0 } else { block | 6 };
            bat.extend_from_slice(&entry.to_le_bytes());
            if bat.len() as u64 >= MIB {
                self.file.write_all_at(&bat, at).map_err(io)?;
                at += bat.len() as u64;
                bat.clear();
            }
        }
        self.file.write_all_at(&bat, at).map_err(io)?;
        self.file.set_len(self.next).map_err(io)?;
        if sync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(format!("syncing vhdx image {}", self.path.display()), e))?;
        }
        Ok(self.next)
    }
}
