//! Buckets moved agent to agent: the target agent lists the source's
//! objects with their BLAKE3 hashes, fetches those it lacks (several at a
//! time), checks each against its hash, and in the end lists both sides
//! again and compares. A bucket is written only when it is new or was
//! created by the same relocation (a record in the target agent's state
//! directory, written before the bucket is created); objects the source no
//! longer has are removed from such a bucket, so a repeated transfer (the
//! final delta) leaves an exact copy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fluidcloud_plugins::{Error, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _};
use serde::{Deserialize, Serialize};

use super::pull::{Pull, PullContext};
use super::{DEFAULT_STREAMS, MAX_STREAMS, PeerRef, hex};

/// One object as the source lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectEntry {
    /// Its key.
    pub key: String,
    /// Its size.
    pub size: u64,
    /// BLAKE3 of its bytes, hex.
    pub hash: String,
}

/// Orchestrator → target agent: pull one bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketPullRequest {
    /// The source agent and ticket.
    pub source: PeerRef,
    /// The bucket at the source.
    pub from: String,
    /// The bucket to write.
    pub into: String,
    /// Creator tag (`RELOCATION/STEP`).
    pub owner: String,
    /// Objects fetched at once.
    #[serde(default)]
    pub streams: Option<u32>,
    /// Bytes per second on the wire.
    #[serde(default)]
    pub bwlimit: Option<u64>,
    /// What shares the limit.
    #[serde(default)]
    pub limit_key: Option<String>,
}

/// Target agent's request for one object.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRequest {
    /// Its key.
    pub key: String,
}

fn store_error(bucket: &str, e: object_store::Error) -> Error {
    Error::Transient(format!("bucket {bucket}: {e}"))
}

