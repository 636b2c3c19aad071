//! `guest-prepare` and `guest-adapt`: the guest of a relocated instance
//! adapted to its new site, inside its target disks (`crate::guest`).
//!
//! - `guest-prepare` runs while the source still serves, after the
//!   pre-copies and the verify step: it refuses a guest whose root cannot
//!   be read (encrypted, unrecognised), before anything is stopped, and
//!   boots the libguestfs appliance over the target disks (about 11 s
//!   under TCG), which then waits where the disks are: in this process,
//!   or in the target site's agent (`crate::driver::Guests`).
//! - `guest-adapt` runs after the final deltas, before cut-over: the
//!   waiting appliance drops what it cached of the disks, mounts the
//!   guest read-write and rewrites its config and network files. Only
//!   this is downtime. Without a waiting appliance (a resumed relocation,
//!   a qcow2 target) it boots one first.
//!
//! A qcow2 target is never opened by an appliance while the final delta
//! writes it: QEMU caches qcow2 metadata, which the delta would change
//! underneath. Raw targets are coherent through the host's page cache.

use std::path::PathBuf;

use async_trait::async_trait;
use fluidcloud_migrators::config;
use fluidcloud_plugins::{
    Diagnostic, Error as SdkError, Estimate, ExecContext, Migrator, MigratorDescriptor,
    Result as SdkResult, StepOutput, StepRequest,
};
use serde::{Deserialize, Serialize};

use super::steps::{descriptor, nothing, open_site, params, validate_params};
use crate::driver::{SiteDriver, require_guests};
use crate::guest::{Adapted, GuestJob, GuestPlan};
use crate::transfer::DiskRef;

/// The parameters of both steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestParams {
    /// The sites file.
    pub sites_file: PathBuf,
    /// The source site (named in the report).
    pub from: String,
    /// The target site.
    pub site: String,
    /// The instance.
    pub instance: String,
    /// The relocation.
    pub relocation: String,
    /// Its disks at the target, the boot disk first.
    pub disks: Vec<DiskRef>,
    /// What to change.
    pub plan: GuestPlan,
    /// Why its guest cannot be read, as introspection found.
    #[serde(default)]
    pub problem: Option<String>,
}

impl GuestParams {
    fn key(&self) -> String {
        format!("{}/{}", self.relocation, self.instance)
    }

    /// The guest's disks at the target, under its key.
    fn job(&self) -> GuestJob {
        GuestJob {
            key: self.key(),
            instance: self.instance.clone(),
            disks: self.disks.clone(),
        }
    }
}

/// The target's driver; its guests are looked into where its disks are
/// (this process, or the site's agent).
fn target(p: &GuestParams) -> SdkResult<Box<dyn SiteDriver>> {
    Ok(open_site(&p.sites_file, &p.site)?.1)
}

/// `guest-prepare`: see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestPrepare;

#[async_trait]
impl Migrator for GuestPrepare {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "guest-prepare",
            "checks a relocated guest can be adapted and boots the appliance that will adapt it",
            Vec::new(),
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<GuestParams>(request)
    }

    async fn plan(&self, _request: &StepRequest) -> SdkResult<Estimate> {
        Ok(Estimate {
            seconds: 12.0,
            ..nothing()
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: GuestParams = params(request)?;
        if let Some(problem) = &p.problem {
            return Err(SdkError::Precondition(format!(
                "instance {} cannot be adapted to {}: {problem}",
                p.instance, p.site
            )));
        }
        let target = target(&p)?;
        let guests = require_guests(target.as_ref())?;
        ctx.progress
            .message(&format!("{}: preparing the guest appliance", p.instance));
        let prepared = guests.prepare(&p.job()).await?;
        let mut out = StepOutput::default();
        match prepared.launch_seconds {
            Some(s) => {
                out.facts
                    .insert("guest_launch_seconds".into(), serde_json::json!(s));
            }
            None => ctx.progress.message(&format!(
                "{}: the appliance boots after the final delta (a qcow2 target disk)",
                p.instance
            )),
        }
        out.facts.insert(
            "guest_prelaunched".into(),
            serde_json::json!(prepared.launch_seconds.is_some()),
        );
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let p: GuestParams = params(request)?;
        // An appliance that cannot be reached now stops on its own: with
        // its process, or after an agent's wait limit.
        if let Err(e) = stop_waiting(&p).await {
            tracing::warn!("{}: the guest appliance was not stopped: {e}", p.instance);
        }
        Ok(())
    }
}

/// Stops the appliance waiting for `p`'s instance, wherever it waits.
async fn stop_waiting(p: &GuestParams) -> SdkResult<()> {
    let target = target(p)?;
    require_guests(target.as_ref())?.release(&p.key()).await
}

/// `guest-adapt`: see the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestAdapt;

#[async_trait]
impl Migrator for GuestAdapt {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "guest-adapt",
            "rewrites a relocated guest's config and network files inside its target disk",
            Vec::new(),
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<GuestParams>(request)
    }

    async fn plan(&self, _request: &StepRequest) -> SdkResult<Estimate> {
        Ok(Estimate {
            seconds: 3.0,
            ..nothing()
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: GuestParams = params(request)?;
        let started = std::time::Instant::now();
        let target = target(&p)?;
        ctx.progress
            .message(&format!("{}: adapting inside the guest", p.instance));
        let Adapted {
            applied,
            prelaunched,
        } = require_guests(target.as_ref())?
            .adapt(&p.job(), &p.plan)
            .await?;
        let mut out = StepOutput::default();
        let diffs: Vec<serde_json::Value> = applied
            .files
            .iter()
            .map(|e| {
                serde_json::json!({
                    "source": format!("{}:{}:{}", p.from, p.instance, e.path),
                    "target": format!("{}:{}:{}", p.site, p.instance, e.path),
                    "diff": config::unified_diff(&e.path, &e.old, &e.new),
                })
            })
            .collect();
        for e in &applied.files {
            out.measured.bytes_written += e.new.len() as u64;
            out.measured.bytes_read += e.old.len() as u64;
        }
        let notes: Vec<String> = applied.notes.iter().map(note_line).collect();
        for n in &notes {
            ctx.progress.message(n);
        }
        ctx.progress.message(&format!(
            "{}: {} file(s) adapted in {:.1} s{}",
            p.instance,
            applied.files.len(),
            started.elapsed().as_secs_f64(),
            if prelaunched {
                ""
            } else {
                " (appliance booted now)"
            }
        ));
        for (k, v) in [
            ("guest_diffs", serde_json::json!(diffs)),
            ("guest_notes", serde_json::json!(notes)),
            ("guest_removed", serde_json::json!(applied.removed)),
            (
                "guest_seconds",
                serde_json::json!(started.elapsed().as_secs_f64()),
            ),
            ("guest_edit_seconds", serde_json::json!(applied.seconds)),
            ("guest_prelaunched", serde_json::json!(prelaunched)),
        ] {
            out.facts.insert(k.into(), v);
        }
        Ok(out)
    }

    async fn rollback(
        &self,
        _request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        // The edits are in the target disks, which the disk transfers'
        // rollbacks remove.
        Ok(())
    }
}

/// A diagnostic as one line: `FILE:LINE: summary`.
fn note_line(d: &Diagnostic) -> String {
    match (&d.file, d.line) {
        (Some(f), Some(l)) => format!("{}:{l}: {}", f.display(), d.summary),
        (Some(f), None) => format!("{}: {}", f.display(), d.summary),
        _ => d.summary.clone(),
    }
}
