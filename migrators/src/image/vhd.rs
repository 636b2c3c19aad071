//! VHD (Virtual PC / Hyper-V v1): fixed and dynamic images are read and
//! written (by [`crate::image::convert`]); fixed ones optionally with the
//! virtual size rounded up to a whole MiB as Azure requires.
//!
//! The virtual size follows QEMU's rule, so both tools see the same disk:
//! images made by Virtual PC (`vpc `) or older QEMU (`qemu`) are sized by
//! their CHS geometry, all others (Hyper-V, Azure, ours) by the footer's
//! current size. Differencing images are refused for now.

use std::fs::File;
use std::path::{Path, PathBuf};

use fluidcloud_plugins::ImageFormat;

use super::limits::{VHD_MAX_BAT_ENTRIES, VHD_MAX_BLOCK, VHD_MAX_DYNAMIC_SIZE};
use super::reader::{Extent, ExtentKind, ImageReader, RawReader, check_range, pread_full};
use super::table::{Cursor, Entry, PagedTable};
use crate::error::{Error, Result};

/// Footer length.
pub const FOOTER_LEN: u64 = 512;
/// Creator application we write: QEMU's own code for "the footer's current
/// size is the disk size". QEMU 7.2 sizes every creator outside a short
/// list (`win `, `qem2`, `d2v `, `CTXS`, `tap`) by its CHS geometry, which
/// truncates most sizes; newer QEMU only `vpc ` and `qemu`. (We wrote
/// `fcld` before, which QEMU 7.2 truncated to the geometry.)
const CREATOR: &[u8; 4] = b"qem2";
/// Largest CHS geometry: images this large are sized by the footer.
const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_be_bytes)
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_be_bytes)
}

/// A VHD opened for reading.
#[derive(Debug)]
pub struct VhdReader {
    file: File,
    path: PathBuf,
    file_len: u64,
    size: u64,
    /// `None` for fixed images; block size, BAT (paged) and bitmap length
    /// for dynamic ones.
    dynamic: Option<(u64, PagedTable, u64)>,
    /// Fixed images: the file, for its holes (`SEEK_DATA`), as raw images.
    fixed: Option<RawReader>,
}

