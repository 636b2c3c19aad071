//! The block store of an `aws` site: a volume is a disk of the `volume`
//! store, an EBS snapshot chain (`crate::drivers::aws::ebs`). Writes at
//! offsets go into a snapshot started at the first write and completed at
//! `flush`: until then reads see them, afterwards the volume's latest
//! snapshot holds them. Reading a volume an instance has attached reads
//! the instance's EBS volume (snapshotted first), as the guest left it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use fluidcloud_migrators::image::{ExtentKind as ImageExtentKind, ImageReader, extents};
use fluidcloud_plugins::{Error, ImageFormat, Result};

use super::Aws;
use super::ebs::check_name;
use crate::driver::{BlockStore, DiskStore, DiskWriter, Disks, Extent, ExtentKind, ImageRecord};

/// Volumes with writes not yet flushed, by name.
#[derive(Default)]
pub(crate) struct OpenWrites(Mutex<HashMap<String, Arc<dyn DiskWriter>>>);

impl std::fmt::Debug for OpenWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenWrites").finish_non_exhaustive()
    }
}

impl OpenWrites {
    fn get(&self, name: &str) -> Option<Arc<dyn DiskWriter>> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }
}

/// Runs blocking `f` (the [`Disks`] calls) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Transient(format!("a volume call stopped: {e}")))?
}

impl Aws {
    /// Volume `name` as it reads now: its unflushed writes, else the
    /// volume as its instance or its latest snapshot holds it.
    fn volume_reader(&self, name: &str) -> Result<Box<dyn ImageReader>> {
        match self.writes.get(name) {
            Some(w) => w.current(),
            None => self.read(DiskStore::Volume, name, ImageFormat::Raw),
        }
    }

    /// The writer of volume `name`, opened at its first write.
    fn volume_writer(&self, name: &str) -> Result<Arc<dyn DiskWriter>> {
        if let Some(w) = self.writes.get(name) {
            return Ok(w);
        }
        let info = self.volume_reader(name)?;
        let owner = self.holder(DiskStore::Volume, name)?.flatten();
        let w: Arc<dyn DiskWriter> = Arc::from(self.write_as(
            DiskStore::Volume,
            name,
            info.virtual_size(),
            owner.as_deref(),
        )?);
        let mut open = self.writes.0.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(open.entry(name.to_owned()).or_insert(w).clone())
    }
}

#[async_trait]
impl BlockStore for Aws {
    async fn list_volumes(&self) -> Result<Vec<String>> {
        let api = self.api.clone();
        self.api
            .on_rt(async move { api.names(DiskStore::Volume).await })
            .await
    }

    async fn volume_info(&self, name: &str) -> Result<ImageRecord> {
        self.disk_info(DiskStore::Volume, name).await
    }

    async fn create_volume(&self, name: &str, size: u64) -> Result<()> {
        check_name(name)?;
        let this = self.clone();
        let name = name.to_owned();
        blocking(move || {
            if this.holder(DiskStore::Volume, &name)?.is_some() {
                return Err(Error::Precondition(format!(
                    "volume {name} already exists on site {}",
                    this.api.name
                )));
            }
            this.write_as(DiskStore::Volume, &name, size, None)?
                .finish()
                .map(drop)
        })
        .await
    }

    async fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        check_name(name)?;
        let this = self.clone();
        let (name, len) = (name.to_owned(), buf.len());
        let data = blocking(move || {
            let r = this.volume_reader(&name)?;
            let n = len.min(r.virtual_size().saturating_sub(offset) as usize);
            let mut data = vec![0u8; n];
            r.read_at(offset, &mut data)?;
            Ok(data)
        })
        .await?;
        buf[..data.len()].copy_from_slice(&data);
        Ok(data.len())
    }

    async fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        check_name(name)?;
        let this = self.clone();
        let (name, data) = (name.to_owned(), data.to_vec());
        blocking(move || this.volume_writer(&name)?.write_at(offset, &data)).await
    }

    async fn allocation(&self, name: &str) -> Result<Vec<Extent>> {
        check_name(name)?;
        let this = self.clone();
        let name = name.to_owned();
        blocking(move || {
            let r = this.volume_reader(&name)?;
            let mut out: Vec<Extent> = Vec::new();
            for e in extents(r.as_ref()) {
                let e = e?;
                let kind = match e.kind {
                    ImageExtentKind::Data => ExtentKind::Data,
                    _ => ExtentKind::Hole,
                };
                match out.last_mut() {
                    Some(last) if last.kind == kind => last.length += e.length,
                    _ => out.push(Extent {
                        offset: e.offset,
                        length: e.length,
                        kind,
                    }),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn flush(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let open = self
            .writes
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        match open {
            Some(w) => blocking(move || w.finish().map(drop)).await,
            None => Ok(()),
        }
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.writes
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        let api = self.api.clone();
        let name = name.to_owned();
        self.api
            .on_rt(async move {
                if api.delete_disk(DiskStore::Volume, &name).await? {
                    Ok(())
                } else {
                    Err(Error::NotFound {
                        what: format!("volume {name}"),
                        site: Some(api.name.clone()),
                    })
                }
            })
            .await
    }
}
