//! Images in Glance v2.
//!
//! An image of the site is the newest `active` Glance image of the
//! project with that name. Each one fluidcloud uploads carries the
//! property `fluidcloud_owner` (the relocation and step that wrote it):
//! only that relocation replaces or removes it.
//!
//! - **Upload**: `POST /v2/images` (name, `disk_format`, `container_format`
//!   `bare`, private, the owner), then `PUT /v2/images/{id}/file` streaming
//!   the bytes while they are hashed with SHA-512; Glance's own
//!   `os_hash_value` must then be the same, or the image is deleted. An
//!   upload that fails deletes its image: nothing half-written stays.
//! - **Download**: `GET /v2/images/{id}/file`, hashed as it comes and
//!   compared with `os_hash_value` at the end: a stream that differs ends
//!   in an error, never in silence.
//! - **Disks** (what a transfer reads and writes) go through a scratch
//!   directory: a disk is downloaded (sparse, checked) and opened with the
//!   project's image codecs as its declared format; a disk is written into
//!   a scratch file in its format, uploaded when the transfer finishes
//!   (replacing the relocation's earlier upload of it, if any).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use fluidcloud_migrators::image::ImageReader;
use fluidcloud_migrators::owner;
use fluidcloud_plugins::{Error, ImageFormat, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Deserialize;
use sha2::{Digest as _, Sha512};
use tokio::io::{AsyncRead, AsyncWriteExt as _};

use super::OpenStack;
use crate::driver::{DiskStore, DiskWriter, Disks, ImageRecord, ImageStore};
use crate::drivers::filedisk::FileDisks;

/// The property holding who uploaded an image.
const OWNER: &str = "fluidcloud_owner";

/// An image as Glance describes it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Image {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    pub status: String,
    #[serde(default)]
    pub disk_format: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub virtual_size: Option<u64>,
    #[serde(default)]
    pub os_hash_algo: Option<String>,
    #[serde(default)]
    pub os_hash_value: Option<String>,
    #[serde(default)]
    pub created_at: String,
    #[serde(default, rename = "fluidcloud_owner")]
    pub owner_tag: Option<String>,
}

#[derive(Deserialize)]
struct Page {
    images: Vec<Image>,
    #[serde(default)]
    next: Option<String>,
}

/// The format Glance's `disk_format` names.
fn format_of(disk_format: Option<&str>) -> ImageFormat {
    match disk_format {
        Some("qcow2") => ImageFormat::Qcow2,
        Some("vmdk") => ImageFormat::Vmdk,
        Some("vhd") => ImageFormat::Vhd,
        Some("vhdx") => ImageFormat::Vhdx,
        _ => ImageFormat::Raw,
    }
}

