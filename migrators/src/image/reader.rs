//! Random-access, allocation-aware image readers.
//!
//! Every format is read through one trait, [`ImageReader`]: the guest bytes
//! at any offset ([`ImageReader::read_at`]) and what the image says about
//! each range ([`ImageReader::extent_at`]: data, explicit zeros, or nothing
//! allocated anywhere in the backing chain). A converter walks the extent
//! map to skip holes without reading them, and reads data ranges from
//! several threads at once: readers take `&self` and are `Send + Sync`, so
//! decompression of compressed clusters runs on every core.
//!
//! [`open`] detects the format from the content (never the file name) and
//! opens the whole backing chain.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use fluidcloud_plugins::ImageFormat;
use serde::Serialize;

use super::probe;
use super::qcow2::Qcow2Reader;
use crate::error::{Error, Result};

pub use super::limits::MAX_CHAIN_DEPTH;

/// What a range of the virtual disk holds, as far as the image knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExtentKind {
    /// Allocated somewhere in the chain: must be read (it may still hold
    /// zeros).
    Data,
    /// Explicitly marked as reading zeros (qcow2 zero clusters).
    Zero,
    /// Allocated nowhere in the chain: reads as zeros.
    Unallocated,
}

impl ExtentKind {
    /// Whether the range reads as zeros without looking at the data.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, Self::Data)
    }
}

/// A range of the virtual disk and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Extent {
    /// Guest byte offset.
    pub offset: u64,
    /// Length in bytes, never 0.
    pub length: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// A disk image opened for reading. See the module docs.
