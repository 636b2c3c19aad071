//! # fluidcloud conduit: sites, their drivers, and introspection
//!
//! The conduit is where fluidcloud touches real sites. It reads the sites
//! file ([`config`]), opens a driver per site ([`drivers`], behind the traits
//! of [`driver`]), and discovers the topology of a service running on a site
//! ([`introspect`], with [`scan`] finding the endpoints inside config files).
//!
//! Drivers follow rclone's shape: a small required trait plus optional
//! capability traits, detected rather than declared, so the broker can match
//! on what a site really offers. Every built-in driver passes the same
//! conformance suite (`conduit/tests/conformance.rs`, exported as
//! [`conformance`] so out-of-tree drivers can run it too).

pub mod agent;
pub mod config;
pub mod conformance;
pub mod demo;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod guest;
pub mod introspect;
pub mod relocate;
pub mod scan;
pub mod tomlfile;
pub mod transfer;

pub use config::{SiteConfig, SitesFile};
pub use driver::SiteDriver;
pub use error::{Error, Result};
pub use introspect::{Introspection, ServiceManifest, introspect};
