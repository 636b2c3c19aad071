//! `fluidcloud match`: where should a service go, and why.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use fluidcloud_broker::placement::{Alternative, UserLocation, Weights};
use fluidcloud_broker::{Constraint, Request};
use fluidcloud_conduit::{ServiceManifest, drivers, introspect};
use fluidcloud_plugins::{MigratorDescriptor, SiteInfo};

use super::{print_json, sites_file};
use crate::Globals;
use crate::output::bytes;

#[derive(Debug, Args)]
pub(crate) struct MatchArgs {
    /// The site the service runs on now.
    #[arg(long = "from", value_name = "SITE")]
    from: String,
    /// The service to place.
    #[arg(long)]
    service: String,
    /// A placement constraint, e.g. `ban(db; cloud-virginia)`,
    /// `jurisdiction(*; EU)`, `latency(web,db; 10)`. Repeatable.
    #[arg(long = "constraint", short = 'c', value_name = "CONSTRAINT")]
    constraints: Vec<String>,
    /// Where users are: `LAT,LON` or `LAT,LON,WEIGHT`. Repeatable.
    /// Default: where the service runs now.
    #[arg(long = "user", value_name = "LAT,LON[,W]", value_parser = parse_user)]
    users: Vec<UserLocation>,
    /// Objective weights, e.g. `latency=2,cost=1,time=0.5,carbon=1`.
    #[arg(long, value_name = "NAME=W,...", value_parser = parse_weights)]
    weights: Option<Weights>,
    /// Link bandwidth between sites in Mbit/s (for relocation time).
    #[arg(long, default_value_t = 1000.0, value_parser = parse_positive)]
    bandwidth_mbps: f64,
    /// Let resources stay on the source site.
    #[arg(long)]
    include_source: bool,
    /// Declared service manifest to merge (default: the site's services/NAME.toml).
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
}

/// `LAT,LON[,WEIGHT]`, for clap (a bad value exits 2 with clap's message).
fn parse_user(s: &str) -> std::result::Result<UserLocation, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if !(2..=3).contains(&parts.len()) {
        return Err("expected LAT,LON or LAT,LON,WEIGHT".into());
    }
    let num = |i: usize, what: &str| {
        parts[i]
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{what} `{}` is not a number", parts[i]))
    };
    let (latitude, longitude) = (num(0, "latitude")?, num(1, "longitude")?);
    if !(-90.0..=90.0).contains(&latitude) || !(-180.0..=180.0).contains(&longitude) {
        return Err("latitude must be within -90..90 and longitude within -180..180".into());
    }
    let weight = if parts.len() == 3 {
        num(2, "weight")?
    } else {
        1.0
    };
    if weight <= 0.0 {
        return Err("the weight must be positive".into());
    }
    Ok(UserLocation {
        latitude,
        longitude,
        weight,
    })
}

