//! VHDX reading: fixed and dynamic images (Hyper-V's format).
//!
//! The current header is the valid one (signature and CRC-32C) with the
//! highest sequence number; images whose log still holds entries to replay
//! are refused, as QEMU refuses them read-only. The region table (either
//! copy) gives the BAT and metadata regions; the metadata gives the block
//! size, the virtual size and the logical sector size, which sets how many
//! payload blocks share a sector-bitmap entry in the BAT (the chunk
//! ratio). Differencing images (with a parent) are refused for now.

use std::fs::File;
use std::path::{Path, PathBuf};

use fluidcloud_plugins::ImageFormat;

use super::probe::{crc32c, guid};
use super::reader::{Extent, ExtentKind, ImageReader, check_range, pread_full};
use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;
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
    bat: Vec<u64>,
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
            if crc32c(&z) != stored {
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
            if crc32c(&z) != stored {
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
        for (at, len, what) in [
            (bat_at, bat_len, "BAT region"),
            (meta_at, meta_len, "metadata region"),
        ] {
            if at.saturating_add(len) > file_len || len > 256 * MIB {
                return Err(corrupt(&format!("{what} ({len} bytes at {at})"), at));
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
        if !block.is_power_of_two() || !(MIB..=256 * MIB).contains(&block) {
            return Err(corrupt(&format!("block size {block}"), meta_at));
        }
        let size = le64(&item(&META_VIRTUAL_SIZE, 8)?, 0);
        let sector = le32(&item(&META_LOGICAL_SECTOR, 4)?, 0);
        if sector != 512 && sector != 4096 {
            return Err(corrupt(&format!("logical sector size {sector}"), meta_at));
        }
        if size > 64 << 40 {
            return Err(corrupt(&format!("virtual size {size}"), meta_at));
        }
        let chunk_ratio = ((1u64 << 23) * sector) / block;
        let blocks = size.div_ceil(block);
        // Payload entries, with one sector-bitmap entry after every
        // `chunk_ratio` of them (the last one may be left out).
        let entries = blocks + blocks.saturating_sub(1) / chunk_ratio.max(1);
        if entries * 8 > bat_len {
            return Err(corrupt(
                &format!("BAT ({bat_len} bytes, {entries} entries needed)"),
                bat_at,
            ));
        }
        let mut raw = vec![0u8; (entries * 8).min(bat_len) as usize];
        pread_full(&file, path, bat_at, &mut raw)?;
        let bat = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
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
    fn map(&self, offset: u64) -> Result<(Option<u64>, ExtentKind, u64)> {
        let index = offset / self.block;
        let within = offset % self.block;
        let rest = self.block - within;
        let bat_index = index + index / self.chunk_ratio;
        let entry = usize::try_from(bat_index)
            .ok()
            .and_then(|i| self.bat.get(i))
            .copied()
            .unwrap_or(0);
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
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (host, _, rest) = self.map(pos)?;
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
        let (_, kind, mut len) = self.map(offset)?;
        let mut steps = 0;
        while offset + len < self.size && steps < 4096 {
            let (_, k, more) = self.map(offset + len)?;
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
