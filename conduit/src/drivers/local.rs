//! The `local` driver: a site is a directory.
//!
//! ```text
//! SITE/
//!   instances/NAME.toml     one manifest per instance (see InstanceRecord)
//!   images/NAME             disk images, any format (detected by content)
//!   volumes/NAME            block volumes: raw sparse files, or images
//!   buckets/BUCKET/KEY...   object storage, through object_store's LocalFileSystem
//!                           (unless `buckets_url` puts the buckets on S3)
//!   config/PATH             the service's config files
//!   services/NAME.toml      optional declared service manifests
//! ```
//!
//! It is the embedded default: a whole relocation runs between two local
//! sites with no cloud account. Everything it writes is atomic: a temporary
//! dot-file in the same directory, fsynced, then linked into place (which
//! fails rather than replaces when the name exists) or renamed; listings
//! skip dot-files, so a crash never leaves a half-written resource visible.
//! Instance state (`running`/`stopped`) lives in the manifest; that is what
//! "running" means on a directory site.
//!
//! With `buckets_url = "s3://?endpoint=URL&region=R"` in the sites file, the
//! site's object storage is that S3 endpoint instead of `buckets/`: every
//! bucket of the key named by `credentials` is a bucket of the site. The
//! credentials are read from their variables when a bucket operation runs;
//! an unset one is an `Invalid` error naming the variable and its key.

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_plugins::{Diagnostic, Error, ImageFormat, Result};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use tokio::io::AsyncRead;

use super::DriverDescriptor;
use crate::config::SiteConfig;
use crate::driver::{
    BlockStore, Compute, ConfigFileRecord, Extent, ExtentKind, ImageRecord, ImageStore,
    InstanceRecord, InstanceState, Inventory, ObjectStorage, SiteDriver,
};
use crate::tomlfile;

/// Registration of the `local` kind.
pub const DESCRIPTOR: DriverDescriptor = DriverDescriptor {
    kind: "local",
    disk_bus: false,
    help: "a directory on this machine: instances as manifests, images and volumes as files, buckets as folders",
    options: &[
        ("path", "the site's directory (relative to the sites file)"),
        (
            "buckets_url",
            "s3://?endpoint=URL&region=R: keep the site's buckets on that S3 endpoint instead of in the directory",
        ),
        (
            "accel",
            "auto (default), kvm or tcg: how the appliance that looks inside guests runs",
        ),
    ],
    open,
};

fn open(name: &str, config: &SiteConfig) -> crate::Result<Box<dyn SiteDriver>> {
    let root = config.path.clone().ok_or_else(|| crate::Error::Config {
        diagnostics: vec![
            Diagnostic::error("a local site needs `path`").at_key(format!("sites.{name}.path")),
        ],
    })?;
    let mut site = LocalSite::new(name, root).with_backing_dirs(config.allow_backing_dirs.clone());
    site.accel = crate::guest::Accel::from_config(config.accel.as_deref());
    if config.buckets_url.is_some() {
        site.s3 = Some(super::s3buckets::S3Buckets::from_config(name, config)?);
    }
    Ok(Box::new(site))
}

/// A site that is a directory.
#[derive(Debug, Clone)]
pub struct LocalSite {
    name: String,
    root: PathBuf,
    s3: Option<super::s3buckets::S3Buckets>,
    disks: super::filedisk::FileDisks,
    /// How guest appliances run (`accel`).
    accel: crate::guest::Accel,
}

const DIRS: [&str; 6] = [
    "instances",
    "images",
    "volumes",
    "buckets",
    "config",
    "services",
];

/// Checks config path `rel` is relative and stays inside the config root.
///
/// # Errors
/// `Invalid` naming the path.
pub fn check_config_path(rel: &str) -> Result<()> {
    let p = Path::new(rel);
    if !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_))) {
        Ok(())
    } else {
        Err(Error::Invalid(vec![Diagnostic::error(format!(
            "config path `{rel}` must be relative and stay inside the site's config directory"
        ))]))
    }
}

impl LocalSite {
    /// The site `name` rooted at `root` (nothing is checked until used).
    pub fn new(name: impl Into<String>, root: impl Into<PathBuf>) -> Self {
        let (name, root) = (name.into(), root.into());
        Self {
            disks: super::filedisk::FileDisks::new(
                name.clone(),
                root.join("images"),
                root.join("volumes"),
                Vec::new(),
            ),
            name,
            root,
            s3: None,
            accel: crate::guest::Accel::Auto,
        }
    }

