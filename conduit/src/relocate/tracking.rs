//! `change-tracking`: the source side of the warm path's final delta.
//!
//! - `op = "begin"` (before any pre-copy of the instances' disks): starts
//!   the source site's change tracking ([`crate::driver::ChangeTracking`])
//!   of each instance. From then on the disks the pre-copies read no
//!   longer change. Rollback ends the tracking, folding every write back.
//! - `op = "collect"` (after `source-stop`): reads each stopped instance's
//!   change sets into `dir` ([`ChangeSet::file_in`]), then ends the
//!   tracking. The final delta of each disk reads its change set: only
//!   those ranges, not the whole disk. A disk with no change set there
//!   (a site without tracking, a disk that is not a file) is re-hashed.
//!
//! Both are idempotent: a resumed `begin` keeps tracking that is on, and a
//! resumed `collect` keeps the change sets it wrote (`INSTANCE.done`).

use std::path::PathBuf;

use async_trait::async_trait;
use fluidcloud_migrators::changes::ChangeSet;
use fluidcloud_plugins::{
    Diagnostic, Error as SdkError, Estimate, ExecContext, Migrator, MigratorDescriptor,
    Result as SdkResult, StepOutput, StepRequest,
};
use serde::Deserialize;

use super::steps::{descriptor, nothing, open_site, params, validate_params};

/// What a `change-tracking` step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Start tracking, before the pre-copies.
    Begin,
    /// Save the change sets and end tracking, once the source stopped.
    Collect,
}

impl Op {
    /// Its `op` parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Begin => "begin",
            Self::Collect => "collect",
        }
    }

    /// The id of its step in a relocation.
    pub fn step_id(self) -> &'static str {
        match self {
            Self::Begin => "track-changes",
            Self::Collect => "collect-changes",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrackParams {
    sites_file: PathBuf,
    site: String,
    instances: Vec<String>,
    op: Op,
    /// Where change sets are written (`collect`).
    dir: PathBuf,
}

/// The `change-tracking` migrator. See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChangeTrack;

#[async_trait]
impl Migrator for ChangeTrack {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "change-tracking",
            "tracks the source's disk writes so the final delta reads only those",
            Vec::new(),
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<TrackParams>(request)
    }

    async fn plan(&self, _request: &StepRequest) -> SdkResult<Estimate> {
        Ok(nothing())
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: TrackParams = params(request)?;
        let (_, driver) = open_site(&p.sites_file, &p.site)?;
        let Some(tracking) = driver.change_tracking() else {
            return Ok(StepOutput::default());
        };
        let mut out = StepOutput::default();
        match p.op {
            Op::Begin => {
                for name in &p.instances {
                    tracking.begin_tracking(name).await?;
                }
            }
            Op::Collect => {
                std::fs::create_dir_all(&p.dir)
                    .map_err(|e| SdkError::io(format!("creating {}", p.dir.display()), e))?;
                let mut changed = 0u64;
                for name in &p.instances {
                    changed += collect(tracking, name, &p.dir).await?;
                }
                ctx.progress.message(&format!(
                    "source disks: {changed} bytes written since the pre-copy began"
                ));
                out.facts.insert("changed_bytes".into(), changed.into());
            }
        }
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let p: TrackParams = params(request)?;
        if p.op == Op::Collect {
            // Its tracking was already folded back; `begin` ends any left.
            return Ok(());
        }
        let (_, driver) = open_site(&p.sites_file, &p.site)?;
        if let Some(tracking) = driver.change_tracking() {
            for name in &p.instances {
                tracking.end_tracking(name).await?;
            }
        }
        Ok(())
    }
}

/// Writes instance `name`'s change sets into `dir`, then ends its
/// tracking; the bytes they cover. Once done (`dir/NAME.done`), nothing.
async fn collect(
    tracking: &dyn crate::driver::ChangeTracking,
    name: &str,
    dir: &std::path::Path,
) -> SdkResult<u64> {
    let done = dir.join(format!("{name}.done"));
    if let Ok(text) = std::fs::read_to_string(&done) {
        return Ok(text.trim().parse().unwrap_or(0));
    }
    let mut changed = 0;
    // Saved before the tracking ends: once folded back, the overlays that
    // say what changed are gone.
    for set in tracking.changes(name).await?.unwrap_or_default() {
        changed += set.bytes();
        set.save(&ChangeSet::file_in(dir, &set.disk))?;
    }
    tracking.end_tracking(name).await?;
    super::store::write_atomic(&done, changed.to_string().as_bytes())
        .map_err(super::steps::to_sdk)?;
    Ok(changed)
}