/// Glance's `disk_format` for `format`.
fn disk_format(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Vmdk => "vmdk",
        ImageFormat::Vhd => "vhd",
        ImageFormat::Vhdx => "vhdx",
        ImageFormat::Raw => "raw",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_name(name: &str) -> Result<()> {
    if crate::relocate::lock::is_plain_name(name) {
        Ok(())
    } else {
        Err(Error::Invalid(vec![fluidcloud_plugins::Diagnostic::error(
            format!(
                "`{name}` cannot name an image of an openstack site (1 to 128 of A-Z a-z 0-9 . _ -, not starting with a dot)"
            ),
        )]))
    }
}

impl OpenStack {
    /// Every image of the project (all statuses).
    async fn images(&self, name: Option<&str>) -> Result<Vec<Image>> {
        let project = self.project_id().await?;
        let mut path = format!("/v2/images?owner={project}&limit=100");
        if let Some(n) = name {
            path.push_str(&format!("&name={n}"));
        }
        let mut out = Vec::new();
        loop {
            let resp = self
                .send("image", "Glance GET /v2/images", |h, base| {
                    h.get(format!("{base}{path}"))
                })
                .await?;
            let page: Page = resp.json().await.map_err(|e| {
                Error::Transient(format!("site {}: Glance's image list: {e}", self.name))
            })?;
            out.extend(page.images);
            match page.next {
                Some(next) if !next.is_empty() => path = next,
                _ => return Ok(out),
            }
        }
    }

    /// The newest active image named `name`, if any.
    async fn image(&self, name: &str) -> Result<Option<Image>> {
        check_name(name)?;
        let mut found: Vec<Image> = self
            .images(Some(name))
            .await?
            .into_iter()
            .filter(|i| i.status == "active" && i.name.as_deref() == Some(name))
            .collect();
        found.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(found.pop())
    }

    async fn existing(&self, name: &str) -> Result<Image> {
        self.image(name).await?.ok_or_else(|| Error::NotFound {
            what: format!("image {name}"),
            site: Some(self.name.clone()),
        })
    }

    async fn delete(&self, id: &str) -> Result<()> {
        match self
            .send("image", "Glance DELETE /v2/images", |h, base| {
                h.delete(format!("{base}/v2/images/{id}"))
            })
            .await
        {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Uploads file `path` as a new image `name` of `format` by `owner`,
    /// checked against Glance's hash; the image. A failed upload deletes
    /// its image.
    async fn upload(
        &self,
        name: &str,
        format: ImageFormat,
        path: &Path,
        owner: Option<&str>,
    ) -> Result<Image> {
        let mut body = serde_json::json!({
            "name": name,
            "disk_format": disk_format(format),
            "container_format": "bare",
            "visibility": "private",
        });
        if let Some(o) = owner {
            body[OWNER] = serde_json::Value::String(o.to_owned());
        }
        let created: Image = self
            .send("image", "Glance POST /v2/images", |h, base| {
                h.post(format!("{base}/v2/images")).json(&body)
            })
            .await?
            .json()
            .await
            .map_err(|e| {
                Error::Transient(format!("site {}: Glance's new image: {e}", self.name))
            })?;
        match self.put_file(&created.id, path).await {
            Ok(image) => Ok(image),
            Err(e) => {
                if let Err(d) = self.delete(&created.id).await {
                    tracing::warn!(site = %self.name, image = %created.id, error = %d, "an image whose upload failed could not be deleted");
                }
                Err(e)
            }
        }
    }

    /// Streams file `path` into image `id` and checks Glance's hash of it.
    async fn put_file(&self, id: &str, path: &Path) -> Result<Image> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
            .len();
        let hasher = std::sync::Arc::new(std::sync::Mutex::new(Sha512::new()));
        let h = hasher.clone();
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).inspect_ok(move |c| {
                h.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .update(c);
            });
        let body = std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(stream)));
        // The body streams once: a token that expires meanwhile is not
        // renewed for this call (Glance checks it when the call starts,
        // and tokens are renewed five minutes before they expire).
        self.send("image", "Glance PUT /v2/images/{id}/file", |h, base| {
            let b = body
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
                .unwrap_or_else(|| reqwest::Body::from(Vec::new()));
            // A length, not chunks: some WSGI servers cap a chunk's size.
            h.put(format!("{base}/v2/images/{id}/file"))
                .header("Content-Type", "application/octet-stream")
                .header("Content-Length", len)
                .body(b)
        })
        .await?;
        let ours = hex(&hasher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .finalize());
        let image: Image = self
            .send("image", "Glance GET /v2/images/{id}", |h, base| {
                h.get(format!("{base}/v2/images/{id}"))
            })
            .await?
            .json()
            .await
            .map_err(|e| {
                Error::Transient(format!("site {}: Glance's image {id}: {e}", self.name))
            })?;
        check_hash(&self.name, &image, &ours)?;
        Ok(image)
    }

    /// The bytes of image `image`, as a stream that ends in an error when
    /// their SHA-512 is not Glance's `os_hash_value`.
    async fn download(
        &self,
        image: &Image,
    ) -> Result<impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + use<>> {
        let id = image.id.clone();
        let resp = self
            .send("image", "Glance GET /v2/images/{id}/file", |h, base| {
                h.get(format!("{base}/v2/images/{id}/file"))
            })
            .await?;
        let mut hasher = Some(Sha512::new());
        let (site, image) = (self.name.clone(), image.clone());
        let body = resp
            .bytes_stream()
            .map(|c| c.map_err(std::io::Error::other));
        let checked = body
            .map(Some)
            .chain(futures::stream::once(async { None }))
            .filter_map(move |item| {
                let out = match item {
                    Some(Ok(c)) => {
                        if let Some(h) = hasher.as_mut() {
                            h.update(&c);
                        }
                        Some(Ok(c))
                    }
                    Some(Err(e)) => Some(Err(e)),
                    None => {
                        let ours = hex(&hasher.take().map(Sha512::finalize).unwrap_or_default());
                        check_hash(&site, &image, &ours)
                            .err()
                            .map(|e| Err(std::io::Error::other(e.to_string())))
                    }
                };
                async move { out }
            });
        Ok(checked)
    }

    /// Downloads image `image` into `path`, sparse (zero blocks are left
    /// as holes), checked.
    async fn download_to(&self, image: &Image, path: &Path) -> Result<()> {
        let mut file = tokio::fs::File::create(path)
            .await
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let mut stream = Box::pin(self.download(image).await?);
        let mut at = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Error::Transient(format!(
                    "site {}: downloading image {}: {e}",
                    self.name, image.id
                ))
            })?;
            if chunk.iter().any(|&b| b != 0) {
                use tokio::io::AsyncSeekExt as _;
                file.seek(std::io::SeekFrom::Start(at))
                    .await
                    .and(file.write_all(&chunk).await)
                    .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            }
            at += chunk.len() as u64;
        }
        file.set_len(at)
            .await
            .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
        file.sync_all()
            .await
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