    /// Backing files and extents of the site's disks may also be in `dirs`.
    #[must_use]
    pub fn with_backing_dirs(mut self, dirs: Vec<PathBuf>) -> Self {
        self.disks = super::filedisk::FileDisks::new(
            self.name.clone(),
            self.root.join("images"),
            self.root.join("volumes"),
            dirs,
        );
        self
    }

    /// Creates the directory layout of an empty site.
    ///
    /// # Errors
    /// When a directory cannot be created.
    pub fn create(name: impl Into<String>, root: impl Into<PathBuf>) -> Result<Self> {
        let site = Self::new(name, root);
        for d in DIRS {
            let p = site.root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| site.io(&p, "create", e))?;
        }
        Ok(site)
    }

    /// The site's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of an image file.
    pub fn image_path(&self, name: &str) -> Result<PathBuf> {
        Ok(self
            .root
            .join("images")
            .join(self.checked_name(name, "image")?))
    }

    /// Path of a volume file.
    pub fn volume_path(&self, name: &str) -> Result<PathBuf> {
        Ok(self
            .root
            .join("volumes")
            .join(self.checked_name(name, "volume")?))
    }

    /// Path of a config file.
    pub fn config_path(&self, rel: &str) -> Result<PathBuf> {
        check_config_path(rel)?;
        Ok(self.root.join("config").join(rel))
    }

    fn instance_path(&self, name: &str) -> Result<PathBuf> {
        let name = self.checked_name(name, "instance")?;
        Ok(self.root.join("instances").join(format!("{name}.toml")))
    }

    fn bucket_path(&self, name: &str) -> Result<PathBuf> {
        Ok(self
            .root
            .join("buckets")
            .join(self.checked_name(name, "bucket")?))
    }

    fn checked_name<'a>(&self, name: &'a str, what: &str) -> Result<&'a str> {
        let ok = !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0']);
        if ok {
            Ok(name)
        } else {
            Err(Error::Invalid(vec![Diagnostic::error(format!(
                "`{name}` is not a valid {what} name on site {} (no `/`, no leading `.`)",
                self.name
            ))]))
        }
    }

    fn io(&self, path: &Path, doing: &str, e: std::io::Error) -> Error {
        let shown = path
            .strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string();
        match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                what: shown,
                site: Some(self.name.clone()),
            },
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied {
                what: format!("{doing} {shown}"),
                site: Some(self.name.clone()),
            },
            _ => Error::io(
                format!("{doing} {} on site {}", path.display(), self.name),
                e,
            ),
        }
    }

    fn list_dir(&self, dir: &str) -> Result<Vec<String>> {
        let p = self.root.join(dir);
        let entries = match std::fs::read_dir(&p) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(&p, "list", e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io(&p, "list", e))?;
            if let Some(n) = entry.file_name().to_str()
                && !n.starts_with('.')
            {
                names.push(n.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn read_instance(&self, path: &Path) -> Result<InstanceRecord> {
        let text = std::fs::read_to_string(path).map_err(|e| self.io(path, "read", e))?;
        let rec: InstanceRecord =
            tomlfile::parse(path, &text).map_err(|d| Error::Invalid(vec![d]))?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if rec.name != stem {
            return Err(Error::Invalid(vec![
                Diagnostic::error(format!(
                    "instance name `{}` does not match its file name `{stem}.toml`",
                    rec.name
                ))
                .in_file(path)
                .at_key("name")
                .at_line(tomlfile::key_line(&text, "name").unwrap_or(1)),
            ]));
        }
        Ok(rec)
    }

    fn write_instance(&self, rec: &InstanceRecord, replace: bool) -> Result<()> {
        let path = self.instance_path(&rec.name)?;
        let text = toml::to_string_pretty(rec).map_err(|e| {
            Error::Precondition(format!("cannot serialize instance {}: {e}", rec.name))
        })?;
        atomic_write(&path, text.as_bytes(), replace).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Precondition(format!(
                "instance {} already exists on site {}",
                rec.name, self.name
            )),
            _ => self.io(&path, "write", e),
        })
    }

    fn volume_file(&self, name: &str, write: bool) -> Result<(std::fs::File, PathBuf)> {
        let path = self.volume_path(name)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path)
            .map_err(|e| self.io(&path, "open", e))?;
        let info = fluidcloud_migrators::probe(&path).map_err(Error::from)?;
        if info.format != ImageFormat::Raw {
            return Err(Error::NotSupported {
                operation: format!(
                    "byte-level access to {} volume `{name}` (only raw volumes are addressable so far)",
                    info.format
                ),
                site: Some(self.name.clone()),
            });
        }
        Ok((file, path))
    }

    fn record_of(&self, name: &str, path: &Path) -> Result<ImageRecord> {
        let info = fluidcloud_migrators::probe(path).map_err(|e| match Error::from(e) {
            Error::Io { source, .. } => self.io(path, "read", source),
            other => other,
        })?;
        Ok(ImageRecord {
            name: name.to_owned(),
            format: info.format,
            virtual_size: info.virtual_size,
            allocated: info.allocated_bytes,
            backing: info.backing_file,
            locator: path.display().to_string(),
        })
    }
}

