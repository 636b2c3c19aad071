//! Built-in site drivers, registered in one list.
//!
//! To add a driver, copy `local.rs`'s layout exactly (descriptor constant at
//! the top, `open` factory, the driver struct, one `impl` per capability) and
//! add its descriptor to [`DRIVERS`]. It must pass the shared conformance
//! suite (`conduit/tests/conformance.rs`).

pub mod agent;
pub mod aws;
pub(crate) mod filedisk;
pub mod libvirt;
pub mod local;
pub mod openstack;
pub(crate) mod patchdisk;
pub(crate) mod runtime;
pub(crate) mod s3buckets;

use crate::config::SiteConfig;
use crate::driver::SiteDriver;
use crate::error::{Error, Result};

/// How to build a driver of one kind.
#[derive(Debug, Clone, Copy)]
pub struct DriverDescriptor {
    /// The `kind` value in the sites file.
    pub kind: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// Sites-file keys this kind uses beyond the common ones, with help.
    pub options: &'static [(&'static str, &'static str)],
    /// Whether the instances it defines name their disks' bus (a
    /// hypervisor's domains do; a relocation then always sets one).
    pub disk_bus: bool,
    /// Builds a driver for the named site.
    pub open: fn(name: &str, config: &SiteConfig) -> Result<Box<dyn SiteDriver>>,
}

/// Every built-in driver.
pub const DRIVERS: &[DriverDescriptor] = &[
    local::DESCRIPTOR,
    libvirt::DESCRIPTOR,
    aws::DESCRIPTOR,
    openstack::DESCRIPTOR,
];

/// Whether instances of sites of `kind` name their disks' bus
/// ([`DriverDescriptor::disk_bus`]).
pub fn names_disk_bus(kind: &str) -> bool {
    DRIVERS.iter().any(|d| d.kind == kind && d.disk_bus)
}

/// The kinds of every built-in driver.
pub fn kinds() -> Vec<&'static str> {
    DRIVERS.iter().map(|d| d.kind).collect()
}

/// Opens the driver for site `name`: through its agent when it has one
/// (whatever its kind), else in this process.
///
/// # Errors
/// `Config` for an unknown kind; whatever the driver's factory returns.
pub fn open(name: &str, config: &SiteConfig) -> Result<Box<dyn SiteDriver>> {
    if config.agent.is_some() {
        return agent::open(name, config);
    }
    let d = DRIVERS
        .iter()
        .find(|d| d.kind == config.kind)
        .ok_or_else(|| Error::Config {
            diagnostics: vec![
                fluidcloud_plugins::Diagnostic::error(format!(
                    "unknown site kind `{}`",
                    config.kind
                ))
                .at_key(format!("sites.{name}.kind")),
            ],
        })?;
    (d.open)(name, config)
}
