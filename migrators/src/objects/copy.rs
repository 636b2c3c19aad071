//! The copy engine behind [`copy_bucket`] and [`manifest`].

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fluidcloud_plugins::{ProgressSink, Retry, Retryable};
use futures::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, ObjectStore, ObjectStoreExt,
    PutMultipartOptions, PutOptions, PutPayload,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::location::{BucketLocation, S3Location, open_store};
use super::s3::S3Api;
use crate::error::{Error, Result};

/// User metadata key holding the hex BLAKE3 of an object's content.
pub const META_BLAKE3: &str = "fluidcloud-blake3";
/// User metadata key holding the hex MD5 of a single-part object, so a later
/// run can tell whether the object's ETag still matches what was written.
pub const META_MD5: &str = "fluidcloud-md5";
/// User metadata key naming the step that wrote an object (for rollback).
pub const META_STEP: &str = "fluidcloud-step";

/// How each copied object is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verify {
    /// S3 targets: the MD5 the server computed of what it stored (the ETag;
    /// for multipart uploads the MD5 of the parts' MD5s) must equal the MD5
    /// of what was read from the source, and after a server-side copy the
    /// target's size and BLAKE3 metadata must match. Directory targets are
    /// always re-read and BLAKE3-compared.
    #[default]
    Checksums,
    /// Re-read every target object and compare its BLAKE3 with the source's.
    Reread,
}

/// Tuning and behaviour of [`copy_bucket`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectCopyOptions {
    /// Objects in flight at once.
    pub concurrency: usize,
    /// Objects of at least this many bytes go up in parts, read by ranges.
    pub multipart_threshold: u64,
    /// Part size of multipart uploads (and of server-side part copies).
    pub part_size: u64,
    /// Parts in flight per large object.
    pub part_concurrency: usize,
    /// Bytes of object data held in memory at once, over all objects.
    pub memory_budget: u64,
    /// Create the target bucket (or directory) when it is missing.
    pub create_bucket: bool,
    /// Copy server-side when source and target are one S3 server and key.
    pub server_side: bool,
    /// Server-side copies of objects larger than this use `UploadPartCopy`
    /// instead of one `CopyObject` (S3 caps `CopyObject` at 5 GiB).
    pub server_side_part_threshold: u64,
    /// How copied objects are verified.
    pub verify: Verify,
    /// How long one object keeps being retried after transient failures
    /// (a target that restarts, 5xx answers) before it is listed as failed.
    #[serde(with = "secs")]
    pub retry_budget: Duration,
    /// Abort incomplete multipart uploads under the target prefix before
    /// copying (left by an interrupted earlier run).
    pub abort_incomplete_uploads: bool,
    /// Tag written objects with this step id (user metadata
    /// `fluidcloud-step`), so a rollback can find them without a record.
    pub step_tag: Option<String>,
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

impl Default for ObjectCopyOptions {
    fn default() -> Self {
        Self {
            concurrency: 48,
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            part_concurrency: 4,
            memory_budget: 1 << 30,
            create_bucket: true,
            server_side: true,
            server_side_part_threshold: 5 << 30,
            verify: Verify::Checksums,
            retry_budget: Duration::from_secs(60),
            abort_incomplete_uploads: true,
            step_tag: None,
        }
    }
}

/// One object that could not be copied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectFailure {
    /// Its key, relative to the source location.
    pub key: String,
    /// Why, for a person.
    pub error: String,
    /// Whether the last failure was of a passing kind.
    pub transient: bool,
}

/// What [`copy_bucket`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ObjectCopySummary {
    /// Objects the source listed.
    pub objects: u64,
    /// Objects written (or copied server-side) and verified.
    pub copied: u64,
    /// Objects already identical at the target, left alone.
    pub skipped: u64,
    /// Objects copied server-side (a subset of `copied`).
    pub server_side: u64,
    /// Objects that failed, with the reasons.
    pub failures: Vec<ObjectFailure>,
    /// Bytes of all listed objects.
    pub bytes_total: u64,
    /// Bytes read from the source (including hashing reads).
    pub bytes_read: u64,
    /// Bytes uploaded to the target (server-side copies move none).
    pub bytes_written: u64,
    /// Manifest digest of the objects copied or skipped (all of the
    /// source's when nothing failed); see [`Manifest`].
    pub manifest: String,
    /// Keys (relative) this run wrote at the target, where nothing identical
    /// was before.
    pub created: Vec<String>,
    /// Whether this run created the target bucket or directory.
    pub created_bucket: bool,
}

impl ObjectCopySummary {
    /// The error to report when some objects failed, naming the first few.
    pub fn failure_error(&self) -> Option<Error> {
        if self.failures.is_empty() {
            return None;
        }
        let first = self
            .failures
            .iter()
            .take(5)
            .map(|f| format!("{}: {}", f.key, f.error))
            .collect::<Vec<_>>()
            .join("; ");
        Some(Error::ObjectsFailed {
            failed: self.failures.len(),
            total: usize::try_from(self.objects).unwrap_or(usize::MAX),
            first,
            transient: self.failures.iter().all(|f| f.transient),
        })
    }
}

/// One object of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Key relative to the location.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Hex BLAKE3 of the content.
    pub blake3: String,
}