/// Writes `data` to `path` atomically. With `replace == false`, fails with
/// `AlreadyExists` if `path` exists (hard link, not rename, so the check and
/// the publish are one step).
fn atomic_write(path: &Path, data: &[u8], replace: bool) -> std::io::Result<()> {
    let (tmp, mut f) = temp_beside(path)?;
    let result = f
        .write_all(data)
        .and_then(|()| f.sync_all())
        .and_then(|()| publish(&tmp, path, replace));
    let _ = std::fs::remove_file(&tmp);
    result
}

fn temp_beside(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let base = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    for attempt in 0u32..100 {
        let tmp = dir.join(format!(".{base}.tmp-{}-{attempt}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary name"))
}

fn publish(tmp: &Path, path: &Path, replace: bool) -> std::io::Result<()> {
    if replace {
        std::fs::rename(tmp, path)?;
    } else {
        std::fs::hard_link(tmp, path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Transient(format!("worker thread failed: {e}")))?
}

#[async_trait]
impl SiteDriver for LocalSite {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        DESCRIPTOR.kind
    }

    async fn check(&self) -> Result<()> {
        match std::fs::metadata(&self.root) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Error::Precondition(format!(
                "site {}: {} is not a directory",
                self.name,
                self.root.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound {
                what: format!("site directory {}", self.root.display()),
                site: Some(self.name.clone()),
            }),
            Err(e) => Err(self.io(&self.root.clone(), "open", e)),
        }
    }

    fn inventory(&self) -> Option<&dyn Inventory> {
        Some(self)
    }

    fn image_store(&self) -> Option<&dyn ImageStore> {
        Some(self)
    }

    fn block_store(&self) -> Option<&dyn BlockStore> {
        Some(self)
    }

    fn object_storage(&self) -> Option<&dyn ObjectStorage> {
        Some(self)
    }

    fn compute(&self) -> Option<&dyn Compute> {
        Some(self)
    }

    fn disks(&self) -> Option<&dyn crate::driver::Disks> {
        Some(&self.disks)
    }

    fn guests(&self) -> Option<&dyn crate::driver::Guests> {
        Some(self)
    }
}

impl crate::guest::FileGuests for LocalSite {
    fn accel(&self) -> crate::guest::Accel {
        self.accel
    }
}

#[async_trait]
impl Inventory for LocalSite {
    async fn instances(&self) -> Result<Vec<InstanceRecord>> {
        self.check().await?;
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for file in self.list_dir("instances")? {
            if !file.ends_with(".toml") {
                continue;
            }
            match self.read_instance(&self.root.join("instances").join(&file)) {
                Ok(rec) => out.push(rec),
                Err(Error::Invalid(d)) => problems.extend(d),
                Err(e) => return Err(e),
            }
        }
        if !problems.is_empty() {
            return Err(Error::Invalid(problems));
        }
        Ok(out)
    }

    async fn config_file(&self, path: &str) -> Result<ConfigFileRecord> {
        let full = self.config_path(path)?;
        let content = std::fs::read(&full).map_err(|e| self.io(&full, "read", e))?;
        Ok(ConfigFileRecord {
            path: path.to_owned(),
            content,
            locator: full.display().to_string(),
        })
    }

    async fn config_files(&self) -> Result<Vec<String>> {
        let root = self.root.join("config");
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(&dir, "list", e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io(&dir, "list", e))?;
                let p = entry.path();
                let ft = entry.file_type().map_err(|e| self.io(&p, "stat", e))?;
                if ft.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root)
                    && let Some(s) = rel.to_str()
                {
                    out.push(s.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    async fn service_manifest(&self, service: &str) -> Result<Option<(PathBuf, String)>> {
        let name = self.checked_name(service, "service")?;
        let path = self.root.join("services").join(format!("{name}.toml"));
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some((path, t))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&path, "read", e)),
        }
    }

    async fn put_config_file(&self, path: &str, content: &[u8], owner: &str) -> Result<()> {
        let file = self.config_path(path)?;
        let (site, content, owner) = (self.name.clone(), content.to_vec(), owner.to_owned());
        blocking(move || {
            let recorded = fluidcloud_migrators::owner::read(&file)?;
            let relocation = fluidcloud_migrators::owner::relocation_of(&owner);
            let ours = recorded
                .as_deref()
                .is_some_and(|t| fluidcloud_migrators::owner::same_relocation(t, &owner));
            if file.exists() && !ours {
                return Err(Error::Precondition(format!(
                    "site {site}: {} is {}; this relocation ({relocation}) does not overwrite it",
                    file.display(),
                    fluidcloud_migrators::owner::describe(recorded.as_deref())
                )));
            }
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    Error::io(format!("site {site}: creating {}", dir.display()), e)
                })?;
            }
            if recorded.is_none() {
                fluidcloud_migrators::owner::write(&file, &owner)?;
            }
            fluidcloud_migrators::config::write_atomic_mode(&file, &content, 0o600)
                .map_err(|e| Error::Precondition(format!("site {site}: {e}")))
        })
        .await
    }

    async fn remove_config_file(&self, path: &str, owner: &str) -> Result<bool> {
        let file = self.config_path(path)?;
        let top = self.root.join("config");
        let (site, owner) = (self.name.clone(), owner.to_owned());
        blocking(move || {
            let recorded = fluidcloud_migrators::owner::read(&file)?;
            let relocation = fluidcloud_migrators::owner::relocation_of(&owner);
            match recorded.as_deref() {
                None if !file.exists() => return Ok(false),
                Some(t) if fluidcloud_migrators::owner::same_relocation(t, &owner) => {}
                other => {
                    return Err(Error::Precondition(format!(
                        "site {site}: {} is {}; this relocation ({relocation}) does not remove it",
                        file.display(),
                        fluidcloud_migrators::owner::describe(other)
                    )));
                }
            }
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("site {site}: removing {}", file.display()),
                        e,
                    ));
                }
            }
            fluidcloud_migrators::owner::remove(&file)?;
            // Directories left empty, up to the config root.
            let mut dir = file.parent();
            while let Some(d) = dir.filter(|d| *d != top.as_path() && d.starts_with(&top)) {
                if std::fs::remove_dir(d).is_err() {
                    break;
                }
                dir = d.parent();
            }
            Ok(true)
        })
        .await
    }
}

