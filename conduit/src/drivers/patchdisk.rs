//! A qcow2 disk written again in place: the final delta (or any repeated
//! transfer) onto a qcow2 image a relocation wrote earlier goes straight
//! into it through [`Qcow2Patcher`], so only the changed clusters are
//! written and no raw mirror of the whole disk is kept beside it. The
//! patcher keeps the image valid at every point of a crash (see its
//! docs); a resumed transfer compares again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use fluidcloud_migrators::image::{
    self as image, Extent, ExtentKind, ImageReader, OpenOptions, qcow2::Qcow2Patcher,
};
use fluidcloud_plugins::{Error, ImageFormat, Result};

use crate::driver::{DiskWriter, ImageRecord};

/// What the writer and the views it hands out share.
struct Shared {
    path: PathBuf,
    virtual_size: u64,
    /// `None` once finished.
    patcher: Mutex<Option<Qcow2Patcher>>,
    /// The image as it was opened, for its extent map.
    before: Box<dyn ImageReader>,
    /// Guest ranges written since, which may now hold data.
    written: Mutex<Vec<(u64, u64)>>,
}

impl Shared {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Qcow2Patcher) -> fluidcloud_migrators::Result<T>,
    ) -> Result<T> {
        let mut guard = self.patcher.lock().unwrap_or_else(PoisonError::into_inner);
        let p = guard.as_mut().ok_or_else(|| {
            Error::Precondition(format!("{} was already finished", self.path.display()))
        })?;
        f(p).map_err(Error::from)
    }
}

/// Writes an existing qcow2 disk in place.
pub(crate) struct PatchWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PatchWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatchWriter")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl PatchWriter {
    /// Opens the qcow2 image at `path` for patching. `Ok(None)` when the
    /// patcher does not take it (a feature it refuses, such as a backing
    /// file): the caller writes a mirror instead.
    ///
    /// # Errors
    /// I/O or corruption errors naming the file; an image of another size.
    pub(crate) fn open(site: &str, path: PathBuf, virtual_size: u64) -> Result<Option<Self>> {
        let patcher = match Qcow2Patcher::open(&path) {
            Ok(p) => p,
            Err(fluidcloud_migrators::Error::Unsupported { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if patcher.virtual_size() != virtual_size {
            return Err(Error::Precondition(format!(
                "site {site}: {} holds a disk of {} bytes, the source disk {virtual_size}",
                path.display(),
                patcher.virtual_size()
            )));
        }
        let before = image::open_with(
            &path,
            &OpenOptions {
                format: Some(ImageFormat::Qcow2),
                ..OpenOptions::default()
            },
        )?;
        Ok(Some(Self {
            shared: Arc::new(Shared {
                path,
                virtual_size,
                patcher: Mutex::new(Some(patcher)),
                before,
                written: Mutex::new(Vec::new()),
            }),
        }))
    }

    fn note(&self, offset: u64, len: u64) {
        self.shared
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((offset, len));
    }
}

/// The disk as the patcher holds it now, unfinished writes included.
struct View(Arc<Shared>);

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("View").field(&self.0.path).finish()
    }
}

impl ImageReader for View {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.0.virtual_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> fluidcloud_migrators::Result<()> {
        let mut guard = self
            .0
            .patcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match guard.as_mut() {
            Some(p) => p.read_at(offset, buf),
            None => self.0.before.read_at(offset, buf),
        }
    }

    /// The extent of the image as opened, reported as data where a write
    /// since may have put some (reading more than needed is harmless).
    fn extent_at(&self, offset: u64) -> fluidcloud_migrators::Result<Extent> {
        let e = self.0.before.extent_at(offset)?;
        if e.kind == ExtentKind::Data {
            return Ok(e);
        }
        let touched = self
            .0
            .written
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|&(o, l)| o < e.end() && o + l > e.offset);
        Ok(if touched {
            Extent {
                kind: ExtentKind::Data,
                ..e
            }
        } else {
            e
        })
    }

    fn path(&self) -> &std::path::Path {
        &self.0.path
    }
}

impl DiskWriter for PatchWriter {
    fn current(&self) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(View(self.shared.clone())))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.shared.with(|p| p.write_at(offset, data))?;
        self.note(offset, data.len() as u64);
        Ok(())
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        const PIECE: u64 = 1 << 20;
        let zeros = vec![0u8; PIECE.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = PIECE.min(offset + len - pos);
            let piece = zeros.get(..n as usize).unwrap_or_default();
            self.shared.with(|p| p.write_at(pos, piece))?;
            pos += n;
        }
        self.note(offset, len);
        Ok(())
    }

    fn finish(&self) -> Result<ImageRecord> {
        let patcher = self
            .shared
            .patcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                Error::Precondition(format!(
                    "{} was already finished",
                    self.shared.path.display()
                ))
            })?;
        patcher.finish(true)?;
        super::filedisk::record_of(
            &self.shared.path,
            ImageFormat::Qcow2,
            self.shared.virtual_size,
        )
    }
}
