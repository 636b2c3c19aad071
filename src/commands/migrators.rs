//! `fluidcloud migrators list|show`: the migrators this installation can
//! use, built in and plugins.
//!
//! Plugins are discovered (plugins directory, `$FLUIDCLOUD_PLUGIN_PATH`,
//! `fluidcloud-migrator-*` on `$PATH`; see `fluidcloud_plugins::discover`),
//! started, asked `hello` and `describe`, and stopped again. A plugin that
//! fails its handshake is reported as a warning and left out: one broken
//! plugin never hides the others. A plugin named like a built-in is left
//! out too (built-ins win).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use fluidcloud_plugins::discover::{self, PluginOrigin};
use fluidcloud_plugins::host::{HostConfig, start_discovered};
use fluidcloud_plugins::{ArtifactKind, MigratorDescriptor};
use serde::Serialize;

use super::print_json;
use crate::Globals;
use crate::output::table;

#[derive(Debug, Subcommand)]
pub(crate) enum MigratorsCommand {
    /// Built-in and plugin migrators: origin, version, what each consumes
    /// and produces.
    List,
    /// Everything known about one migrator.
    Show {
        /// The migrator's name.
        name: String,
    },
}

/// One migrator as `list` and `show` print it.
#[derive(Debug, Serialize)]
struct Entry {
    name: String,
    /// `built-in`, or where the plugin was found.
    origin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    version: String,
    summary: String,
    consumes: Vec<ArtifactKind>,
    produces: Vec<ArtifactKind>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    secrets: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    features: Vec<String>,
}

/// A discovered plugin that could not be described.
#[derive(Debug)]
struct Broken {
    path: PathBuf,
    origin: PluginOrigin,
    error: String,
}

fn handshake_config() -> HostConfig {
    HostConfig {
        handshake_timeout: Duration::from_secs(5),
        ..HostConfig::default()
    }
}

/// Starts every discovered plugin once and asks what it is.
fn plugins(builtin: &[MigratorDescriptor]) -> (Vec<Entry>, Vec<Broken>) {
    let taken: Vec<&str> = builtin.iter().map(|b| b.name.as_str()).collect();
    let started = start_discovered(discover::discover(), &taken, &handshake_config());
    let ok = started
        .ok
        .into_iter()
        .map(|(found, m)| {
            let d = m.plugin_descriptor().clone();
            let hello = m.hello();
            Entry {
                name: d.migrator.name,
                origin: found.origin.to_string(),
                path: Some(found.path),
                version: d.migrator.version,
                summary: d.migrator.summary,
                consumes: d.migrator.consumes,
                produces: d.migrator.produces,
                secrets: d.secrets,
                protocol: Some(format!("{} {}", hello.protocol, hello.version)),
                features: hello.features.clone(),
            }
        })
        .collect();
    let broken = started
        .broken
        .into_iter()
        .map(|(found, error)| Broken {
            path: found.path,
            origin: found.origin,
            error,
        })
        .collect();
    (ok, broken)
}

/// The descriptors of the discovered plugins, for broker chains. Broken
/// plugins are logged and left out.
pub(crate) fn plugin_descriptors(builtin: &[MigratorDescriptor]) -> Vec<MigratorDescriptor> {
    let (ok, broken) = plugins(builtin);
    for b in &broken {
        tracing::warn!("plugin {}: {}", b.path.display(), b.error);
    }
    ok.into_iter()
        .map(|e| MigratorDescriptor {
            name: e.name,
            version: e.version,
            summary: e.summary,
            consumes: e.consumes,
            produces: e.produces,
        })
        .collect()
}

fn catalogue() -> (Vec<Entry>, Vec<Broken>) {
    let builtin = super::matching::builtin_migrators();
    let (plugins, broken) = plugins(&builtin);
    let mut all: Vec<Entry> = builtin
        .into_iter()
        .map(|d| described(d, "built-in"))
        .collect();
    all.extend(plugins);
    (all, broken)
}

/// An entry known only by its descriptor (a built-in, or one the service
/// lists).
fn described(d: MigratorDescriptor, origin: &str) -> Entry {
    Entry {
        name: d.name,
        origin: origin.into(),
        path: None,
        version: d.version,
        summary: d.summary,
        consumes: d.consumes,
        produces: d.produces,
        secrets: Vec::new(),
        protocol: None,
        features: Vec::new(),
    }
}

fn kinds(k: &[ArtifactKind]) -> String {
    k.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn warn(broken: &[Broken]) {
    for b in broken {
        eprintln!(
            "warning: plugin {} ({}): {}",
            b.path.display(),
            b.origin,
            b.error
        );
    }
}

fn print_list(all: &[Entry]) -> Result<()> {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.origin.clone(),
                e.version.clone(),
                kinds(&e.consumes),
                kinds(&e.produces),
                e.summary.clone(),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &[
                "NAME", "ORIGIN", "VERSION", "CONSUMES", "PRODUCES", "SUMMARY"
            ],
            &rows
        )
    )?;
    Ok(())
}

pub(crate) async fn run(g: &Globals, c: MigratorsCommand) -> Result<()> {
    if let Some(remote) = g.remote()? {
        let MigratorsCommand::List = c else {
            anyhow::bail!(crate::ExitWith(
                2,
                "with --server only `migrators list` runs".into()
            ));
        };
        let all: Vec<MigratorDescriptor> = remote.get("/migrators", "listing migrators").await?;
        if g.json {
            return print_json(&all);
        }
        let all: Vec<Entry> = all.into_iter().map(|d| described(d, "service")).collect();
        print_list(&all)?;
        return Ok(());
    }
    let (all, broken) = catalogue();
    warn(&broken);
    match c {
        MigratorsCommand::List => {
            if g.json {
                return print_json(&all);
            }
            print_list(&all)?;
            Ok(())
        }
        MigratorsCommand::Show { name } => {
            let Some(e) = all.into_iter().find(|e| e.name == name) else {
                return Err(fluidcloud_plugins::Error::NotFound {
                    what: format!("migrator `{name}`"),
                    site: None,
                }
                .into());
            };
            if g.json {
                return print_json(&e);
            }
            outln!("name:     {}", e.name)?;
            match &e.path {
                Some(p) => outln!("origin:   {} ({})", e.origin, p.display())?,
                None => outln!("origin:   {}", e.origin)?,
            }
            outln!("version:  {}", e.version)?;
            if let Some(p) = &e.protocol {
                outln!("protocol: {p} (features: {})", e.features.join(", "))?;
            }
            outln!("summary:  {}", e.summary)?;
            outln!("consumes: {}", kinds(&e.consumes))?;
            outln!("produces: {}", kinds(&e.produces))?;
            if !e.secrets.is_empty() {
                outln!("secrets:  {}", e.secrets.join(", "))?;
            }
            Ok(())
        }
    }
}