#[async_trait]
impl ImageStore for LocalSite {
    async fn list_images(&self) -> Result<Vec<String>> {
        self.list_dir("images")
    }

    async fn image_info(&self, name: &str) -> Result<ImageRecord> {
        let path = self.image_path(name)?;
        self.record_of(name, &path)
    }

    async fn put_image(
        &self,
        name: &str,
        data: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64> {
        let path = self.image_path(name)?;
        if path.exists() {
            return Err(Error::Precondition(format!(
                "image {name} already exists on site {}",
                self.name
            )));
        }
        let (tmp, file) = temp_beside(&path).map_err(|e| self.io(&path, "create", e))?;
        let result = async {
            let mut f = tokio::fs::File::from_std(file);
            let n = tokio::io::copy(data, &mut f)
                .await
                .map_err(|e| self.io(&path, "write", e))?;
            f.sync_all().await.map_err(|e| self.io(&path, "sync", e))?;
            publish(&tmp, &path, false).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Error::Precondition(format!(
                    "image {name} already exists on site {}",
                    self.name
                )),
                _ => self.io(&path, "publish", e),
            })?;
            Ok(n)
        }
        .await;
        let _ = std::fs::remove_file(&tmp);
        result
    }

    async fn open_image(&self, name: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>> {
        let path = self.image_path(name)?;
        let f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| self.io(&path, "open", e))?;
        Ok(Box::new(f))
    }

    async fn delete_image(&self, name: &str) -> Result<()> {
        let path = self.image_path(name)?;
        std::fs::remove_file(&path).map_err(|e| self.io(&path, "delete", e))
    }
}

