//! The [`Guests`] capability of sites whose disks are files of this
//! process (`local` sites, libvirt daemons on this host): the appliance
//! opens the disks where they lie. A site agent serves the same capability
//! to orchestrators on other machines (`/v1/guests/…`), so guests are
//! looked into and adapted on the machine that holds their disks, and no
//! disk crosses the network for it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use fluidcloud_plugins::{Error, ImageFormat, Result};
use serde::{Deserialize, Serialize};

use super::{Accel, Appliance, ApplianceDisk, Applied, GuestPlan, GuestView};
use crate::driver::{DiskStore, Guests, SiteDriver, require_block_store, require_image_store};
use crate::transfer::DiskRef;

/// An instance's boot disk, to look inside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootDisk {
    /// The instance.
    pub instance: String,
    /// Its boot image at the site.
    pub image: String,
    /// The image's format there.
    pub format: ImageFormat,
}

/// One guest's disks at a site, to prepare or adapt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestJob {
    /// The key its appliance waits under between the two steps
    /// (`RELOCATION/INSTANCE`).
    pub key: String,
    /// The instance (named in errors and notes).
    pub instance: String,
    /// Its disks, the boot disk first.
    pub disks: Vec<DiskRef>,
}

/// What [`Guests::prepare`] did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepared {
    /// Seconds the appliance took to boot; `None` when none was booted (a
    /// qcow2 target is opened only after its final delta: QEMU would
    /// cache metadata the delta changes).
    pub launch_seconds: Option<f64>,
}

/// What [`Guests::adapt`] did.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adapted {
    /// The files rewritten, notes and removals.
    pub applied: Applied,
    /// Whether the appliance [`Guests::prepare`] booted did the work (else
    /// one was booted inside the downtime).
    pub prelaunched: bool,
}

/// A site driver whose disks are files of this process: it offers
/// [`Guests`].
pub trait FileGuests: SiteDriver + Clone + 'static {
    /// How its appliances run (the site's `accel` key).
    fn accel(&self) -> Accel;
}

#[async_trait]
impl<T: FileGuests> Guests for T {
    async fn inspect(
        &self,
        boots: &[BootDisk],
        dirs: &[String],
    ) -> Result<BTreeMap<String, GuestView>> {
        let mut found = Vec::new();
        let mut names = Vec::new();
        for boot in boots {
            if let Some(path) = probe(self.clone(), boot).await {
                found.push(ApplianceDisk {
                    path,
                    format: boot.format,
                });
                names.push(boot.instance.clone());
            }
        }
        // An appliance that fails says nothing of the guests (a machine
        // short of memory, a QEMU that died): one more try.
        let mut result = super::inspect_disks(&found, &names, dirs, self.accel()).await;
        if let Err(e) = &result {
            tracing::warn!("looking inside the guests failed ({e}); trying once more");
            result = super::inspect_disks(&found, &names, dirs, self.accel()).await;
        }
        Ok(names.into_iter().zip(result?).collect())
    }

    async fn prepare(&self, job: &GuestJob) -> Result<Prepared> {
        let disks = appliance_disks(self, &job.disks).await?;
        // An earlier run of this step, or one that died, left its appliance.
        self.release(&job.key).await?;
        if disks.iter().any(|d| d.format != ImageFormat::Raw) {
            return Ok(Prepared {
                launch_seconds: None,
            });
        }
        let app = Appliance::launch(&disks, false, self.accel()).await?;
        check_root_readable(&app, &job.instance, self.name()).await?;
        let launch_seconds = Some(app.launch_time.as_secs_f64());
        super::keep(&job.key, app)?;
        Ok(Prepared { launch_seconds })
    }

    async fn adapt(&self, job: &GuestJob, plan: &GuestPlan) -> Result<Adapted> {
        let waiting = super::take(&job.key).and_then(|a| Arc::try_unwrap(a).ok());
        let (app, prelaunched) = match waiting {
            Some(app) => (app, true),
            None => {
                // The process that prepared it died (this is a resume):
                // its appliance may still hold the disks.
                self.release(&job.key).await?;
                let disks = appliance_disks(self, &job.disks).await?;
                (Appliance::launch(&disks, false, self.accel()).await?, false)
            }
        };
        let applied = super::adapt::apply(&app, 0, plan, &job.instance).await?;
        app.shutdown().await?;
        Ok(Adapted {
            applied,
            prelaunched,
        })
    }

    async fn release(&self, key: &str) -> Result<()> {
        // Off the runtime: stopping waits for the appliance to exit.
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            drop(super::take(&key));
            super::stop_stale(&key);
        })
        .await
        .map_err(|e| Error::Precondition(format!("stopping a guest appliance: {e}")))
    }
}

/// The file of `boot`'s disk when its first bytes, as its guest sees them,
/// hold a partition table or a filesystem. The disk is read through the
/// site's `Disks` (its declared format, its backing files kept inside the
/// store), on a blocking thread.
async fn probe<T: FileGuests>(site: T, boot: &BootDisk) -> Option<PathBuf> {
    let (image, format) = (boot.image.clone(), boot.format);
    tokio::task::spawn_blocking(move || {
        let reader = site.disks()?.read(DiskStore::Image, &image, format).ok()?;
        let len = usize::try_from(reader.virtual_size())
            .unwrap_or(usize::MAX)
            .min(super::HEAD);
        let mut head = vec![0u8; len];
        reader.read_at(0, &mut head).ok()?;
        super::has_signature(&head).then(|| reader.path().to_path_buf())
    })
    .await
    .ok()
    .flatten()
}

/// `disks` as files of this machine.
async fn appliance_disks(site: &dyn SiteDriver, disks: &[DiskRef]) -> Result<Vec<ApplianceDisk>> {
    let mut out = Vec::new();
    for d in disks {
        let info = match d.store {
            DiskStore::Image => require_image_store(site)?.image_info(&d.name).await?,
            DiskStore::Volume => require_block_store(site)?.volume_info(&d.name).await?,
        };
        out.push(ApplianceDisk {
            path: PathBuf::from(info.locator),
            format: d.format,
        });
    }
    Ok(out)
}

/// An error when no filesystem of the boot disk can be a readable root.
async fn check_root_readable(app: &Appliance, instance: &str, site: &str) -> Result<()> {
    let device = super::inspect::device_of(app, 0).await?;
    let mine = super::inspect::filesystems_of(app, &device).await?;
    let readable = mine
        .iter()
        .any(|(_, t)| super::inspect::ROOT_TYPES.contains(&t.as_str()));
    if readable {
        return Ok(());
    }
    let encrypted = mine.iter().any(|(_, t)| t == "crypto_LUKS");
    Err(Error::Precondition(format!(
        "instance {instance}: {} at {site}; the relocation stops before the source is stopped",
        if encrypted {
            "its root filesystem is encrypted (LUKS), which fluidcloud cannot adapt without its key"
        } else {
            "no filesystem of its boot disk is one fluidcloud can read"
        },
    )))
}