/// Checks `ours` (SHA-512, hex) against the hash Glance keeps of `image`.
fn check_hash(site: &str, image: &Image, ours: &str) -> Result<()> {
    match (
        image.os_hash_algo.as_deref(),
        image.os_hash_value.as_deref(),
    ) {
        (Some("sha512"), Some(theirs)) if theirs != ours => Err(Error::Corrupt {
            what: format!(
                "image {} of site {site}: its SHA-512 is {ours}, Glance's os_hash_value {theirs}",
                image.id
            ),
            offset: 0,
        }),
        (Some("sha512"), Some(_)) => Ok(()),
        (algo, _) => Err(Error::Precondition(format!(
            "site {site}: Glance keeps no SHA-512 of image {} (os_hash_algo {}); its bytes cannot be checked",
            image.id,
            algo.unwrap_or("unset")
        ))),
    }
}

/// A disk read from a download in a scratch directory, removed with it.
struct Downloaded {
    inner: Box<dyn ImageReader>,
    _scratch: tempfile::TempDir,
}

impl std::fmt::Debug for Downloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloaded")
            .field("path", &self.inner.path())
            .finish()
    }
}

impl ImageReader for Downloaded {
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> fluidcloud_migrators::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn extent_at(
        &self,
        offset: u64,
    ) -> fluidcloud_migrators::Result<fluidcloud_migrators::image::Extent> {
        self.inner.extent_at(offset)
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// A disk written into a scratch file, uploaded at `finish`.
struct Upload {
    site: OpenStack,
    name: String,
    format: ImageFormat,
    owner: String,
    file: PathBuf,
    /// The relocation's earlier upload of this disk, replaced at finish.
    earlier: Option<String>,
    inner: Box<dyn DiskWriter>,
    _scratch: tempfile::TempDir,
}

impl DiskWriter for Upload {
    fn current(&self) -> Result<Box<dyn ImageReader>> {
        self.inner.current()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(offset, data)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.zero(offset, len)
    }
    fn finish(&self) -> Result<ImageRecord> {
        let local = self.inner.finish()?;
        let site = self.site.clone();
        let (name, format, owner, file, earlier) = (
            self.name.clone(),
            self.format,
            self.owner.clone(),
            self.file.clone(),
            self.earlier.clone(),
        );
        let image = self.site.block_on(async move {
            let image = site.upload(&name, format, &file, Some(&owner)).await?;
            if let Some(old) = earlier {
                site.delete(&old).await?;
            }
            Ok(image)
        })?;
        Ok(ImageRecord {
            name: self.name.clone(),
            format: self.format,
            virtual_size: local.virtual_size,
            allocated: image.size.unwrap_or(local.allocated),
            backing: None,
            locator: image.id,
        })
    }
}

/// Only the image store: the block store (Cinder) is not offered.
fn images_only(site: &str, store: DiskStore) -> Result<()> {
    match store {
        DiskStore::Image => Ok(()),
        DiskStore::Volume => Err(Error::NotSupported {
            operation: "volumes (Cinder)".into(),
            site: Some(site.to_owned()),
        }),
    }
}

fn scratch() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("fluidcloud-glance-")
        .tempdir()
        .map_err(|e| Error::io("creating a scratch directory", e))
}

impl Disks for OpenStack {
    fn read(
        &self,
        store: DiskStore,
        name: &str,
        format: ImageFormat,
    ) -> Result<Box<dyn ImageReader>> {
        images_only(&self.name, store)?;
        let dir = scratch()?;
        let path = dir.path().join(name);
        let this = self.clone();
        let (owned, p) = (name.to_owned(), path.clone());
        self.block_on(async move {
            let image = this.existing(&owned).await?;
            this.download_to(&image, &p).await
        })?;
        let inner = FileDisks::new(
            &self.name,
            dir.path().to_owned(),
            dir.path().to_owned(),
            Vec::new(),
        )
        .read(DiskStore::Image, name, format)?;
        Ok(Box::new(Downloaded {
            inner,
            _scratch: dir,
        }))
    }

