//! # fluidcloud broker: choosing where a service goes
//!
//! No other migration tool chooses the target for the user; the broker does,
//! and says why. Given a service's [`Topology`](fluidcloud_plugins::Topology),
//! the sites it could go to ([`SiteInfo`](fluidcloud_plugins::SiteInfo):
//! location, jurisdiction, cost, capacity, accepted image formats, detected
//! capabilities) and the migrators available
//! ([`MigratorDescriptor`](fluidcloud_plugins::MigratorDescriptor)), it:
//!
//! - finds, per resource, the cheapest [`chain`] of migrators from what the
//!   source has to what a target accepts;
//! - applies [`constraint`]s in the vocabulary of the btrPlace/Plasma
//!   placement work (ban, fence, spread, gather, latency, jurisdiction, and
//!   the implicit capacity and formats);
//! - solves the [`placement`] exactly (branch and bound) for the sizes
//!   services have, with a documented heuristic beyond, and explains every
//!   choice and every rejected site — or returns a minimal set of
//!   conflicting constraints when nothing fits.
//!
//! The broker never touches a site: the conduit hands it facts, and its
//! REST service runs relocations through an injected runner
//! ([`runner::Relocations`]). It speaks HTTPS through [`tls`], which holds
//! the certificate handling every network service of fluidcloud shares.

pub mod chain;
pub mod constraint;
pub mod error;
pub mod placement;
pub mod rest;
pub mod runner;
pub mod tls;
pub mod ui;

pub use constraint::Constraint;
pub use error::{Error, Result};
pub use placement::{Placement, Request, Unit, solve, units};
