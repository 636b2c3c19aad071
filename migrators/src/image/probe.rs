//! Format detection by content.
//!
//! Checked in this order: the magic at offset 0 (qcow2 `QFI\xfb`, VMDK
//! sparse `KDMV`, VHDX `vhdxfile`, VMDK text `# Disk DescriptorFile`), then a
//! VHD `conectix` footer in the last 512 bytes (or its copy at offset 0, as
//! dynamic VHDs keep one); anything else is raw. Only headers are read, never
//! the data, so probing a large image is cheap. Every length and offset taken
//! from the file is bounds-checked: hostile input gives a typed error, never
//! a panic or a huge allocation.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use fluidcloud_plugins::ImageFormat;

use super::ImageInfo;
use super::limits::{VMDK_MAX_DESCRIPTOR as MAX_DESCRIPTOR, VMDK_MAX_SIZE};
use super::qcow2;
use super::vhdx;
use crate::error::{Error, Result};

/// Bytes read from the start of every file to look for a magic.
const HEAD_LEN: usize = 4096;
/// The text every VMDK descriptor starts with.
const VMDK_DESCRIPTOR_MAGIC: &[u8] = b"# Disk DescriptorFile";
/// VHD footers and copies are this long.
const VHD_FOOTER_LEN: usize = 512;
/// On-disk byte order of a GUID: the first three fields little-endian.
pub(crate) const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// Detects the format of the image at `path` from its content (never from
/// its name) and reads its header.
///
/// For VHDX the virtual size comes from the metadata region reached through
/// the region table (the copy at 256 KiB is used if the one at 192 KiB fails
/// its checksum); the log is not replayed and the parent locator is not
/// read, so `backing_file` is always `None` for VHDX. VMDK descriptors are
/// read up to 1 MiB. `file_size` is `st_size`, so `path` should be a regular
/// file (a block device reports 0 and probes as an empty raw image).
///
/// # Errors
///
/// - [`Error::Io`] naming `path` if it cannot be opened or read.
/// - [`Error::Corrupt`] if a header is truncated or a field is out of range
///   (the offset is that of the field, or the file length when the file
///   ends too early).
/// - [`Error::Unsupported`] for encrypted qcow2 images, qcow2 versions
///   other than 2 and 3 and unknown qcow2 incompatible feature bits.
pub fn probe(path: &Path) -> Result<ImageInfo> {
    let file =
        File::open(path).map_err(|e| Error::io(format!("opening image {}", path.display()), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading metadata of image {}", path.display()), e))?;
    let src = Source {
        file: &file,
        path,
        len: meta.len(),
    };
    let head = src.read(0, HEAD_LEN)?;
    let found = if head.starts_with(&qcow2::MAGIC) {
        probe_qcow2(&src, &head)?
    } else if head.starts_with(b"KDMV") {
        probe_vmdk_sparse(&src, &head)?
    } else if head.starts_with(b"vhdxfile") {
        probe_vhdx(&src)?
    } else if head.starts_with(VMDK_DESCRIPTOR_MAGIC) {
        probe_vmdk_descriptor(&src)?
    } else if let Some(found) = probe_vhd(&src, &head)? {
        found
    } else {
        Found::plain(ImageFormat::Raw, src.len)
    };
    Ok(ImageInfo {
        format: found.format,
        virtual_size: found.virtual_size,
        file_size: src.len,
        allocated_bytes: meta.blocks().saturating_mul(512),
        backing_file: found.backing_file,
        cluster_size: found.cluster_size,
        qcow2_version: found.qcow2_version,
    })
}

/// The format-specific part of [`ImageInfo`].
#[derive(Debug)]
struct Found {
    format: ImageFormat,
    virtual_size: u64,
    backing_file: Option<String>,
    cluster_size: Option<u32>,
    qcow2_version: Option<u32>,
}

impl Found {
    fn plain(format: ImageFormat, virtual_size: u64) -> Self {
        Self {
            format,
            virtual_size,
            backing_file: None,
            cluster_size: None,
            qcow2_version: None,
        }
    }
}

/// The file being probed.
struct Source<'a> {
    file: &'a File,
    path: &'a Path,
    len: u64,
}

impl Source<'_> {
    /// Up to `len` bytes at `offset`; fewer only at the end of the file.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let avail = self.len.saturating_sub(offset);
        let len = usize::try_from(avail).map_or(len, |avail| avail.min(len));
        let mut buf = vec![0; len];
        let mut done = 0;
        while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
            match self.file.read_at(rest, offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("reading image {} at offset {offset}", self.path.display()),
                        e,
                    ));
                }
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// A `Corrupt` error about `what` of this file.
    fn corrupt(&self, what: &str, offset: u64) -> Error {
        Error::Corrupt {
            what: format!("{what} of {}", self.path.display()),
            offset,
        }
    }
}