#[async_trait]
impl BlockStore for LocalSite {
    async fn list_volumes(&self) -> Result<Vec<String>> {
        self.list_dir("volumes")
    }

    async fn volume_info(&self, name: &str) -> Result<ImageRecord> {
        let path = self.volume_path(name)?;
        self.record_of(name, &path)
    }

    async fn create_volume(&self, name: &str, size: u64) -> Result<()> {
        let path = self.volume_path(name)?;
        let (tmp, f) = temp_beside(&path).map_err(|e| self.io(&path, "create", e))?;
        let r = f
            .set_len(size)
            .and_then(|()| f.sync_all())
            .and_then(|()| publish(&tmp, &path, false));
        let _ = std::fs::remove_file(&tmp);
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Precondition(format!(
                "volume {name} already exists on site {}",
                self.name
            )),
            _ => self.io(&path, "create", e),
        })
    }

    async fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (file, path) = self.volume_file(name, false)?;
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            match file.read_at(&mut buf[done..], at) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(&path, "read", e)),
            }
        }
        Ok(done)
    }

    async fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        let (file, path) = self.volume_file(name, true)?;
        let size = file
            .metadata()
            .map_err(|e| self.io(&path, "stat", e))?
            .len();
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > size) {
            return Err(Error::Precondition(format!(
                "write of {} bytes at offset {offset} goes past the end of volume {name} ({size} bytes)",
                data.len()
            )));
        }
        file.write_all_at(data, offset)
            .map_err(|e| self.io(&path, "write", e))
    }

    async fn allocation(&self, name: &str) -> Result<Vec<Extent>> {
        let (file, path) = self.volume_file(name, false)?;
        let site = self.clone();
        blocking(move || allocation_map(&file).map_err(|e| site.io(&path, "map", e))).await
    }

    async fn flush(&self, name: &str) -> Result<()> {
        let (file, path) = self.volume_file(name, true)?;
        file.sync_all().map_err(|e| self.io(&path, "sync", e))
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        let path = self.volume_path(name)?;
        std::fs::remove_file(&path).map_err(|e| self.io(&path, "delete", e))
    }
}

/// Data and hole extents of a file, from `SEEK_DATA`/`SEEK_HOLE`.
pub(crate) fn allocation_map(file: &std::fs::File) -> std::io::Result<Vec<Extent>> {
    use std::os::fd::AsRawFd as _;
    let size = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: lseek on a file descriptor we own for the duration of the call.
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after offset.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(u64::try_from(r).map_err(std::io::Error::other)?))
    };
    let mut out = Vec::new();
    let mut push = |offset: u64, end: u64, kind: ExtentKind| {
        if end > offset {
            out.push(Extent {
                offset,
                length: end - offset,
                kind,
            });
        }
    };
    let mut pos = 0;
    while pos < size {
        let data = seek(pos, libc::SEEK_DATA)?.unwrap_or(size).min(size);
        push(pos, data, ExtentKind::Hole);
        if data >= size {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        push(data, hole, ExtentKind::Data);
        pos = hole;
    }
    Ok(out)
}

#[async_trait]
impl ObjectStorage for LocalSite {
    fn location(&self, name: &str) -> Option<Result<String>> {
        if let Some(s3) = &self.s3 {
            return s3.location(name);
        }
        Some(
            std::fs::canonicalize(&self.root)
                .map(|root| format!("file://{}", root.join("buckets").join(name).display()))
                .map_err(|e| Error::io(format!("site directory {}", self.root.display()), e)),
        )
    }

    async fn list_buckets(&self) -> Result<Vec<String>> {
        if let Some(s3) = &self.s3 {
            return s3.list_buckets().await;
        }
        let mut out = Vec::new();
        for name in self.list_dir("buckets")? {
            if self.root.join("buckets").join(&name).is_dir() {
                out.push(name);
            }
        }
        Ok(out)
    }