    fn write(
        &self,
        store: DiskStore,
        name: &str,
        format: ImageFormat,
        virtual_size: u64,
        owner_tag: &str,
    ) -> Result<Box<dyn DiskWriter>> {
        images_only(&self.name, store)?;
        check_name(name)?;
        let dir = scratch()?;
        let path = dir.path().join(name);
        let this = self.clone();
        let (owned, p, tag) = (name.to_owned(), path.clone(), owner_tag.to_owned());
        let earlier = self.block_on(async move {
            let Some(image) = this.image(&owned).await? else {
                return Ok(None);
            };
            if !image
                .owner_tag
                .as_deref()
                .is_some_and(|t| owner::same_relocation(t, &tag))
            {
                return Err(Error::Precondition(format!(
                    "image {owned} exists on site {} ({}), and this relocation did not write it",
                    this.name,
                    owner::describe(image.owner_tag.as_deref())
                )));
            }
            // A repeated transfer: it starts from what the relocation
            // uploaded, and sends only what differs.
            this.download_to(&image, &p).await?;
            Ok(Some(image.id))
        })?;
        if earlier.is_some() {
            owner::write(&path, owner_tag).map_err(Error::from)?;
        }
        let inner = FileDisks::new(
            &self.name,
            dir.path().to_owned(),
            dir.path().to_owned(),
            Vec::new(),
        )
        .write(DiskStore::Image, name, format, virtual_size, owner_tag)?;
        Ok(Box::new(Upload {
            site: self.clone(),
            name: name.to_owned(),
            format,
            owner: owner_tag.to_owned(),
            file: path,
            earlier,
            inner,
            _scratch: dir,
        }))
    }

    fn remove(&self, store: DiskStore, name: &str, owner_tag: &str) -> Result<bool> {
        images_only(&self.name, store)?;
        check_name(name)?;
        let this = self.clone();
        let (name, tag) = (name.to_owned(), owner_tag.to_owned());
        self.block_on(async move {
            let all: Vec<Image> = this
                .images(Some(&name))
                .await?
                .into_iter()
                .filter(|i| i.name.as_deref() == Some(name.as_str()))
                .collect();
            if let Some(other) = all.iter().find(|i| {
                !i.owner_tag
                    .as_deref()
                    .is_some_and(|t| owner::same_relocation(t, &tag))
            }) {
                return Err(Error::Precondition(format!(
                    "image {name} on site {} ({}, {}) was not written by this relocation",
                    this.name,
                    other.id,
                    owner::describe(other.owner_tag.as_deref())
                )));
            }
            for i in &all {
                this.delete(&i.id).await?;
            }
            Ok(!all.is_empty())
        })
    }