///
/// Implementations bounds-check every table entry they follow: a hostile
/// image gives [`Error::Corrupt`] naming the file and the offending offset,
/// never a panic or an allocation sized by the file.
pub trait ImageReader: Send + Sync + fmt::Debug {
    /// The container format of the top image.
    fn format(&self) -> ImageFormat;

    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buf` with the guest bytes at `offset`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] if the range ends past the virtual size;
    /// [`Error::Corrupt`] if metadata on the way is malformed;
    /// [`Error::Io`] if reading a file fails.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// The extent starting at `offset` (which must be below the virtual
    /// size). It may end before the kind changes (implementations stop at a
    /// metadata boundary); [`extents`] merges neighbours of the same kind.
    ///
    /// # Errors
    ///
    /// As for [`read_at`](Self::read_at).
    fn extent_at(&self, offset: u64) -> Result<Extent>;

    /// The file this reader was opened from.
    fn path(&self) -> &Path;

    /// The backing image, if any.
    fn backing(&self) -> Option<&dyn ImageReader> {
        None
    }

    /// The qcow2 header details, for qcow2 images.
    fn qcow2_details(&self) -> Option<&super::qcow2::Qcow2Details> {
        None
    }

    /// The file that [`stored_at`](Self::stored_at) offsets refer to, for
    /// formats that store guest bytes unchanged (raw, qcow2), so that a
    /// converter can map it instead of reading through a buffer.
    fn data_file(&self) -> Option<&File> {
        None
    }

    /// Where the guest bytes `offset..offset + len` are stored unchanged
    /// and contiguously in [`data_file`](Self::data_file): their offset in
    /// that file. `None` when any of them is not (compressed, zero,
    /// unallocated, in a backing image, or a format without a data file).
    ///
    /// # Errors
    ///
    /// As for [`read_at`](Self::read_at).
    fn stored_at(&self, offset: u64, len: u64) -> Result<Option<u64>> {
        let _ = (offset, len);
        Ok(None)
    }
}

/// The merged extent map of `reader`, front to back.
pub fn extents(reader: &dyn ImageReader) -> Extents<'_> {
    Extents {
        reader,
        pos: 0,
        pending: None,
        failed: false,
    }
}

/// Bytes of `reader` that hold data (neither holes nor zero extents): what
/// a copy reads and writes.
///
/// # Errors
/// As [`extents`].
pub fn data_bytes(reader: &dyn ImageReader) -> Result<u64> {
    let mut data = 0;
    for e in extents(reader) {
        let e = e?;
        if e.kind == ExtentKind::Data {
            data += e.length;
        }
    }
    Ok(data)
}

/// Iterator returned by [`extents`]: maximal runs of one [`ExtentKind`].
#[derive(Debug)]
pub struct Extents<'a> {
    reader: &'a dyn ImageReader,
    pos: u64,
    pending: Option<Extent>,
    failed: bool,
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let size = self.reader.virtual_size();
        loop {
            if self.pos >= size {
                return self.pending.take().map(Ok);
            }
            let mut e = match self.reader.extent_at(self.pos) {
                Ok(e) => e,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            };
            // Guard against a reader that makes no progress.
            if e.offset != self.pos || e.length == 0 {
                self.failed = true;
                return Some(Err(Error::Corrupt {
                    what: format!(
                        "extent map of {} (empty extent)",
                        self.reader.path().display()
                    ),
                    offset: self.pos,
                }));
            }
            e.length = e.length.min(size - self.pos);
            self.pos = e.end();
            match &mut self.pending {
                Some(p) if p.kind == e.kind => p.length += e.length,
                Some(_) => return self.pending.replace(e).map(Ok),
                None => self.pending = Some(e),
            }
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Read the top image as this format instead of detecting it. In a
    /// relocation this is always set: the format the site declares, never
    /// one the guest's bytes suggest.
    pub format: Option<ImageFormat>,
    /// Read this internal snapshot (qcow2; matched by id, then by name)
    /// instead of the current state.
    pub snapshot: Option<String>,
    /// Where backing files and extents may be.
    pub backing: BackingPolicy,
}

/// Where the backing files and extents an image names may be.
///
/// Image headers (a qcow2 backing file name, a VMDK descriptor's extent
/// lines) are bytes a guest can write: a raw disk that begins with a qcow2
/// header is indistinguishable from a qcow2 image by content. So a name
/// from a header is followed only to a regular file that resolves, symlinks
/// included, under [`root`](Self::root) (default: the directory of the image
/// naming it) or under one of [`allow_dirs`](Self::allow_dirs). Absolute
/// names are refused unless they lie in `allow_dirs`; devices, FIFOs and
/// directories always are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackingPolicy {
    /// The directory relative names must stay under (a site's image store);
    /// `None`: the directory of the image that names them.
    pub root: Option<PathBuf>,
    /// Further directories backing files and extents may be in, also by
    /// absolute name (a site's `allow_backing_dirs`).
    pub allow_dirs: Vec<PathBuf>,
}

impl BackingPolicy {
    /// Resolves `name`, which `image` names as its `what` (`backing file`
    /// or `extent`), to the regular file it may read. Relative names are
    /// relative to the image's directory, as in QEMU.
    ///
    /// # Errors
    ///
    /// [`Error::Refused`] naming the image and the path when the policy
    /// forbids it; [`Error::Io`] when it does not exist.
    pub fn resolve(&self, image: &Path, what: &'static str, name: &str) -> Result<PathBuf> {
        let refuse = |why: String| Error::Refused {
            image: image.to_owned(),
            what,
            path: name.to_owned(),
            why,
        };
        let io = |p: &Path, e| {
            Error::io(
                format!(
                    "resolving {what} `{name}` of image {} ({})",
                    image.display(),
                    p.display()
                ),
                e,
            )
        };
        let image_dir = match image.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let image_dir = std::fs::canonicalize(image_dir).map_err(|e| io(image_dir, e))?;
        let root = match &self.root {
            Some(r) => std::fs::canonicalize(r).map_err(|e| io(r, e))?,
            None => image_dir.clone(),
        };
        let allow: Vec<PathBuf> = self
            .allow_dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect();
        let inside = |p: &Path, own: bool| -> bool {
            (own && p.starts_with(&root)) || allow.iter().any(|d| p.starts_with(d))
        };
        let named = Path::new(name);
        // Decided on the name alone first, so a refused path is never
        // looked up (its existence is not the image's business).
        let lexical = lexical_join(&image_dir, named);
        if named.is_absolute() && !inside(&lexical, false) {
            return Err(refuse(
                "absolute paths are refused (a site may allow a directory with `allow_backing_dirs`)"
                    .into(),
            ));
        }
        if !inside(&lexical, true) {
            return Err(refuse(format!(
                "it leads outside {} (through `..`)",
                root.display()
            )));
        }
        // Then symlinks, resolved.
        let real = std::fs::canonicalize(&lexical).map_err(|e| io(&lexical, e))?;
        if !inside(&real, !named.is_absolute()) {
            return Err(refuse(format!(
                "it resolves to {}, outside {} (through a symlink)",
                real.display(),
                root.display()
            )));
        }
        let meta = std::fs::metadata(&real).map_err(|e| io(&real, e))?;
        if !meta.is_file() {
            return Err(refuse(format!(
                "{} is not a regular file (a device, directory, socket or FIFO)",
                real.display()
            )));
        }
        Ok(real)
    }
}

/// Opens the image at `path`, detecting its format from the content, with
/// its whole backing chain.
///
/// # Errors
///
/// [`Error::Io`] if a file of the chain cannot be opened;
/// [`Error::Corrupt`] for malformed headers or tables, backing chains that
/// loop or are deeper than [`MAX_CHAIN_DEPTH`];
/// [`Error::Unsupported`] for formats or features not read yet (see
/// `docs/images.md`).
pub fn open(path: &Path) -> Result<Box<dyn ImageReader>> {
    open_with(path, &OpenOptions::default())
}

/// [`open`] with options.
///
/// # Errors
///
/// As for [`open`].
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn ImageReader>> {
    let mut chain = Chain::new(opts.backing.clone());
    chain.open(path, opts.format, opts.snapshot.as_deref())
}

/// The files opened so far in one backing chain, for loop detection, and
/// where the chain may reach.
#[derive(Debug, Default)]
pub(crate) struct Chain {
    seen: HashSet<PathBuf>,
    pub(crate) policy: BackingPolicy,
}

impl Chain {
    pub(crate) fn new(policy: BackingPolicy) -> Self {
        Self {
            seen: HashSet::new(),
            policy,
        }
    }

    /// Opens one image of the chain (and, through the format readers, the
    /// rest of the chain below it).
    pub(crate) fn open(
        &mut self,
        path: &Path,
        format: Option<ImageFormat>,
        snapshot: Option<&str>,
    ) -> Result<Box<dyn ImageReader>> {
        let canonical = std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("opening image {}", path.display()), e))?;
        if self.seen.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::Corrupt {
                what: format!(
                    "backing chain at {} (deeper than {MAX_CHAIN_DEPTH} images)",
                    path.display()
                ),
                offset: 0,
            });
        }
        if !self.seen.insert(canonical) {
            return Err(Error::Corrupt {
                what: format!("backing chain (loops back to {})", path.display()),
                offset: 0,
            });
        }
        let format = match format {
            Some(f) => f,
            None => probe(path)?.format,
        };
        match format {
            ImageFormat::Raw => {
                if snapshot.is_some() {
                    return Err(Error::Unsupported {
                        what: format!("snapshots of raw image {}", path.display()),
                    });
                }
                Ok(Box::new(RawReader::open(path)?))
            }
            ImageFormat::Qcow2 => Ok(Box::new(Qcow2Reader::open_in_chain(path, snapshot, self)?)),
            ImageFormat::Vmdk if snapshot.is_none() => Ok(Box::new(
                super::vmdk::VmdkReader::open_with_policy(path, &self.policy)?,
            )),
            ImageFormat::Vhdx if snapshot.is_none() => {
                Ok(Box::new(super::vhdx::VhdxReader::open(path)?))
            }
            ImageFormat::Vhd if snapshot.is_none() => {
                Ok(Box::new(super::vhd::VhdReader::open(path)?))
            }
            other => Err(Error::Unsupported {
                what: format!("reading {other} images ({})", path.display()),
            }),
        }
    }
}

/// `base` joined with `name`, `.` and `..` resolved without looking at the
/// file system (`..` at the root stays at the root).
fn lexical_join(base: &Path, name: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = if name.is_absolute() {
        PathBuf::from("/")
    } else {
        base.to_owned()
    };
    for c in name.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Where a backing file name given by the *caller* for an output image
/// (never one read from an image) resolves: relative names next to the
/// image, as in QEMU.
pub fn backing_of_output(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_owned()
    } else {
        image.parent().unwrap_or_else(|| Path::new(".")).join(p)
    }
}

/// Reads exactly `buf.len()` bytes at `offset` of `file`; bytes past the end
/// of the file read as zeros (as QEMU's file driver does).
pub(crate) fn pread_full(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset.saturating_add(done as u64);
        let rest = buf.get_mut(done..).unwrap_or_default();
        match file.read_at(rest, at) {
            Ok(0) => {
                rest.fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::io(
                    format!("reading image {} at offset {at}", path.display()),
                    e,
                ));
            }
        }
    }
    Ok(())
}

/// Checks that `offset..offset + len` lies within a disk of `size` bytes.
pub(crate) fn check_range(path: &Path, size: u64, offset: u64, len: usize) -> Result<()> {
    let ok = offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= size);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "read of {len} bytes at offset {offset} ends past the virtual size {size} of {}",
            path.display()
        )))
    }
}

/// A raw image: the file is the disk. Holes (found with `SEEK_DATA` /
/// `SEEK_HOLE`) are reported as [`ExtentKind::Unallocated`].
#[derive(Debug)]
pub struct RawReader {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawReader {
    /// Opens `path` as a raw image.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if it cannot be opened.
    pub fn open(path: &Path) -> Result<Self> {
        let (file, size) = crate::image::open_file(path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
        })
    }

    /// `lseek(offset, whence)`; `None` when there is no such position
    /// (`ENXIO`: no data past `offset`).
    fn seek(&self, offset: u64, whence: libc::c_int) -> Result<Option<u64>> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on a file descriptor we own; it only moves the file
        // position, which this type never uses (all reads are positioned).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(Error::io(
                format!("mapping holes of image {}", self.path.display()),
                e,
            ));
        }
        Ok(u64::try_from(r).ok())
    }
}

impl ImageReader for RawReader {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        pread_full(&self.file, &self.path, offset, buf)
    }

    fn extent_at(&self, offset: u64) -> Result<Extent> {
        check_range(&self.path, self.size, offset, 1)?;
        let rest = self.size - offset;
        let extent = |length: u64, kind| Extent {
            offset,
            length: length.clamp(1, rest),
            kind,
        };
        match self.seek(offset, libc::SEEK_DATA)? {
            None => Ok(extent(rest, ExtentKind::Unallocated)),
            Some(data) if data > offset => Ok(extent(data - offset, ExtentKind::Unallocated)),
            Some(_) => {
                let hole = self.seek(offset, libc::SEEK_HOLE)?.unwrap_or(self.size);
                Ok(extent(hole.saturating_sub(offset), ExtentKind::Data))
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn data_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn stored_at(&self, offset: u64, len: u64) -> Result<Option<u64>> {
        Ok(offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size)
            .then_some(offset))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn raw_holes_are_unallocated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.raw");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[5; 4096], 4 << 20).unwrap();
        drop(f);
        let r = RawReader::open(&path).unwrap();
        let map: Vec<Extent> = extents(&r).collect::<Result<_>>().unwrap();
        // The file system decides the granularity; the data must be inside a
        // Data extent and the start must be a hole.
        assert_eq!(map.first().unwrap().kind, ExtentKind::Unallocated);
        assert!(map.iter().any(|e| e.kind == ExtentKind::Data
            && e.offset <= 4 << 20
            && e.end() >= (4 << 20) + 4096));
        assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), 8 << 20);
        let mut buf = vec![0u8; 8192];
        r.read_at((4 << 20) - 4096, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 5));
        assert!(matches!(
            r.read_at((8 << 20) - 1, &mut buf),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn backing_names_of_outputs_resolve_next_to_the_image() {
        assert_eq!(
            backing_of_output(Path::new("/a/b/top.qcow2"), "base.raw"),
            Path::new("/a/b/base.raw")
        );
        assert_eq!(
            backing_of_output(Path::new("/a/b/top.qcow2"), "/c/base.raw"),
            Path::new("/c/base.raw")
        );
    }

    fn refused(r: Result<PathBuf>) -> String {
        match r {
            Err(e @ Error::Refused { .. }) => e.to_string(),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_backing_name_stays_in_the_images_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("images");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("base.raw"), b"x").unwrap();
        std::fs::write(dir.join("sub/deep.raw"), b"x").unwrap();
        std::fs::write(tmp.path().join("secret"), b"s").unwrap();
        let top = dir.join("top.qcow2");
        let p = BackingPolicy::default();
        let real = std::fs::canonicalize(&dir).unwrap();
        assert_eq!(
            p.resolve(&top, "backing file", "base.raw").unwrap(),
            real.join("base.raw")
        );
        assert_eq!(
            p.resolve(&top, "backing file", "sub/../sub/deep.raw")
                .unwrap(),
            real.join("sub/deep.raw")
        );
        let abs = tmp.path().join("secret");
        let e = refused(p.resolve(&top, "backing file", abs.to_str().unwrap()));
        assert!(
            e.contains("absolute paths are refused") && e.contains("top.qcow2"),
            "{e}"
        );
        let e = refused(p.resolve(&top, "backing file", "../secret"));
        assert!(e.contains("outside"), "{e}");
        std::os::unix::fs::symlink(tmp.path().join("secret"), dir.join("link")).unwrap();
        let e = refused(p.resolve(&top, "extent", "link"));
        assert!(
            e.contains("names extent `link`") && e.contains("outside"),
            "{e}"
        );
        // A device, even in an allowed directory.
        let dev = BackingPolicy {
            allow_dirs: vec!["/dev".into()],
            ..BackingPolicy::default()
        };
        let e = refused(dev.resolve(&top, "backing file", "/dev/zero"));
        assert!(e.contains("not a regular file"), "{e}");
        // An allowed directory admits absolute names and `..` into it.
        let allow = BackingPolicy {
            allow_dirs: vec![tmp.path().to_owned()],
            ..BackingPolicy::default()
        };
        assert!(
            allow
                .resolve(&top, "backing file", abs.to_str().unwrap())
                .is_ok()
        );
        assert!(allow.resolve(&top, "backing file", "../secret").is_ok());
        // A root wider than the image's own directory.
        let rooted = BackingPolicy {
            root: Some(tmp.path().to_owned()),
            ..BackingPolicy::default()
        };
        assert!(
            rooted
                .resolve(&dir.join("sub/x.qcow2"), "backing file", "../base.raw")
                .is_ok()
        );
    }
}
