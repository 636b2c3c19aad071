//! `disk-transfer`: one disk moved from the source site's agent to the
//! target site's agent (`crate::transfer`). The orchestrator only starts
//! the pull and follows it; the bytes go site to site.
//!
//! The same step serves the pre-copy and the final delta: a second run
//! onto the disk the first wrote sends only the chunks that differ, and
//! every run ends with the Merkle roots of both sides compared. Its
//! rollback removes the disk and whatever the transfer left, when this
//! relocation created it.

use std::path::PathBuf;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error as SdkError, Estimate, ExecContext, ImageFormat,
    Migrator, MigratorDescriptor, Result as SdkResult, StepOutput, StepRequest,
};
use serde::Deserialize;

use super::steps::{descriptor, open_site, params, validate_params};
use crate::agent::client::AgentClient;
use crate::driver::{DiskStore, SiteDriver};
use crate::transfer::orchestrate::{BucketMove, Move, transfer, transfer_bucket};
use crate::transfer::{CHUNK, DiskRef};

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
}

/// `disk-transfer`: see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskTransfer;

fn agent_of<'a>(site: &'a dyn SiteDriver, name: &str) -> SdkResult<&'a AgentClient> {
    site.agent().ok_or_else(|| SdkError::NotSupported {
        operation: format!(
            "moving disks agent to agent: site {name} has no `agent` (run `fluidcloud agent` there)"
        ),
        site: Some(name.to_owned()),
    })
}

/// What a transfer between two sites is estimated to cost: its bytes read,
/// sent and written, over a WAN link of 100 Mbit/s until measured otherwise.
fn wan_estimate(bytes: u64) -> Estimate {
    Estimate {
        bytes_read: bytes,
        bytes_sent: bytes,
        bytes_written: bytes,
        seconds: bytes as f64 / 12.5e6,
    }
}

/// The source and target sites of a transfer step.
pub(super) fn both_sites(
    sites_file: &std::path::Path,
    from: &str,
    to: &str,
) -> SdkResult<(Box<dyn SiteDriver>, Box<dyn SiteDriver>)> {
    let (_, source) = open_site(sites_file, from)?;
    let (_, target) = open_site(sites_file, to)?;
    Ok((source, target))
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
        Ok(wan_estimate(p.allocated))
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: TransferParams = params(request)?;
        let (source, target) = both_sites(&p.sites_file, &p.from, &p.site)?;
        let m = Move {
            from: p.source.clone(),
            into: p.into.clone(),
            owner: owner(&p),
            streams: p.streams,
            bwlimit: p.bwlimit,
            limit_key: Some(limit_key(&p.relocation, &p.from, &p.site)),
        };
        let show = |s: &crate::transfer::PullStatus, g: &crate::transfer::TicketGrant| {
            ctx.progress
                .progress((s.done * CHUNK).min(g.virtual_size), Some(g.virtual_size));
        };
        let (status, grant) = transfer(
            agent_of(source.as_ref(), &p.from)?,
            agent_of(target.as_ref(), &p.site)?,
            &m,
            &show,
        )
        .await?;
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
                size: Some(grant.virtual_size),
                checksum: status.root.as_ref().map(|r| format!("merkle:{r}")),
            },
        );
        out.measured = Estimate {
            bytes_read: grant.data_bytes,
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
        let _: bool = agent_of(target.as_ref(), &p.site)?
            .post(
                "/v1/disks/remove",
                &crate::agent::server::RemoveDisk {
                    disk: p.into.clone(),
                    owner: owner(&p),
                },
            )
            .await?;
        Ok(())
    }
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
/// target site's agent (`crate::transfer::objects`): every object checked
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
        Ok(wan_estimate(p.bytes))
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
        let status = transfer_bucket(
            agent_of(source.as_ref(), &p.from)?,
            agent_of(target.as_ref(), &p.site)?,
            &m,
            &show,
        )
        .await?;
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
        let _: bool = agent_of(target.as_ref(), &p.site)?
            .post(
                "/v1/buckets/remove",
                &crate::agent::server::RemoveBucket {
                    bucket: p.bucket.clone(),
                    owner: bucket_owner(&p),
                },
            )
            .await?;
        Ok(())
    }
}