    fn holder(&self, store: DiskStore, name: &str) -> Result<Option<Option<String>>> {
        images_only(&self.name, store)?;
        let this = self.clone();
        let name = name.to_owned();
        self.block_on(async move { Ok(this.image(&name).await?.map(|i| i.owner_tag)) })
    }
}

/// The format of an image stream from its first bytes (Glance needs a
/// `disk_format` before the bytes, and checks it against them).
fn sniff(head: &[u8]) -> ImageFormat {
    if head.starts_with(b"QFI\xfb") {
        ImageFormat::Qcow2
    } else if head.starts_with(b"KDMV") {
        ImageFormat::Vmdk
    } else if head.starts_with(b"vhdxfile") {
        ImageFormat::Vhdx
    } else {
        ImageFormat::Raw
    }
}

#[async_trait]
impl ImageStore for OpenStack {
    async fn list_images(&self) -> Result<Vec<String>> {
        let this = self.clone();
        let mut names: Vec<String> = self
            .on_rt(async move { this.images(None).await })
            .await?
            .into_iter()
            .filter(|i| i.status == "active")
            .filter_map(|i| i.name)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn image_info(&self, name: &str) -> Result<ImageRecord> {
        let this = self.clone();
        let owned = name.to_owned();
        let i = self
            .on_rt(async move { this.existing(&owned).await })
            .await?;
        let size = i.size.unwrap_or(0);
        Ok(ImageRecord {
            name: name.to_owned(),
            format: format_of(i.disk_format.as_deref()),
            virtual_size: i.virtual_size.unwrap_or(size),
            allocated: size,
            backing: None,
            locator: i.id,
        })
    }

    /// Spooled to a scratch file first: Glance needs the format before
    /// the bytes, and a checked upload needs them whole.
    async fn put_image(
        &self,
        name: &str,
        data: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64> {
        check_name(name)?;
        let dir = scratch()?;
        let path = dir.path().join(name);
        let size = {
            let mut f = tokio::fs::File::create(&path)
                .await
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
            let n = tokio::io::copy(data, &mut f)
                .await
                .map_err(|e| Error::io("reading the image stream", e))?;
            f.sync_all()
                .await
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            n
        };
        let mut head = [0u8; 8];
        let got = {
            use std::io::Read as _;
            std::fs::File::open(&path)
                .and_then(|mut f| f.read(&mut head))
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        };
        let format = sniff(&head[..got]);
        let this = self.clone();
        let owned = name.to_owned();
        self.on_rt(async move {
            if this.image(&owned).await?.is_some() {
                return Err(Error::Precondition(format!(
                    "image {owned} already exists on site {}",
                    this.name
                )));
            }
            this.upload(&owned, format, &path, None).await.map(drop)
        })
        .await?;
        drop(dir);
        Ok(size)
    }

    async fn open_image(&self, name: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>> {
        let this = self.clone();
        let owned = name.to_owned();
        let stream = self
            .on_rt(async move {
                let image = this.existing(&owned).await?;
                this.download(&image).await
            })
            .await?;
        Ok(Box::new(tokio_util::io::StreamReader::new(Box::pin(
            stream,
        ))))
    }

    async fn delete_image(&self, name: &str) -> Result<()> {
        let this = self.clone();
        let owned = name.to_owned();
        self.on_rt(async move {
            let all: Vec<Image> = this
                .images(Some(&owned))
                .await?
                .into_iter()
                .filter(|i| i.name.as_deref() == Some(owned.as_str()))
                .collect();
            if all.is_empty() {
                return Err(Error::NotFound {
                    what: format!("image {owned}"),
                    site: Some(this.name.clone()),
                });
            }
            for i in &all {
                this.delete(&i.id).await?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_named_both_ways_and_sniffed() {
        for f in [
            ImageFormat::Raw,
            ImageFormat::Qcow2,
            ImageFormat::Vmdk,
            ImageFormat::Vhdx,
        ] {
            assert_eq!(format_of(Some(disk_format(f))), f);
        }
        assert_eq!(sniff(b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2);
        assert_eq!(sniff(b"\0\0\0\0"), ImageFormat::Raw);
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
