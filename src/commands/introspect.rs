//! `fluidcloud introspect SITE`.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use fluidcloud_conduit::{ServiceManifest, drivers, introspect};
use fluidcloud_plugins::{Relation, Resource, ResourceId, ResourceKind, ResourceSpec, Topology};
use serde::Serialize;

use super::{print_json, sites_file};
use crate::Globals;
use crate::output::bytes;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Format {
    /// A tree for people.
    Text,
    /// The topology document.
    Json,
    /// Graphviz DOT (pipe into `dot -Tsvg`).
    Dot,
}

#[derive(Debug, Args)]
pub(crate) struct IntrospectArgs {
    /// The site to look at.
    site: String,
    /// Only this service (default: every instance on the site).
    #[arg(long)]
    service: Option<String>,
    /// Declared service manifest to merge (default: the site's services/NAME.toml).
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Output format (`--json` is the same as `--format json`).
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Serialize)]
struct Doc {
    #[serde(flatten)]
    topology: fluidcloud_plugins::TopologyDoc,
    notes: Vec<fluidcloud_plugins::Diagnostic>,
}

pub(crate) async fn run(g: &Globals, a: IntrospectArgs) -> Result<()> {
    let file = sites_file(g)?;
    let cfg = file.site(&a.site)?;
    let driver = drivers::open(&a.site, cfg)?;
    let manifest = match &a.manifest {
        Some(p) => {
            let (_, text) = ServiceManifest::load(p)?;
            Some((p.clone(), text))
        }
        None => None,
    };
    let found = introspect(driver.as_ref(), cfg, a.service.as_deref(), manifest).await?;
    let format = if g.json { Format::Json } else { a.format };
    match format {
        Format::Json => print_json(&Doc {
            topology: found.topology.to_doc(),
            notes: found.notes,
        }),
        Format::Dot => {
            out!("{}", found.topology.to_dot())?;
            Ok(())
        }
        Format::Text => {
            out!("{}", render(&found.topology))?;
            for n in &found.notes {
                eprintln!("{:?}: {n}", n.severity);
            }
            Ok(())
        }
    }
}

fn describe(r: &Resource) -> String {
    match &r.spec {
        ResourceSpec::Instance {
            vcpus,
            memory_mib,
            state,
            hostname,
            addresses,
            guest,
        } => format!(
            "{vcpus} vCPU, {} memory, {state}{}{}{}",
            bytes(memory_mib << 20),
            hostname
                .as_deref()
                .map(|h| format!(", {h}"))
                .unwrap_or_default(),
            if addresses.is_empty() {
                String::new()
            } else {
                format!(" [{}]", addresses.join(", "))
            },
            match guest {
                Some(g) if g.problem.is_some() => {
                    format!(
                        ", guest unreadable: {}",
                        g.problem.as_deref().unwrap_or_default()
                    )
                }
                Some(g) => format!(
                    ", guest {}{}",
                    g.os,
                    g.root
                        .as_deref()
                        .map(|r| format!(" on {r}"))
                        .unwrap_or_default()
                ),
                None => String::new(),
            }
        ),
        ResourceSpec::Image {
            format,
            virtual_size,
            allocated,
            backing,
            ..
        } => format!(
            "{format}, {} virtual, {} allocated{}",
            bytes(*virtual_size),
            bytes(*allocated),
            backing
                .as_deref()
                .map(|b| format!(", backed by {b}"))
                .unwrap_or_default()
        ),
        ResourceSpec::Volume {
            format,
            virtual_size,
            allocated,
            ..
        } => format!(
            "{format}, {} virtual, {} allocated",
            bytes(*virtual_size),
            bytes(*allocated)
        ),
        ResourceSpec::Bucket { objects, bytes: b } => format!("{objects} objects, {}", bytes(*b)),
        ResourceSpec::ConfigFile {
            format,
            bytes: b,
            guest,
            ..
        } => format!(
            "{}, {}{}",
            format!("{format:?}").to_lowercase(),
            bytes(*b),
            guest
                .as_deref()
                .map(|g| format!(", inside instance {g}"))
                .unwrap_or_default()
        ),
        ResourceSpec::Endpoint { external, .. } => {
            if *external {
                "external".into()
            } else {
                "internal".into()
            }
        }
    }
}

