//! [`Disks`] of a site whose stores are directories on this machine: a
//! `local` site's `images/` and `volumes/`, a libvirt dir pool.
//!
//! Reading opens a disk with the image codecs, as the format the site
//! declares, its backing files held inside the store. Writing goes to a
//! hidden file beside the disk's name:
//!
//! - a raw disk is written in `.NAME.fcpart`, renamed to `NAME` when the
//!   transfer finishes; a repeated transfer (the final delta) writes in
//!   place, into the disk its own relocation created;
//! - a qcow2 disk a relocation wrote earlier is patched in place
//!   ([`super::patchdisk`]): only what changed is written;
//! - any other format is written into a raw mirror, `.NAME.fcmirror`,
//!   which the finish converts into `NAME` (through a temporary file,
//!   renamed) and then removes. A repeated transfer onto such a disk (VMDK,
//!   VHD, VHDX) first fills the mirror from the disk.
//!
//! The creator tag (`.NAME.fcowner`, [`fluidcloud_migrators::owner`]) is
//! written before any byte, so a crashed transfer's leftovers belong to
//! someone, and a disk another relocation or a person made is never
//! written.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use fluidcloud_migrators::image::{self as image, BackingPolicy, ImageReader, OpenOptions};
use fluidcloud_migrators::owner;
use fluidcloud_plugins::{Error, ImageFormat, Result};

use crate::driver::{DiskStore, DiskWriter, Disks, ImageRecord};

/// Disks kept as files in two directories (which may be the same).
#[derive(Debug, Clone)]
pub(crate) struct FileDisks {
    site: String,
    images: PathBuf,
    volumes: PathBuf,
    allow_dirs: Vec<PathBuf>,
}

impl FileDisks {
    /// The disks of site `site`: images in `images`, volumes in `volumes`;
    /// backing files may also be in `allow_dirs`.
    pub(crate) fn new(
        site: impl Into<String>,
        images: PathBuf,
        volumes: PathBuf,
        allow_dirs: Vec<PathBuf>,
    ) -> Self {
        Self {
            site: site.into(),
            images,
            volumes,
            allow_dirs,
        }
    }

    fn dir(&self, store: DiskStore) -> &Path {
        match store {
            DiskStore::Image => &self.images,
            DiskStore::Volume => &self.volumes,
        }
    }

    /// The file of disk `name`: a plain name in the store's directory.
    fn path(&self, store: DiskStore, name: &str) -> Result<PathBuf> {
        let plain = !name.is_empty()
            && !name.starts_with('.')
            && !name.contains(['/', '\0'])
            && name.len() <= 200;
        if !plain {
            return Err(Error::Precondition(format!(
                "site {}: `{name}` is not a {} name (a plain file name, not hidden)",
                self.site,
                store.as_str()
            )));
        }
        Ok(self.dir(store).join(name))
    }
}

fn from_codec(e: fluidcloud_migrators::Error) -> Error {
    e.into()
}

impl Disks for FileDisks {
    fn read(
        &self,
        store: DiskStore,
        name: &str,
        format: ImageFormat,
    ) -> Result<Box<dyn ImageReader>> {
        let path = self.path(store, name)?;
        if !path.is_file() {
            return Err(Error::NotFound {
                what: format!("{} {name}", store.as_str()),
                site: Some(self.site.clone()),
            });
        }
        let opts = OpenOptions {
            format: Some(format),
            snapshot: None,
            backing: BackingPolicy {
                root: Some(self.dir(store).to_owned()),
                allow_dirs: self.allow_dirs.clone(),
            },
        };
        image::open_with(&path, &opts).map_err(from_codec)
    }

    fn remove(&self, store: DiskStore, name: &str, owner: &str) -> Result<bool> {
        self.remove_disk(store, name, owner)
    }

    fn holder(&self, store: DiskStore, name: &str) -> Result<Option<Option<String>>> {
        let path = self.path(store, name)?;
        let owner = owner::read(&path).map_err(from_codec)?;
        Ok((path.exists() || owner.is_some()).then_some(owner))
    }

    fn write(
        &self,
        store: DiskStore,
        name: &str,
        format: ImageFormat,
        virtual_size: u64,
        owner: &str,
    ) -> Result<Box<dyn DiskWriter>> {
        let path = self.path(store, name)?;
        let exists = claim(&self.site, &path, owner)?;
        let mirror = staging_path(&path, format, exists);
        if format == ImageFormat::Qcow2
            && exists
            && !mirror.exists()
            && let Some(w) =
                super::patchdisk::PatchWriter::open(&self.site, path.clone(), virtual_size)?
        {
            return Ok(Box::new(w));
        }
        if format != ImageFormat::Raw && exists && !mirror.exists() {
            fill_mirror(&path, format, &mirror)?;
        }
        Ok(Box::new(FileDiskWriter::open(
            &self.site,
            path,
            format,
            virtual_size,
            exists,
        )?))
    }
}

