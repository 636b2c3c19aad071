//! Disks as EBS snapshots, through the EBS direct APIs.
//!
//! A disk `NAME` of a store is the latest *completed* snapshot tagged
//! `fluidcloud:store` (`image` or `volume`) and `fluidcloud:name=NAME`;
//! its guest size is the tag `fluidcloud:size` (snapshots count whole
//! GiB). Blocks are 512 KiB, EBS's unit.
//!
//! - **Reading** lists the snapshot's blocks (`ListSnapshotBlocks`): the
//!   blocks it lists are data, the rest holes, never fetched. Blocks are
//!   fetched (`GetSnapshotBlock`) in parallel, each checked against the
//!   SHA-256 EBS returns with it.
//! - **Writing** starts a snapshot (`StartSnapshot`, tagged with the owner
//!   and size) and puts only the blocks that hold data, each with its
//!   SHA-256, from several threads; `finish` completes it
//!   (`CompleteSnapshot` with the count of blocks put). A second write of
//!   the same disk (the final delta, a resumed transfer) starts a child of
//!   the last snapshot (`ParentSnapshotId`) and puts only the blocks that
//!   differ from it, as the transfer's Merkle comparison finds them: EBS's
//!   own `ListChangedBlocks` is not asked (see `docs/aws.md`). The child
//!   names its parent in `fluidcloud:parent`, and a reader takes the blocks
//!   of the parent the child does not list: on AWS the child lists them all
//!   already, on an endpoint that ignores `ParentSnapshotId` (moto) this is
//!   what makes the child whole.
//! - What a write put is also kept in a sparse scratch file until `finish`,
//!   so the transfer reads back what it wrote without fetching it (EBS
//!   cannot read a snapshot that is not completed).
//! - A write that fails or is dropped unfinished deletes its snapshot.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use aws_sdk_ebs::config::http::HttpResponse;
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAlgorithm, Tag};
use base64::Engine as _;
use fluidcloud_migrators::image::{Extent, ExtentKind, ImageReader};
use fluidcloud_migrators::owner::same_relocation;
use fluidcloud_plugins::{Diagnostic, Error, ImageFormat, Result};
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::ec2::Snapshot;
use super::{Api, Aws};
use crate::driver::{DiskStore, DiskWriter, Disks, ImageRecord, ImageStore};

/// EBS's block size.
pub(crate) const BLOCK: u64 = 512 << 10;
const GIB: u64 = 1 << 30;
/// Blocks fetched or put at once by one reader or writer.
const PARALLEL: usize = 16;

const TAG_STORE: &str = "fluidcloud:store";
const TAG_NAME: &str = "fluidcloud:name";
const TAG_OWNER: &str = "fluidcloud:owner";
const TAG_SIZE: &str = "fluidcloud:size";
const TAG_PARENT: &str = "fluidcloud:parent";
/// The snapshot's place in its disk's chain: 0, 1, …
const TAG_SEQ: &str = "fluidcloud:seq";
/// `writing` from the start, `complete` once completed: some endpoints
/// (moto) call a snapshot completed before it is.
const TAG_STATE: &str = "fluidcloud:state";

/// Disk names are 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with a dot.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if crate::relocate::lock::is_plain_name(name) {
        Ok(())
    } else {
        Err(Error::Invalid(vec![Diagnostic::error(format!(
            "`{name}` cannot name a disk of an aws site (1 to 128 of A-Z a-z 0-9 . _ -, not starting with a dot)"
        ))]))
    }
}

fn b64(digest: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(digest)
}

fn io_err(e: &Error) -> fluidcloud_migrators::Error {
    let kind = match e {
        Error::Transient(_) => std::io::ErrorKind::TimedOut,
        Error::NotFound { .. } => std::io::ErrorKind::NotFound,
        Error::PermissionDenied { .. } => std::io::ErrorKind::PermissionDenied,
        _ => std::io::ErrorKind::Other,
    };
    fluidcloud_migrators::Error::Io {
        context: e.to_string(),
        source: std::io::Error::new(kind, e.to_string()),
    }
}

/// The SDK's error of call `call`, classified as [`super::classify`] does.
fn sdk_err<E>(site: &str, call: &str, e: &aws_sdk_ebs::error::SdkError<E, HttpResponse>) -> Error
where
    E: aws_sdk_ebs::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_sdk_ebs::error::{DisplayErrorContext, SdkError};
    match e {
        SdkError::ServiceError(s) => {
            let m = s.err();
            super::classify(
                site,
                &format!("EBS {call}"),
                s.raw().status().as_u16(),
                m.code().unwrap_or("?"),
                m.message().unwrap_or(""),
            )
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Error::Transient(format!("EBS {call}: {}", DisplayErrorContext(e)))
        }
        other => Error::Precondition(format!(
            "site {site}: EBS {call}: {}",
            DisplayErrorContext(other)
        )),
    }
}

