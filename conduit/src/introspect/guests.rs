//! Introspection inside guests: the files of each instance's boot disk
//! (`crate::guest`), read once for all instances of the service.

use std::collections::BTreeMap;

use fluidcloud_plugins::{Diagnostic, ImageFormat, Severity};
use serde::Deserialize;

use crate::driver::{InstanceRecord, SiteDriver};
use crate::guest::{BootDisk, GuestView};

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
/// and notes on those that cannot. Guests are looked into where their
/// disks are (this process, or the site's agent: `crate::driver::Guests`);
/// only boot disks whose first bytes hold a partition table or a
/// filesystem are.
pub(super) async fn look_inside(
    driver: &dyn SiteDriver,
    instances: &[&InstanceRecord],
    manifest: &GuestManifest,
) -> (BTreeMap<String, GuestView>, Vec<Diagnostic>) {
    let Some(guests) = driver.guests() else {
        return (BTreeMap::new(), Vec::new());
    };
    let boots: Vec<BootDisk> = instances
        .iter()
        .filter_map(|rec| {
            let image = rec.boot_image.clone()?;
            Some(BootDisk {
                instance: rec.name.clone(),
                format: rec.formats.get(&image).copied().unwrap_or(ImageFormat::Raw),
                image,
            })
        })
        .collect();
    match guests.inspect(&boots, &manifest.dirs).await {
        Ok(views) => (views, Vec::new()),
        Err(e) => {
            let names: Vec<&str> = boots.iter().map(|b| b.instance.as_str()).collect();
            let note = Diagnostic::new(
                Severity::Warning,
                format!(
                    "the guests of {} were not looked into ({e}): their config files and network settings are not known, and a relocation will not adapt them",
                    names.join(", ")
                ),
            );
            (BTreeMap::new(), vec![note])
        }
    }
}
