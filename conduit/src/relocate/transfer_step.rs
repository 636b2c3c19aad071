//! `disk-transfer`: one disk moved from the source site to the target
//! site, through their disk capabilities. Between sites reached through
//! agents it is an agent-to-agent transfer (`crate::transfer`): the
//! orchestrator only starts the pull and follows it, and the bytes go site
//! to site. Between sites that run in this process it is the same chunked,
//! hashed move without a network (`crate::transfer::local`).
//!
//! The same step serves the pre-copy and the final delta: a second run
//! onto the disk the first wrote sends only the chunks that differ, and
//! every run ends with the Merkle roots of both sides compared. Its
//! rollback removes the disk and whatever the transfer left, when this
//! relocation created it.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error as SdkError, Estimate, ExecContext, ImageFormat,
    Migrator, MigratorDescriptor, Result as SdkResult, StepOutput, StepRequest,
};
use serde::Deserialize;

use super::steps::{descriptor, open_site, params, validate_params};
use crate::agent::client::AgentClient;
use crate::agent::embedded::Embedded;
use crate::driver::{DiskStore, SiteDriver, require_disks};
use crate::transfer::local::{self, Leaves, LocalMove};
use crate::transfer::orchestrate::{BucketMove, Move, transfer, transfer_bucket};
use crate::transfer::{CHUNK, DiskRef, PullStatus};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferParams {
    sites_file: PathBuf,
    /// The source site.
    from: String,
    /// The target site.
    site: String,
    source: DiskRef,
    into: DiskRef,
    relocation: String,
    /// Allocated bytes of the source, for the estimate.
    #[serde(default)]
    allocated: u64,
    #[serde(default)]
    streams: Option<u32>,
    #[serde(default)]
    bwlimit: Option<u64>,
    /// The source disk's change set since the pre-copy (a final delta),
    /// when the source tracked it.
    #[serde(default)]
    changes: Option<PathBuf>,
    /// Where the orchestrator keeps the leaves of the last verified run
    /// onto this disk, for a final delta between sites of this process.
    #[serde(default)]
    leaves: Option<PathBuf>,
}

/// `disk-transfer`: see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskTransfer;

/// The agents of both ends of a transfer that involves at least one site
/// reached through its agent: each site's own, or, for a site of this
/// process, an agent embedded in this process for the transfer
/// ([`Embedded`]).
struct Ends {
    source: Arc<dyn SiteDriver>,
    target: Arc<dyn SiteDriver>,
    embedded: Option<Embedded>,
}

impl Ends {
    async fn of(
        sites_file: &std::path::Path,
        source: Arc<dyn SiteDriver>,
        target: Arc<dyn SiteDriver>,
    ) -> SdkResult<Self> {
        let embed = |here: &Arc<dyn SiteDriver>, peer: &AgentClient| {
            let (here, peer) = (here.clone(), peer.url().to_owned());
            async move {
                let name = here.name().to_owned();
                Embedded::start(sites_file, &name, here, Some(&peer)).await
            }
        };
        let embedded = match (source.agent(), target.agent()) {
            (Some(_), Some(_)) => None,
            (Some(peer), None) => Some(embed(&target, peer).await?),
            (None, Some(peer)) => Some(embed(&source, peer).await?),
            (None, None) => {
                return Err(SdkError::Precondition(format!(
                    "a transfer between {} and {}, both in this process, needs no agents",
                    source.name(),
                    target.name()
                )));
            }
        };
        Ok(Self {
            source,
            target,
            embedded,
        })
    }

    fn agent<'a>(&'a self, site: &'a Arc<dyn SiteDriver>) -> SdkResult<&'a AgentClient> {
        site.agent()
            .or_else(|| self.embedded.as_ref().map(Embedded::client))
            .ok_or_else(|| SdkError::NotSupported {
                operation: "a transfer without an agent".into(),
                site: Some(site.name().to_owned()),
            })
    }

    fn source(&self) -> SdkResult<&AgentClient> {
        self.agent(&self.source)
    }

    fn target(&self) -> SdkResult<&AgentClient> {
        self.agent(&self.target)
    }