/// The sorted (key, size, BLAKE3) list of a bucket and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Entries sorted by key.
    pub entries: Vec<ManifestEntry>,
    /// `blake3-manifest:<hex>`: BLAKE3 over `key\tsize\tblake3\n` lines in
    /// key order.
    pub digest: String,
}

impl Manifest {
    /// Builds a manifest from entries in any order.
    pub fn from_entries(mut entries: Vec<ManifestEntry>) -> Self {
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        let mut h = blake3::Hasher::new();
        for e in &entries {
            h.update(format!("{}\t{}\t{}\n", e.key, e.size, e.blake3).as_bytes());
        }
        Self {
            entries,
            digest: format!("blake3-manifest:{}", h.finalize().to_hex()),
        }
    }

    /// Total bytes of the entries.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// The delay before retry number `attempt` (0-based) of one object:
/// exponential from 200 ms, capped at 5 s. Pure, so it is tested without
/// sleeping.
pub fn next_delay(attempt: u32) -> Duration {
    let ms = 200u64.saturating_mul(1u64 << attempt.min(10));
    Duration::from_millis(ms.min(5_000))
}

/// A listed object.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub(crate) key: String,
    pub(crate) size: u64,
    pub(crate) etag: Option<String>,
}

fn os_err(context: String) -> impl FnOnce(object_store::Error) -> Error {
    move |source| Error::ObjectStore { context, source }
}

/// The store path of a relative key.
fn store_path(loc: &BucketLocation, key: &str) -> Result<Path> {
    let full = match loc {
        BucketLocation::Dir { .. } => key.to_owned(),
        BucketLocation::S3(s) => s.full_key(key),
    };
    Path::parse(&full).map_err(|e| Error::InvalidArgument(format!("object key `{full}`: {e}")))
}

/// Whether a directory entry's name is one of `object_store`'s staging files
/// (`name#123`), which are not objects.
fn is_staging_name(name: &str) -> bool {
    match name.rsplit_once('#') {
        Some((_, suffix)) => !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Walks a directory. Unlike `LocalFileSystem::list`, entries that cannot be
/// read (dangling symlinks, names that are not UTF-8) are listed, so the
/// copy reports them as failures instead of silently leaving them out.
fn walk_dir(root: &FsPath) -> std::io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_staging_name(&name) {
                continue;
            }
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{}", name)
            };
            match std::fs::metadata(entry.path()) {
                Ok(m) if m.is_dir() => stack.push((entry.path(), key)),
                Ok(m) => out.push(Listed {
                    key,
                    size: m.len(),
                    etag: None,
                }),
                // Dangling symlink or unreadable entry: an object we will
                // fail to read, reported per object.
                Err(_) => out.push(Listed {
                    key,
                    size: 0,
                    etag: None,
                }),
            }
        }
    }
    Ok(out)
}

/// Lists every object of a location with keys relative to it. A missing
/// bucket or directory lists as empty when `missing_ok`.
pub(crate) async fn list(
    loc: &BucketLocation,
    store: Option<&Arc<dyn ObjectStore>>,
    missing_ok: bool,
) -> Result<Vec<Listed>> {
    match loc {
        BucketLocation::Dir { path, .. } => {
            let p = path.clone();
            let r = tokio::task::spawn_blocking(move || walk_dir(&p))
                .await
                .map_err(|e| Error::io("listing", std::io::Error::other(e)))?;
            match r {
                Ok(v) => Ok(v),
                Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
                Err(e) => Err(Error::io(format!("listing {}", path.display()), e)),
            }
        }
        BucketLocation::S3(s3) => {
            let owned;
            let store = match store {
                Some(s) => s,
                None => {
                    owned = open_store(loc)?;
                    &owned
                }
            };
            let prefix = if s3.prefix.is_empty() {
                None
            } else {
                Some(Path::from(s3.prefix.as_str()))
            };
            let strip = if s3.prefix.is_empty() {
                String::new()
            } else {
                format!("{}/", s3.prefix)
            };
            let r: std::result::Result<Vec<_>, _> = store.list(prefix.as_ref()).try_collect().await;
            match r {
                Ok(v) => Ok(v
                    .into_iter()
                    .map(|m| Listed {
                        key: m
                            .location
                            .as_ref()
                            .strip_prefix(&strip)
                            .unwrap_or(m.location.as_ref())
                            .to_owned(),
                        size: m.size,
                        etag: m.e_tag.map(|e| e.trim_matches('"').to_owned()),
                    })
                    .collect()),
                Err(object_store::Error::NotFound { .. }) if missing_ok => Ok(vec![]),
                Err(e) if missing_ok && e.to_string().contains("NoSuchBucket") => Ok(vec![]),
                Err(source) => Err(Error::ObjectStore {
                    context: format!("listing {}", s3.url),
                    source,
                }),
            }
        }
    }
}

/// Hashes one object by streaming it.
async fn hash_object(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    what: &str,
) -> Result<(blake3::Hash, u64)> {
    let got = store
        .get(path)
        .await
        .map_err(os_err(format!("reading {what}")))?;
    let mut stream = got.into_stream();
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(os_err(format!("reading {what}")))?;
        n += chunk.len() as u64;
        if chunk.len() > 1 << 20 {
            let (hh, _) = tokio::task::spawn_blocking(move || {
                h.update(&chunk);
                (h, ())
            })
            .await
            .map_err(|e| Error::io("hashing", std::io::Error::other(e)))?;
            h = hh;
        } else {
            h.update(&chunk);
        }
    }
    Ok((h.finalize(), n))
}