impl FileDisks {
    /// As [`Disks::remove`].
    pub(crate) fn remove_disk(
        &self,
        store: DiskStore,
        name: &str,
        owner_tag: &str,
    ) -> Result<bool> {
        let path = self.path(store, name)?;
        let recorded = owner::read(&path).map_err(from_codec)?;
        let relocation = owner::relocation_of(owner_tag);
        match recorded.as_deref() {
            None if !path.exists() => {}
            Some(t) if owner::same_relocation(t, owner_tag) => {}
            other => {
                return Err(Error::Precondition(format!(
                    "site {}: {} is {}; this relocation ({relocation}) does not remove it",
                    self.site,
                    path.display(),
                    owner::describe(other)
                )));
            }
        }
        let mut removed = false;
        for p in std::iter::once(path.clone()).chain(leftovers(&path)) {
            match std::fs::remove_file(&p) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("site {}: removing {}", self.site, p.display()),
                        e,
                    ));
                }
            }
        }
        owner::remove(&path).map_err(from_codec)?;
        Ok(removed)
    }
}

/// A hidden file beside `path`: `.NAME.SUFFIX`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// The raw file a transfer writes for the disk at `path` kept as `format`.
pub(crate) fn staging_path(path: &Path, format: ImageFormat, exists: bool) -> PathBuf {
    match (format, exists) {
        (ImageFormat::Raw, true) => path.to_owned(),
        (ImageFormat::Raw, false) => beside(path, "fcpart"),
        _ => beside(path, "fcmirror"),
    }
}

/// Every file a transfer may leave for the disk at `path`, besides the
/// disk itself and its owner record (for rollbacks).
pub(crate) fn leftovers(path: &Path) -> [PathBuf; 3] {
    [
        beside(path, "fcpart"),
        beside(path, "fcmirror"),
        beside(path, "fcconvert"),
    ]
}

/// Zero detection granularity: all-zero blocks of this size become holes,
/// as with `cp --sparse=always`.
const BLOCK: usize = 4096;

/// Starts writing `offset..offset + len` back to disk without waiting, so
/// the final sync finds little left to do: the disk writes overlap the
/// transfer instead of following it (measured: the last 0.85 s of a
/// 1.5 GiB transfer was the sync alone). Only a hint; failures surface at
/// the sync.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd as _;
    let (Ok(o), Ok(l)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), o, l, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Writes `data` at `offset`, its runs of zero blocks as holes.
fn write_sparse(file: &std::fs::File, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut pos = 0;
    while pos < data.len() {
        let zero = |p: usize| {
            let end = (p + BLOCK).min(data.len());
            data.get(p..end).unwrap_or_default().iter().all(|&b| b == 0)
        };
        let kind = zero(pos);
        let mut end = pos;
        while end < data.len() && zero(end) == kind {
            end = (end + BLOCK).min(data.len());
        }
        let at = offset + pos as u64;
        if kind {
            fluidcloud_migrators::fsx::zero_range(file, at, (end - pos) as u64)?;
        } else {
            file.write_all_at(data.get(pos..end).unwrap_or_default(), at)?;
        }
        pos = end;
    }
    Ok(())
}

/// Writes one disk: see the module docs.
#[derive(Debug)]
struct FileDiskWriter {
    site: String,
    /// The disk's name in its store.
    path: PathBuf,
    /// The raw file written.
    staging: PathBuf,
    file: std::fs::File,
    format: ImageFormat,
    virtual_size: u64,
}

/// Claims the disk at `path` for `owner_tag`: a new disk gets its owner
/// record before any byte; an existing one must be this relocation's.
/// Whether the disk exists.
fn claim(site: &str, path: &Path, owner_tag: &str) -> Result<bool> {
    let exists = path.exists();
    let recorded = owner::read(path).map_err(from_codec)?;
    let relocation = owner::relocation_of(owner_tag);
    let ours = recorded
        .as_deref()
        .is_some_and(|t| owner::same_relocation(t, owner_tag));
    match (&recorded, exists) {
        (Some(_), _) if !ours => Err(Error::Precondition(format!(
            "site {site}: {} is {}; this relocation ({relocation}) does not write it",
            path.display(),
            owner::describe(recorded.as_deref())
        ))),
        (None, true) => Err(Error::Precondition(format!(
            "site {site}: {} exists and no relocation of fluidcloud created it; it is not overwritten",
            path.display()
        ))),
        (None, false) => owner::write(path, owner_tag)
            .map_err(from_codec)
            .map(|()| false),
        (Some(_), _) => Ok(exists),
    }
}

