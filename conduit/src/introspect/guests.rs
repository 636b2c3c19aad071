//! Introspection inside guests: the files of each instance's boot disk
//! (`crate::guest`), read once for all instances of the service.

use std::collections::BTreeMap;
use std::path::PathBuf;

use fluidcloud_plugins::{Diagnostic, ImageFormat, Severity};
use serde::Deserialize;

use crate::config::SiteConfig;
use crate::driver::{DiskStore, InstanceRecord, SiteDriver};
use crate::guest::{self, Accel, ApplianceDisk, GuestView};

/// The manifest's `[guest]` table: where a service keeps its config
/// inside its guests.
///
/// ```toml
/// [guest]
/// files = ["/etc/app/app.yaml"]   # always config files of the service
/// dirs = ["/opt/app/etc"]         # scanned besides /etc
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestManifest {
    /// Files that are the service's config, in every guest that has them.
    #[serde(default)]
    pub files: Vec<String>,
    /// Directories scanned for config files besides `/etc`.
    #[serde(default)]
    pub dirs: Vec<String>,
}

/// The guests of `instances` that can be looked into, by instance name,
/// and notes on those that cannot. Only disks this process reads as files
/// (a `local` site, a libvirt daemon on this host) whose first bytes hold
/// a partition table or a filesystem are looked into.
pub(super) async fn look_inside(
    driver: &dyn SiteDriver,
    site: &SiteConfig,
    instances: &[&InstanceRecord],
    manifest: &GuestManifest,
) -> (BTreeMap<String, GuestView>, Vec<Diagnostic>) {
    let mut notes = Vec::new();
    if driver.agent().is_some() || driver.disks().is_none() {
        return (BTreeMap::new(), notes);
    }
    let mut found = Vec::new();
    let mut names = Vec::new();
    for rec in instances {
        let Some(image) = &rec.boot_image else {
            continue;
        };
        let format = rec.formats.get(image).copied().unwrap_or(ImageFormat::Raw);
        if let Some(path) = probe(driver.name(), site, image, format).await {
            found.push(ApplianceDisk { path, format });
            names.push(rec.name.clone());
        }
    }
    let dirs: Vec<String> = manifest.dirs.clone();
    let accel = Accel::from_config(site.accel.as_deref());
    // An appliance that fails says nothing of the guests (a machine short
    // of memory, a QEMU that died): one more try before giving up.
    let mut result = guest::inspect_disks(&found, &names, &dirs, accel).await;
    if let Err(e) = &result {
        tracing::warn!("looking inside the guests failed ({e}); trying once more");
        result = guest::inspect_disks(&found, &names, &dirs, accel).await;
    }
    match result {
        Ok(views) => (names.into_iter().zip(views).collect(), notes),
        Err(e) => {
            notes.push(Diagnostic::new(
                Severity::Warning,
                format!(
                    "the guests of {} were not looked into ({e}): their config files and network settings are not known, and a relocation will not adapt them",
                    names.join(", ")
                ),
            ));
            (BTreeMap::new(), notes)
        }
    }
}

/// The file of boot disk `image` when its first bytes, as its guest sees
/// them, hold a partition table or a filesystem. The disk is read through
/// the site's `Disks` (its declared format, its backing files kept inside
/// the store), on a blocking thread with a driver of its own.
async fn probe(
    site_name: &str,
    site: &SiteConfig,
    image: &str,
    format: ImageFormat,
) -> Option<PathBuf> {
    let (name, cfg, image) = (site_name.to_owned(), site.clone(), image.to_owned());
    tokio::task::spawn_blocking(move || {
        let driver = crate::drivers::open(&name, &cfg).ok()?;
        let reader = driver
            .disks()?
            .read(DiskStore::Image, &image, format)
            .ok()?;
        let len = usize::try_from(reader.virtual_size())
            .unwrap_or(usize::MAX)
            .min(guest::HEAD);
        let mut head = vec![0u8; len];
        reader.read_at(0, &mut head).ok()?;
        guest::has_signature(&head).then(|| reader.path().to_path_buf())
    })
    .await
    .ok()
    .flatten()
}