impl VhdReader {
    /// Opens a fixed or dynamic VHD.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] for a missing or bad footer, dynamic header or
    /// BAT; [`Error::Unsupported`] for differencing images.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, file_len) = crate::image::open_file(path)?;
        let corrupt = |what: &str, offset: u64| Error::Corrupt {
            what: format!("vhd {what} of {}", path.display()),
            offset,
        };
        let mut footer = [0u8; FOOTER_LEN as usize];
        let mut at = file_len.saturating_sub(FOOTER_LEN);
        pread_full(&file, path, at, &mut footer)?;
        if !footer.starts_with(b"conectix") {
            // Dynamic images keep a copy at offset 0.
            at = 0;
            pread_full(&file, path, 0, &mut footer)?;
            if !footer.starts_with(b"conectix") {
                return Err(corrupt("footer (no conectix cookie)", file_len));
            }
        }
        let disk_type = be32(&footer, 60);
        let current = be64(&footer, 48);
        let chs = u64::from(u16::from_be_bytes([footer[56], footer[57]]))
            * u64::from(footer[58])
            * u64::from(footer[59]);
        let by_chs = matches!(&footer[28..32], b"vpc " | b"qemu") && chs != MAX_CHS_SECTORS;
        let size = if by_chs { chs * 512 } else { current };
        let dynamic = match disk_type {
            2 => {
                if size > at {
                    return Err(corrupt(
                        &format!("footer (fixed disk of {size} bytes in a shorter file)"),
                        at + 48,
                    ));
                }
                None
            }
            3 => {
                let dyn_at = be64(&footer, 16);
                if dyn_at.saturating_add(1024) > file_len {
                    return Err(corrupt("dynamic header offset", at + 16));
                }
                let mut header = [0u8; 1024];
                pread_full(&file, path, dyn_at, &mut header)?;
                if !header.starts_with(b"cxsparse") {
                    return Err(corrupt("dynamic header (no cxsparse cookie)", dyn_at));
                }
                let table = be64(&header, 16);
                let entries = u64::from(be32(&header, 28));
                let block = u64::from(be32(&header, 32));
                if !block.is_power_of_two() || !(512..=VHD_MAX_BLOCK).contains(&block) {
                    return Err(corrupt(
                        &format!(
                            "dynamic header field block size ({block}; a power of two from 512 \
                             to {} MiB)",
                            VHD_MAX_BLOCK >> 20
                        ),
                        dyn_at + 32,
                    ));
                }
                if entries > VHD_MAX_BAT_ENTRIES || entries * block < size {
                    return Err(corrupt(
                        &format!(
                            "dynamic header field max table entries ({entries}: {} needed for \
                             {size} bytes, at most {VHD_MAX_BAT_ENTRIES})",
                            size.div_ceil(block)
                        ),
                        dyn_at + 28,
                    ));
                }
                if table.saturating_add(entries * 4) > file_len {
                    return Err(corrupt(
                        &format!(
                            "dynamic header field table offset (a BAT of {entries} entries at \
                             {table} ends past the end of the file)"
                        ),
                        dyn_at + 16,
                    ));
                }
                let bat = PagedTable::new(table, entries, Entry::Be32);
                // Each block starts with its sector bitmap, padded to 512.
                let bitmap = (block / 512).div_ceil(8).div_ceil(512) * 512;
                Some((block, bat, bitmap))
            }
            4 => {
                return Err(Error::Unsupported {
                    what: format!("differencing VHD {}", path.display()),
                });
            }
            t => return Err(corrupt(&format!("footer (disk type {t})"), at + 60)),
        };
        let fixed = match dynamic {
            None => Some(RawReader::open(path)?),
            Some(_) => None,
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            file_len,
            size,
            dynamic,
            fixed,
        })
    }

    /// Host offset of guest `offset` and the bytes left in its block, or
    /// `None` with that length if the block is not allocated.
    fn map<'a>(
        &'a self,
        offset: u64,
        cursor: &mut Option<Cursor<'a>>,
    ) -> Result<(Option<u64>, u64)> {
        let Some((block, bat, bitmap)) = &self.dynamic else {
            return Ok((Some(offset), self.size - offset));
        };
        let index = offset / block;
        let within = offset % block;
        let bat = cursor.get_or_insert_with(|| Cursor::new(bat, &self.file, &self.path));
        let entry = bat.get(index)?.unwrap_or(u64::from(u32::MAX));
        let rest = block - within;
        if entry == u64::from(u32::MAX) {
            return Ok((None, rest));
        }
        let host = entry * 512 + bitmap;
        if host >= self.file_len {
            return Err(Error::Corrupt {
                what: format!(
                    "vhd block allocation table entry {index} (block at {host}, past the end) of {}",
                    self.path.display()
                ),
                offset: host,
            });
        }
        Ok((Some(host + within), rest))
    }
}

