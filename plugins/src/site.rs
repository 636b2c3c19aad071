//! Sites: where a service runs or could run, and what each can do.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::resource::ImageFormat;

/// The optional powers a site driver can have, besides the required core.
///
/// The broker matches on these; a missing one means the operation fails with
/// `NotSupported`, never a silent fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Lists what runs on the site (instances, volumes, images, buckets, config files).
    Inventory,
    /// Stores and serves disk images.
    ImageStore,
    /// Reads and writes block volumes with allocation status.
    BlockStore,
    /// Offers buckets through an `object_store::ObjectStore`.
    ObjectStorage,
    /// Defines, starts and stops instances.
    Compute,
}

impl Capability {
    /// Every capability, in display order.
    pub const ALL: [Capability; 5] = [
        Capability::Inventory,
        Capability::ImageStore,
        Capability::BlockStore,
        Capability::ObjectStorage,
        Capability::Compute,
    ];

    /// The kebab-case name used in configs and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Inventory => "inventory",
            Capability::ImageStore => "image-store",
            Capability::BlockStore => "block-store",
            Capability::ObjectStorage => "object-storage",
            Capability::Compute => "compute",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Geographic location of a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// Provider or operator region name, e.g. `fr-bretagne`.
    pub region: String,
    /// Latitude in degrees, -90..=90.
    pub latitude: f64,
    /// Longitude in degrees, -180..=180.
    pub longitude: f64,
}

impl Location {
    /// Great-circle distance in kilometres (haversine, mean Earth radius).
    pub fn distance_km(&self, other: &Location) -> f64 {
        const EARTH_RADIUS_KM: f64 = 6371.0;
        let (lat1, lat2) = (self.latitude.to_radians(), other.latitude.to_radians());
        let dlat = lat2 - lat1;
        let dlon = (other.longitude - self.longitude).to_radians();
        let a = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_KM * a.sqrt().asin()
    }
}

/// Prices a site charges, in the site's currency.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Cost {
    /// ISO 4217 currency code.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Price of one vCPU for one hour.
    #[serde(default)]
    pub vcpu_hour: f64,
    /// Price of one GiB of memory for one hour.
    #[serde(default)]
    pub memory_gib_hour: f64,
    /// Price of storing one GiB for a month.
    #[serde(default)]
    pub storage_gib_month: f64,
    /// Price of one GiB leaving the site.
    #[serde(default)]
    pub egress_gib: f64,
    /// Grams of CO2-equivalent per kWh, when the site declares it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carbon_g_per_kwh: Option<f64>,
}

fn default_currency() -> String {
    "EUR".to_owned()
}

/// Capacity of a site, as far as it is declared or detected.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Total vCPUs available to relocated instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Total memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Total storage in GiB (images, volumes and buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_gib: Option<u64>,
}

/// Everything known about a site: declared facts plus detected capabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SiteInfo {
    /// The site's name in the sites file.
    pub name: String,
    /// Driver kind, e.g. `local`.
    pub kind: String,
    /// Where it is.
    pub location: Location,
    /// Legal jurisdiction, e.g. `EU/FR`; matched by prefix (`EU` covers `EU/FR`).
    pub jurisdiction: String,
    /// What it charges.
    pub cost: Cost,
    /// How much it can hold.
    pub capacity: Capacity,
    /// Disk image formats its image store or compute accepts.
    pub image_formats: BTreeSet<ImageFormat>,
    /// Capabilities the driver detected.
    pub capabilities: BTreeSet<Capability>,
    /// Round trip of the site's health check from the broker, in
    /// milliseconds, measured when the service started (a site reached
    /// through an agent: the network's round trip and the agent's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
}

impl SiteInfo {
    /// Whether the site's jurisdiction lies within `region` (`EU` contains `EU/FR`).
    pub fn in_jurisdiction(&self, region: &str) -> bool {
        let j = self.jurisdiction.as_str();
        j == region || (j.starts_with(region) && j.as_bytes().get(region.len()) == Some(&b'/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paris_to_frankfurt_is_about_480_km() {
        let paris = Location {
            region: "fr".into(),
            latitude: 48.8566,
            longitude: 2.3522,
        };
        let fra = Location {
            region: "de".into(),
            latitude: 50.1109,
            longitude: 8.6821,
        };
        let d = paris.distance_km(&fra);
        assert!((470.0..490.0).contains(&d), "{d}");
        assert!(paris.distance_km(&paris).abs() < 1e-9);
    }

    #[test]
    fn jurisdiction_matches_by_path_prefix() {
        let site = SiteInfo {
            name: "x".into(),
            kind: "local".into(),
            location: Location {
                region: "r".into(),
                latitude: 0.0,
                longitude: 0.0,
            },
            jurisdiction: "EU/FR".into(),
            cost: Cost::default(),
            capacity: Capacity::default(),
            image_formats: BTreeSet::new(),
            capabilities: BTreeSet::new(),
            rtt_ms: None,
        };
        assert!(site.in_jurisdiction("EU"));
        assert!(site.in_jurisdiction("EU/FR"));
        assert!(!site.in_jurisdiction("EU/F"));
        assert!(!site.in_jurisdiction("US"));
    }
}
