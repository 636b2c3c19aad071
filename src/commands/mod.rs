//! One module per command group.

pub(crate) mod agent;
pub(crate) mod demo;
pub(crate) mod image;
pub(crate) mod introspect;
pub(crate) mod matching;
pub(crate) mod migrators;
pub(crate) mod relocate;
pub(crate) mod runner;
pub(crate) mod serve;
pub(crate) mod sites;
pub(crate) mod transfer;
pub(crate) mod worker;

use anyhow::Result;
use fluidcloud_conduit::{SitesFile, drivers};

use crate::Globals;

/// Loads the sites file chosen by the global options.
pub(crate) fn sites_file(g: &Globals) -> Result<SitesFile> {
    Ok(SitesFile::discover(g.config.as_deref(), &drivers::kinds())?)
}

/// Prints a value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}