impl ImageReader for VhdReader {
    fn format(&self) -> ImageFormat {
        ImageFormat::Vhd
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        let mut bat = None;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (host, rest) = self.map(pos, &mut bat)?;
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
        if let Some(raw) = &self.fixed {
            let e = raw.extent_at(offset)?;
            return Ok(Extent {
                offset,
                length: e.length.min(self.size - offset),
                kind: e.kind,
            });
        }
        let mut bat = None;
        let (host, mut len) = self.map(offset, &mut bat)?;
        // Merge following blocks of the same kind (bounded work per call).
        let mut steps = 0;
        while offset + len < self.size && steps < 1 << 16 {
            let (next, more) = self.map(offset + len, &mut bat)?;
            if next.is_some() != host.is_some() {
                break;
            }
            len += more;
            steps += 1;
        }
        Ok(Extent {
            offset,
            length: len.min(self.size - offset),
            kind: if host.is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Unallocated
            },
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The CHS geometry of the VHD specification for `size` bytes.
fn geometry(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(MAX_CHS_SECTORS);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255u64;
        heads = 16u64;
        cth = total / spt;
    } else {
        let mut s = 17u64;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    let cyl = (cth / heads).min(65535);
    (cyl as u16, heads as u8, spt as u8)
}

/// The footer of a fixed VHD of `size` bytes (a multiple of 512).
pub fn fixed_footer(size: u64) -> [u8; FOOTER_LEN as usize] {
    footer(size, None)
}

/// Block size of the dynamic VHDs we write (the specification's default,
/// and QEMU's and Hyper-V's).
pub const DYNAMIC_BLOCK: u64 = 2 << 20;
/// Offset of the dynamic header (after the footer copy).
const DYN_HEADER_AT: u64 = 512;
/// Offset of the BAT (after the dynamic header).
const BAT_AT: u64 = DYN_HEADER_AT + 1024;
/// Sector bitmap in front of each block: one bit per sector, padded to 512.
const DYNAMIC_BITMAP: u64 = 512;
/// The largest dynamic VHD (the specification's 2040 GiB).
pub const MAX_DYNAMIC_SIZE: u64 = VHD_MAX_DYNAMIC_SIZE;

/// Writes a dynamic VHD front to back: blocks are allocated at the end of
/// the file in the order they are first written (so ascending offsets
/// give a file in guest order), with every sector marked present in the
/// bitmap; parts of a block never written stay holes in the file and read
/// as zeros. The BAT (4 bytes per 2 MiB) is kept in memory and written,
/// with the headers and both footers, by [`DynamicVhdWriter::finish`].
#[derive(Debug)]
pub struct DynamicVhdWriter {
    file: File,
    path: PathBuf,
    size: u64,
    bat: Vec<u32>,
    /// Where the next block (its bitmap) goes.
    next: u64,
}

impl DynamicVhdWriter {
    /// Creates the image at `path` (which must not exist) for a disk of
    /// `size` bytes (rounded up to whole sectors).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file exists or cannot be created;
    /// [`Error::InvalidArgument`] for a size over 2040 GiB (checked before
    /// the file is created or the BAT allocated).
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        if size > MAX_DYNAMIC_SIZE {
            return Err(Error::InvalidArgument(format!(
                "virtual size {size} is too large for a dynamic VHD ({}: 2040 GiB at most, \
                 the VHD specification's limit)",
                path.display()
            )));
        }
        let size = size.div_ceil(512) * 512;
        let entries = size.div_ceil(DYNAMIC_BLOCK) as usize;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(format!("creating vhd image {}", path.display()), e))?;
        let bat_len = (entries as u64 * 4).div_ceil(512) * 512;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            bat: vec![u32::MAX; entries],
            next: BAT_AT + bat_len,
        })
    }

    /// Virtual size (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
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
        let io = |e| Error::io(format!("writing vhd image {}", self.path.display()), e);
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let index = (pos / DYNAMIC_BLOCK) as usize;
            let within = pos % DYNAMIC_BLOCK;
            let n = ((DYNAMIC_BLOCK - within) as usize).min(data.len() - done);
            let entry = self.bat.get(index).copied().unwrap_or(u32::MAX);
            let block_at = if entry == u32::MAX {
                let at = self.next;
                let sector = u32::try_from(at / 512).map_err(|_| {
                    Error::InvalidArgument(format!("{} passes 2 TiB", self.path.display()))
                })?;
                self.file
                    .write_all_at(&[0xFF; DYNAMIC_BITMAP as usize], at)
                    .map_err(io)?;
                if let Some(e) = self.bat.get_mut(index) {
                    *e = sector;
                }
                self.next = at + DYNAMIC_BITMAP + DYNAMIC_BLOCK;
                at
            } else {
                u64::from(entry) * 512
            };
            let chunk = data.get(done..done + n).unwrap_or_default();
            self.file
                .write_all_at(chunk, block_at + DYNAMIC_BITMAP + within)
                .map_err(io)?;
            done += n;
        }
        Ok(())
    }

    /// Writes the BAT, the dynamic header and both footers, and syncs if
    /// `sync`; returns the file size.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if writing or syncing fails.
    pub fn finish(self, sync: bool) -> Result<u64> {
        use std::os::unix::fs::FileExt as _;
        let io = |e| Error::io(format!("writing vhd image {}", self.path.display()), e);
        let mut bat: Vec<u8> = self.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
        bat.resize(bat.len().div_ceil(512) * 512, 0xFF);
        self.file.write_all_at(&bat, BAT_AT).map_err(io)?;
        let mut h = [0u8; 1024];
        h[0..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes()); // data offset: unused
        h[16..24].copy_from_slice(&BAT_AT.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&(self.bat.len() as u32).to_be_bytes());
        h[32..36].copy_from_slice(&(DYNAMIC_BLOCK as u32).to_be_bytes());
        let sum = h.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        h[36..40].copy_from_slice(&(!sum).to_be_bytes());
        self.file.write_all_at(&h, DYN_HEADER_AT).map_err(io)?;
        let f = footer(self.size, Some(DYN_HEADER_AT));
        self.file.write_all_at(&f, 0).map_err(io)?;
        // The last block may have been written only in part: the footer
        // goes after the whole block.
        self.file.write_all_at(&f, self.next).map_err(io)?;
        if sync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(format!("syncing vhd image {}", self.path.display()), e))?;
        }
        Ok(self.next + FOOTER_LEN)
    }
}

