//! `guest-prepare` and `guest-adapt`: the guest of a relocated instance
//! adapted to its new site, inside its target disks (`crate::guest`).
//!
//! - `guest-prepare` runs while the source still serves, after the
//!   pre-copies and the verify step: it refuses a guest whose root cannot
//!   be read (encrypted, unrecognised), before anything is stopped, and
//!   boots the libguestfs appliance over the target disks (about 11 s
//!   under TCG), which then waits in this process.
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
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_migrators::config;
use fluidcloud_plugins::{
    Diagnostic, Error as SdkError, Estimate, ExecContext, ImageFormat, Migrator,
    MigratorDescriptor, Result as SdkResult, StepOutput, StepRequest,
};
use serde::{Deserialize, Serialize};

use super::steps::{descriptor, nothing, open_site, params, validate_params};
use crate::driver::{DiskStore, SiteDriver, require_block_store, require_image_store};
use crate::guest::{self, Accel, Appliance, ApplianceDisk, GuestPlan};
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
}

/// The target disks as files of this machine.
async fn appliance_disks(
    target: &dyn SiteDriver,
    p: &GuestParams,
) -> SdkResult<Vec<ApplianceDisk>> {
    if target.agent().is_some() {
        return Err(SdkError::NotSupported {
            operation: format!(
                "adapting instance {} inside its disks at a site reached through an agent",
                p.instance
            ),
            site: Some(p.site.clone()),
        });
    }
    let mut out = Vec::new();
    for d in &p.disks {
        let info = match d.store {
            DiskStore::Image => require_image_store(target)?.image_info(&d.name).await?,
            DiskStore::Volume => require_block_store(target)?.volume_info(&d.name).await?,
        };
        out.push(ApplianceDisk {
            path: PathBuf::from(info.locator),
            format: d.format,
        });
    }
    Ok(out)
}

/// The target's driver and how its appliances run (its `accel` key).
fn target(p: &GuestParams) -> SdkResult<(Box<dyn SiteDriver>, Accel)> {
    let (file, driver) = open_site(&p.sites_file, &p.site)?;
    let cfg = file.site(&p.site).map_err(super::steps::to_sdk)?;
    Ok((driver, Accel::from_config(cfg.accel.as_deref())))
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
        let (target, accel) = target(&p)?;
        let disks = appliance_disks(target.as_ref(), &p).await?;
        let mut out = StepOutput::default();
        if disks.iter().any(|d| d.format != ImageFormat::Raw) {
            ctx.progress.message(&format!(
                "{}: the appliance boots after the final delta (a qcow2 target disk)",
                p.instance
            ));
            out.facts
                .insert("guest_prelaunched".into(), serde_json::json!(false));
            return Ok(out);
        }
        ctx.progress
            .message(&format!("{}: booting the guest appliance", p.instance));
        // An earlier run of this step, or one that died, left its appliance.
        stop_waiting(&p).await;
        let app = Appliance::launch(&disks, false, accel).await?;
        // Refuse now, while the source still runs, a guest whose root is
        // encrypted or unrecognised: reading the filesystem list only
        // probes the disk, it mounts nothing.
        check_root_readable(&app, &p).await?;
        out.facts.insert(
            "guest_launch_seconds".into(),
            serde_json::json!(app.launch_time.as_secs_f64()),
        );
        out.facts
            .insert("guest_prelaunched".into(), serde_json::json!(true));
        guest::keep(&p.key(), app)?;
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let p: GuestParams = params(request)?;
        stop_waiting(&p).await;
        Ok(())
    }
}

/// Stops the appliance waiting for `p`'s instance, in this process or
/// left by one that died (off the runtime: it waits for the server to
/// exit).
async fn stop_waiting(p: &GuestParams) {
    let key = p.key();
    let _ = tokio::task::spawn_blocking(move || {
        drop(guest::take(&key));
        guest::stop_stale(&key);
    })
    .await;
}

/// An error when no filesystem of the boot disk can be a readable root.
async fn check_root_readable(app: &Appliance, p: &GuestParams) -> SdkResult<()> {
    let device = guest::inspect::device_of(app, 0).await?;
    let mine = guest::inspect::filesystems_of(app, &device).await?;
    let readable = mine
        .iter()
        .any(|(_, t)| guest::inspect::ROOT_TYPES.contains(&t.as_str()));
    if readable {
        return Ok(());
    }
    let encrypted = mine.iter().any(|(_, t)| t == "crypto_LUKS");
    Err(SdkError::Precondition(format!(
        "instance {}: {} at {}; the relocation stops before the source is stopped",
        p.instance,
        if encrypted {
            "its root filesystem is encrypted (LUKS), which fluidcloud cannot adapt without its key"
        } else {
            "no filesystem of its boot disk is one fluidcloud can read"
        },
        p.site
    )))
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
        let (app, prelaunched) = match guest::take(&p.key()).and_then(|a| Arc::try_unwrap(a).ok()) {
            Some(app) => (app, true),
            None => {
                // The process that ran `guest-prepare` died (this is a
                // resume): its appliance holds the disks.
                stop_waiting(&p).await;
                let (target, accel) = target(&p)?;
                let disks = appliance_disks(target.as_ref(), &p).await?;
                ctx.progress
                    .message(&format!("{}: booting the guest appliance", p.instance));
                (Appliance::launch(&disks, false, accel).await?, false)
            }
        };
        ctx.progress
            .message(&format!("{}: adapting inside the guest", p.instance));
        let applied = guest::adapt::apply(&app, 0, &p.plan, &p.instance).await?;
        app.shutdown().await?;
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