/// Every object of `store`, sorted by key, with its hash (reads them all).
///
/// # Errors
/// The store's errors.
pub async fn list_hashed(store: &dyn ObjectStore, bucket: &str) -> Result<Vec<ObjectEntry>> {
    let metas: Vec<_> = store
        .list(None)
        .try_collect()
        .await
        .map_err(|e| store_error(bucket, e))?;
    let mut out = Vec::with_capacity(metas.len());
    for m in metas {
        let mut stream = store
            .get(&m.location)
            .await
            .map_err(|e| store_error(bucket, e))?
            .into_stream();
        let mut h = blake3::Hasher::new();
        while let Some(piece) = stream.next().await {
            h.update(&piece.map_err(|e| store_error(bucket, e))?);
        }
        out.push(ObjectEntry {
            key: m.location.to_string(),
            size: m.size,
            hash: hex(h.finalize().as_bytes()),
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// The record that this agent's site got bucket `name` from `owner`'s
/// relocation.
fn owner_record(state: &Path, bucket: &str) -> PathBuf {
    state.join("buckets").join(format!("{bucket}.owner"))
}

/// Who created bucket `bucket` here, by the agent's record.
pub fn bucket_owner(state: &Path, bucket: &str) -> Option<String> {
    std::fs::read_to_string(owner_record(state, bucket))
        .ok()
        .map(|t| t.trim().to_owned())
}

/// Makes bucket `into` ready for `owner`: created (the record first) when
/// it does not exist, taken when `owner`'s relocation created it, refused
/// otherwise.
async fn claim(ctx: &PullContext, state: &Path, into: &str, owner: &str) -> Result<()> {
    let os = crate::driver::require_object_storage(ctx.driver.as_ref())?;
    let exists = os.list_buckets().await?.iter().any(|b| b == into);
    match (exists, bucket_owner(state, into)) {
        (true, Some(t)) if fluidcloud_migrators::owner::same_relocation(&t, owner) => Ok(()),
        (true, t) => Err(Error::Precondition(format!(
            "bucket {into} exists at site {} and {}; this relocation does not write it",
            ctx.driver.name(),
            t.map_or(
                "no relocation of fluidcloud created it".to_owned(),
                |t| format!("{t} created it")
            )
        ))),
        (false, _) => {
            let rec = owner_record(state, into);
            if let Some(dir) = rec.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            }
            std::fs::write(&rec, format!("{owner}\n"))
                .map_err(|e| Error::io(format!("writing {}", rec.display()), e))?;
            os.create_bucket(into).await
        }
    }
}

/// Runs a bucket pull to its end, recording the outcome in `pull`.
pub async fn run(ctx: PullContext, state: PathBuf, req: BucketPullRequest, pull: Arc<Pull>) {
    let result = run_inner(&ctx, &state, &req, &pull).await;
    pull.finish(result.map(|n| (format!("{n} objects"), None)));
}

async fn run_inner(
    ctx: &PullContext,
    state: &Path,
    req: &BucketPullRequest,
    pull: &Arc<Pull>,
) -> Result<usize> {
    claim(ctx, state, &req.into, &req.owner).await?;
    let os = crate::driver::require_object_storage(ctx.driver.as_ref())?;
    let target = os.bucket(&req.into).await?;
    let client = super::pull::client_for(&req.source.fingerprint, &ctx.identity)?;
    let peer = super::pull::Peer {
        client: &client,
        url: &req.source.url,
        ticket: &req.source.ticket,
    };
    let client = client.clone();
    let theirs: Vec<ObjectEntry> = peer
        .post("/v1/transfers/objects", &serde_json::json!({}))
        .await?
        .json()
        .await
        .map_err(|e| {
            Error::Transient(format!(
                "source agent {}: an unreadable listing: {e}",
                req.source.url
            ))
        })?;
    pull.set_chunks(theirs.len() as u64);
    let ours = list_hashed(target.as_ref(), &req.into).await?;
    let have: std::collections::BTreeMap<&str, &ObjectEntry> =
        ours.iter().map(|e| (e.key.as_str(), e)).collect();
    let bucket = req.bwlimit.map(|rate| {
        ctx.limits
            .bucket(req.limit_key.as_deref().unwrap_or(&req.into), rate)
    });
    let streams = req.streams.unwrap_or(DEFAULT_STREAMS).clamp(1, MAX_STREAMS) as usize;
    let mut fetch = Vec::new();
    for e in &theirs {
        if have.get(e.key.as_str()).is_some_and(|h| *h == e) {
            pull.add(|s| {
                s.same_chunks += 1;
                s.done += 1;
            });
        } else {
            fetch.push(e.clone());
        }
    }
    let job = Fetch {
        client,
        req: req.clone(),
        target: target.clone(),
        bucket,
        pull: pull.clone(),
        stopping: ctx.stopping.clone(),
    };
    futures::stream::iter(fetch)
        .map(|e| job.clone().one(e))
        .buffer_unordered(streams)
        .try_collect::<Vec<()>>()
        .await?;
    // What the source no longer has goes: the bucket is ours.
    let keys: std::collections::BTreeSet<&str> = theirs.iter().map(|e| e.key.as_str()).collect();
    for extra in ours.iter().filter(|e| !keys.contains(e.key.as_str())) {
        target
            .delete(&ObjectPath::from(extra.key.as_str()))
            .await
            .map_err(|e| store_error(&req.into, e))?;
    }
    let after = list_hashed(target.as_ref(), &req.into).await?;
    if after != theirs {
        return Err(Error::Corrupt {
            what: format!(
                "bucket {} after the transfer: its objects differ from {}'s listing",
                req.into, req.from
            ),
            offset: 0,
        });
    }
    Ok(after.len())
}

/// What fetching one object needs, owned (fetches run concurrently).
#[derive(Clone)]
struct Fetch {
    client: reqwest::Client,
    req: BucketPullRequest,
    target: Arc<dyn ObjectStore>,
    bucket: Option<Arc<super::limit::Bucket>>,
    pull: Arc<Pull>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Fetch {
    /// Fetches object `e`, checks it against the listing, stores it.
    async fn one(self, e: ObjectEntry) -> Result<()> {
        let req = &self.req;
        if self.stopping.load(Ordering::Relaxed) {
            return Err(Error::Transient("the agent is shutting down".into()));
        }
        let peer = super::pull::Peer {
            client: &self.client,
            url: &req.source.url,
            ticket: &req.source.ticket,
        };
        let bytes = peer
            .post(
                "/v1/transfers/object",
                &ObjectRequest { key: e.key.clone() },
            )
            .await?
            .bytes()
            .await
            .map_err(|err| {
                Error::Transient(format!(
                    "source agent {}: object {}: {err}",
                    req.source.url, e.key
                ))
            })?;
        if let Some(b) = &self.bucket {
            b.take(bytes.len() as u64).await;
        }
        if bytes.len() as u64 != e.size || hex(blake3::hash(&bytes).as_bytes()) != e.hash {
            return Err(Error::Corrupt {
                what: format!(
                    "object {} of bucket {} from {} (its BLAKE3 hash or size differs from the listing)",
                    e.key, req.from, req.source.url
                ),
                offset: 0,
            });
        }
        let len = bytes.len() as u64;
        self.target
            .put(&ObjectPath::from(e.key.as_str()), bytes.into())
            .await
            .map_err(|err| store_error(&req.into, err))?;
        self.pull.add(|s| {
            s.done += 1;
            s.data_chunks += 1;
            s.data_bytes += len;
            s.wire_bytes += len;
        });
        Ok(())
    }
}

/// Removes bucket `bucket` when `owner`'s relocation created it (by the
/// agent's record); whether it did.
///
/// # Errors
/// `Precondition` for a bucket someone else created; the store's errors.
pub async fn remove(ctx: &PullContext, state: &Path, bucket: &str, owner: &str) -> Result<bool> {
    let os = crate::driver::require_object_storage(ctx.driver.as_ref())?;
    let exists = os.list_buckets().await?.iter().any(|b| b == bucket);
    match bucket_owner(state, bucket) {
        Some(t) if fluidcloud_migrators::owner::same_relocation(&t, owner) => {
            if exists {
                os.delete_bucket(bucket).await?;
            }
            let rec = owner_record(state, bucket);
            std::fs::remove_file(&rec)
                .map_err(|e| Error::io(format!("removing {}", rec.display()), e))?;
            Ok(exists)
        }
        _ if !exists => Ok(false),
        t => Err(Error::Precondition(format!(
            "bucket {bucket} at site {} was not created by this relocation ({}); it stays",
            ctx.driver.name(),
            t.unwrap_or_else(|| "no record".into())
        ))),
    }
}