/// Computes the manifest of a location by reading and hashing every object
/// (metadata is not trusted), 16 at a time.
///
/// # Errors
/// When the location cannot be listed or an object cannot be read.
pub async fn manifest(location: &BucketLocation) -> Result<Manifest> {
    let store = open_store(location)?;
    let listed = list(location, Some(&store), false).await?;
    let entries: Vec<ManifestEntry> = futures::stream::iter(listed)
        .map(|l| {
            let store = Arc::clone(&store);
            async move {
                let path = store_path(location, &l.key)?;
                let what = format!("{} in {}", l.key, location.url());
                let (h, n) = hash_object(&store, &path, &what).await?;
                Ok::<_, Error>(ManifestEntry {
                    key: l.key,
                    size: n,
                    blake3: h.to_hex().to_string(),
                })
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    Ok(Manifest::from_entries(entries))
}

/// Shared state of one copy run.
struct Run {
    src: BucketLocation,
    dst: BucketLocation,
    src_store: Arc<dyn ObjectStore>,
    dst_store: Arc<dyn ObjectStore>,
    dst_api: Option<S3Api>,
    server_side: AtomicBool,
    opts: ObjectCopyOptions,
    mem: Semaphore,
    mem_units: u64,
    progress: Arc<dyn ProgressSink>,
    done: AtomicU64,
    total: u64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// How one object ended.
enum Outcome {
    Copied { blake3: String, server_side: bool },
    Skipped { blake3: String, ours: bool },
}

/// Memory is accounted in KiB permits.
fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024).max(1)
}

fn meta_value(attrs: &Attributes, key: &'static str) -> Option<String> {
    attrs
        .get(&Attribute::Metadata(key.into()))
        .map(|v| v.as_ref().to_owned())
}

fn hex_md5(data: &[u8]) -> String {
    format!("{:x}", Md5::digest(data))
}

impl Run {
    fn s3_dst(&self) -> Option<&S3Location> {
        match &self.dst {
            BucketLocation::S3(s) => Some(s),
            BucketLocation::Dir { .. } => None,
        }
    }

    async fn permit(&self, bytes: u64) -> Result<tokio::sync::SemaphorePermit<'_>> {
        let n = u32::try_from(kib(bytes).min(self.mem_units)).unwrap_or(u32::MAX);
        self.mem
            .acquire_many(n)
            .await
            .map_err(|e| Error::io("memory budget", std::io::Error::other(e)))
    }

    /// The attributes to write at the target: the source's content headers
    /// and user metadata (our own keys replaced), for S3 targets only
    /// (directories store no attributes).
    fn target_attributes(
        &self,
        src: &Attributes,
        blake3: Option<&str>,
        md5: Option<&str>,
    ) -> Attributes {
        let mut out = Attributes::new();
        if self.s3_dst().is_none() {
            return out;
        }
        for (k, v) in src.iter() {
            match k {
                Attribute::Metadata(m) if m.starts_with("fluidcloud-") => {}
                other => {
                    out.insert(other.clone(), v.clone());
                }
            }
        }
        if let Some(b) = blake3 {
            out.insert(Attribute::Metadata(META_BLAKE3.into()), b.to_owned().into());
        }
        if let Some(m) = md5 {
            out.insert(Attribute::Metadata(META_MD5.into()), m.to_owned().into());
        }
        if let Some(step) = &self.opts.step_tag {
            out.insert(Attribute::Metadata(META_STEP.into()), step.clone().into());
        }
        out
    }

    async fn head(
        store: &Arc<dyn ObjectStore>,
        path: &Path,
        what: &str,
    ) -> Result<(u64, Option<String>, Attributes)> {
        let r = store
            .get_opts(
                path,
                GetOptions {
                    head: true,
                    ..GetOptions::default()
                },
            )
            .await
            .map_err(os_err(format!("inspecting {what}")))?;
        Ok((
            r.meta.size,
            r.meta.e_tag.clone().map(|e| e.trim_matches('"').to_owned()),
            r.attributes,
        ))
    }

    /// BLAKE3 of a local file, read in a blocking task.
    async fn hash_file(&self, loc: &BucketLocation, key: &str) -> Result<String> {
        let BucketLocation::Dir { path, .. } = loc else {
            return Err(Error::InvalidArgument("not a directory location".into()));
        };
        let file = path.join(key);
        let r = tokio::task::spawn_blocking(move || {
            let mut h = blake3::Hasher::new();
            let f = std::fs::File::open(&file)
                .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
            let n = h
                .update_reader(f)
                .map_err(|e| Error::io(format!("reading {}", file.display()), e))?
                .count();
            Ok::<_, Error>((h.finalize().to_hex().to_string(), n))
        })
        .await
        .map_err(|e| Error::io("hashing", std::io::Error::other(e)))??;
        Ok(r.0)
    }

    /// Whether the target already holds exactly the source's object; the
    /// source's BLAKE3 and whether this step wrote it when so.
    async fn identical(&self, l: &Listed, tgt: &Listed) -> Result<Option<(String, bool)>> {
        if tgt.size != l.size {
            return Ok(None);
        }
        let src_path = store_path(&self.src, &l.key)?;
        let dst_path = store_path(&self.dst, &l.key)?;
        let dst_what = format!("{} at {}", l.key, self.dst.url());
        let (tgt_b3, ours) = match &self.dst {
            BucketLocation::Dir { .. } => (self.hash_file(&self.dst, &l.key).await?, false),
            BucketLocation::S3(_) => {
                let (_, etag, attrs) = Self::head(&self.dst_store, &dst_path, &dst_what).await?;
                let Some(b3) = meta_value(&attrs, META_BLAKE3) else {
                    return Ok(None);
                };
                // An object rewritten behind our back with our metadata
                // copied along no longer has the ETag we recorded.
                if let (Some(md5), Some(etag)) = (meta_value(&attrs, META_MD5), etag.as_deref())
                    && !etag.contains('-')
                    && md5 != etag
                {
                    return Ok(None);
                }
                let ours = self.opts.step_tag.is_some()
                    && meta_value(&attrs, META_STEP) == self.opts.step_tag;
                (b3, ours)
            }
        };
        let src_b3 = match &self.src {
            BucketLocation::Dir { .. } => self.hash_file(&self.src, &l.key).await?,
            BucketLocation::S3(_) => {
                let what = format!("{} at {}", l.key, self.src.url());
                let (_, etag, attrs) = Self::head(&self.src_store, &src_path, &what).await?;
                match meta_value(&attrs, META_BLAKE3) {
                    Some(b) => b,
                    None => {
                        let plain_equal = matches!((&etag, &tgt.etag),
                            (Some(a), Some(b)) if a == b && !a.contains('-'));
                        if plain_equal {
                            tgt_b3.clone()
                        } else {
                            let (h, n) = hash_object(&self.src_store, &src_path, &what).await?;
                            self.bytes_read.fetch_add(n, Ordering::Relaxed);
                            h.to_hex().to_string()
                        }
                    }
                }
            }
        };
        Ok((src_b3 == tgt_b3).then_some((src_b3, ours)))
    }

    /// Re-reads a target object and compares its BLAKE3.
    async fn reread_verify(&self, key: &str, expected: &str) -> Result<()> {
        let path = store_path(&self.dst, key)?;
        let what = format!("{key} at {}", self.dst.url());
        let (h, _) = hash_object(&self.dst_store, &path, &what).await?;
        let got = h.to_hex().to_string();
        if got != expected {
            return Err(Error::Corrupt {
                what: format!("{what} (verification: BLAKE3 {got}, source has {expected})"),
                offset: 0,
            });
        }
        Ok(())
    }

    fn needs_reread(&self) -> bool {
        self.opts.verify == Verify::Reread || self.s3_dst().is_none()
    }

    /// Copies an object of fewer than `multipart_threshold` bytes in one PUT.
    async fn copy_small(&self, key: &str) -> Result<String> {
        let src_path = store_path(&self.src, key)?;
        let dst_path = store_path(&self.dst, key)?;
        let what = format!("{key} at {}", self.src.url());
        let got = self
            .src_store
            .get(&src_path)
            .await
            .map_err(os_err(format!("reading {what}")))?;
        let _permit = self.permit(got.meta.size).await?;
        let attrs = got.attributes.clone();
        let data = got
            .bytes()
            .await
            .map_err(os_err(format!("reading {what}")))?;
        self.bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let (b3, md5) = if data.len() > 1 << 20 {
            let d = data.clone();
            tokio::task::spawn_blocking(move || {
                (blake3::hash(&d).to_hex().to_string(), hex_md5(&d))
            })
            .await
            .map_err(|e| Error::io("hashing", std::io::Error::other(e)))?
        } else {
            (blake3::hash(&data).to_hex().to_string(), hex_md5(&data))
        };
        let attributes = self.target_attributes(&attrs, Some(&b3), Some(&md5));
        let len = data.len() as u64;
        let put = self
            .dst_store
            .put_opts(
                &dst_path,
                PutPayload::from(data),
                PutOptions {
                    attributes,
                    ..PutOptions::default()
                },
            )
            .await
            .map_err(os_err(format!("writing {key} to {}", self.dst.url())))?;
        self.bytes_written.fetch_add(len, Ordering::Relaxed);
        if self.s3_dst().is_some() {
            let etag = put.e_tag.unwrap_or_default();
            let etag = etag.trim_matches('"');
            if etag != md5 {
                return Err(Error::Corrupt {
                    what: format!(
                        "{key} at {} (verification: server MD5 {etag}, sent {md5})",
                        self.dst.url()
                    ),
                    offset: 0,
                });
            }
        }
        if self.needs_reread() {
            self.reread_verify(key, &b3).await?;
        }
        Ok(b3)
    }

    /// Copies a large object in parts: ranged reads of the source, several
    /// parts uploading at once, MD5 per part for the ETag check and one
    /// BLAKE3 over the whole in order.
    async fn copy_large(&self, key: &str, size: u64) -> Result<String> {
        let src_path = store_path(&self.src, key)?;
        let dst_path = store_path(&self.dst, key)?;
        let what = format!("{key} at {}", self.src.url());
        let (size, _, attrs) = if matches!(self.src, BucketLocation::S3(_)) {
            Self::head(&self.src_store, &src_path, &what).await?
        } else {
            (size, None, Attributes::new())
        };
        let known = meta_value(&attrs, META_BLAKE3);
        let attributes = self.target_attributes(&attrs, known.as_deref(), None);
        let mut upload = self
            .dst_store
            .put_multipart_opts(
                &dst_path,
                PutMultipartOptions {
                    attributes,
                    ..PutMultipartOptions::default()
                },
            )
            .await
            .map_err(os_err(format!(
                "starting an upload of {key} to {}",
                self.dst.url()
            )))?;
        let part = self.opts.part_size.max(5 << 20);
        let ranges: Vec<Range<u64>> = (0..size.div_ceil(part))
            .map(|i| i * part..((i + 1) * part).min(size))
            .collect();
        let pc = self.opts.part_concurrency.max(1);
        let (sp, wt) = (&src_path, &what);
        let body = async {
            let mut reads = futures::stream::iter(ranges)
                .map(|r| async move {
                    let permit = self.permit(r.end - r.start).await?;
                    let b = self
                        .src_store
                        .get_range(sp, r.clone())
                        .await
                        .map_err(os_err(format!("reading {wt} bytes {r:?}")))?;
                    if b.len() as u64 != r.end - r.start {
                        return Err(Error::Corrupt {
                            what: format!(
                                "{wt}: short read of bytes {r:?} (changed while copying?)"
                            ),
                            offset: r.start + b.len() as u64,
                        });
                    }
                    Ok::<_, Error>((b, permit))
                })
                .buffered(pc);
            let mut hasher = blake3::Hasher::new();
            let mut md5s: Vec<u8> = Vec::new();
            let mut parts = 0usize;
            let mut inflight = FuturesUnordered::new();
            while let Some(item) = reads.next().await {
                let (b, permit) = item?;
                self.bytes_read.fetch_add(b.len() as u64, Ordering::Relaxed);
                let d = b.clone();
                let (h, m) = tokio::task::spawn_blocking(move || {
                    hasher.update(&d);
                    (hasher, Md5::digest(&d))
                })
                .await
                .map_err(|e| Error::io("hashing", std::io::Error::other(e)))?;
                hasher = h;
                md5s.extend_from_slice(&m);
                parts += 1;
                let len = b.len() as u64;
                let fut = upload.put_part(PutPayload::from(b));
                inflight.push(async move {
                    let r = fut.await;
                    drop(permit);
                    r.map(|()| len)
                });
                while inflight.len() >= pc {
                    if let Some(r) = inflight.next().await {
                        let n = r.map_err(os_err(format!("uploading a part of {key}")))?;
                        self.bytes_written.fetch_add(n, Ordering::Relaxed);
                    }
                }
            }
            while let Some(r) = inflight.next().await {
                let n = r.map_err(os_err(format!("uploading a part of {key}")))?;
                self.bytes_written.fetch_add(n, Ordering::Relaxed);
            }
            Ok::<_, Error>((hasher.finalize().to_hex().to_string(), md5s, parts))
        }
        .await;
        let (b3, md5s, parts) = match body {
            Ok(v) => v,
            Err(e) => {
                let _ = upload.abort().await;
                return Err(e);
            }
        };
        let put = match upload.complete().await {
            Ok(p) => p,
            Err(e) => {
                let _ = upload.abort().await;
                return Err(os_err(format!("completing the upload of {key}"))(e));
            }
        };
        if let Some(dst) = self.s3_dst() {
            let expected = format!("{:x}-{parts}", Md5::digest(&md5s));
            let etag = put.e_tag.unwrap_or_default();
            let etag = etag.trim_matches('"');
            if etag != expected {
                return Err(Error::Corrupt {
                    what: format!(
                        "{key} at {} (verification: server multipart MD5 {etag}, sent {expected})",
                        self.dst.url()
                    ),
                    offset: 0,
                });
            }
            if known.as_deref() != Some(b3.as_str()) {
                // The content hash is known only now: record it with an
                // in-place copy (metadata only on Garage and S3).
                let api = self.api()?;
                let attrs = self.target_attributes(&attrs, Some(&b3), None);
                let full = dst.full_key(key);
                api.copy_object(&dst.bucket, &full, &dst.bucket, &full, &headers_of(&attrs))
                    .await?;
            }
        }
        if self.needs_reread() {
            self.reread_verify(key, &b3).await?;
        }
        Ok(b3)
    }

    fn api(&self) -> Result<&S3Api> {
        self.dst_api
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("no S3 client for the target".into()))
    }

    /// Server-side copy within one S3 server: the data never leaves it.
    async fn copy_server_side(&self, key: &str) -> Result<String> {
        let (BucketLocation::S3(src), Some(dst)) = (&self.src, self.s3_dst()) else {
            return Err(Error::InvalidArgument(
                "server-side copy needs two S3 locations".into(),
            ));
        };
        let api = self.api()?;
        let src_path = store_path(&self.src, key)?;
        let what = format!("{key} at {}", self.src.url());
        let (size, src_etag, attrs) = Self::head(&self.src_store, &src_path, &what).await?;
        let b3 = match meta_value(&attrs, META_BLAKE3) {
            Some(b) => b,
            None => {
                let (h, n) = hash_object(&self.src_store, &src_path, &what).await?;
                self.bytes_read.fetch_add(n, Ordering::Relaxed);
                h.to_hex().to_string()
            }
        };
        let md5 = src_etag.clone().filter(|e| !e.contains('-'));
        let headers = headers_of(&self.target_attributes(&attrs, Some(&b3), md5.as_deref()));
        let (sk, dk) = (src.full_key(key), dst.full_key(key));
        if size <= self.opts.server_side_part_threshold {
            api.copy_object(&src.bucket, &sk, &dst.bucket, &dk, &headers)
                .await?;
        } else {
            let id = api.create_multipart(&dst.bucket, &dk, &headers).await?;
            let part = self.opts.part_size.max(5 << 20);
            let n = size.div_ceil(part);
            let r: Result<Vec<String>> = futures::stream::iter(0..n)
                .map(|i| {
                    let (sk, dk, id) = (&sk, &dk, &id);
                    async move {
                        let first = i * part;
                        let last = ((i + 1) * part).min(size) - 1;
                        api.upload_part_copy(
                            &src.bucket,
                            sk,
                            &dst.bucket,
                            dk,
                            id,
                            usize::try_from(i + 1).unwrap_or(usize::MAX),
                            first,
                            last,
                        )
                        .await
                    }
                })
                .buffered(self.opts.part_concurrency.max(1) * 2)
                .try_collect()
                .await;
            let done = match r {
                Ok(etags) => api.complete_multipart(&dst.bucket, &dk, &id, &etags).await,
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                let _ = api.abort_multipart(&dst.bucket, &dk, &id).await;
                return Err(e);
            }
        }
        // Verify what the server now holds under the target key.
        let dst_path = store_path(&self.dst, key)?;
        let dst_what = format!("{key} at {}", self.dst.url());
        let (tsize, tetag, tattrs) = Self::head(&self.dst_store, &dst_path, &dst_what).await?;
        let tb3 = meta_value(&tattrs, META_BLAKE3);
        let etag_ok = match (&md5, &tetag) {
            (Some(a), Some(b)) if !b.contains('-') => a == b,
            _ => true,
        };
        if tsize != size || tb3.as_deref() != Some(b3.as_str()) || !etag_ok {
            return Err(Error::Corrupt {
                what: format!(
                    "{dst_what} (verification after server-side copy: size {tsize}, ETag {tetag:?}; expected size {size}, ETag {md5:?})"
                ),
                offset: 0,
            });
        }
        if self.opts.verify == Verify::Reread {
            self.reread_verify(key, &b3).await?;
        }
        Ok(b3)
    }

    async fn copy_once(&self, l: &Listed, tgt: Option<&Listed>) -> Result<Outcome> {
        if let Some(t) = tgt
            && let Some((blake3, ours)) = self.identical(l, t).await?
        {
            return Ok(Outcome::Skipped { blake3, ours });
        }
        if self.server_side.load(Ordering::Relaxed) {
            match self.copy_server_side(&l.key).await {
                Ok(blake3) => {
                    return Ok(Outcome::Copied {
                        blake3,
                        server_side: true,
                    });
                }
                // Not allowed or not implemented by the server: stream
                // instead, from now on.
                Err(Error::S3 {
                    status: Some(400 | 403 | 405 | 501),
                    ..
                }) => self.server_side.store(false, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        let blake3 = if l.size >= self.opts.multipart_threshold {
            self.copy_large(&l.key, l.size).await?
        } else {
            self.copy_small(&l.key).await?
        };
        Ok(Outcome::Copied {
            blake3,
            server_side: false,
        })
    }

    /// Copies one object, retrying passing failures within the budget.
    async fn copy_one(&self, l: &Listed, tgt: Option<&Listed>) -> Result<Outcome> {
        let start = Instant::now();
        let mut attempt = 0u32;
        let mut corrupt_retries = 0;
        loop {
            match self.copy_once(l, tgt).await {
                Ok(o) => return Ok(o),
                Err(e) => {
                    // A verification mismatch is re-copied once; a passing
                    // fault until the budget is spent.
                    let again = match (&e, e.retry()) {
                        (Error::Corrupt { .. }, _) => {
                            corrupt_retries += 1;
                            corrupt_retries <= 1
                        }
                        (_, Retry::Never) => false,
                        _ => start.elapsed() < self.opts.retry_budget,
                    };
                    if !again {
                        return Err(e);
                    }
                    tokio::time::sleep(next_delay(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// The HTTP headers of a set of attributes, for the signed requests.
fn headers_of(attrs: &Attributes) -> Vec<(String, String)> {
    attrs
        .iter()
        .filter_map(|(k, v): (&Attribute, &AttributeValue)| {
            let name = match k {
                Attribute::ContentType => "content-type".to_owned(),
                Attribute::ContentEncoding => "content-encoding".to_owned(),
                Attribute::ContentDisposition => "content-disposition".to_owned(),
                Attribute::ContentLanguage => "content-language".to_owned(),
                Attribute::CacheControl => "cache-control".to_owned(),
                Attribute::Metadata(m) => format!("x-amz-meta-{m}"),
                _ => return None,
            };
            Some((name, v.as_ref().to_owned()))
        })
        .collect()
}

/// Ensures the target bucket or directory exists; whether it was created.
async fn ensure_target(dst: &BucketLocation, api: Option<&S3Api>, create: bool) -> Result<bool> {
    match dst {
        BucketLocation::Dir { path, .. } => {
            if path.is_dir() {
                return Ok(false);
            }
            if !create {
                return Err(Error::io(
                    format!("target directory {}", path.display()),
                    std::io::ErrorKind::NotFound.into(),
                ));
            }
            tokio::fs::create_dir_all(path)
                .await
                .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
            Ok(true)
        }
        BucketLocation::S3(s3) => {
            let api = api.ok_or_else(|| Error::InvalidArgument("no S3 client".into()))?;
            if api.bucket_exists(&s3.bucket).await? {
                return Ok(false);
            }
            if !create {
                return Err(Error::S3 {
                    operation: "HeadBucket".into(),
                    resource: s3.url.clone(),
                    status: Some(404),
                    message: "the target bucket does not exist and creating it is off".into(),
                });
            }
            api.create_bucket(&s3.bucket).await
        }
    }
}

/// Copies every object of `source` to `target`. See the module docs of
/// [`crate::objects`] for what is skipped, verified and retried.
///
/// Failed objects do not stop the others: they are listed in
/// [`ObjectCopySummary::failures`] (turn them into an error with
/// [`ObjectCopySummary::failure_error`]).
///
/// # Errors
/// When a location cannot be opened, the target cannot be created, or the
/// source cannot be listed.
pub async fn copy_bucket(
    source: &BucketLocation,
    target: &BucketLocation,
    opts: &ObjectCopyOptions,
    progress: Arc<dyn ProgressSink>,
) -> Result<ObjectCopySummary> {
    if source.url() == target.url() {
        return Err(Error::InvalidArgument(format!(
            "source and target are the same location {}",
            source.url()
        )));
    }
    let src_store = open_store(source)?;
    let dst_api = match target {
        BucketLocation::S3(s) => Some(S3Api::new(s)?),
        BucketLocation::Dir { .. } => None,
    };
    let server_side = match (source, &dst_api) {
        (BucketLocation::S3(s), Some(d)) if opts.server_side => S3Api::new(s)?.same_server(d),
        _ => false,
    };
    let created_bucket = ensure_target(target, dst_api.as_ref(), opts.create_bucket).await?;
    let dst_store = open_store(target)?;
    if let (BucketLocation::S3(s), Some(api), true) =
        (target, &dst_api, opts.abort_incomplete_uploads)
    {
        // Uploads an interrupted run left behind hold space; a re-run
        // starts those objects afresh.
        if let Ok(uploads) = api.list_multipart_uploads(&s.bucket, &s.prefix).await {
            for (key, id) in uploads {
                let _ = api.abort_multipart(&s.bucket, &key, &id).await;
            }
        }
    }
    let (listed, existing) = futures::try_join!(
        list(source, Some(&src_store), false),
        list(target, Some(&dst_store), true)
    )?;
    let existing: HashMap<String, Listed> =
        existing.into_iter().map(|l| (l.key.clone(), l)).collect();
    let total: u64 = listed.iter().map(|l| l.size).sum();
    let mem_units = kib(opts
        .memory_budget
        .max(opts.part_size.max(opts.multipart_threshold)));
    let run = Run {
        src: source.clone(),
        dst: target.clone(),
        src_store,
        dst_store,
        dst_api,
        server_side: AtomicBool::new(server_side),
        opts: opts.clone(),
        mem: Semaphore::new(usize::try_from(mem_units).unwrap_or(usize::MAX)),
        mem_units,
        progress,
        done: AtomicU64::new(0),
        total,
        bytes_read: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
    };
    let run = &run;
    let existing = &existing;
    let mut summary = ObjectCopySummary {
        objects: listed.len() as u64,
        bytes_total: total,
        created_bucket,
        ..ObjectCopySummary::default()
    };
    // Large objects first, so their parts overlap with the many small ones.
    let mut order = listed;
    order.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.key.cmp(&b.key)));
    let mut results = futures::stream::iter(order)
        .map(|l| async move {
            let r = run.copy_one(&l, existing.get(&l.key)).await;
            let done = run.done.fetch_add(l.size, Ordering::Relaxed) + l.size;
            run.progress.progress(done, Some(run.total));
            (l, r)
        })
        .buffer_unordered(opts.concurrency.max(1));
    let mut entries = Vec::new();
    while let Some((l, r)) = results.next().await {
        match r {
            Ok(Outcome::Copied {
                blake3,
                server_side,
            }) => {
                summary.copied += 1;
                summary.server_side += u64::from(server_side);
                summary.created.push(l.key.clone());
                entries.push(ManifestEntry {
                    key: l.key,
                    size: l.size,
                    blake3,
                });
            }
            Ok(Outcome::Skipped { blake3, ours }) => {
                summary.skipped += 1;
                if ours {
                    summary.created.push(l.key.clone());
                }
                entries.push(ManifestEntry {
                    key: l.key,
                    size: l.size,
                    blake3,
                });
            }
            Err(e) => {
                run.progress
                    .message(&format!("object {} failed: {e}", l.key));
                summary.failures.push(ObjectFailure {
                    key: l.key,
                    transient: e.retry() != Retry::Never,
                    error: e.to_string(),
                });
            }
        }
    }
    drop(results);
    summary.failures.sort_by(|a, b| a.key.cmp(&b.key));
    summary.created.sort();
    summary.bytes_read = run.bytes_read.load(Ordering::Relaxed);
    summary.bytes_written = run.bytes_written.load(Ordering::Relaxed);
    summary.manifest = Manifest::from_entries(entries).digest;
    Ok(summary)
}

/// Deletes `keys` (relative) at a location, and the bucket or directory
/// itself when `bucket` is set and it is then empty. Missing objects are
/// fine. Used by the migrator's rollback.
///
/// # Errors
/// When a deletion fails for another reason than the object being gone.
pub async fn delete_objects(
    location: &BucketLocation,
    keys: &[String],
    bucket: bool,
) -> Result<()> {
    let store = match open_store(location) {
        Ok(s) => s,
        // A directory that is gone has nothing left to delete.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let results: Vec<Result<()>> = futures::stream::iter(keys.to_vec())
        .map(|k: String| {
            let store = Arc::clone(&store);
            async move {
                let p = store_path(location, &k)?;
                match store.delete(&p).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(source) => Err(Error::ObjectStore {
                        context: format!("deleting {k} at {}", location.url()),
                        source,
                    }),
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    if bucket {
        match location {
            BucketLocation::Dir { path, .. } => {
                let p = path.clone();
                tokio::task::spawn_blocking(move || remove_empty_dirs(&p))
                    .await
                    .map_err(|e| Error::io("removing directories", std::io::Error::other(e)))?;
            }
            BucketLocation::S3(s3) => {
                if s3.prefix.is_empty() && list(location, Some(&store), true).await?.is_empty() {
                    match S3Api::new(s3)?.delete_bucket(&s3.bucket).await {
                        Ok(())
                        | Err(Error::S3 {
                            status: Some(404), ..
                        }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Removes a directory tree bottom-up as far as it is empty.
fn remove_empty_dirs(dir: &FsPath) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_dirs(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Keys at an S3 location whose `fluidcloud-step` metadata names `step`.
///
/// # Errors
/// When the location cannot be listed or inspected.
pub async fn keys_tagged(location: &BucketLocation, step: &str) -> Result<Vec<String>> {
    if matches!(location, BucketLocation::Dir { .. }) {
        return Ok(vec![]);
    }
    let store = open_store(location)?;
    let listed = list(location, Some(&store), true).await?;
    let tagged: Vec<Option<String>> = futures::stream::iter(listed)
        .map(|l| {
            let store = Arc::clone(&store);
            async move {
                let p = store_path(location, &l.key)?;
                let (_, _, attrs) = Run::head(&store, &p, &l.key).await?;
                Ok::<_, Error>(
                    (meta_value(&attrs, META_STEP).as_deref() == Some(step)).then_some(l.key),
                )
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    Ok(tagged.into_iter().flatten().collect())
}

/// Bytes and object count of a location, by listing (for planning).
///
/// # Errors
/// When the location cannot be opened or listed.
pub async fn usage(location: &BucketLocation) -> Result<(u64, u64)> {
    let store = match location {
        BucketLocation::S3(_) => Some(open_store(location)?),
        BucketLocation::Dir { .. } => None,
    };
    let listed = list(location, store.as_ref(), false).await?;
    Ok((listed.len() as u64, listed.iter().map(|l| l.size).sum()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        assert_eq!(next_delay(0), Duration::from_millis(200));
        assert_eq!(next_delay(1), Duration::from_millis(400));
        assert_eq!(next_delay(4), Duration::from_millis(3200));
        assert_eq!(next_delay(5), Duration::from_secs(5));
        assert_eq!(next_delay(400), Duration::from_secs(5));
    }

    #[test]
    fn manifest_digest_ignores_order_and_sees_every_field() {
        let e = |k: &str, s, b: &str| ManifestEntry {
            key: k.into(),
            size: s,
            blake3: b.into(),
        };
        let a = Manifest::from_entries(vec![e("a", 1, "x"), e("b", 2, "y")]);
        let b = Manifest::from_entries(vec![e("b", 2, "y"), e("a", 1, "x")]);
        assert_eq!(a.digest, b.digest);
        assert!(a.digest.starts_with("blake3-manifest:"));
        assert_eq!(a.bytes(), 3);
        for changed in [
            vec![e("a", 1, "x"), e("b", 3, "y")],
            vec![e("a", 1, "x"), e("b", 2, "z")],
            vec![e("a", 1, "x"), e("c", 2, "y")],
        ] {
            assert_ne!(Manifest::from_entries(changed).digest, a.digest);
        }
    }

    #[test]
    fn staging_files_are_not_objects() {
        assert!(is_staging_name("a.bin#12"));
        assert!(!is_staging_name("a#b"));
        assert!(!is_staging_name("a#"));
        assert!(!is_staging_name("plain"));
    }

    #[test]
    fn failure_error_names_keys_and_classifies() {
        let mut s = ObjectCopySummary {
            objects: 3,
            ..ObjectCopySummary::default()
        };
        assert!(s.failure_error().is_none());
        s.failures.push(ObjectFailure {
            key: "k1".into(),
            error: "boom".into(),
            transient: true,
        });
        let e = s.failure_error().unwrap();
        assert!(e.to_string().contains("k1: boom"), "{e}");
        assert_eq!(e.retry(), Retry::Transient);
        s.failures.push(ObjectFailure {
            key: "k2".into(),
            error: "gone".into(),
            transient: false,
        });
        assert_eq!(s.failure_error().unwrap().retry(), Retry::Never);
    }
}
