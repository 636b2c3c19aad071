//! # fluidcloud broker: choosing where a service goes
//!
//! The broker keeps a catalog of sites and migrators, finds migrator chains
//! from what a source has to what a target accepts, and solves placement
//! under constraints (ban, fence, spread, gather, latency, jurisdiction,
//! capacity) with explained results. Its REST service runs relocations
//! through an injected runner so it never depends on the conduit.
//!
//! This crate holds its place in the dependency chain; matching and the
//! REST service are built by the broker issue and are not here yet.

pub use fluidcloud_viaduct as viaduct;
