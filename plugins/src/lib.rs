//! # fluidcloud plugin SDK: the shared vocabulary
//!
//! Every crate of fluidcloud, and every plugin, speaks the types defined
//! here: [`site`]s and their [`Capability`]s, the [`resource`]s of a service
//! (instances, volumes, images, buckets, config files, endpoints) with stable
//! ids, the [`Topology`] graph that links them, the [`Migrator`] trait, the
//! structured [`Diagnostic`]s that point at what a user must fix, and the
//! [`Retry`] classification that travels with every error.
//!
//! This crate does no I/O of its own beyond what a migrator implementation
//! chooses to do; it depends only on serde, petgraph and async-trait, so a
//! plugin author pulls in little.

pub mod diagnostic;
pub mod error;
pub mod migrator;
pub mod resource;
pub mod site;
pub mod topology;

pub use diagnostic::{Diagnostic, Severity};
pub use error::{Error, Result, Retry, Retryable};
pub use migrator::{
    Artifact, ArtifactKind, CancelFlag, Estimate, ExecContext, Migrator, MigratorDescriptor,
    NoProgress, ProgressSink, StepOutput, StepRequest,
};
pub use resource::{
    ConfigFormat, EndpointKind, ImageFormat, Origin, Resource, ResourceId, ResourceKind,
    ResourceSpec,
};
pub use site::{Capability, Capacity, Cost, Location, SiteInfo};
pub use topology::{Edge, Relation, Topology, TopologyDoc};