/// The text tree: each instance with what it boots from, attaches and
/// reads; each config file with its references and what they resolve to.
fn render(t: &Topology) -> String {
    use std::fmt::Write as _;
    let resources = t.resources();
    let count = |k: ResourceKind| resources.iter().filter(|r| r.kind() == k).count();
    let to_move: u64 = resources.iter().map(|r| r.spec.bytes_to_move()).sum();
    let mut out = String::new();
    let _ = writeln!(out, "service {} on site {}", t.service(), t.site());
    let counts: Vec<String> = [
        (ResourceKind::Instance, "instance"),
        (ResourceKind::Image, "image"),
        (ResourceKind::Volume, "volume"),
        (ResourceKind::Bucket, "bucket"),
        (ResourceKind::ConfigFile, "config file"),
        (ResourceKind::Endpoint, "endpoint"),
    ]
    .into_iter()
    .map(|(k, word)| {
        let n = count(k);
        format!("{n} {word}{}", if n == 1 { "" } else { "s" })
    })
    .collect();
    let _ = writeln!(
        out,
        "  {}; {} of data to move\n",
        counts.join(", "),
        bytes(to_move)
    );
    let mut edges = t.edges();
    // Disks first, then config files, then buckets; references in file order.
    edges.sort_by_key(|e| {
        let line = e
            .key
            .as_deref()
            .and_then(|k| k.strip_prefix("line "))
            .and_then(|n| n.parse::<u32>().ok());
        (
            e.from.clone(),
            e.relation,
            e.to.kind(),
            line,
            e.to.clone(),
            e.key.clone(),
        )
    });
    let mut shown: BTreeSet<ResourceId> = BTreeSet::new();
    let get = |id: &ResourceId| t.get(id);
    for inst in resources
        .iter()
        .filter(|r| r.kind() == ResourceKind::Instance)
    {
        shown.insert(inst.id.clone());
        let _ = writeln!(out, "instance {}  ({})", inst.name, describe(inst));
        for e in edges.iter().filter(|e| e.from == inst.id) {
            let Some(dep) = get(&e.to) else { continue };
            shown.insert(dep.id.clone());
            let _ = writeln!(
                out,
                "  {:<11} {} {}  ({})",
                e.relation.as_str(),
                dep.kind(),
                dep.name,
                describe(dep)
            );
            if dep.kind() == ResourceKind::ConfigFile {
                for r in edges
                    .iter()
                    .filter(|x| x.from == dep.id && x.relation == Relation::ReferencesEndpoint)
                {
                    let Some(ep) = get(&r.to) else { continue };
                    shown.insert(ep.id.clone());
                    let ResourceSpec::Endpoint {
                        value, external, ..
                    } = &ep.spec
                    else {
                        continue;
                    };
                    let targets: Vec<String> = edges
                        .iter()
                        .filter(|x| x.from == ep.id && x.relation == Relation::ResolvesTo)
                        .map(|x| {
                            format!(
                                "{} {}",
                                x.to.kind().map_or("?", ResourceKind::as_str),
                                x.to.name()
                            )
                        })
                        .collect();
                    let to = if !targets.is_empty() {
                        targets.join(", ")
                    } else if *external {
                        "external".to_owned()
                    } else {
                        "unresolved".to_owned()
                    };
                    let _ = writeln!(
                        out,
                        "      {:<22} {value}  -> {to}",
                        r.key.as_deref().unwrap_or("")
                    );
                }
            }
        }
        out.push('\n');
    }
    let rest: Vec<_> = resources
        .iter()
        .filter(|r| !shown.contains(&r.id))
        .collect();
    if !rest.is_empty() {
        let _ = writeln!(out, "not attached to an instance:");
        for r in rest {
            let _ = writeln!(out, "  {} {}  ({})", r.kind(), r.name, describe(r));
        }
    }
    out
}