    async fn close(self) {
        if let Some(e) = self.embedded {
            e.stop().await;
        }
    }
}

/// What a transfer of `bytes` between sites `from` and `to` is estimated
/// to cost: its bytes read, sent and written, over a WAN link of
/// 100 Mbit/s when either site is reached through its agent (until
/// measured otherwise), else at local disk speed with nothing sent.
fn estimate(sites_file: &std::path::Path, from: &str, to: &str, bytes: u64) -> Estimate {
    let here =
        crate::config::SitesFile::load(sites_file, &crate::drivers::kinds()).is_ok_and(|f| {
            [from, to]
                .iter()
                .all(|s| f.site(s).is_ok_and(|c| c.agent.is_none()))
        });
    Estimate {
        bytes_read: bytes,
        bytes_sent: if here { 0 } else { bytes },
        bytes_written: bytes,
        seconds: bytes as f64 / if here { 500e6 } else { 12.5e6 },
    }
}

/// The source and target sites of a transfer step.
pub(super) fn both_sites(
    sites_file: &std::path::Path,
    from: &str,
    to: &str,
) -> SdkResult<(Arc<dyn SiteDriver>, Arc<dyn SiteDriver>)> {
    let (_, source) = open_site(sites_file, from)?;
    let (_, target) = open_site(sites_file, to)?;
    Ok((Arc::from(source), Arc::from(target)))
}

/// What a relocation's transfers between two sites share a bandwidth
/// limit by.
fn limit_key(relocation: &str, from: &str, to: &str) -> String {
    format!("{relocation}:{from}->{to}")
}

fn owner(p: &TransferParams) -> String {
    format!("{}/{}", p.relocation, p.into.name)
}

#[async_trait]
impl Migrator for DiskTransfer {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "disk-transfer",
            "moves a disk from the source site's agent to the target site's agent, site to site",
            std::iter::once(ArtifactKind::Volume)
                .chain(
                    [
                        ImageFormat::Raw,
                        ImageFormat::Qcow2,
                        ImageFormat::Vmdk,
                        ImageFormat::Vhd,
                        ImageFormat::Vhdx,
                    ]
                    .map(|format| ArtifactKind::DiskImage { format }),
                )
                .collect(),
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<TransferParams>(request)
    }

    async fn plan(&self, request: &StepRequest) -> SdkResult<Estimate> {
        let p: TransferParams = params(request)?;
        Ok(estimate(&p.sites_file, &p.from, &p.site, p.allocated))
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: TransferParams = params(request)?;
        let (source, target) = both_sites(&p.sites_file, &p.from, &p.site)?;
        let (status, read, tracked) = if source.agent().is_none() && target.agent().is_none() {
            local_move(&p, source, target, ctx).await?
        } else {
            let ends = Ends::of(&p.sites_file, source, target).await?;
            let moved = match (ends.source(), ends.target()) {
                (Ok(from), Ok(into)) => agent_move(&p, from, into, ctx).await,
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            ends.close().await;
            let (status, read) = moved?;
            let tracked = status.tracked;
            (status, read, tracked)
        };
        ctx.progress.message(&format!(
            "{} {} at {}: {} of {} chunks written ({} bytes), {} unchanged{}",
            p.into.store.as_str(),
            p.into.name,
            p.site,
            status.data_chunks,
            status.chunks,
            status.data_bytes,
            status.same_chunks,
            if tracked {
                "; only the chunks the guest wrote were looked at"
            } else {
                ""
            }
        ));
        let mut out = transfer_output(&p, &status, read);
        // Whether it looked only at the chunks the change set named.
        out.facts.insert("tracked".into(), tracked.into());
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let p: TransferParams = params(request)?;
        let (_, target) = open_site(&p.sites_file, &p.site)?;
        if let Some(agent) = target.agent() {
            let _: bool = agent
                .post(
                    "/v1/disks/remove",
                    &crate::agent::server::RemoveDisk {
                        disk: p.into.clone(),
                        owner: owner(&p),
                    },
                )
                .await?;
        } else {
            let into = p.into.clone();
            let who = owner(&p);
            tokio::task::spawn_blocking(move || {
                require_disks(target.as_ref())?
                    .remove(into.store, &into.name, &who)
                    .map(drop)
            })
            .await
            .map_err(|e| SdkError::Transient(format!("a rollback task failed: {e}")))??;
        }
        if let Some(path) = &p.leaves {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(SdkError::io(format!("removing {}", path.display()), e)),
            }
        }
        Ok(())
    }
}