/// `N` bytes at `at`, or `None` if they are not all inside `b`.
fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    array(b, at).map(u32::from_be_bytes)
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    array(b, at).map(u64::from_be_bytes)
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    array(b, at).map(u16::from_le_bytes)
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    array(b, at).map(u32::from_le_bytes)
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    array(b, at).map(u64::from_le_bytes)
}

fn probe_qcow2(src: &Source<'_>, head: &[u8]) -> Result<Found> {
    const WHAT: &str = "qcow2 header";
    let truncated = || src.corrupt("qcow2 header (file ends inside it)", src.len);
    let version = be_u32(head, 4).ok_or_else(truncated)?;
    let min_len = match version {
        2 => 72,
        3 => 104,
        v => {
            return Err(Error::Unsupported {
                what: format!("qcow2 version {v} in {}", src.path.display()),
            });
        }
    };
    if head.len() < min_len {
        return Err(truncated());
    }
    // All fields below lie within `min_len` bytes, so they are present.
    let field32 = |at| be_u32(head, at).ok_or_else(truncated);
    let field64 = |at| be_u64(head, at).ok_or_else(truncated);

    let cluster_bits = field32(20)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(src.corrupt(&format!("{WHAT} (cluster_bits {cluster_bits})"), 20));
    }
    let cluster_size = 1u32 << cluster_bits;
    let crypt_method = field32(32)?;
    if crypt_method != 0 {
        let kind = match crypt_method {
            1 => "AES",
            2 => "LUKS",
            _ => "unknown method",
        };
        return Err(Error::Unsupported {
            what: format!(
                "encrypted qcow2 ({kind}, crypt_method {crypt_method}) in {}",
                src.path.display()
            ),
        });
    }
    if version == 3 {
        let unknown = field64(72)? & !qcow2::KNOWN_INCOMPATIBLE_FEATURES;
        if unknown != 0 {
            return Err(Error::Unsupported {
                what: format!(
                    "qcow2 incompatible feature bits {unknown:#x} in {}",
                    src.path.display()
                ),
            });
        }
        let header_length = field32(100)?;
        if header_length < 104 || !header_length.is_multiple_of(8) || header_length > cluster_size {
            return Err(src.corrupt(&format!("{WHAT} (header_length {header_length})"), 100));
        }
        if u64::from(header_length) > src.len {
            return Err(truncated());
        }
    }

    let backing_offset = field64(8)?;
    let backing_size = field32(16)?;
    let backing_file = if backing_offset == 0 || backing_size == 0 {
        None
    } else {
        if backing_size > 1023 {
            return Err(src.corrupt(
                &format!("{WHAT} (backing file name of {backing_size} bytes, at most 1023)"),
                16,
            ));
        }
        let in_file = backing_offset
            .checked_add(u64::from(backing_size))
            .is_some_and(|end| end <= src.len);
        if !in_file {
            return Err(src.corrupt(
                &format!(
                    "{WHAT} (backing file name at {backing_offset}+{backing_size} lies past \
                     the end of the file, {} bytes)",
                    src.len
                ),
                8,
            ));
        }
        let name = src.read(backing_offset, backing_size as usize)?;
        let name = String::from_utf8(name)
            .map_err(|_| src.corrupt("qcow2 backing file name (not UTF-8)", backing_offset))?;
        Some(name)
    };

    Ok(Found {
        format: ImageFormat::Qcow2,
        virtual_size: field64(24)?,
        backing_file,
        cluster_size: Some(cluster_size),
        qcow2_version: Some(version),
    })
}

/// A monolithic (or stream-optimized) sparse VMDK extent.
fn probe_vmdk_sparse(src: &Source<'_>, head: &[u8]) -> Result<Found> {
    let capacity = le_u64(head, 12)
        .ok_or_else(|| src.corrupt("vmdk sparse header (file ends inside it)", src.len))?;
    let virtual_size = capacity
        .checked_mul(512)
        .filter(|&size| size <= VMDK_MAX_SIZE)
        .ok_or_else(|| {
            src.corrupt(
                &format!(
                    "vmdk header field capacity ({capacity} sectors, over the {} TiB limit)",
                    VMDK_MAX_SIZE >> 40
                ),
                12,
            )
        })?;
    // An embedded descriptor may name a parent.
    let mut backing_file = None;
    if let (Some(offset), Some(size)) = (le_u64(head, 28), le_u64(head, 36))
        && offset != 0
        && size != 0
    {
        let start = offset
            .checked_mul(512)
            .filter(|&start| start < src.len)
            .ok_or_else(|| {
                src.corrupt(
                    &format!("vmdk embedded descriptor offset (sector {offset})"),
                    28,
                )
            })?;
        let len = size.saturating_mul(512).min(MAX_DESCRIPTOR);
        let text = src.read(start, usize::try_from(len).unwrap_or(0))?;
        let desc = parse_vmdk_descriptor(&text, start, src)?;
        backing_file = desc.parent;
    }
    Ok(Found {
        backing_file,
        ..Found::plain(ImageFormat::Vmdk, virtual_size)
    })
}