/// A footer for a disk of `size` bytes: fixed, or dynamic with its header
/// at `dynamic_header`.
fn footer(size: u64, dynamic_header: Option<u64>) -> [u8; FOOTER_LEN as usize] {
    let mut f = [0u8; FOOTER_LEN as usize];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Seconds since 2000-01-01.
    let stamp = now.saturating_sub(946_684_800) as u32;
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes()); // features: reserved bit
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes()); // version 1.0
    f[16..24].copy_from_slice(&dynamic_header.unwrap_or(u64::MAX).to_be_bytes());
    f[24..28].copy_from_slice(&stamp.to_be_bytes());
    f[28..32].copy_from_slice(CREATOR);
    f[32..36].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    let (c, h, s) = geometry(size);
    f[56..58].copy_from_slice(&c.to_be_bytes());
    f[58] = h;
    f[59] = s;
    let disk_type: u32 = if dynamic_header.is_some() { 3 } else { 2 };
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    // A unique id from the time and the process: no randomness needed.
    let seed = now
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(std::process::id()))
        .wrapping_add(size);
    f[68..76].copy_from_slice(&seed.to_be_bytes());
    f[76..84].copy_from_slice(&seed.rotate_left(29).wrapping_mul(31).to_be_bytes());
    let sum = f.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_specification() {
        // 127 MiB: 17 sectors per track does not fit, 31 does.
        let (c, h, s) = geometry(127 << 20);
        assert!(u64::from(c) * u64::from(h) * u64::from(s) <= (127 << 20) / 512);
        assert_eq!(geometry(1 << 40), (65535, 16, 255));
    }

    #[test]
    fn footer_checksum_is_ones_complement() {
        let f = fixed_footer(1 << 20);
        let stored = u32::from_be_bytes(f[64..68].try_into().unwrap());
        let mut z = f;
        z[64..68].fill(0);
        let sum = z.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        assert_eq!(stored, !sum);
        assert_eq!(be64(&f, 48), 1 << 20);
    }
}