/// The place of `snap` in its disk's chain (`fluidcloud:seq`, counted
/// from 0).
fn seq_of(snap: &Snapshot) -> u64 {
    snap.tag(TAG_SEQ).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The sequence number of the next snapshot of `chain`.
fn next_seq(chain: &[Snapshot]) -> u64 {
    chain.iter().map(seq_of).max().map_or(0, |m| m + 1)
}

/// The guest size of the disk snapshot `snap` holds.
fn size_of(snap: &Snapshot) -> u64 {
    snap.tag(TAG_SIZE)
        .and_then(|s| s.parse().ok())
        .unwrap_or(snap.volume_gib * GIB)
}

impl Snapshot {
    fn complete(&self) -> bool {
        self.state == "completed" && self.tag(TAG_STATE) == Some("complete")
    }
}

impl Api {
    /// Every snapshot of disk `name` of `store`, oldest first.
    async fn chain_of(&self, store: DiskStore, name: &str) -> Result<Vec<Snapshot>> {
        let mut chain: Vec<Snapshot> = self
            .snapshots(TAG_NAME, Some(name))
            .await?
            .into_iter()
            .filter(|s| s.tag(TAG_STORE) == Some(store.as_str()))
            .collect();
        // Start times count seconds: two snapshots of one second are
        // ordered by their sequence number.
        chain.sort_by_key(seq_of);
        Ok(chain)
    }

    /// The latest complete snapshot of disk `name` of `store`.
    async fn latest(&self, store: DiskStore, name: &str) -> Result<Option<Snapshot>> {
        Ok(self
            .chain_of(store, name)
            .await?
            .into_iter()
            .rev()
            .find(Snapshot::complete))
    }

    /// [`Self::latest`], or `NotFound`.
    async fn existing(&self, store: DiskStore, name: &str) -> Result<Snapshot> {
        check_name(name)?;
        self.latest(store, name)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: format!("{} {name}", store.as_str()),
                site: Some(self.name.clone()),
            })
    }

    /// The latest complete snapshot of disk `name` of `store` and the
    /// disk's guest size, or `NotFound`.
    pub(crate) async fn latest_with_size(
        &self,
        store: DiskStore,
        name: &str,
    ) -> Result<(String, u64)> {
        let snap = self.existing(store, name).await?;
        let size = size_of(&snap);
        Ok((snap.id, size))
    }

    /// Keeps what volume `volume` holds as the latest snapshot of disk
    /// `name` of `store` (an instance's guest wrote there, not into the
    /// snapshots it started from).
    pub(crate) async fn keep_volume(
        &self,
        store: DiskStore,
        name: &str,
        volume: &str,
        owner: Option<&str>,
    ) -> Result<()> {
        let (_, size) = self.latest_with_size(store, name).await?;
        let chain = self.chain_of(store, name).await?;
        let mut tags = vec![
            (TAG_STORE.to_owned(), store.as_str().to_owned()),
            (TAG_NAME.to_owned(), name.to_owned()),
            (TAG_SIZE.to_owned(), size.to_string()),
            (TAG_STATE.to_owned(), "writing".to_owned()),
            (TAG_SEQ.to_owned(), next_seq(&chain).to_string()),
        ];
        if let Some(o) = owner {
            tags.push((TAG_OWNER.to_owned(), o.to_owned()));
        }
        let id = self.snapshot_volume(volume, &tags).await?;
        if let Err(e) = self.wait_snapshot(&id).await {
            let _ = self.delete_snapshot(&id).await;
            return Err(e);
        }
        self.mark_complete(store, name, &id, owner).await
    }

    /// Volume `volume` as it holds `size` guest bytes now: a snapshot of
    /// it (tagged as read for `of`), deleted when the reader goes.
    async fn open_volume(&self, volume: &str, size: u64, of: &str) -> Result<SnapshotReader> {
        let tags = [
            ("fluidcloud:read-of".to_owned(), of.to_owned()),
            (TAG_SIZE.to_owned(), size.to_string()),
        ];
        let id = self.snapshot_volume(volume, &tags).await?;
        let opened = async {
            self.wait_snapshot(&id).await?;
            let taken = self.snapshot(&id).await?.ok_or_else(|| Error::NotFound {
                what: format!("snapshot {id} of volume {volume}"),
                site: Some(self.name.clone()),
            })?;
            self.open_snapshot(&taken).await
        }
        .await;
        match opened {
            Ok(mut r) => {
                r.temporary = Some(id);
                Ok(r)
            }
            Err(e) => {
                let _ = self.delete_snapshot(&id).await;
                Err(e)
            }
        }
    }

    /// The size of EBS volume `name` when disk `name` of `store` is not a
    /// disk fluidcloud keeps but a volume (`vol-…`) of an instance it did
    /// not define.
    async fn foreign_volume(&self, store: DiskStore, name: &str) -> Result<Option<u64>> {
        if !name.starts_with("vol-") || self.latest(store, name).await?.is_some() {
            return Ok(None);
        }
        Ok(self.volume_gib(name).await?.map(|g| g * GIB))
    }

    /// Opens disk `name` of `store` as its guest sees it now: from the
    /// volume of the instance it is attached to, if one was launched,
    /// else from its latest snapshot.
    async fn open_disk(&self, store: DiskStore, name: &str) -> Result<SnapshotReader> {
        if let Some(size) = self.foreign_volume(store, name).await? {
            return self.open_volume(name, size, name).await;
        }
        let snap = self.existing(store, name).await?;
        match self.attached(store, name).await? {
            Some((_, volume)) => self.open_volume(&volume, size_of(&snap), &snap.id).await,
            None => self.open_snapshot(&snap).await,
        }
    }

    /// Every name of `store`, sorted.
    pub(crate) async fn names(&self, store: DiskStore) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .snapshots(TAG_STORE, Some(store.as_str()))
            .await?
            .into_iter()
            .filter(Snapshot::complete)
            .filter_map(|s| s.tag(TAG_NAME).map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Opens snapshot `snap`, with the parents it names, for reading.
    async fn open_snapshot(&self, snap: &Snapshot) -> Result<SnapshotReader> {
        let size = size_of(snap);
        let siblings = match snap.tag(TAG_PARENT) {
            Some(_) => self.snapshots(TAG_NAME, snap.tag(TAG_NAME)).await?,
            None => Vec::new(),
        };
        let mut chain = vec![snap.id.clone()];
        let mut at = snap.tag(TAG_PARENT).map(str::to_owned);
        while let Some(parent) = at.take().filter(|p| !chain.contains(p)) {
            at = siblings
                .iter()
                .find(|s| s.id == parent)
                .and_then(|s| s.tag(TAG_PARENT))
                .map(str::to_owned);
            chain.push(parent);
        }
        // Oldest first, so a newer snapshot's blocks win.
        let mut blocks = BTreeMap::new();
        for id in chain.iter().rev() {
            for (index, token) in self.list_blocks(id).await? {
                blocks.insert(index, (id.clone(), token));
            }
        }
        Ok(SnapshotReader {
            api: self.clone(),
            path: PathBuf::from(format!("aws://{}/{}", self.name, snap.id)),
            size,
            blocks,
            temporary: None,
        })
    }

    /// Deletes every snapshot of `store`'s disk `name` and the AMIs
    /// registered from them; whether there was any.
    pub(crate) async fn delete_disk(&self, store: DiskStore, name: &str) -> Result<bool> {
        let chain = self.chain_of(store, name).await?;
        if store == DiskStore::Image {
            for ami in self.images(TAG_NAME, name).await? {
                self.deregister_image(&ami).await?;
            }
        }
        for s in chain.iter().rev() {
            self.delete_snapshot(&s.id).await?;
        }
        Ok(!chain.is_empty())
    }

    /// (block index, token) of every block snapshot `id` lists.
    async fn list_blocks(&self, id: &str) -> Result<Vec<(u64, String)>> {
        let mut out = Vec::new();
        let mut pages = self
            .ebs
            .list_snapshot_blocks()
            .snapshot_id(id)
            .max_results(10_000)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_err(&self.name, "ListSnapshotBlocks", &e))?;
            // AWS gives bytes (524288); moto gives 512, its KiB.
            if let Some(b) = page.block_size()
                && u64::try_from(b).ok() != Some(BLOCK)
                && b != 512
            {
                return Err(Error::NotSupported {
                    operation: format!("snapshot {id} with blocks of {b} bytes"),
                    site: Some(self.name.clone()),
                });
            }
            for b in page.blocks() {
                if let (Some(i), Some(t)) = (b.block_index(), b.block_token()) {
                    out.push((u64::try_from(i).unwrap_or(0), t.to_owned()));
                }
            }
        }
        Ok(out)
    }

    /// Block `index` of snapshot `id`, checked against its checksum.
    async fn get_block(&self, id: String, index: u64, token: String) -> Result<Vec<u8>> {
        let call = "GetSnapshotBlock";
        let out = self
            .ebs
            .get_snapshot_block()
            .snapshot_id(&id)
            .block_index(i32::try_from(index).unwrap_or(i32::MAX))
            .block_token(token)
            .send()
            .await
            .map_err(|e| sdk_err(&self.name, call, &e))?;
        let want = out.checksum().map(str::to_owned);
        let data = out
            .block_data
            .collect()
            .await
            .map_err(|e| Error::Transient(format!("EBS {call} of {id} block {index}: {e}")))?
            .to_vec();
        if let Some(want) = want
            && b64(&Sha256::digest(&data)) != want
        {
            return Err(Error::Corrupt {
                what: format!(
                    "block {index} of snapshot {id} (its SHA-256 is not the one EBS sent)"
                ),
                offset: index * BLOCK,
            });
        }
        Ok(data)
    }

    /// Puts `data` (one whole block) as block `index` of `id`.
    async fn put_block(&self, id: String, index: u64, data: Vec<u8>) -> Result<()> {
        let checksum = b64(&Sha256::digest(&data));
        self.ebs
            .put_snapshot_block()
            .snapshot_id(&id)
            .block_index(i32::try_from(index).unwrap_or(i32::MAX))
            .data_length(i32::try_from(data.len()).unwrap_or(i32::MAX))
            .checksum(checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .block_data(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| sdk_err(&self.name, "PutSnapshotBlock", &e))?;
        Ok(())
    }

    /// Starts a snapshot of disk `name` of `store` (`size` guest bytes),
    /// tagged with its owner; a child of `parent` when given.
    async fn start(
        &self,
        store: DiskStore,
        name: &str,
        size: u64,
        owner: Option<&str>,
        parent: Option<&str>,
        seq: u64,
    ) -> Result<String> {
        let gib = i32::try_from(size.div_ceil(GIB).max(1)).unwrap_or(i32::MAX);
        let mut tags = vec![
            (TAG_STORE, store.as_str().to_owned()),
            (TAG_NAME, name.to_owned()),
            (TAG_SIZE, size.to_string()),
            (TAG_STATE, "writing".to_owned()),
            (TAG_SEQ, seq.to_string()),
        ];
        if let Some(o) = owner {
            tags.push((TAG_OWNER, o.to_owned()));
        }
        if let Some(p) = parent {
            tags.push((TAG_PARENT, p.to_owned()));
        }
        let tags = tags
            .into_iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let out = self
            .ebs
            .start_snapshot()
            .volume_size(i64::from(gib))
            .set_tags(Some(tags))
            .set_parent_snapshot_id(parent.map(str::to_owned))
            .description("written by fluidcloud")
            .timeout(60)
            .send()
            .await
            .map_err(|e| sdk_err(&self.name, "StartSnapshot", &e))?;
        out.snapshot_id().map(str::to_owned).ok_or_else(|| {
            Error::Transient("EBS StartSnapshot answered without a snapshot id".into())
        })
    }

    /// Completes snapshot `id` of disk `name` of `store` after `changed`
    /// blocks, and marks it complete ([`Self::mark_complete`]).
    async fn complete(
        &self,
        store: DiskStore,
        name: &str,
        id: &str,
        changed: u64,
        owner: Option<&str>,
    ) -> Result<()> {
        self.ebs
            .complete_snapshot()
            .snapshot_id(id)
            .changed_blocks_count(i32::try_from(changed).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|e| sdk_err(&self.name, "CompleteSnapshot", &e))?;
        self.mark_complete(store, name, id, owner).await
    }

    /// Marks completed snapshot `id` as the latest of disk `name` of
    /// `store`; an image is registered as an AMI of its name (replacing
    /// the AMI of an earlier snapshot).
    async fn mark_complete(
        &self,
        store: DiskStore,
        name: &str,
        id: &str,
        owner: Option<&str>,
    ) -> Result<()> {
        self.tag(id, &[(TAG_STATE.to_owned(), "complete".to_owned())])
            .await?;
        if store == DiskStore::Image {
            for ami in self.images(TAG_NAME, name).await? {
                self.deregister_image(&ami).await?;
            }
            let mut tags = vec![
                (TAG_STORE.to_owned(), store.as_str().to_owned()),
                (TAG_NAME.to_owned(), name.to_owned()),
            ];
            if let Some(o) = owner {
                tags.push((TAG_OWNER.to_owned(), o.to_owned()));
            }
            self.register_image(name, id, &tags).await?;
        }
        Ok(())
    }

    /// Puts `blocks` into snapshot `id`, [`PARALLEL`] at once.
    async fn put_all(&self, id: &str, blocks: Vec<(u64, Vec<u8>)>) -> Result<()> {
        futures::stream::iter(blocks)
            .map(|(i, b)| {
                let (api, id) = (self.clone(), id.to_owned());
                async move { api.put_block(id, i, b).await }
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>>>()
            .map(drop)
    }
}

/// A completed snapshot (with its parents) as guest bytes.
pub(crate) struct SnapshotReader {
    api: Api,
    path: PathBuf,
    size: u64,
    /// Block index → (snapshot, token) of every listed block.
    blocks: BTreeMap<u64, (String, String)>,
    /// A snapshot taken for this reader alone, deleted with it.
    temporary: Option<String>,
}

impl Drop for SnapshotReader {
    fn drop(&mut self) {
        if let Some(id) = self.temporary.take() {
            let api = self.api.clone();
            self.api.rt.spawn(async move {
                if let Err(e) = api.delete_snapshot(&id).await {
                    tracing::warn!(site = %api.name, snapshot = %id, error = %e, "a snapshot taken for reading could not be deleted");
                }
            });
        }
    }
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("path", &self.path)
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl SnapshotReader {
    /// Bytes in listed blocks, up to the guest size.
    fn allocated(&self) -> u64 {
        self.blocks
            .keys()
            .map(|i| BLOCK.min(self.size.saturating_sub(i * BLOCK)))
            .sum()
    }

    /// The listed blocks among `first..=last`, fetched in parallel.
    async fn fetch(&self, first: u64, last: u64) -> Result<BTreeMap<u64, Vec<u8>>> {
        let want: Vec<(u64, String, String)> = self
            .blocks
            .range(first..=last)
            .map(|(i, (id, t))| (*i, id.clone(), t.clone()))
            .collect();
        futures::stream::iter(want)
            .map(|(i, id, t)| {
                let api = self.api.clone();
                async move { api.get_block(id, i, t).await.map(|d| (i, d)) }
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Fills `buf` with the guest bytes at `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        for (i, data) in self.fetch(offset / BLOCK, (end - 1) / BLOCK).await? {
            let (b0, b1) = (i * BLOCK, i * BLOCK + data.len() as u64);
            let (from, to) = (b0.max(offset), b1.min(end));
            if from < to {
                let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                dst.copy_from_slice(&data[(from - b0) as usize..(to - b0) as usize]);
            }
        }
        Ok(())
    }
}

fn past_end(path: &Path, offset: u64, len: usize, size: u64) -> fluidcloud_migrators::Error {
    fluidcloud_migrators::Error::InvalidArgument(format!(
        "read of {len} bytes at {offset}, past the end ({size}) of {}",
        path.display()
    ))
}

impl ImageReader for SnapshotReader {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> fluidcloud_migrators::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.size {
            return Err(past_end(&self.path, offset, buf.len(), self.size));
        }
        self.api
            .rt
            .block_on(self.read(offset, buf))
            .map_err(|e| io_err(&e))
    }

    fn extent_at(&self, offset: u64) -> fluidcloud_migrators::Result<Extent> {
        Ok(extent_of(
            offset,
            self.size,
            |i| self.blocks.contains_key(&i),
            |i| self.blocks.range(i..).next().map(|(k, _)| *k),
        ))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// The extent at `offset` of a disk of `size` bytes whose blocks `has`
/// data; `next` gives the first block at or after an index that has.
fn extent_of(
    offset: u64,
    size: u64,
    has: impl Fn(u64) -> bool,
    next: impl Fn(u64) -> Option<u64>,
) -> Extent {
    let index = offset / BLOCK;
    let data = has(index);
    let mut end = index + 1;
    if data {
        while end * BLOCK < size && has(end) {
            end += 1;
        }
    } else {
        end = next(index).unwrap_or(u64::MAX);
    }
    Extent {
        offset,
        length: end.saturating_mul(BLOCK).min(size) - offset,
        kind: if data {
            ExtentKind::Data
        } else {
            ExtentKind::Unallocated
        },
    }
}

/// What a write put so far: the block indices, and their bytes in a sparse
/// scratch file (EBS cannot read a snapshot before it is completed).
struct Scratch {
    put: Mutex<std::collections::BTreeSet<u64>>,
    file: std::fs::File,
    path: PathBuf,
}

impl Scratch {
    fn has(&self, i: u64) -> bool {
        self.put
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&i)
    }

    fn next(&self, i: u64) -> Option<u64> {
        self.put
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .range(i..)
            .next()
            .copied()
    }
}

/// A disk as a write leaves it: the blocks put, else what it held before.
struct Current {
    size: u64,
    path: PathBuf,
    scratch: Arc<Scratch>,
    before: Option<Arc<SnapshotReader>>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current").field("path", &self.path).finish()
    }
}

impl Current {
    /// Block `i` as the disk holds it now (`buf` is its guest length).
    fn block(&self, i: u64, buf: &mut [u8]) -> Result<()> {
        if self.scratch.has(i) {
            return self
                .scratch
                .file
                .read_exact_at(buf, i * BLOCK)
                .map_err(|e| Error::io(format!("reading {}", self.scratch.path.display()), e));
        }
        match &self.before {
            Some(r) => r.read_at(i * BLOCK, buf).map_err(Error::from),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }
}

impl ImageReader for Current {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> fluidcloud_migrators::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.size {
            return Err(past_end(&self.path, offset, buf.len(), self.size));
        }
        let mut block = vec![0u8; BLOCK as usize];
        let mut at = offset;
        while at < end {
            let i = at / BLOCK;
            let b0 = i * BLOCK;
            let blen = BLOCK.min(self.size - b0) as usize;
            self.block(i, &mut block[..blen]).map_err(|e| io_err(&e))?;
            let to = end.min(b0 + blen as u64);
            buf[(at - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&block[(at - b0) as usize..(to - b0) as usize]);
            at = to;
        }
        Ok(())
    }

    fn extent_at(&self, offset: u64) -> fluidcloud_migrators::Result<Extent> {
        let before = |i: u64| {
            self.before
                .as_ref()
                .is_some_and(|b| b.blocks.contains_key(&i))
        };
        Ok(extent_of(
            offset,
            self.size,
            |i| self.scratch.has(i) || before(i),
            |i| {
                let a = self.scratch.next(i);
                let b = self
                    .before
                    .as_ref()
                    .and_then(|r| r.blocks.range(i..).next().map(|(k, _)| *k));
                a.into_iter().chain(b).min()
            },
        ))
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A snapshot being written. See the module docs.
pub(crate) struct SnapshotWriter {
    api: Api,
    store: DiskStore,
    name: String,
    owner: Option<String>,
    size: u64,
    snapshot: String,
    before: Option<Arc<SnapshotReader>>,
    scratch: Arc<Scratch>,
    pending: Pending,
    finished: Mutex<bool>,
}

impl SnapshotWriter {
    fn current_view(&self) -> Current {
        Current {
            size: self.size,
            path: PathBuf::from(format!("aws://{}/{}", self.api.name, self.snapshot)),
            scratch: self.scratch.clone(),
            before: self.before.clone(),
        }
    }

    fn bounds(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::Precondition(format!(
                "write of {len} bytes at {offset} past the end ({}) of {} {}",
                self.size,
                self.store.as_str(),
                self.name
            )));
        }
        Ok(())
    }

    /// The whole blocks covering `offset..offset + len` as the disk will
    /// hold them: what it holds now, with `data` (or zeros) laid over.
    fn blocks_with(
        &self,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>> {
        let view = self.current_view();
        let end = offset + len;
        let mut out = Vec::new();
        for i in offset / BLOCK..=(end - 1) / BLOCK {
            let b0 = i * BLOCK;
            let blen = BLOCK.min(self.size - b0);
            // EBS takes whole blocks: the tail of the last one is zeros.
            let mut block = vec![0u8; BLOCK as usize];
            if offset > b0 || end < b0 + blen {
                view.block(i, &mut block[..blen as usize])?;
            }
            let (from, to) = (offset.max(b0), end.min(b0 + blen));
            let dst = &mut block[(from - b0) as usize..(to - b0) as usize];
            match data {
                Some(d) => {
                    dst.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize])
                }
                None => dst.fill(0),
            }
            out.push((i, block));
        }
        Ok(out)
    }

    /// Puts `blocks`: all-zero ones only over a parent (a new snapshot
    /// reads zeros where nothing was put). The puts run in the background,
    /// [`IN_FLIGHT`] at most, one at a time per block and in order; a
    /// failed one fails the next write and `finish`.
    fn put_blocks(&self, blocks: Vec<(u64, Vec<u8>)>) -> Result<()> {
        self.pending.check()?;
        let fresh = self.before.is_none();
        let blocks: Vec<_> = blocks
            .into_iter()
            .filter(|(i, b)| !(fresh && !self.scratch.has(*i) && b.iter().all(|&x| x == 0)))
            .collect();
        for (i, b) in &blocks {
            self.scratch
                .file
                .write_all_at(b, i * BLOCK)
                .map_err(|e| Error::io(format!("writing {}", self.scratch.path.display()), e))?;
        }
        self.scratch
            .put
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(blocks.iter().map(|(i, _)| *i));
        for (i, b) in blocks {
            self.pending.put(&self.api, &self.snapshot, i, b)?;
        }
        Ok(())
    }
}

/// Blocks put into EBS at once by one writer.
const IN_FLIGHT: usize = 48;

/// The background puts of a writer.
struct Pending {
    slots: Arc<tokio::sync::Semaphore>,
    tasks: Mutex<std::collections::HashMap<u64, tokio::task::JoinHandle<()>>>,
    failed: Arc<Mutex<Option<Error>>>,
}

impl Pending {
    fn new() -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            tasks: Mutex::new(Default::default()),
            failed: Arc::new(Mutex::new(None)),
        }
    }

    /// The first failed put's error, if one failed.
    fn check(&self) -> Result<()> {
        match &*self.failed.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(e) => Err(Error::Transient(format!("an earlier block failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Starts the put of block `i` of `snapshot`, after the one before of
    /// the same block, once a slot is free.
    fn put(&self, api: &Api, snapshot: &str, i: u64, data: Vec<u8>) -> Result<()> {
        let before = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&i);
        if let Some(h) = before {
            let _ = api.rt.block_on(h);
        }
        let slot = api
            .rt
            .block_on(self.slots.clone().acquire_owned())
            .map_err(|e| Error::Transient(format!("EBS puts stopped: {e}")))?;
        let (task_api, id, failed) = (api.clone(), snapshot.to_owned(), self.failed.clone());
        let h = api.rt.spawn(async move {
            let _slot = slot;
            if let Err(e) = task_api.put_block(id, i, data).await {
                failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(e);
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(i, h);
        Ok(())
    }

    /// Waits for every put; the first error, with the original cause.
    fn drain(&self, api: &Api) -> Result<()> {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, h)| h)
            .collect();
        for h in tasks {
            let _ = api.rt.block_on(h);
        }
        match self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl DiskWriter for SnapshotWriter {
    fn current(&self) -> Result<Box<dyn ImageReader>> {
        Ok(Box::new(self.current_view()))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.bounds(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let blocks = self.blocks_with(offset, Some(data), data.len() as u64)?;
        self.put_blocks(blocks)
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.bounds(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let blocks = self.blocks_with(offset, None, len)?;
        self.put_blocks(blocks)
    }

    fn finish(&self) -> Result<ImageRecord> {
        let mut finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
        let (api, store, name, id) = (
            self.api.clone(),
            self.store,
            self.name.clone(),
            self.snapshot.clone(),
        );
        self.pending.drain(&self.api)?;
        let changed = self
            .scratch
            .put
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64;
        let owner = self.owner.clone();
        self.api.rt.block_on(async move {
            api.complete(store, &name, &id, changed, owner.as_deref())
                .await
        })?;
        *finished = true;
        let allocated = {
            let put = self
                .scratch
                .put
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let before = self
                .before
                .as_ref()
                .map(|b| b.blocks.keys().filter(|i| !put.contains(i)).count());
            (put.len() + before.unwrap_or(0)) as u64 * BLOCK
        };
        Ok(ImageRecord {
            name: self.name.clone(),
            format: ImageFormat::Raw,
            virtual_size: self.size,
            allocated: allocated.min(self.size),
            backing: None,
            locator: self.snapshot.clone(),
        })
    }
}

impl Drop for SnapshotWriter {
    /// An unfinished write deletes its snapshot: nothing half-written
    /// stays (a resumed transfer starts a new one).
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.scratch.path);
        if *self.finished.lock().unwrap_or_else(PoisonError::into_inner) {
            return;
        }
        let (api, id) = (self.api.clone(), self.snapshot.clone());
        // On the driver's runtime, which outlives the writer.
        drop(self.api.rt.spawn(async move {
            if let Err(e) = api.delete_snapshot(&id).await {
                tracing::warn!(site = %api.name, snapshot = %id, error = %e, "an unfinished snapshot could not be deleted");
            }
        }));
    }
}

impl Api {
    /// Opens disk `name` of `store` for a write of `size` guest bytes by
    /// `owner` (see [`Disks::write`]).
    async fn open_write(
        &self,
        store: DiskStore,
        name: &str,
        size: u64,
        owner: Option<&str>,
    ) -> Result<SnapshotWriter> {
        check_name(name)?;
        let chain = self.chain_of(store, name).await?;
        let latest = chain.iter().rev().find(|s| s.complete()).cloned();
        if let Some(l) = &latest {
            let held = l.tag(TAG_OWNER);
            // No owner on either side: a block-store write of a volume no
            // relocation wrote.
            let ours = match (held, owner) {
                (Some(h), Some(o)) => same_relocation(h, o),
                (None, None) => true,
                _ => false,
            };
            if !ours {
                return Err(Error::Precondition(format!(
                    "{} {name} exists on site {} ({}), and this relocation did not write it",
                    store.as_str(),
                    self.name,
                    fluidcloud_migrators::owner::describe(held)
                )));
            }
            let had: Option<u64> = l.tag(TAG_SIZE).and_then(|s| s.parse().ok());
            if had != Some(size) {
                return Err(Error::Precondition(format!(
                    "{} {name} on site {} holds {} bytes, not {size}",
                    store.as_str(),
                    self.name,
                    had.map_or_else(|| "an unknown number of".to_owned(), |h| h.to_string())
                )));
            }
        }
        // Snapshots a crash left unfinished: this relocation's go.
        for s in chain.iter().filter(|s| !s.complete()) {
            if let (Some(h), Some(o)) = (s.tag(TAG_OWNER), owner)
                && same_relocation(h, o)
            {
                self.delete_snapshot(&s.id).await?;
            }
        }
        let before = match &latest {
            Some(l) => Some(Arc::new(self.open_snapshot(l).await?)),
            None => None,
        };
        let scratch = tempfile::Builder::new()
            .prefix(".fluidcloud-ebs-")
            .tempfile()
            .map_err(|e| Error::io("creating a scratch file", e))?;
        let (file, path) = scratch
            .keep()
            .map_err(|e| Error::io("keeping a scratch file", e.error))?;
        file.set_len(size)
            .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
        let snapshot = self
            .start(
                store,
                name,
                size,
                owner,
                latest.as_ref().map(|l| l.id.as_str()),
                next_seq(&chain),
            )
            .await?;
        Ok(SnapshotWriter {
            api: self.clone(),
            store,
            name: name.to_owned(),
            owner: owner.map(str::to_owned),
            size,
            snapshot,
            before,
            scratch: Arc::new(Scratch {
                put: Mutex::new(Default::default()),
                file,
                path,
            }),
            pending: Pending::new(),
            finished: Mutex::new(false),
        })
    }
}

impl Aws {
    /// Opens disk `name` of `store` for a write of `size` guest bytes by
    /// `owner` (none: a block-store write), blocking.
    pub(crate) fn write_as(
        &self,
        store: DiskStore,
        name: &str,
        size: u64,
        owner: Option<&str>,
    ) -> Result<Box<dyn DiskWriter>> {
        let api = self.api.clone();
        let (name, owner) = (name.to_owned(), owner.map(str::to_owned));
        let w = self
            .api
            .rt
            .block_on(async move { api.open_write(store, &name, size, owner.as_deref()).await })?;
        Ok(Box::new(w))
    }

    /// Facts about disk `name` of `store`.
    pub(crate) async fn disk_info(&self, store: DiskStore, name: &str) -> Result<ImageRecord> {
        let api = self.api.clone();
        let name = name.to_owned();
        self.api
            .on_rt(async move {
                if let Some(size) = api.foreign_volume(store, &name).await? {
                    // Its allocation is known only once read.
                    return Ok(ImageRecord {
                        locator: name.clone(),
                        name,
                        format: ImageFormat::Raw,
                        virtual_size: size,
                        allocated: size,
                        backing: None,
                    });
                }
                let snap = api.existing(store, &name).await?;
                let r = api.open_snapshot(&snap).await?;
                Ok(ImageRecord {
                    name,
                    format: ImageFormat::Raw,
                    virtual_size: r.size,
                    allocated: r.allocated(),
                    backing: None,
                    locator: snap.id,
                })
            })
            .await
    }
}

impl Disks for Aws {
    fn read(
        &self,
        store: DiskStore,
        name: &str,
        format: ImageFormat,
    ) -> Result<Box<dyn ImageReader>> {
        raw_only(format, &self.api.name)?;
        let api = self.api.clone();
        let name = name.to_owned();
        let reader = self
            .api
            .rt
            .block_on(async move { api.open_disk(store, &name).await })?;
        Ok(Box::new(reader))
    }

    fn write(
        &self,
        store: DiskStore,
        name: &str,
        format: ImageFormat,
        virtual_size: u64,
        owner: &str,
    ) -> Result<Box<dyn DiskWriter>> {
        raw_only(format, &self.api.name)?;
        self.write_as(store, name, virtual_size, Some(owner))
    }

    fn remove(&self, store: DiskStore, name: &str, owner: &str) -> Result<bool> {
        check_name(name)?;
        let api = self.api.clone();
        let (name, owner) = (name.to_owned(), owner.to_owned());
        self.api.rt.block_on(async move {
            let chain = api.chain_of(store, &name).await?;
            if let Some(other) = chain
                .iter()
                .find(|s| !s.tag(TAG_OWNER).is_some_and(|h| same_relocation(h, &owner)))
            {
                return Err(Error::Precondition(format!(
                    "{} {name} on site {} ({}) was not written by this relocation",
                    store.as_str(),
                    api.name,
                    other.id
                )));
            }
            api.delete_disk(store, &name).await
        })
    }

    fn holder(&self, store: DiskStore, name: &str) -> Result<Option<Option<String>>> {
        check_name(name)?;
        let api = self.api.clone();
        let name = name.to_owned();
        self.api.rt.block_on(async move {
            if api.foreign_volume(store, &name).await?.is_some() {
                // A volume of an instance fluidcloud did not define.
                return Ok(Some(None));
            }
            Ok(api
                .latest(store, &name)
                .await?
                .map(|s| s.tag(TAG_OWNER).map(str::to_owned)))
        })
    }
}

fn raw_only(format: ImageFormat, site: &str) -> Result<()> {
    if format == ImageFormat::Raw {
        Ok(())
    } else {
        Err(Error::NotSupported {
            operation: format!("keeping a disk as {format} (EBS snapshots hold raw blocks)"),
            site: Some(site.to_owned()),
        })
    }
}

#[async_trait]
impl ImageStore for Aws {
    async fn list_images(&self) -> Result<Vec<String>> {
        let api = self.api.clone();
        self.api
            .on_rt(async move { api.names(DiskStore::Image).await })
            .await
    }

    async fn image_info(&self, name: &str) -> Result<ImageRecord> {
        self.disk_info(DiskStore::Image, name).await
    }

    /// The stream is the disk's guest bytes (EBS keeps raw blocks). It is
    /// spooled to a sparse scratch file first: a snapshot's size is given
    /// when it starts.
    async fn put_image(
        &self,
        name: &str,
        data: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64> {
        check_name(name)?;
        let (file, path, size) = spool(data).await?;
        let api = self.api.clone();
        let name = name.to_owned();
        let result = self
            .api
            .on_rt(async move {
                if api.latest(DiskStore::Image, &name).await?.is_some() {
                    return Err(Error::Precondition(format!(
                        "image {name} already exists on site {}",
                        api.name
                    )));
                }
                let mut w = api.open_write(DiskStore::Image, &name, size, None).await?;
                upload_file(&api, &mut w, &file, size).await?;
                Ok(size)
            })
            .await;
        let _ = std::fs::remove_file(&path);
        result
    }

    async fn open_image(&self, name: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>> {
        let api = self.api.clone();
        let name = name.to_owned();
        let reader = self
            .api
            .on_rt(async move { api.open_disk(DiskStore::Image, &name).await })
            .await?;
        let (mut tx, rx) = tokio::io::duplex(4 * BLOCK as usize);
        self.api.rt.spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let step = 8 * BLOCK;
            let mut at = 0;
            let mut buf = vec![0u8; step as usize];
            while at < reader.size {
                let n = step.min(reader.size - at) as usize;
                if reader.read(at, &mut buf[..n]).await.is_err()
                    || tx.write_all(&buf[..n]).await.is_err()
                {
                    // The reader sees the stream end early.
                    return;
                }
                at += n as u64;
            }
        });
        Ok(Box::new(rx))
    }

    async fn delete_image(&self, name: &str) -> Result<()> {
        check_name(name)?;
        let api = self.api.clone();
        let name = name.to_owned();
        self.api
            .on_rt(async move {
                if api.delete_disk(DiskStore::Image, &name).await? {
                    Ok(())
                } else {
                    Err(Error::NotFound {
                        what: format!("image {name}"),
                        site: Some(api.name.clone()),
                    })
                }
            })
            .await
    }
}

/// Copies `data` into a sparse scratch file (zero blocks become holes):
/// the file, its path and the stream's length.
async fn spool(data: &mut (dyn AsyncRead + Send + Unpin)) -> Result<(std::fs::File, PathBuf, u64)> {
    let scratch = tempfile::Builder::new()
        .prefix(".fluidcloud-ebs-put-")
        .tempfile()
        .map_err(|e| Error::io("creating a scratch file", e))?;
    let (file, path) = scratch
        .keep()
        .map_err(|e| Error::io("keeping a scratch file", e.error))?;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut size = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = data
                .read(&mut buf[filled..])
                .await
                .map_err(|e| Error::io("reading the image stream", e))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        if buf[..filled].iter().any(|&b| b != 0) {
            file.write_all_at(&buf[..filled], size)
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    file.set_len(size)
        .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
    Ok((file, path, size))
}

/// Puts the blocks of `file` (`size` bytes) that hold data into `w`'s
/// snapshot and completes it.
async fn upload_file(
    api: &Api,
    w: &mut SnapshotWriter,
    file: &std::fs::File,
    size: u64,
) -> Result<()> {
    let mut blocks = Vec::new();
    let mut sent = 0u64;
    let mut i = 0;
    while i * BLOCK < size {
        let len = BLOCK.min(size - i * BLOCK) as usize;
        let mut b = vec![0u8; BLOCK as usize];
        file.read_exact_at(&mut b[..len], i * BLOCK)
            .map_err(|e| Error::io("reading the spooled image", e))?;
        if b.iter().any(|&x| x != 0) {
            blocks.push((i, b));
        }
        i += 1;
        if blocks.len() >= 4 * PARALLEL || i * BLOCK >= size {
            sent += blocks.len() as u64;
            api.put_all(&w.snapshot, std::mem::take(&mut blocks))
                .await?;
        }
    }
    api.complete(DiskStore::Image, &w.name, &w.snapshot, sent, None)
        .await?;
    *w.finished.lock().unwrap_or_else(PoisonError::into_inner) = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_extents_and_owners() {
        assert!(check_name("web.raw").is_ok());
        for bad in ["", ".x", "../escape", "a/b", &"x".repeat(129)] {
            assert!(matches!(check_name(bad), Err(Error::Invalid(_))), "{bad}");
        }
        let has = |i: u64| i == 2 || i == 3;
        let next = |i: u64| (i <= 2).then_some(2).or((i == 3).then_some(3));
        let size = 5 * BLOCK + 100;
        let e = extent_of(0, size, has, next);
        assert_eq!((e.kind, e.length), (ExtentKind::Unallocated, 2 * BLOCK));
        let e = extent_of(2 * BLOCK + 7, size, has, next);
        assert_eq!((e.kind, e.end()), (ExtentKind::Data, 4 * BLOCK));
        let e = extent_of(4 * BLOCK, size, has, next);
        assert_eq!((e.kind, e.end()), (ExtentKind::Unallocated, size));
    }
}