/// A VMDK text descriptor whose extents live in other files.
fn probe_vmdk_descriptor(src: &Source<'_>) -> Result<Found> {
    if src.len > MAX_DESCRIPTOR {
        return Err(src.corrupt(
            &format!("vmdk descriptor (longer than {MAX_DESCRIPTOR} bytes)"),
            MAX_DESCRIPTOR,
        ));
    }
    let text = src.read(0, MAX_DESCRIPTOR as usize)?;
    let desc = parse_vmdk_descriptor(&text, 0, src)?;
    let sectors = desc
        .sectors
        .ok_or_else(|| src.corrupt("vmdk descriptor (no extent lines)", 0))?;
    let virtual_size = sectors
        .checked_mul(512)
        .filter(|&size| size <= VMDK_MAX_SIZE)
        .ok_or_else(|| {
            src.corrupt(
                &format!(
                    "vmdk descriptor (extents of {sectors} sectors in all, over the {} TiB limit)",
                    VMDK_MAX_SIZE >> 40
                ),
                0,
            )
        })?;
    Ok(Found {
        backing_file: desc.parent,
        ..Found::plain(ImageFormat::Vmdk, virtual_size)
    })
}

/// What a VMDK descriptor says about the disk.
#[derive(Debug, Default, PartialEq, Eq)]
struct VmdkDescriptor {
    /// Sum of the extent sizes, `None` if there is no extent line.
    sectors: Option<u64>,
    /// `parentFileNameHint`, if any.
    parent: Option<String>,
}

/// Parses descriptor `text` found at byte `base` of the file: extent lines
/// (`RW 2048 SPARSE "x.vmdk"`) and `parentFileNameHint="..."`.
fn parse_vmdk_descriptor(text: &[u8], base: u64, src: &Source<'_>) -> Result<VmdkDescriptor> {
    // Embedded descriptors are padded with NULs.
    let text = text.split(|&b| b == 0).next().unwrap_or_default();
    let mut desc = VmdkDescriptor::default();
    let mut line_start = base;
    for raw_line in text.split(|&b| b == b'\n') {
        let at = line_start;
        line_start += raw_line.len() as u64 + 1;
        let line = String::from_utf8_lossy(raw_line);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // Extent lines first: a file name may contain `=`.
        let mut words = line.split_whitespace();
        if let Some("RW" | "RDONLY" | "NOACCESS") = words.next() {
            let sectors = words
                .next()
                .and_then(|w| w.parse::<u64>().ok())
                .ok_or_else(|| src.corrupt(&format!("vmdk extent line `{line}`"), at))?;
            let sum = desc
                .sectors
                .unwrap_or(0)
                .checked_add(sectors)
                .ok_or_else(|| src.corrupt("vmdk extents (size overflows)", at))?;
            desc.sectors = Some(sum);
        } else if let Some((key, value)) = line.split_once('=')
            && key.trim() == "parentFileNameHint"
        {
            let value = value.trim().trim_matches('"');
            if !value.is_empty() {
                desc.parent = Some(value.to_owned());
            }
        }
    }
    Ok(desc)
}