/// The move agent to agent: its status, and the bytes the source read.
async fn agent_move(
    p: &TransferParams,
    from: &AgentClient,
    into: &AgentClient,
    ctx: &ExecContext,
) -> SdkResult<(PullStatus, u64)> {
    let only = match &p.changes {
        Some(c) if c.exists() => {
            Some(fluidcloud_migrators::changes::ChangeSet::load(c)?.chunks(CHUNK))
        }
        _ => None,
    };
    let m = Move {
        from: p.source.clone(),
        into: p.into.clone(),
        owner: owner(p),
        streams: p.streams,
        bwlimit: p.bwlimit,
        limit_key: Some(limit_key(&p.relocation, &p.from, &p.site)),
        only,
    };
    let show = |s: &PullStatus, g: &crate::transfer::TicketGrant| {
        ctx.progress
            .progress((s.done * CHUNK).min(g.virtual_size), Some(g.virtual_size));
    };
    let (status, grant) = transfer(from, into, &m, &show).await?;
    // A tracked delta read the chunks of its change set only.
    let read = if status.tracked {
        grant.data_bytes.min(status.chunks * CHUNK)
    } else {
        grant.data_bytes
    };
    Ok((status, read))
}

/// Threads of a move between sites of this process.
const LOCAL_WORKERS: usize = 4;

/// The move between two sites of this process (`transfer::local`): its
/// status, the bytes read at the source, and whether it looked only at the
/// changed chunks (given a change set and the leaves of the last verified
/// run).
async fn local_move(
    p: &TransferParams,
    source: Arc<dyn SiteDriver>,
    target: Arc<dyn SiteDriver>,
    ctx: &ExecContext,
) -> SdkResult<(PullStatus, u64, bool)> {
    let since = match (&p.changes, &p.leaves) {
        (Some(c), Some(l)) if c.exists() => {
            let set = fluidcloud_migrators::changes::ChangeSet::load(c)?;
            Leaves::load(l)?
                .filter(|base| base.virtual_size == set.virtual_size)
                .map(|base| (set.chunks(CHUNK), base))
        }
        _ => None,
    };
    let tracked = since.is_some();
    let (from, into, who) = (p.source.clone(), p.into.clone(), owner(p));
    let (progress, cancel) = (ctx.progress.clone(), ctx.cancel.clone());
    let leaves_at = p.leaves.clone();
    tokio::task::spawn_blocking(move || {
        let m = LocalMove {
            source: require_disks(source.as_ref())?,
            from: &from,
            target: require_disks(target.as_ref())?,
            into: &into,
            owner: &who,
            workers: LOCAL_WORKERS,
            since,
            cancel: &cancel,
            progress: &|done, of| progress.progress(done * CHUNK, Some(of * CHUNK)),
        };
        let moved = local::run(&m)?;
        if let Some(path) = &leaves_at {
            Leaves::store(path, &moved.leaves, None)?;
        }
        Ok((moved.status, moved.read, tracked))
    })
    .await
    .map_err(|e| SdkError::Transient(format!("a transfer task failed: {e}")))?
}

