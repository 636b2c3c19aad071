//! `fluidcloud sites list|show`.

use anyhow::{Context as _, Result};
use clap::Subcommand;
use fluidcloud_conduit::driver::SiteDriver;
use fluidcloud_conduit::{SiteConfig, drivers};
use fluidcloud_plugins::{Capability, SiteInfo};
use serde::Serialize;

use super::{print_json, sites_file};
use crate::Globals;
use crate::output::{bytes, table};

#[derive(Debug, Subcommand)]
pub(crate) enum SitesCommand {
    /// One line per site: kind, jurisdiction, formats, capabilities, health.
    List,
    /// Everything known about one site, with its detected capabilities.
    Show {
        /// The site's name in the sites file.
        name: String,
    },
    /// The site kinds (drivers) this build knows, with their options.
    Kinds,
}

#[derive(Serialize)]
struct KindDoc {
    kind: &'static str,
    help: &'static str,
    options: Vec<OptionDoc>,
}

#[derive(Serialize)]
struct OptionDoc {
    key: &'static str,
    help: &'static str,
}

fn kinds(g: &Globals) -> Result<()> {
    let docs: Vec<KindDoc> = drivers::DRIVERS
        .iter()
        .map(|d| KindDoc {
            kind: d.kind,
            help: d.help,
            options: d
                .options
                .iter()
                .map(|&(key, help)| OptionDoc { key, help })
                .collect(),
        })
        .collect();
    if g.json {
        return print_json(&docs);
    }
    for d in &docs {
        outln!("{}: {}", d.kind, d.help)?;
        for o in &d.options {
            outln!("  {:<10} {}", o.key, o.help)?;
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct SiteStatus {
    #[serde(flatten)]
    info: SiteInfo,
    description: Option<String>,
    /// `ok`, or the health check's error.
    status: String,
}

async fn status_of(name: &str, cfg: &SiteConfig) -> Result<(Box<dyn SiteDriver>, SiteStatus)> {
    let driver = drivers::open(name, cfg)?;
    let status = match driver.check().await {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.to_string(),
    };
    let info = cfg.info(name, driver.capabilities());
    let s = SiteStatus {
        info,
        description: cfg.description.clone(),
        status,
    };
    Ok((driver, s))
}

fn formats(info: &SiteInfo) -> String {
    let v: Vec<&str> = info.image_formats.iter().map(|f| f.as_str()).collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

pub(crate) async fn run(g: &Globals, cmd: SitesCommand) -> Result<()> {
    if let SitesCommand::Kinds = cmd {
        return kinds(g);
    }
    if let Some(remote) = g.remote()? {
        let SitesCommand::List = cmd else {
            anyhow::bail!(crate::ExitWith(
                2,
                "with --server only `sites list` runs; `sites show` needs the sites file".into()
            ));
        };
        let all: Vec<SiteInfo> = remote.get("/sites", "listing sites").await?;
        if g.json {
            return print_json(&all);
        }
        // The service lists a site that did not answer without capabilities.
        let all: Vec<SiteStatus> = all
            .into_iter()
            .map(|info| SiteStatus {
                status: if info.capabilities.is_empty() {
                    "no answer".into()
                } else {
                    "ok".into()
                },
                info,
                description: None,
            })
            .collect();
        print_sites(&all)?;
        return Ok(());
    }
    let file = sites_file(g)?;
    match cmd {
        SitesCommand::List => {
            let mut all = Vec::new();
            for (name, cfg) in &file.sites {
                all.push(status_of(name, cfg).await?.1);
            }
            if g.json {
                return print_json(&all);
            }
            print_sites(&all)?;
            Ok(())
        }
        SitesCommand::Show { name } => show(g, &file, &name).await,
        SitesCommand::Kinds => kinds(g),
    }
}

fn print_sites(all: &[SiteStatus]) -> Result<()> {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let caps: Vec<&str> = s.info.capabilities.iter().map(|c| c.as_str()).collect();
            vec![
                s.info.name.clone(),
                s.info.kind.clone(),
                s.info.jurisdiction.clone(),
                s.info.location.region.clone(),
                formats(&s.info),
                caps.join(","),
                s.status.clone(),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &[
                "SITE",
                "KIND",
                "JURISDICTION",
                "REGION",
                "IMAGES",
                "CAPABILITIES",
                "STATUS"
            ],
            &rows
        )
    )?;
    Ok(())
}

#[derive(Serialize)]
struct Contents {
    instances: Vec<String>,
    images: Vec<String>,
    volumes: Vec<String>,
    buckets: Vec<String>,
    config_files: usize,
}

#[derive(Serialize)]
struct Credential {
    key: String,
    variable: String,
    set: bool,
}

#[derive(Serialize)]
struct ShowDoc {
    #[serde(flatten)]
    status: SiteStatus,
    path: Option<String>,
    endpoint: Option<String>,
    object_endpoint: Option<String>,
    internal_domains: Vec<String>,
    credentials: Vec<Credential>,
    /// What the site's driver offers beyond the capabilities.
    features: Features,
    contents: Option<Contents>,
}

/// Facilities of a site's driver that are not placement capabilities.
#[derive(Serialize)]
struct Features {
    /// Whole disks move to and from it as streams of extents.
    disk_transfers: bool,
    /// It tracks the writes of running instances' disks (a short final
    /// delta).
    change_tracking: bool,
    /// It looks inside its guests' disks (in-guest config files, and their
    /// adaptation when they move).
    guests: bool,
}

async fn contents(d: &dyn SiteDriver) -> Result<Contents> {
    let mut c = Contents {
        instances: vec![],
        images: vec![],
        volumes: vec![],
        buckets: vec![],
        config_files: 0,
    };
    if let Some(inv) = d.inventory() {
        c.instances = inv.instances().await?.into_iter().map(|i| i.name).collect();
        c.config_files = inv.config_files().await?.len();
    }
    if let Some(s) = d.image_store() {
        c.images = s.list_images().await?;
    }
    if let Some(s) = d.block_store() {
        c.volumes = s.list_volumes().await?;
    }
    if let Some(s) = d.object_storage() {
        c.buckets = s.list_buckets().await?;
    }
    Ok(c)
}

async fn show(g: &Globals, file: &fluidcloud_conduit::SitesFile, name: &str) -> Result<()> {
    let cfg = file.site(name)?;
    let (driver, status) = status_of(name, cfg).await?;
    let contents = if status.status == "ok" {
        Some(
            contents(driver.as_ref())
                .await
                .with_context(|| format!("listing the contents of site {name}"))?,
        )
    } else {
        None
    };
    let credentials = cfg
        .credentials
        .iter()
        .flat_map(|c| c.references())
        .map(|(key, var)| Credential {
            key: key.to_owned(),
            variable: var.to_owned(),
            set: std::env::var_os(var).is_some(),
        })
        .collect();
    let doc = ShowDoc {
        status,
        path: cfg.path.as_ref().map(|p| p.display().to_string()),
        endpoint: cfg.endpoint.clone(),
        object_endpoint: cfg.object_endpoint.clone(),
        internal_domains: cfg.internal_domains.clone(),
        credentials,
        features: Features {
            disk_transfers: driver.disks().is_some() || driver.agent().is_some(),
            change_tracking: driver.change_tracking().is_some(),
            guests: driver.guests().is_some(),
        },
        contents,
    };
    if g.json {
        return print_json(&doc);
    }
    let i = &doc.status.info;
    outln!("site {} ({})", i.name, i.kind)?;
    if let Some(d) = &doc.status.description {
        outln!("  {d}")?;
    }
    outln!("  status:        {}", doc.status.status)?;
    if let Some(p) = &doc.path {
        outln!("  path:          {p}")?;
    }
    if let Some(e) = &doc.endpoint {
        outln!("  endpoint:      {e}")?;
    }
    outln!(
        "  location:      {} ({:.4}, {:.4})",
        i.location.region,
        i.location.latitude,
        i.location.longitude
    )?;
    outln!("  jurisdiction:  {}", i.jurisdiction)?;
    outln!("  image formats: {}", formats(i))?;
    if let Some(o) = &doc.object_endpoint {
        outln!("  object store:  {o}")?;
    }
    if !doc.internal_domains.is_empty() {
        outln!("  internal DNS:  {}", doc.internal_domains.join(", "))?;
    }
    let c = &i.cost;
    outln!(
        "  cost:          {:.3} {cur}/vCPU-h, {:.4} {cur}/GiB-h memory, {:.3} {cur}/GiB-month storage, {:.3} {cur}/GiB egress",
        c.vcpu_hour,
        c.memory_gib_hour,
        c.storage_gib_month,
        c.egress_gib,
        cur = c.currency
    )?;
    if let Some(g) = c.carbon_g_per_kwh {
        outln!("  carbon:        {g:.0} gCO2e/kWh")?;
    }
    let cap = &i.capacity;
    outln!(
        "  capacity:      {} vCPUs, {} memory, {} storage",
        cap.vcpus.map_or("?".into(), |v| v.to_string()),
        cap.memory_mib.map_or("?".into(), |m| bytes(m << 20)),
        cap.storage_gib.map_or("?".into(), |s| bytes(s << 30)),
    )?;
    for cred in &doc.credentials {
        outln!(
            "  credential:    {} from ${} ({})",
            cred.key,
            cred.variable,
            if cred.set { "set" } else { "NOT SET" }
        )?;
    }
    outln!("  capabilities:")?;
    for capability in Capability::ALL {
        let yes = i.capabilities.contains(&capability);
        outln!(
            "    {:<15} {}",
            capability.as_str(),
            if yes { "yes" } else { "no" }
        )?;
    }
    let f = &doc.features;
    outln!("  features:")?;
    for (what, yes) in [
        ("disk-transfers", f.disk_transfers),
        ("change-tracking", f.change_tracking),
        ("guest-files", f.guests),
    ] {
        outln!("    {what:<15} {}", if yes { "yes" } else { "no" })?;
    }
    if let Some(c) = &doc.contents {
        outln!("  contents:")?;
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(", ")
            }
        };
        outln!("    instances     {}", list(&c.instances))?;
        outln!("    images        {}", list(&c.images))?;
        outln!("    volumes       {}", list(&c.volumes))?;
        outln!("    buckets       {}", list(&c.buckets))?;
        outln!("    config files  {}", c.config_files)?;
    }
    Ok(())
}