/// A VHD: fixed (footer at the end only) or dynamic/differencing (footer at
/// the end, copy at offset 0). `None` if there is no footer.
fn probe_vhd(src: &Source<'_>, head: &[u8]) -> Result<Option<Found>> {
    const COOKIE: &[u8] = b"conectix";
    let footer_at = src.len.checked_sub(VHD_FOOTER_LEN as u64);
    let mut footer = None;
    if let Some(at) = footer_at {
        let tail = src.read(at, VHD_FOOTER_LEN)?;
        if tail.starts_with(COOKIE) {
            footer = Some((tail, at));
        }
    }
    // A damaged end footer: fall back on the copy a dynamic disk keeps at 0.
    if footer.is_none() && head.starts_with(COOKIE) {
        footer = Some((head.get(..VHD_FOOTER_LEN).unwrap_or(head).to_vec(), 0));
    }
    let Some((footer, footer_at)) = footer else {
        return Ok(None);
    };
    let current_size = be_u64(&footer, 48)
        .ok_or_else(|| src.corrupt("vhd footer (file ends inside it)", src.len))?;
    let disk_type = be_u32(&footer, 60)
        .ok_or_else(|| src.corrupt("vhd footer (file ends inside it)", src.len))?;
    let mut backing_file = None;
    const DIFFERENCING: u32 = 4;
    if disk_type == DIFFERENCING {
        let field = footer_at + 16;
        let dyn_at = be_u64(&footer, 16)
            .filter(|&at| at.checked_add(1024).is_some_and(|end| end <= src.len))
            .ok_or_else(|| src.corrupt("vhd dynamic header offset", field))?;
        let dyn_header = src.read(dyn_at, 1024)?;
        if !dyn_header.starts_with(b"cxsparse") {
            return Err(src.corrupt("vhd dynamic header (no cxsparse cookie)", dyn_at));
        }
        // Parent Unicode Name: 512 bytes of UTF-16BE at offset 64, NUL-ended.
        let units: Vec<u16> = dyn_header
            .get(64..576)
            .unwrap_or_default()
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16(&units)
            .map_err(|_| src.corrupt("vhd parent name (not UTF-16)", dyn_at + 64))?;
        if !name.is_empty() {
            backing_file = Some(name);
        }
    }
    Ok(Some(Found {
        backing_file,
        ..Found::plain(ImageFormat::Vhd, current_size)
    }))
}

/// A VHDX: region table → metadata region → virtual disk size item.
fn probe_vhdx(src: &Source<'_>) -> Result<Found> {
    let mut metadata = None;
    for at in vhdx::REGION_TABLES {
        let table = src.read(at, vhdx::TABLE_LEN)?;
        if let Some(region) = vhdx_metadata_region(&table) {
            metadata = Some(region);
            break;
        }
    }
    let (region_at, region_len) = metadata.ok_or_else(|| {
        src.corrupt(
            "vhdx region tables (no copy with a valid signature, checksum and metadata region)",
            vhdx::REGION_TABLES[0],
        )
    })?;
    let table_len = usize::try_from(region_len)
        .unwrap_or(vhdx::TABLE_LEN)
        .min(vhdx::TABLE_LEN);
    let table = src.read(region_at, table_len)?;
    if !table.starts_with(b"metadata") {
        return Err(src.corrupt("vhdx metadata table (bad signature)", region_at));
    }
    let count = le_u16(&table, 10).map_or(0, usize::from);
    if count > vhdx::MAX_ENTRIES {
        return Err(src.corrupt(
            &format!("vhdx metadata table ({count} entries)"),
            region_at.saturating_add(10),
        ));
    }
    let item = (0..count)
        .filter_map(|i| table.get(32 + i * 32..64 + i * 32))
        .find(|entry| entry.starts_with(&vhdx::META_VIRTUAL_SIZE))
        .ok_or_else(|| src.corrupt("vhdx metadata table (no virtual disk size)", region_at))?;
    // The 8-byte value must lie inside the metadata region and the file.
    let value_at = match (le_u32(item, 16), le_u32(item, 20)) {
        (Some(offset), Some(length))
            if length >= 8 && u64::from(offset) + 8 <= u64::from(region_len) =>
        {
            region_at
                .checked_add(u64::from(offset))
                .filter(|at| at.checked_add(8).is_some_and(|end| end <= src.len))
        }
        _ => None,
    }
    .ok_or_else(|| src.corrupt("vhdx virtual disk size item", region_at))?;
    let value = src.read(value_at, 8)?;
    let virtual_size =
        le_u64(&value, 0).ok_or_else(|| src.corrupt("vhdx virtual disk size", value_at))?;
    Ok(Found::plain(ImageFormat::Vhdx, virtual_size))
}

/// `(file offset, length)` of the metadata region named by a region table,
/// if the table's signature and checksum hold.
fn vhdx_metadata_region(table: &[u8]) -> Option<(u64, u32)> {
    if table.len() != vhdx::TABLE_LEN || !table.starts_with(b"regi") {
        return None;
    }
    let stored = le_u32(table, 4)?;
    let mut zeroed = table.to_vec();
    zeroed.get_mut(4..8)?.fill(0);
    if crc32c(&zeroed) != stored && !vhdx::SKIP_CHECKSUMS {
        return None;
    }
    let count = usize::try_from(le_u32(table, 8)?).ok()?;
    if count > vhdx::MAX_ENTRIES {
        return None;
    }
    (0..count)
        .filter_map(|i| table.get(16 + i * 32..48 + i * 32))
        .find(|entry| entry.starts_with(&vhdx::REGION_METADATA))
        .and_then(|entry| Some((le_u64(entry, 16)?, le_u32(entry, 24)?)))
}

