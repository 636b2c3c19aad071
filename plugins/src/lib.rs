//! # fluidcloud plugin SDK: the shared vocabulary
//!
//! Every crate of fluidcloud, and every plugin, speaks the types defined
//! here: [`site`]s and their [`Capability`]s, the [`resource`]s of a service
//! (instances, volumes, images, buckets, config files, endpoints) with stable
//! ids, the [`Topology`] graph that links them, the [`Migrator`] trait, the
//! structured [`Diagnostic`]s that point at what a user must fix, and the
//! [`Retry`] classification that travels with every error.
//!
//! It is also the **plugin SDK** (see `plugins/README.md` and
//! `plugins/PROTOCOL.md`): the [`protocol`] (message types only, no I/O),
//! [`serve()`] to turn a Rust migrator into a plugin executable, the
//! [`harness`] to test one in-process, and the [`host`] that runs plugin
//! executables ([`discover`]ed in a plugins directory,
//! `$FLUIDCLOUD_PLUGIN_PATH` and `$PATH`) as [`Migrator`]s.
//!
//! The vocabulary does no I/O of its own; the SDK adds serde_json, tokio
//! (a single-threaded runtime in `serve`, timers in the host) and tracing,
//! so a plugin author still pulls in little.

pub mod diagnostic;
pub mod discover;
pub mod error;
pub mod harness;
pub mod host;
pub mod migrator;
pub mod protocol;
pub mod redact;
pub mod resource;
pub mod serve;
pub mod site;
pub mod topology;
pub mod wire;

pub use diagnostic::{Diagnostic, Severity};
pub use error::{Error, Result, Retry, Retryable};
pub use migrator::{
    Artifact, ArtifactKind, CancelFlag, Estimate, ExecContext, Migrator, MigratorDescriptor,
    NoProgress, ProgressSink, StepOutput, StepRequest,
};
pub use resource::{
    ConfigFormat, EndpointKind, GuestFacts, ImageFormat, Origin, Resource, ResourceId,
    ResourceKind, ResourceSpec,
};
pub use serve::{Plugin, secret, serve};
pub use site::{Capability, Capacity, Cost, Location, SiteInfo};
pub use topology::{Edge, Relation, Topology, TopologyDoc};