    async fn create_bucket(&self, name: &str) -> Result<()> {
        let path = self.bucket_path(name)?;
        if let Some(s3) = &self.s3 {
            return s3.create_bucket(name).await;
        }
        std::fs::create_dir_all(self.root.join("buckets"))
            .map_err(|e| self.io(&path, "create", e))?;
        std::fs::create_dir(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Precondition(format!(
                "bucket {name} already exists on site {}",
                self.name
            )),
            _ => self.io(&path, "create", e),
        })
    }

    async fn bucket(&self, name: &str) -> Result<Arc<dyn ObjectStore>> {
        let path = self.bucket_path(name)?;
        if let Some(s3) = &self.s3 {
            return s3.bucket(name).await;
        }
        if !path.is_dir() {
            return Err(Error::NotFound {
                what: format!("bucket {name}"),
                site: Some(self.name.clone()),
            });
        }
        let store = LocalFileSystem::new_with_prefix(&path).map_err(|e| {
            Error::Precondition(format!("bucket {name} on site {}: {e}", self.name))
        })?;
        Ok(Arc::new(store))
    }

    async fn delete_bucket(&self, name: &str) -> Result<()> {
        let path = self.bucket_path(name)?;
        if let Some(s3) = &self.s3 {
            return s3.delete_bucket(name).await;
        }
        std::fs::remove_dir_all(&path).map_err(|e| self.io(&path, "delete", e))
    }
}

#[async_trait]
impl Compute for LocalSite {
    async fn define(&self, record: &InstanceRecord) -> Result<()> {
        let mut rec = record.clone();
        rec.state = InstanceState::Stopped;
        self.write_instance(&rec, false)
    }

    async fn start(&self, name: &str) -> Result<()> {
        self.set_state(name, InstanceState::Running)
    }

    async fn stop(&self, name: &str) -> Result<()> {
        self.set_state(name, InstanceState::Stopped)?;
        self.wait_for_exit(name).await
    }

    async fn state(&self, name: &str) -> Result<InstanceState> {
        Ok(self.read_instance(&self.instance_path(name)?)?.state)
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let path = self.instance_path(name)?;
        if self.read_instance(&path)?.state == InstanceState::Running {
            return Err(Error::Precondition(format!(
                "instance {name} on site {} is running; stop it before undefining",
                self.name
            )));
        }
        std::fs::remove_file(&path).map_err(|e| self.io(&path, "delete", e))
    }

    async fn console(&self, name: &str) -> Result<String> {
        // A manifest runs nothing, so it prints nothing.
        self.read_instance(&self.instance_path(name)?)?;
        Err(Error::NotSupported {
            operation: format!("reading the console of instance {name}"),
            site: Some(self.name.clone()),
        })
    }
}

/// How long `stop` waits for an instance's process to let go.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl LocalSite {
    /// The file a process standing for instance `name`'s guest holds a
    /// shared `flock` on while it runs (`instances/.NAME.run`).
    pub fn run_lock_path(&self, name: &str) -> Result<PathBuf> {
        let name = self.checked_name(name, "instance")?;
        Ok(self.root.join("instances").join(format!(".{name}.run")))
    }

    /// Waits until no process holds instance `name`'s run lock: once the
    /// manifest says `stopped` and this returns, the guest writes nothing
    /// more (a hypervisor's stop returns once the domain is off).
    async fn wait_for_exit(&self, name: &str) -> Result<()> {
        use std::os::fd::AsRawFd as _;
        let path = self.run_lock_path(name)?;
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.io(&path, "open", e)),
        };
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        loop {
            // SAFETY: flock on a descriptor `file` owns; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                // Released when `file` closes.
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(self.io(&path, "lock", err));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Precondition(format!(
                    "instance {name} on site {}: its process still holds {} {} s after it was told to stop",
                    self.name,
                    path.display(),
                    STOP_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn set_state(&self, name: &str, state: InstanceState) -> Result<()> {
        let mut rec = self.read_instance(&self.instance_path(name)?)?;
        if rec.state != state {
            rec.state = state;
            self.write_instance(&rec, true)?;
        }
        Ok(())
    }
}