/// CRC-32C (Castagnoli), as VHDX checksums use.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    static TABLE: [u32; 256] = crc32c_table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const fn crc32c_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn crc32c_matches_the_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn guids_are_stored_mixed_endian() {
        assert_eq!(
            vhdx::REGION_METADATA,
            [
                0x06, 0xA2, 0x7C, 0x8B, 0x90, 0x47, 0x9A, 0x4B, 0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F,
                0x88, 0x6E
            ]
        );
    }

    #[test]
    fn byte_helpers_never_read_past_the_end() {
        let b = [1u8, 2, 3, 4, 5];
        assert_eq!(be_u32(&b, 0), Some(0x0102_0304));
        assert_eq!(be_u32(&b, 2), None);
        assert_eq!(be_u64(&b, 0), None);
        assert_eq!(le_u16(&b, 3), Some(0x0504));
        assert_eq!(le_u16(&b, 4), None);
        assert_eq!(le_u32(&b, usize::MAX - 1), None);
        assert_eq!(le_u64(&b, usize::MAX), None);
    }

    fn with_file(bytes: &[u8], f: impl FnOnce(&Source<'_>)) {
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        tmp.write_all(bytes).unwrap();
        let file = File::open(tmp.path()).unwrap();
        let src = Source {
            file: &file,
            path: tmp.path(),
            len: bytes.len() as u64,
        };
        f(&src);
    }

    #[test]
    fn descriptor_sums_extents_and_finds_the_parent() {
        let text = b"# Disk DescriptorFile\nversion=1\nparentCID=ffffffff\n\
            parentFileNameHint=\"base.vmdk\"\ncreateType=\"twoGbMaxExtentSparse\"\n\n\
            # Extent description\nRW 4192256 SPARSE \"d-s001.vmdk\"\n\
            RDONLY 1024 FLAT \"d=f.vmdk\" 0\nNOACCESS 8 ZERO\nddb.adapterType = \"ide\"\n\0\0\0";
        with_file(text, |src| {
            let d = parse_vmdk_descriptor(text, 0, src).unwrap();
            assert_eq!(
                d,
                VmdkDescriptor {
                    sectors: Some(4_192_256 + 1024 + 8),
                    parent: Some("base.vmdk".into()),
                }
            );
        });
    }

    #[test]
    fn bad_extent_line_names_its_offset() {
        let text = b"# Disk DescriptorFile\nRW lots SPARSE \"x.vmdk\"\n";
        with_file(text, |src| {
            let e = parse_vmdk_descriptor(text, 1000, src).unwrap_err();
            assert!(
                matches!(e, Error::Corrupt { offset: 1022, ref what } if what.contains("RW lots")),
                "{e:?}"
            );
        });
    }

    /// A differencing VHD: footer at 0 and at the end, dynamic header at 512
    /// naming the parent.
    fn differencing_vhd(parent: &str) -> Vec<u8> {
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        footer[16..24].copy_from_slice(&512u64.to_be_bytes());
        footer[48..56].copy_from_slice(&(8u64 << 20).to_be_bytes());
        footer[60..64].copy_from_slice(&4u32.to_be_bytes());
        let mut dynamic = vec![0u8; 1024];
        dynamic[..8].copy_from_slice(b"cxsparse");
        for (i, u) in parent.encode_utf16().enumerate() {
            dynamic[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        let mut image = footer.clone();
        image.extend_from_slice(&dynamic);
        image.extend_from_slice(&footer);
        image
    }

    #[test]
    fn differencing_vhd_names_its_parent() {
        let image = differencing_vhd("parent disk.vhd");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("child");
        std::fs::write(&path, &image).unwrap();
        let info = probe(&path).unwrap();
        assert_eq!(info.format, ImageFormat::Vhd);
        assert_eq!(info.virtual_size, 8 << 20);
        assert_eq!(info.backing_file.as_deref(), Some("parent disk.vhd"));

        // Dynamic header pointing past the end: the field is named.
        let mut bad = image.clone();
        let end = bad.len() - 512;
        bad[end + 16..end + 24].copy_from_slice(&u64::MAX.to_be_bytes());
        std::fs::write(&path, &bad).unwrap();
        let e = probe(&path).unwrap_err();
        assert!(
            matches!(e, Error::Corrupt { offset, .. } if offset == end as u64 + 16),
            "{e:?}"
        );
    }
}