/// `latency=2,cost=1,...`, for clap.
fn parse_weights(s: &str) -> std::result::Result<Weights, String> {
    let mut w = Weights::default();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{pair}` is not NAME=WEIGHT"))?;
        let v: f64 = v
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("`{pair}` needs a non-negative number"))?;
        match k.trim() {
            "latency" => w.latency = v,
            "cost" => w.cost = v,
            "time" => w.time = v,
            "carbon" => w.carbon = v,
            other => {
                return Err(format!(
                    "unknown objective `{other}` (latency, cost, time, carbon)"
                ));
            }
        }
    }
    Ok(w)
}

fn parse_positive(s: &str) -> std::result::Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("`{s}` is not a positive number"))
}

/// Migrators the broker may chain: the built-ins and discovered plugins.
pub(crate) fn migrators() -> Vec<MigratorDescriptor> {
    let mut all = builtin_migrators();
    let plugins = super::migrators::plugin_descriptors(&all);
    all.extend(plugins);
    all
}

/// The built-in migrators: the data migrators of `fluidcloud-migrators`
/// and the conduit's relocation steps.
pub(crate) fn builtin_migrators() -> Vec<MigratorDescriptor> {
    let registry = fluidcloud_conduit::relocate::registry();
    registry
        .names()
        .filter_map(|n| registry.get(n))
        .map(|m| m.describe())
        .collect()
}

/// Places `service`'s units: the broker's answer for a request built
/// from `constraints` (and `tune`), over every site of `file`.
pub(crate) async fn place(
    file: &fluidcloud_conduit::SitesFile,
    from: &str,
    topology: &fluidcloud_plugins::Topology,
    constraints: &[String],
    tune: impl FnOnce(&mut Request),
) -> Result<fluidcloud_broker::Placement> {
    let mut request = Request::new(from);
    for c in constraints {
        let c: Constraint = c
            .parse()
            .map_err(|d| fluidcloud_broker::Error::Invalid(vec![d]))?;
        request.constraints.push(c);
    }
    tune(&mut request);
    let mut sites: Vec<SiteInfo> = Vec::new();
    for (name, cfg) in &file.sites {
        let d = drivers::open(name, cfg)?;
        // A site that does not answer cannot take the service.
        let caps = match d.check().await {
            Ok(()) => d.capabilities(),
            Err(_) => Default::default(),
        };
        sites.push(cfg.info(name, caps));
    }
    let units = fluidcloud_broker::units(topology);
    Ok(fluidcloud_broker::solve(
        &units,
        &sites,
        &request,
        &migrators(),
    )?)
}

pub(crate) async fn run(g: &Globals, a: MatchArgs) -> Result<()> {
    let file = sites_file(g)?;
    let source_cfg = file.site(&a.from)?;
    let driver = drivers::open(&a.from, source_cfg)?;
    let manifest = match &a.manifest {
        Some(p) => Some((p.clone(), ServiceManifest::load(p)?.1)),
        None => None,
    };
    let found = introspect(driver.as_ref(), source_cfg, Some(&a.service), manifest).await?;
    let placement = place(&file, &a.from, &found.topology, &a.constraints, |r| {
        r.users = a.users;
        if let Some(w) = a.weights {
            r.weights = w;
        }
        r.bandwidth_mbps = a.bandwidth_mbps;
        r.include_source = a.include_source;
    })
    .await?;
    if g.json {
        return print_json(&placement);
    }
    let currency = source_cfg.cost.currency.clone();
    println!(
        "placement of {} from {} ({}, {} search nodes)\n",
        a.service,
        a.from,
        if placement.optimal {
            "optimal"
        } else {
            "heuristic"
        },
        placement.explored
    );
    for asg in &placement.assignments {
        let s = &asg.score;
        let kind = match asg.unit.kind {
            fluidcloud_broker::placement::UnitKind::Instance => "instance",
            fluidcloud_broker::placement::UnitKind::Bucket => "bucket",
        };
        println!(
            "{kind} {} -> {}   score {:.1}",
            asg.unit.name, asg.site, s.total
        );
        println!(
            "  {:.1} ms to users, {:.1} ms to its peers ({}), {:.2} {currency}/month, egress {:.2} {currency}, {} to move ({:.0} s)",
            s.latency_ms,
            s.peers_ms,
            if asg.unit.peers.is_empty() {
                "none".to_owned()
            } else {
                asg.unit.peers.join(", ")
            },
            s.cost_month,
            s.egress,
            bytes(asg.unit.move_bytes),
            s.time_s
        );
        for step in &asg.chain {
            println!(
                "  convert {} -> {} with {}",
                step.from, step.to, step.migrator
            );
        }
        for alt in &asg.alternatives {
            match alt {
                Alternative::Worse {
                    site,
                    delta,
                    mainly,
                    ..
                } => {
                    println!("    {site:<16} +{delta:.1}, mainly {mainly}");
                }
                Alternative::Rejected {
                    site,
                    constraint,
                    reason,
                } => {
                    println!("    {site:<16} rejected by {constraint}: {reason}");
                }
            }
        }
        println!();
    }
    println!(
        "total score {:.1} (lower is better; see docs/broker.md)",
        placement.total
    );
    Ok(())
}