/// The step's output: the disk written, with its verified root, and what
/// the move read, sent and wrote.
fn transfer_output(p: &TransferParams, status: &PullStatus, read: u64) -> StepOutput {
    let kind = match p.into.store {
        DiskStore::Volume => ArtifactKind::Volume,
        DiskStore::Image => ArtifactKind::DiskImage {
            format: p.into.format,
        },
    };
    let mut out = StepOutput::default();
    out.artifacts.insert(
        "disk".into(),
        Artifact {
            kind,
            site: p.site.clone(),
            locator: p.into.name.clone(),
            size: status.record.as_ref().map(|r| r.virtual_size),
            checksum: status.root.as_ref().map(|r| format!("blake3-merkle:{r}")),
        },
    );
    out.measured = Estimate {
        bytes_read: read,
        bytes_sent: status.wire_bytes,
        bytes_written: status.data_bytes,
        seconds: status.elapsed_s,
    };
    for (k, v) in [
        ("data_bytes", status.data_bytes),
        ("wire_bytes", status.wire_bytes),
        ("same_chunks", status.same_chunks),
        ("resent_chunks", status.resent_chunks),
        ("reconnects", status.reconnects),
    ] {
        out.facts.insert(k.into(), serde_json::json!(v));
    }
    out
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BucketParams {
    sites_file: PathBuf,
    from: String,
    site: String,
    bucket: String,
    relocation: String,
    #[serde(default)]
    bytes: u64,
    #[serde(default)]
    streams: Option<u32>,
    #[serde(default)]
    bwlimit: Option<u64>,
}

fn bucket_owner(p: &BucketParams) -> String {
    format!("{}/bucket:{}", p.relocation, p.bucket)
}

/// `bucket-transfer`: a bucket moved from the source site's agent to the
/// target site's agent (`crate::transfer::objects`), one of them embedded
/// in this process when its site runs here: every object checked
/// against its BLAKE3 hash, both listings compared at the end. A second
/// run (the final delta) fetches only what changed and removes what the
/// source no longer has. Rollback removes the bucket when this relocation
/// created it.
#[derive(Debug, Default, Clone, Copy)]
pub struct BucketTransfer;

#[async_trait]
impl Migrator for BucketTransfer {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "bucket-transfer",
            "moves a bucket from the source site's agent to the target site's agent, site to site",
            vec![ArtifactKind::Bucket],
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<BucketParams>(request)
    }

    async fn plan(&self, request: &StepRequest) -> SdkResult<Estimate> {
        let p: BucketParams = params(request)?;
        Ok(estimate(&p.sites_file, &p.from, &p.site, p.bytes))
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: BucketParams = params(request)?;
        let (source, target) = both_sites(&p.sites_file, &p.from, &p.site)?;
        let m = BucketMove {
            from: p.bucket.clone(),
            into: p.bucket.clone(),
            owner: bucket_owner(&p),
            streams: p.streams,
            bwlimit: p.bwlimit,
            limit_key: Some(limit_key(&p.relocation, &p.from, &p.site)),
        };
        let show = |s: &crate::transfer::PullStatus| ctx.progress.progress(s.done, Some(s.chunks));
        let ends = Ends::of(&p.sites_file, source, target).await?;
        let moved = match (ends.source(), ends.target()) {
            (Ok(from), Ok(into)) => transfer_bucket(from, into, &m, &show).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        ends.close().await;
        let status = moved?;
        let mut out = StepOutput::default();
        out.artifacts.insert(
            "bucket".into(),
            Artifact {
                kind: ArtifactKind::Bucket,
                site: p.site.clone(),
                locator: p.bucket.clone(),
                size: Some(status.chunks),
                checksum: None,
            },
        );
        out.measured = Estimate {
            bytes_read: status.data_bytes,
            bytes_sent: status.wire_bytes,
            bytes_written: status.data_bytes,
            seconds: status.elapsed_s,
        };
        out.facts
            .insert("objects_kept".into(), serde_json::json!(status.same_chunks));
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let p: BucketParams = params(request)?;
        let (_, target) = open_site(&p.sites_file, &p.site)?;
        let remove = crate::agent::server::RemoveBucket {
            bucket: p.bucket.clone(),
            owner: bucket_owner(&p),
        };
        if let Some(agent) = target.agent() {
            let _: bool = agent.post("/v1/buckets/remove", &remove).await?;
            return Ok(());
        }
        // A site of this process: its buckets' creators are recorded by
        // the agent embedded for the transfer, which removes it again.
        let here = Embedded::start(&p.sites_file, &p.site, Arc::from(target), None).await?;
        let removed = here
            .client()
            .post::<_, bool>("/v1/buckets/remove", &remove)
            .await;
        here.stop().await;
        removed.map(drop)
    }
}
