//! # fluidcloud viaduct: the workflow engine
//!
//! The viaduct turns a placement into a DAG of migrator steps and runs it
//! safely: bounded concurrency, retries driven by each error's
//! [`Retry`](fluidcloud_plugins::Retry) classification, a durable journal so
//! a relocation resumes after `kill -9`, and rollback of completed steps.
//!
//! This crate holds its place in the dependency chain
//! (`plugins <- migrators <- viaduct <- broker <- conduit`); the engine
//! itself is built by the viaduct issue and is not here yet.

pub use fluidcloud_plugins as sdk;
