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
    /// A measured round trip from the users to a site, in ms; it replaces
    /// the estimate from coordinates for that site. Repeatable.
    #[arg(long = "rtt", value_name = "SITE=MS", value_parser = parse_rtt)]
    rtts: Vec<(String, f64)>,
    /// Measure the round trip to every site with an `endpoint` by timing
    /// TCP connects from this machine (the best of three); figures given
    /// with --rtt win.
    #[arg(long)]
    measure_rtt: bool,
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

/// `SITE=MS`, for clap.
fn parse_rtt(s: &str) -> std::result::Result<(String, f64), String> {
    let (site, ms) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not SITE=MS"))?;
    let ms: f64 = ms
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| format!("`{s}` needs a non-negative number of milliseconds"))?;
    Ok((site.trim().to_owned(), ms))
}

/// The round trip to `endpoint` (`scheme://host:port/...` or `host:port`):
/// the fastest of three TCP connects, ms; `None` when it does not answer
/// within two seconds.
pub(crate) async fn measure_rtt(endpoint: &str) -> Option<f64> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok() && !authority.ends_with(']'));
    let target = if has_port {
        authority.to_owned()
    } else if endpoint.starts_with("https://") {
        format!("{authority}:443")
    } else {
        format!("{authority}:80")
    };
    let mut best: Option<f64> = None;
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let c = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tokio::net::TcpStream::connect(&target),
        )
        .await;
        if let Ok(Ok(_)) = c {
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            best = Some(best.map_or(ms, |b: f64| b.min(ms)));
        }
    }
    best
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
    if let Some(remote) = g.remote()? {
        return run_remote(g, &remote, a).await;
    }
    let file = sites_file(g)?;
    let source_cfg = file.site(&a.from)?;
    let driver = drivers::open(&a.from, source_cfg)?;
    let manifest = match &a.manifest {
        Some(p) => Some((p.clone(), ServiceManifest::load(p)?.1)),
        None => None,
    };
    let found = introspect(driver.as_ref(), source_cfg, Some(&a.service), manifest).await?;
    let mut measured = std::collections::BTreeMap::new();
    if a.measure_rtt {
        for (name, cfg) in &file.sites {
            let Some(ep) = &cfg.endpoint else { continue };
            match measure_rtt(ep).await {
                Some(ms) => {
                    measured.insert(name.clone(), ms);
                }
                None => eprintln!("note: {name} ({ep}) did not answer; its RTT is estimated"),
            }
        }
    }
    measured.extend(a.rtts.iter().cloned());
    let placement = place(&file, &a.from, &found.topology, &a.constraints, |r| {
        r.measured_rtt_ms = measured;
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
    print_placement(&placement, &a.service, &a.from, &source_cfg.cost.currency)?;
    Ok(())
}

fn print_placement(
    placement: &fluidcloud_broker::Placement,
    service: &str,
    from: &str,
    currency: &str,
) -> Result<()> {
    outln!(
        "placement of {} from {} ({}, {} search nodes)\n",
        service,
        from,
        if placement.optimal {
            "optimal"
        } else {
            "heuristic"
        },
        placement.explored
    )?;
    for asg in &placement.assignments {
        let s = &asg.score;
        let kind = match asg.unit.kind {
            fluidcloud_broker::placement::UnitKind::Instance => "instance",
            fluidcloud_broker::placement::UnitKind::Bucket => "bucket",
        };
        outln!(
            "{kind} {} -> {}   score {:.1}",
            asg.unit.name,
            asg.site,
            s.total
        )?;
        outln!(
            "  {:.1} ms to users{}, {:.1} ms to its peers ({}), {:.2} {currency}/month, egress {:.2} {currency}, {} to move ({:.0} s)",
            s.latency_ms,
            if s.latency_measured {
                " (measured)"
            } else {
                ""
            },
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
        )?;
        for step in &asg.chain {
            outln!(
                "  convert {} -> {} with {}",
                step.from,
                step.to,
                step.migrator
            )?;
        }
        for alt in &asg.alternatives {
            match alt {
                Alternative::Worse {
                    site,
                    delta,
                    mainly,
                    ..
                } => {
                    outln!("    {site:<16} +{delta:.1}, mainly {mainly}")?;
                }
                Alternative::Rejected {
                    site,
                    constraint,
                    reason,
                } => {
                    outln!("    {site:<16} rejected by {constraint}: {reason}")?;
                }
            }
        }
        outln!()?;
    }
    outln!(
        "total score {:.1} (lower is better; see docs/broker.md)",
        placement.total
    )?;
    Ok(())
}

/// `match --server URL`: the service introspects and places.
async fn run_remote(g: &Globals, remote: &crate::remote::Remote, a: MatchArgs) -> Result<()> {
    if a.manifest.is_some() {
        anyhow::bail!(crate::ExitWith(
            2,
            "--manifest names a local file; with --server the service reads its own manifests"
                .into()
        ));
    }
    let mut request = Request::new(&a.from);
    for c in &a.constraints {
        let c: Constraint = c
            .parse()
            .map_err(|d| fluidcloud_broker::Error::Invalid(vec![d]))?;
        request.constraints.push(c);
    }
    request.users = a.users;
    if let Some(w) = a.weights {
        request.weights = w;
    }
    request.bandwidth_mbps = a.bandwidth_mbps;
    request.include_source = a.include_source;
    if a.measure_rtt {
        anyhow::bail!(crate::ExitWith(
            2,
            "--measure-rtt measures from the machine of the sites file; with --server give figures with --rtt SITE=MS".into()
        ));
    }
    request.measured_rtt_ms = a.rtts.into_iter().collect();
    let body = serde_json::json!({ "service": a.service, "request": request });
    let placement: fluidcloud_broker::Placement = remote
        .post("/match", &body, &format!("matching {}", a.service))
        .await?;
    if g.json {
        return print_json(&placement);
    }
    let source: SiteInfo = remote
        .get(&format!("/sites/{}", a.from), "reading the source site")
        .await?;
    print_placement(&placement, &a.service, &a.from, &source.cost.currency)?;
    Ok(())
}