/// Fills `mirror` with the guest bytes of the `format` disk at `path`
/// (through a temporary file, renamed), for a transfer to bring it up to
/// date.
fn fill_mirror(path: &Path, format: ImageFormat, mirror: &Path) -> Result<()> {
    let reader = image::open_with(
        path,
        &OpenOptions {
            format: Some(format),
            ..OpenOptions::default()
        },
    )
    .map_err(from_codec)?;
    let tmp = beside(path, "fcconvert");
    let opts = image::ConvertOptions {
        format: ImageFormat::Raw,
        overwrite: true,
        ..image::ConvertOptions::default()
    };
    image::convert(reader.as_ref(), &tmp, &opts, &|_, _| {}).map_err(from_codec)?;
    std::fs::rename(&tmp, mirror).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), mirror.display()),
            e,
        )
    })
}

/// The record of the `format` disk at `path`, its allocation as the file
/// system says.
pub(crate) fn record_of(
    path: &Path,
    format: ImageFormat,
    virtual_size: u64,
) -> Result<ImageRecord> {
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    let allocated = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .unwrap_or_default();
    Ok(ImageRecord {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        format,
        virtual_size,
        allocated,
        backing: None,
        locator: path.display().to_string(),
    })
}

impl FileDiskWriter {
    fn open(
        site: &str,
        path: PathBuf,
        format: ImageFormat,
        virtual_size: u64,
        exists: bool,
    ) -> Result<Self> {
        let io = |what: String, e| Error::io(format!("site {site}: {what}"), e);
        let staging = staging_path(&path, format, exists);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&staging)
            .map_err(|e| io(format!("opening {}", staging.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| io(format!("reading {}", staging.display()), e))?
            .len();
        if len != virtual_size {
            if exists && format == ImageFormat::Raw {
                return Err(Error::Precondition(format!(
                    "site {site}: {} holds {len} bytes, the source disk {virtual_size}",
                    path.display()
                )));
            }
            file.set_len(virtual_size)
                .map_err(|e| io(format!("sizing {}", staging.display()), e))?;
        }
        Ok(Self {
            site: site.to_owned(),
            path,
            staging,
            file,
            format,
            virtual_size,
        })
    }

    fn io(&self, what: String, e: std::io::Error) -> Error {
        Error::io(format!("site {}: {what}", self.site), e)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.virtual_size)
        {
            return Err(Error::Precondition(format!(
                "site {}: writing {len} bytes at {offset} runs past the end of {} ({} bytes)",
                self.site,
                self.path.display(),
                self.virtual_size
            )));
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|e| self.io(format!("syncing {}", self.staging.display()), e))
    }
}

impl DiskWriter for FileDiskWriter {
    fn current(&self) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(
            image::RawReader::open(&self.staging).map_err(from_codec)?,
        ))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        write_sparse(&self.file, offset, data)
            .map_err(|e| self.io(format!("writing {} at {offset}", self.staging.display()), e))?;
        start_writeback(&self.file, offset, data.len() as u64);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        fluidcloud_migrators::fsx::zero_range(&self.file, offset, len)
            .map_err(|e| self.io(format!("zeroing {} at {offset}", self.staging.display()), e))
    }

    fn finish(&self) -> Result<ImageRecord> {
        self.sync()?;
        if self.format == ImageFormat::Raw {
            if self.staging != self.path {
                std::fs::rename(&self.staging, &self.path)
                    .map_err(|e| self.io(format!("renaming {}", self.staging.display()), e))?;
            }
        } else {
            let tmp = beside(&self.path, "fcconvert");
            let source = image::RawReader::open(&self.staging).map_err(from_codec)?;
            let opts = image::ConvertOptions {
                format: self.format,
                overwrite: true,
                ..image::ConvertOptions::default()
            };
            image::convert(&source, &tmp, &opts, &|_, _| {}).map_err(from_codec)?;
            std::fs::rename(&tmp, &self.path)
                .map_err(|e| self.io(format!("renaming {}", tmp.display()), e))?;
            // The disk holds it all now; a later transfer patches the disk
            // (qcow2) or fills a new mirror from it.
            std::fs::remove_file(&self.staging)
                .map_err(|e| self.io(format!("removing {}", self.staging.display()), e))?;
        }
        record_of(&self.path, self.format, self.virtual_size)
    }
}
