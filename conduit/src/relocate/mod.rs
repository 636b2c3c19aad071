//! Relocation: from an introspected topology and a placement to a viaduct
//! workflow, and the records a relocation leaves behind.
//!
//! [`plan`] turns "service S on site A, its units assigned to sites B…" into
//! a [`Relocation`]: the endpoint map (old host, address, URL → new) and a
//! workflow of migrator steps, in this shape:
//!
//! ```text
//! image:NAME ─────────┐
//! precopy:VOLUME ─────┤
//! config:PATH ────────┼─> provision:INSTANCE ─┐
//! bucket:NAME ────────┴───────────────────────┴─> verify ─> stop-source
//!                                                   ─> sync:VOLUME ─> cutover
//! ```
//!
//! - images are converted straight into the target's image store, into the
//!   source format when the target boots it, else raw, else the first
//!   format the target accepts that `image-convert` writes;
//! - volumes are copied while the source runs (`precopy:`), and again after
//!   the source stopped (`sync:`), which sends only the chunks that changed:
//!   the downtime is the final delta, not the volume;
//! - config files are rewritten with the endpoint map into the target;
//! - buckets are copied (or left in place, `--buckets repoint`, and the
//!   config keeps pointing at them);
//! - `verify` proves the target equal and self-contained before the source
//!   is touched: every image compared with its source, the service
//!   introspected at the target (every reference resolves there), and no
//!   config at the target still naming an old internal endpoint;
//! - only then `stop-source` stops (never deletes) the source instances,
//!   the volumes get their final delta and `cutover` starts the target.
//!
//! The conduit's own migrators (provision, verify, stop, cut-over) are in
//! [`steps`]; the state a relocation keeps on disk in [`store`].

pub mod clock;
pub mod config_step;
pub mod extra;
pub mod lock;
pub mod report;
pub mod steps;
pub mod store;
pub mod tracking;
pub mod transfer_step;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fluidcloud_migrators::image::BackingPolicy;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, EndpointKind, Error as SdkError, ImageFormat, Migrator,
    ResourceId, ResourceKind, ResourceSpec, Topology,
};
use fluidcloud_viaduct::{InputBinding, Registry, StepSpec, WorkflowBuilder, WorkflowDef};
use serde::{Deserialize, Serialize};

use crate::config::{SiteConfig, SitesFile, move_address};
use crate::driver::{DiskStore, InstanceRecord, InstanceState};
use crate::error::{Error, Result};
use crate::transfer::DiskRef;

/// Formats `image-convert` writes, in order of preference after the
/// source's own format (raw is the cheapest to produce and to boot).
const WRITABLE: [ImageFormat; 5] = [
    ImageFormat::Raw,
    ImageFormat::Qcow2,
    ImageFormat::Vmdk,
    ImageFormat::Vhd,
    ImageFormat::Vhdx,
];

/// What to do with the service's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BucketMode {
    /// Copy every object to the target site.
    #[default]
    Copy,
    /// Leave the objects where they are; the config keeps reaching them.
    Repoint,
}

impl BucketMode {
    /// `copy` or `repoint`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Repoint => "repoint",
        }
    }
}

/// One rewrite of the endpoint map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointChange {
    /// What the value is.
    pub kind: EndpointKind,
    /// The value at the source.
    pub old: String,
    /// The value at the target.
    pub new: String,
    /// Why (which resource moved where).
    pub because: String,
}

/// Everything decided before a relocation runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Relocation {
    /// Its id, e.g. `shop-20261122-101500`.
    pub id: String,
    /// The service.
    pub service: String,
    /// The source site.
    pub from: String,
    /// Target site per moved unit (`instance:web`, `bucket:shop-media`).
    pub assignments: BTreeMap<String, String>,
    /// The sites file the steps open sites from (absolute).
    pub sites_file: PathBuf,
    /// The service manifest used at the source, if any (absolute).
    pub manifest: Option<PathBuf>,
    /// Buckets copied or left in place.
    pub bucket_mode: BucketMode,
    /// Old endpoint → new endpoint.
    pub endpoint_map: Vec<EndpointChange>,
    /// The workflow to run.
    pub workflow: WorkflowDef,
    /// Bytes the data steps will move (allocated bytes, not virtual sizes).
    pub bytes_to_move: u64,
    /// Config files rewritten: (source path, target path).
    pub config_files: Vec<(PathBuf, PathBuf)>,
}

impl Relocation {
    /// The distinct target sites.
    pub fn targets(&self) -> Vec<String> {
        let mut t: Vec<String> = self.assignments.values().cloned().collect();
        t.sort();
        t.dedup();
        t
    }
}

/// What [`plan`] needs to know.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// The relocation id to use.
    pub id: String,
    /// The parsed sites file.
    pub sites: &'a SitesFile,
    /// The source site.
    pub from: &'a str,
    /// The service's topology at the source.
    pub topology: &'a Topology,
    /// Target per unit (`instance:NAME`, `bucket:NAME`); every instance and
    /// bucket of the topology must have one.
    pub assignments: BTreeMap<String, String>,
    /// The manifest used for introspection, if any.
    pub manifest: Option<PathBuf>,
    /// Buckets copied or left in place.
    pub bucket_mode: BucketMode,
    /// Where steps keep their rollback records (the relocation's directory).
    pub records: PathBuf,
    /// The source site's instance records (kernel, command line, NICs,
    /// disk bus are carried from them; empty: only what the topology says).
    pub source_instances: Vec<InstanceRecord>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Config {
        diagnostics: vec![Diagnostic::error(msg.into())],
    }
}

fn not_supported(operation: String, site: &str) -> Error {
    Error::Site {
        site: site.to_owned(),
        source: SdkError::NotSupported {
            operation,
            site: Some(site.to_owned()),
        },
    }
}

/// The directory of a site whose data lives on this machine.
///
/// # Errors
/// `NotSupported` for site kinds whose data is not reachable as files.
pub fn site_root(name: &str, cfg: &SiteConfig) -> Result<PathBuf> {
    match (&cfg.path, cfg.kind.as_str()) {
        (Some(p), "local") => std::fs::canonicalize(p).map_err(|e| Error::Site {
            site: name.to_owned(),
            source: SdkError::io(format!("site directory {}", p.display()), e),
        }),
        _ => Err(not_supported(
            format!("relocating data to or from a `{}` site", cfg.kind),
            name,
        )),
    }
}

/// Where a site keeps the files the data steps write.
#[derive(Debug, Clone)]
pub struct SiteDirs {
    /// Boot images, kernels and initrds.
    pub images: PathBuf,
    /// Block volumes.
    pub volumes: PathBuf,
    /// Config files, where the site has them.
    pub config: Option<PathBuf>,
}

/// The directories of a site whose data lives on this machine: a local
/// site's `images/`, `volumes/`, `config/`; a libvirt site's storage pool
/// (images and volumes alike; no config files).
///
/// # Errors
/// `NotSupported` for site kinds whose data is not reachable as files (a
/// libvirt daemon on another host); the daemon's error for a missing pool.
pub fn site_dirs(name: &str, cfg: &SiteConfig) -> Result<SiteDirs> {
    if cfg.kind == "libvirt" {
        let site = crate::drivers::libvirt::LibvirtSite::new(
            name,
            cfg.uri.clone().unwrap_or_default(),
            cfg.pool.clone().unwrap_or_default(),
        );
        if !site.is_local() {
            return Err(not_supported(
                "relocating disks to or from a libvirt daemon on another host (the disks are copied as files; run fluidcloud on that host)".into(),
                name,
            ));
        }
        let pool = pool_path_blocking(name, cfg)?;
        return Ok(SiteDirs {
            images: pool.clone(),
            volumes: pool,
            config: None,
        });
    }
    let root = site_root(name, cfg)?;
    Ok(SiteDirs {
        images: root.join("images"),
        volumes: root.join("volumes"),
        config: Some(root.join("config")),
    })
}

/// The target path of a libvirt site's pool, asked of the daemon.
fn pool_path_blocking(name: &str, cfg: &SiteConfig) -> Result<PathBuf> {
    let uri = cfg.uri.clone().unwrap_or_default();
    let pool = cfg.pool.clone().unwrap_or_default();
    let site_err = |source: SdkError| Error::Site {
        site: name.to_owned(),
        source,
    };
    let out = std::process::Command::new("virsh")
        .args(["-q", "-c", &uri, "pool-dumpxml", &pool])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| site_err(SdkError::io("running virsh (Debian: libvirt-clients)", e)))?;
    if !out.status.success() {
        return Err(site_err(SdkError::Precondition(format!(
            "storage pool {pool} at {uri}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc = roxmltree::Document::parse(&text)
        .map_err(|e| site_err(SdkError::Precondition(format!("pool XML: {e}"))))?;
    doc.descendants()
        .find(|n| n.has_tag_name("target"))
        .and_then(|t| t.children().find(|n| n.has_tag_name("path")))
        .and_then(|p| p.text())
        .map(|p| PathBuf::from(p.trim()))
        .ok_or_else(|| {
            site_err(SdkError::NotSupported {
                operation: format!("storage pool {pool} without a target path (use a dir pool)"),
                site: Some(name.to_owned()),
            })
        })
}

/// Where the backing files and extents of a source disk in `store` may be
/// (an image-convert or volume-copy `backing` param): under the site's
/// store, or in a directory the site allows with `allow_backing_dirs`.
fn backing_policy(cfg: &SiteConfig, store: &Path) -> BackingPolicy {
    BackingPolicy {
        root: Some(store.to_owned()),
        allow_dirs: cfg.allow_backing_dirs.clone(),
    }
}

/// `record` adapted to a target site: network and bridge names mapped,
/// MAC addresses kept or regenerated (stable for one relocation id), the
/// disk bus set. A libvirt target always gets an explicit disk bus, so the
/// domain it defines reads back as the same record.
pub fn adapt_record(record: &mut InstanceRecord, target: &SiteConfig, relocation_id: &str) {
    let adapt = target.adapt.clone().unwrap_or_default();
    for (i, nic) in record.nics.iter_mut().enumerate() {
        let map = match nic.kind {
            crate::driver::NicKind::Network => Some(&adapt.networks),
            crate::driver::NicKind::Bridge => Some(&adapt.bridges),
            crate::driver::NicKind::User => None,
        };
        if let (Some(map), Some(src)) = (map, &nic.source)
            && let Some(new) = map.get(src)
        {
            nic.source = Some(new.clone());
        }
        if adapt.mac == crate::config::MacPolicy::Generate {
            nic.mac = Some(generated_mac(relocation_id, &record.name, i));
        }
    }
    if let Some(bus) = &adapt.disk_bus {
        record.disk_bus = Some(bus.clone());
    }
    let has_disks = record.boot_image.is_some() || !record.volumes.is_empty();
    if target.kind == "libvirt" && has_disks && record.disk_bus.is_none() {
        record.disk_bus = Some("virtio".into());
    }
    if !has_disks {
        record.disk_bus = None;
    }
}

/// A locally administered MAC in QEMU's `52:54:00` range, from a hash of
/// the relocation, the instance and the interface index.
pub fn generated_mac(relocation_id: &str, instance: &str, index: usize) -> String {
    // FNV-1a: stable across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in relocation_id
        .bytes()
        .chain([0])
        .chain(instance.bytes())
        .chain([0])
        .chain(index.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[5], b[6], b[7])
}

/// Where bucket `bucket` of site `name` lives, as an object-copy location
/// URL (`file:///…` or `s3://…`; credentials by variable name only).
///
/// # Errors
/// As [`site_root`].
pub fn bucket_url(name: &str, cfg: &SiteConfig, bucket: &str) -> Result<String> {
    if let Some(base) = &cfg.buckets_url {
        let rest = base.trim_start_matches("s3://");
        let (_, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut q: Vec<String> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(c) = &cfg.credentials {
            for (field, var) in c.references() {
                if field != "token_env" && !q.iter().any(|p| p.starts_with(field)) {
                    q.push(format!("{field}={var}"));
                }
            }
        }
        return Ok(format!("s3://{bucket}?{}", q.join("&")));
    }
    let root = site_root(name, cfg)?;
    Ok(format!(
        "file://{}",
        root.join("buckets").join(bucket).display()
    ))
}

fn image_ext(f: ImageFormat) -> &'static str {
    f.as_str()
}

/// The format an image of format `source` becomes on a site accepting
/// `accepted`.
fn target_format(source: ImageFormat, accepted: &[ImageFormat]) -> Option<ImageFormat> {
    if accepted.contains(&source) && WRITABLE.contains(&source) {
        return Some(source);
    }
    WRITABLE.iter().copied().find(|f| accepted.contains(f))
}

/// `host` moved from one of `from_domains` to `to_domain`.
fn move_host(host: &str, from_domains: &[String], to_domain: &str) -> Option<String> {
    from_domains.iter().find_map(|d| {
        host.strip_suffix(d.as_str())
            .filter(|head| head.ends_with('.'))
            .map(|head| format!("{head}{to_domain}"))
    })
}

/// A step id safe for the journal and for file names.
fn step_id(prefix: &str, name: &str) -> String {
    format!("{prefix}:{name}")
}

fn given(kind: ArtifactKind, site: &str, locator: String, size: Option<u64>) -> InputBinding {
    InputBinding::Given {
        artifact: Artifact {
            kind,
            site: site.to_owned(),
            locator,
            size,
            checksum: None,
        },
    }
}

struct InstancePlan {
    record: InstanceRecord,
    target: String,
    images: Vec<String>,
    volumes: Vec<String>,
    configs: Vec<String>,
}

/// Builds the relocation. Pure planning: reads nothing but `input` and the
/// site directories' locations.
///
/// # Errors
/// `Config` when a unit has no target or names an unknown site;
/// `NotSupported` for a site kind without local data, or an image no
/// format of the target can hold.
pub fn plan(input: &PlanInput<'_>) -> Result<Relocation> {
    let topo = input.topology;
    let from_cfg = input.sites.site(input.from)?;
    let from_domains = from_cfg.internal_domains.clone();
    let sites_file = std::fs::canonicalize(&input.sites.path).map_err(|e| Error::Site {
        site: input.from.to_owned(),
        source: SdkError::io(format!("sites file {}", input.sites.path.display()), e),
    })?;
    let sites_file_s = sites_file.display().to_string();
    let target_of = |unit: &str| -> Result<(&str, &SiteConfig)> {
        let t = input
            .assignments
            .get(unit)
            .ok_or_else(|| invalid(format!("no target site for {unit}")))?;
        Ok((t.as_str(), input.sites.site(t)?))
    };

    let mut map: Vec<EndpointChange> = Vec::new();
    let mut push_change = |kind, old: &str, new: String, because: String| {
        if old != new && !map.iter().any(|c: &EndpointChange| c.old == old) {
            map.push(EndpointChange {
                kind,
                old: old.to_owned(),
                new,
                because,
            });
        }
    };

    let mut wf = WorkflowBuilder::new(format!(
        "relocate {} from {} ({})",
        topo.service(),
        input.from,
        input.id
    ));
    let mut bytes_to_move = 0u64;
    let mut config_files = Vec::new();
    let mut instances: Vec<InstancePlan> = Vec::new();
    // What runs once the source stopped: every disk's final delta.
    let mut after_stop: Vec<StepSpec> = Vec::new();
    let mut bucket_steps: Vec<String> = Vec::new();
    let mut images_to_compare: Vec<steps::ImagePair> = Vec::new();
    let mut configs_done: BTreeMap<String, String> = BTreeMap::new();
    let mut boot_checks: Vec<steps::BootCheckPlan> = Vec::new();
    let tracking = Tracking::plan(input, from_cfg, topo, &sites_file_s);
    if let Some(begin) = tracking.step(tracking::Op::Begin) {
        wf.push(begin);
    }

    for r in topo.resources() {
        let ResourceSpec::Instance {
            vcpus,
            memory_mib,
            hostname,
            addresses,
            ..
        } = &r.spec
        else {
            continue;
        };
        let unit = r.id.as_str().to_owned();
        let (target, tcfg) = target_of(&unit)?;
        let data_path = DataPath::of(input.from, from_cfg, target, tcfg)?;
        let source_rec = input.source_instances.iter().find(|i| i.name == r.name);
        let to_domain = tcfg.internal_domains.first().cloned();
        let new_host = match (hostname, &to_domain) {
            (Some(h), Some(d)) => move_host(h, &from_domains, d).unwrap_or_else(|| h.clone()),
            (Some(h), None) => h.clone(),
            (None, _) => String::new(),
        };
        if let Some(h) = hostname {
            push_change(
                EndpointKind::Host,
                h,
                new_host.clone(),
                format!("{unit} moves to {target}"),
            );
        }
        let mut new_addresses = Vec::new();
        for a in addresses {
            let moved = tcfg
                .subnet
                .as_deref()
                .and_then(|net| move_address(a, net))
                .unwrap_or_else(|| a.clone());
            push_change(
                EndpointKind::Ip,
                a,
                moved.clone(),
                format!("{unit} moves to {target}"),
            );
            new_addresses.push(moved);
        }
        let mut plan = InstancePlan {
            record: InstanceRecord {
                name: r.name.clone(),
                service: Some(topo.service().to_owned()),
                state: InstanceState::Stopped,
                vcpus: *vcpus,
                memory_mib: *memory_mib,
                hostname: (!new_host.is_empty()).then_some(new_host),
                addresses: new_addresses,
                boot_image: None,
                volumes: Vec::new(),
                config_files: Vec::new(),
                cmdline: source_rec.and_then(|s| s.cmdline.clone()),
                disk_bus: source_rec.and_then(|s| s.disk_bus.clone()),
                nics: source_rec.map(|s| s.nics.clone()).unwrap_or_default(),
                created_by: Some(input.id.clone()),
                ..InstanceRecord::new(r.name.clone(), *vcpus, *memory_mib)
            },
            target: target.to_owned(),
            images: Vec::new(),
            volumes: Vec::new(),
            configs: Vec::new(),
        };
        for edge in topo.dependencies(&r.id) {
            let Some(dep) = topo.get(&edge.to) else {
                continue;
            };
            match &dep.spec {
                ResourceSpec::Image {
                    format,
                    allocated,
                    locator,
                    ..
                } => {
                    let is_kernel =
                        source_rec.is_some_and(|s| s.kernel.as_ref() == Some(&dep.name));
                    let is_initrd =
                        source_rec.is_some_and(|s| s.initrd.as_ref() == Some(&dep.name));
                    let accepted: Vec<ImageFormat> = if is_kernel || is_initrd {
                        // Kernels and initrds are files the hypervisor
                        // reads, never disk images: copied byte for byte.
                        vec![ImageFormat::Raw]
                    } else {
                        tcfg.image_formats.clone()
                    };
                    let to = target_format(*format, &accepted).ok_or_else(|| {
                        let why = if accepted.is_empty() {
                            format!(
                                "{target} accepts no disk image format (`image_formats` is empty)"
                            )
                        } else {
                            format!(
                                "no format {target} accepts ({}) can be written by image-convert",
                                accepted
                                    .iter()
                                    .map(|f| f.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        };
                        not_supported(format!("image {} ({format}): {why}", dep.name), target)
                    })?;
                    let stem = Path::new(&dep.name)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| dep.name.clone());
                    let new_name = if is_kernel || is_initrd {
                        dep.name.clone()
                    } else {
                        format!("{stem}.{}", image_ext(to))
                    };
                    let id = step_id("image", &dep.name);
                    if !wf_has(&wf, &id) {
                        bytes_to_move += allocated;
                        match &data_path {
                            DataPath::Files { tdirs, from_dirs } => {
                                let out = tdirs.images.join(&new_name);
                                let disk = ImageStep {
                                    id: &id,
                                    name: &dep.name,
                                    target,
                                    from: input.from,
                                    relocation: &input.id,
                                    source: locator,
                                    source_format: *format,
                                    allocated: *allocated,
                                    output: &out,
                                    format: to,
                                    backing: backing_policy(from_cfg, &from_dirs.images),
                                    tracking: &tracking,
                                };
                                if is_kernel || is_initrd {
                                    // Host files the guest never writes: one
                                    // copy, compared by the verify step.
                                    wf.push(disk.convert());
                                    images_to_compare.push(disk.pair());
                                } else {
                                    // A disk the running guest writes:
                                    // pre-copied now, its last writes sent
                                    // once it stopped.
                                    let (pre, last) = disk.warm();
                                    wf.push(pre);
                                    after_stop.push(last);
                                }
                            }
                            DataPath::Agents => {
                                let disk = AgentDisk {
                                    target,
                                    from: input.from,
                                    relocation: &input.id,
                                    sites_file: &sites_file_s,
                                    source: DiskRef {
                                        store: DiskStore::Image,
                                        name: dep.name.clone(),
                                        format: *format,
                                    },
                                    into: DiskRef {
                                        store: DiskStore::Image,
                                        name: new_name.clone(),
                                        format: to,
                                    },
                                    allocated: *allocated,
                                    tracking: &tracking,
                                };
                                if is_kernel || is_initrd {
                                    // Compared end to end by the transfer.
                                    wf.push(disk.once(&id));
                                } else {
                                    let (pre, last) = disk.warm(&id, &step_id("final", &dep.name));
                                    wf.push(pre);
                                    after_stop.push(last);
                                }
                            }
                        }
                    }
                    if is_kernel {
                        plan.record.kernel = Some(new_name);
                    } else if is_initrd {
                        plan.record.initrd = Some(new_name);
                    } else {
                        plan.record.formats.insert(new_name.clone(), to);
                        plan.record.boot_image = Some(new_name);
                    }
                    plan.images.push(id);
                }
                ResourceSpec::Volume {
                    allocated,
                    locator,
                    format,
                    ..
                } => {
                    let stem = Path::new(&dep.name)
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| dep.name.clone());
                    let new_name = format!("{stem}.raw");
                    let pre = step_id("precopy", &dep.name);
                    bytes_to_move += allocated;
                    match &data_path {
                        DataPath::Files { tdirs, from_dirs } => {
                            let out = tdirs.volumes.join(&new_name);
                            let params = serde_json::json!({
                                "output": out.display().to_string(),
                                "site": target,
                                "source_format": format.as_str(),
                                "backing": backing_policy(from_cfg, &from_dirs.volumes),
                                "relocation": input.id,
                            });
                            let source = given(
                                ArtifactKind::Volume,
                                input.from,
                                locator.clone(),
                                Some(*allocated),
                            );
                            wf.push(
                                tracking.precopy(
                                    StepSpec::new(&pre, "volume-copy", target)
                                        .params(params.clone())
                                        .input("volume", source.clone())
                                        .output("volume", ArtifactKind::Volume),
                                ),
                            );
                            after_stop.push(
                                tracking.final_delta(
                                    StepSpec::new(
                                        step_id("sync", &dep.name),
                                        "volume-copy",
                                        target,
                                    )
                                    .params(params)
                                    .input("volume", source)
                                    .output("volume", ArtifactKind::Volume)
                                    .after(&pre),
                                    locator,
                                ),
                            );
                        }
                        DataPath::Agents => {
                            let disk = AgentDisk {
                                target,
                                from: input.from,
                                relocation: &input.id,
                                sites_file: &sites_file_s,
                                source: DiskRef {
                                    store: DiskStore::Volume,
                                    name: dep.name.clone(),
                                    format: *format,
                                },
                                into: DiskRef {
                                    store: DiskStore::Volume,
                                    name: new_name.clone(),
                                    format: ImageFormat::Raw,
                                },
                                allocated: *allocated,
                                tracking: &tracking,
                            };
                            let (first, last) = disk.warm(&pre, &step_id("sync", &dep.name));
                            wf.push(first);
                            after_stop.push(last);
                        }
                    }
                    plan.record
                        .formats
                        .insert(new_name.clone(), ImageFormat::Raw);
                    plan.record.volumes.push(new_name);
                    plan.volumes.push(pre);
                }
                ResourceSpec::ConfigFile { path, .. } => {
                    let id = step_id("config", path);
                    if let Some(other) = configs_done.get(path) {
                        if other != target {
                            return Err(invalid(format!(
                                "config file {path} is read by instances placed on {other} and {target}; place them together"
                            )));
                        }
                    } else {
                        configs_done.insert(path.clone(), target.to_owned());
                        let step = match &data_path {
                            DataPath::Files { tdirs, .. } => {
                                let (step, src, out) = config_adapt_step(
                                    &id, path, input, from_cfg, target, tcfg, tdirs,
                                )?;
                                config_files.push((src, out));
                                step
                            }
                            DataPath::Agents => StepSpec::new(&id, "config-transfer", target)
                                .params(serde_json::json!({
                                    "sites_file": sites_file_s,
                                    "from": input.from,
                                    "site": target,
                                    "path": path,
                                    "relocation": input.id,
                                }))
                                .output("config", ArtifactKind::ConfigFile),
                        };
                        wf.push(step);
                    }
                    plan.record.config_files.push(path.clone());
                    plan.configs.push(id);
                }
                _ => {}
            }
        }
        adapt_record(&mut plan.record, tcfg, &input.id);
        if let Some(check) = &tcfg.boot_check {
            boot_checks.push(steps::BootCheckPlan {
                site: target.to_owned(),
                instance: plan.record.name.clone(),
                source_site: input.from.to_owned(),
                console: check.console.clone(),
                timeout_s: check.timeout_s,
            });
        }
        instances.push(plan);
    }

    for r in topo.resources() {
        let ResourceSpec::Bucket { bytes, .. } = &r.spec else {
            continue;
        };
        let unit = r.id.as_str().to_owned();
        let (target, tcfg) = target_of(&unit)?;
        let id = step_id("bucket", &r.name);
        if from_cfg.agent.is_some() || tcfg.agent.is_some() {
            if !matches!(
                DataPath::of(input.from, from_cfg, target, tcfg)?,
                DataPath::Agents
            ) || input.bucket_mode != BucketMode::Copy
            {
                return Err(not_supported(
                    format!(
                        "bucket {}: leaving buckets in place (`--buckets repoint`) at a site reached through its agent",
                        r.name
                    ),
                    target,
                ));
            }
            bytes_to_move += bytes;
            if let (Some(old), Some(new)) = (&from_cfg.object_endpoint, &tcfg.object_endpoint) {
                push_change(
                    EndpointKind::Url,
                    old,
                    new.clone(),
                    format!("{unit} moves to {target}"),
                );
            }
            wf.push(
                StepSpec::new(&id, "bucket-transfer", target)
                    .params(serde_json::json!({
                        "sites_file": sites_file_s,
                        "from": input.from,
                        "site": target,
                        "bucket": r.name,
                        "relocation": input.id,
                        "bytes": bytes,
                    }))
                    .output("bucket", ArtifactKind::Bucket),
            );
            bucket_steps.push(id);
            continue;
        }
        let source = bucket_url(input.from, from_cfg, &r.name)?;
        let mut params = serde_json::json!({
            "mode": input.bucket_mode.as_str(),
            "record_dir": input.records.display().to_string(),
        });
        if input.bucket_mode == BucketMode::Copy {
            params["target"] = serde_json::json!(bucket_url(target, tcfg, &r.name)?);
            bytes_to_move += bytes;
            if let (Some(old), Some(new)) = (&from_cfg.object_endpoint, &tcfg.object_endpoint) {
                push_change(
                    EndpointKind::Url,
                    old,
                    new.clone(),
                    format!("{unit} moves to {target}"),
                );
            }
        }
        wf.push(
            StepSpec::new(&id, "object-copy", target)
                .params(params)
                .input(
                    "bucket",
                    given(ArtifactKind::Bucket, input.from, source, Some(*bytes)),
                )
                .output("bucket", ArtifactKind::Bucket),
        );
        bucket_steps.push(id);
    }

    // The endpoint map is known only now: give it to every config step.
    let map_json = adapt_map_json(&map);
    let mut def = wf.clone().into_def();
    for s in &mut def.steps {
        if s.migrator == "config-adapt" || s.migrator == "config-transfer" {
            s.params["map"] = map_json.clone();
        }
    }
    let mut wf = WorkflowBuilder::from_def(def);

    let mut provision_ids = Vec::new();
    for p in &instances {
        let id = step_id("provision", &p.record.name);
        let mut spec = StepSpec::new(&id, "instance-provision", &p.target)
            .params(serde_json::json!({
                "sites_file": sites_file_s,
                "site": p.target,
                "record": p.record,
            }))
            .output("instance", ArtifactKind::Instance);
        for v in p.images.iter().chain(&p.volumes).chain(&p.configs) {
            spec = spec.after(v);
        }
        wf.push(spec);
        provision_ids.push(id);
    }

    let targets: Vec<String> = {
        let mut t: Vec<String> = input.assignments.values().cloned().collect();
        t.sort();
        t.dedup();
        t
    };
    let primary = targets
        .first()
        .cloned()
        .ok_or_else(|| invalid("nothing to relocate: the service has no instances or buckets"))?;
    let mut verify =
        StepSpec::new("verify", "service-verify", &primary).params(serde_json::json!({
            "sites_file": sites_file_s,
            "service": topo.service(),
            "from": input.from,
            "manifest": input.manifest.as_ref().map(|m| m.display().to_string()),
            "targets": targets,
            "images": images_to_compare,
            "endpoint_map": map,
            "boot_checks": boot_checks,
        }));
    for id in provision_ids.iter().chain(&bucket_steps) {
        verify = verify.after(id);
    }
    wf.push(verify);

    let source_instances: Vec<String> = instances.iter().map(|p| p.record.name.clone()).collect();
    wf.push(
        StepSpec::new("stop-source", "source-stop", input.from)
            .params(serde_json::json!({
                "sites_file": sites_file_s,
                "site": input.from,
                "instances": source_instances,
                "record_dir": input.records.display().to_string(),
            }))
            .after("verify"),
    );
    let mut cutover = StepSpec::new("cutover", "cutover", &primary).params(serde_json::json!({
        "sites_file": sites_file_s,
        "instances": instances
            .iter()
            .map(|p| (p.target.clone(), p.record.name.clone()))
            .collect::<Vec<_>>(),
        "boot_checks": boot_checks,
    }));
    cutover = cutover.after("stop-source");
    if let Some(collect) = tracking.step(tracking::Op::Collect) {
        wf.push(collect.after("stop-source"));
    }
    for last in after_stop {
        let id = last.id.clone();
        wf.push(last.after("stop-source"));
        cutover = cutover.after(id);
    }
    wf.push(cutover);

    let mut workflow = wf.into_def();
    if let Some(m) = &input.manifest {
        let steps = crate::introspect::ServiceManifest::load(m)?.0.steps;
        if !steps.is_empty() {
            let ctx = extra::Context {
                manifest: m,
                service: topo.service(),
                relocation: &input.id,
                from: input.from,
                from_root: site_root(input.from, from_cfg).ok(),
                instance_targets: instances
                    .iter()
                    .map(|p| (p.record.name.clone(), p.target.clone()))
                    .collect(),
                primary: &primary,
                roots: targets
                    .iter()
                    .filter_map(|t| {
                        let root = site_root(t, input.sites.site(t).ok()?).ok()?;
                        Some((t.clone(), root))
                    })
                    .collect(),
                endpoint_map: adapt_map_json(&map),
            };
            workflow = extra::add_steps(workflow, &steps, &ctx)?;
        }
    }

    Ok(Relocation {
        id: input.id.clone(),
        service: topo.service().to_owned(),
        from: input.from.to_owned(),
        assignments: input.assignments.clone(),
        sites_file,
        manifest: input.manifest.clone(),
        bucket_mode: input.bucket_mode,
        endpoint_map: map,
        workflow,
        bytes_to_move,
        config_files,
    })
}

/// The `config-adapt` step of config file `path` between two sites whose
/// files are on this machine: (the step, the source file, the output).
fn config_adapt_step(
    id: &str,
    path: &str,
    input: &PlanInput<'_>,
    from_cfg: &SiteConfig,
    target: &str,
    tcfg: &SiteConfig,
    tdirs: &SiteDirs,
) -> Result<(StepSpec, PathBuf, PathBuf)> {
    let src = site_root(input.from, from_cfg)?.join("config").join(path);
    let config_dir = tdirs.config.as_ref().ok_or_else(|| {
        not_supported(
            format!(
                "config file {path}: a {} site holds no config files",
                tcfg.kind
            ),
            target,
        )
    })?;
    let out = config_dir.join(path);
    let step = StepSpec::new(id, "config-adapt", target)
        .params(serde_json::json!({
            "output": out.display().to_string(),
            "site": target,
            "prune_up_to": config_dir.display().to_string(),
        }))
        .input(
            "config",
            given(
                ArtifactKind::ConfigFile,
                input.from,
                src.display().to_string(),
                None,
            ),
        )
        .output("config", ArtifactKind::ConfigFile);
    Ok((step, src, out))
}

/// How a unit's data reaches its target.
enum DataPath {
    /// Both sites' data is on this machine: the data steps read and write
    /// their directories.
    Files {
        /// The target's.
        tdirs: SiteDirs,
        /// The source's.
        from_dirs: SiteDirs,
    },
    /// Both sites are reached through their agents: disks move agent to
    /// agent (`disk-transfer`).
    Agents,
}

impl DataPath {
    fn of(from: &str, from_cfg: &SiteConfig, target: &str, tcfg: &SiteConfig) -> Result<Self> {
        match (from_cfg.agent.is_some(), tcfg.agent.is_some()) {
            (true, true) => Ok(Self::Agents),
            (false, false) => Ok(Self::Files {
                tdirs: site_dirs(target, tcfg)?,
                from_dirs: site_dirs(from, from_cfg)?,
            }),
            (true, false) => Err(not_supported(
                format!(
                    "relocating from a site reached through its agent ({from}) to one in this process: give {target} an agent too (`fluidcloud agent`)"
                ),
                target,
            )),
            (false, true) => Err(not_supported(
                format!(
                    "relocating from a site in this process to one reached through its agent ({target}): give {from} an agent too (`fluidcloud agent`)"
                ),
                from,
            )),
        }
    }
}

/// One disk moved agent to agent.
struct AgentDisk<'a> {
    target: &'a str,
    from: &'a str,
    relocation: &'a str,
    sites_file: &'a str,
    source: DiskRef,
    into: DiskRef,
    allocated: u64,
    tracking: &'a Tracking,
}

impl AgentDisk<'_> {
    fn step(&self, id: &str) -> StepSpec {
        let kind = match self.into.store {
            DiskStore::Volume => ArtifactKind::Volume,
            DiskStore::Image => ArtifactKind::DiskImage {
                format: self.into.format,
            },
        };
        StepSpec::new(id, "disk-transfer", self.target)
            .params(serde_json::json!({
                "sites_file": self.sites_file,
                "from": self.from,
                "site": self.target,
                "source": self.source,
                "into": self.into,
                "relocation": self.relocation,
                "allocated": self.allocated,
            }))
            .output("disk", kind)
    }

    /// One transfer (kernels, initrds: files the guest never writes).
    fn once(&self, id: &str) -> StepSpec {
        self.step(id)
    }

    /// A pre-copy while the source runs, and the final delta once it
    /// stopped: the same transfer again, which sends only what differs.
    fn warm(&self, id: &str, last: &str) -> (StepSpec, StepSpec) {
        (
            self.tracking.precopy(self.step(id)),
            self.tracking.after_collect(self.step(last).after(id)),
        )
    }
}

/// One disk image of an instance, to be written at its target.
struct ImageStep<'a> {
    id: &'a str,
    name: &'a str,
    target: &'a str,
    from: &'a str,
    relocation: &'a str,
    source: &'a str,
    source_format: ImageFormat,
    allocated: u64,
    output: &'a Path,
    format: ImageFormat,
    backing: BackingPolicy,
    tracking: &'a Tracking,
}

/// Whether the source site tracks disk writes during this relocation, and
/// the steps and parameters that follow from it (`tracking.rs`).
struct Tracking {
    /// The `change-tracking` step's parameters; `None` without tracking.
    params: Option<serde_json::Value>,
    /// Where the change sets are written.
    dir: PathBuf,
}

impl Tracking {
    fn plan(
        input: &PlanInput<'_>,
        from_cfg: &SiteConfig,
        topo: &Topology,
        sites_file: &str,
    ) -> Self {
        let dir = input.records.join("changes");
        let on =
            crate::drivers::open(input.from, from_cfg).is_ok_and(|d| d.change_tracking().is_some());
        let instances: Vec<&str> = topo
            .resources()
            .into_iter()
            .filter(|r| r.kind() == ResourceKind::Instance)
            .map(|r| r.name.as_str())
            .collect();
        let params = (on && !instances.is_empty()).then(|| {
            serde_json::json!({
                "sites_file": sites_file,
                "site": input.from,
                "instances": instances,
                "dir": dir.display().to_string(),
            })
        });
        Self { params, dir }
    }

    /// Whether the source site tracks changes.
    fn is_on(&self) -> bool {
        self.params.is_some()
    }

    /// The step of `op`, when tracking is on.
    fn step(&self, op: tracking::Op) -> Option<StepSpec> {
        let mut params = self.params.clone()?;
        params["op"] = serde_json::json!(op.as_str());
        Some(
            StepSpec::new(
                op.step_id(),
                "change-tracking",
                params["site"].as_str().unwrap_or_default(),
            )
            .params(params),
        )
    }

    /// A pre-copy: after the tracking began, so it reads disks that no
    /// longer change.
    fn precopy(&self, spec: StepSpec) -> StepSpec {
        match self.params {
            Some(_) => spec.after(tracking::Op::Begin.step_id()),
            None => spec,
        }
    }

    /// A step that reads a source disk once the source stopped: after
    /// the tracked writes were folded back into it.
    fn after_collect(&self, spec: StepSpec) -> StepSpec {
        match self.params {
            Some(_) => spec.after(tracking::Op::Collect.step_id()),
            None => spec,
        }
    }

    /// A final delta of the disk at `locator`: reads its change set.
    fn final_delta(&self, mut spec: StepSpec, locator: &str) -> StepSpec {
        if self.params.is_none() {
            return spec;
        }
        let file = fluidcloud_migrators::changes::ChangeSet::file_in(&self.dir, locator);
        spec.params["changes"] = serde_json::json!(file.display().to_string());
        self.after_collect(spec)
    }
}

impl ImageStep<'_> {
    fn input(&self) -> InputBinding {
        given(
            ArtifactKind::DiskImage {
                format: self.source_format,
            },
            self.from,
            self.source.to_owned(),
            Some(self.allocated),
        )
    }

    fn convert_params(&self) -> serde_json::Value {
        let mut params = serde_json::json!({
            "format": self.format.as_str(),
            "output": self.output.display().to_string(),
            "backing": self.backing,
            "relocation": self.relocation,
        });
        if self.format == ImageFormat::Vhd {
            params["azure"] = serde_json::json!(true);
        }
        params
    }

    /// One conversion into the target format.
    fn convert(&self) -> StepSpec {
        StepSpec::new(self.id, "image-convert", self.target)
            .params(self.convert_params())
            .input("image", self.input())
            .output(
                "image",
                ArtifactKind::DiskImage {
                    format: self.format,
                },
            )
    }

    /// What the verify step compares.
    fn pair(&self) -> steps::ImagePair {
        steps::ImagePair {
            source: self.source.to_owned(),
            source_format: self.source_format,
            target: self.output.display().to_string(),
            target_format: self.format,
            backing: self.backing.clone(),
        }
    }

    /// The warm path: a copy while the source runs, then, once it stopped,
    /// a last step that brings the target up to the stopped source and
    /// proves them equal.
    ///
    /// A raw target is a `volume-copy`: the last step is its re-sync, which
    /// writes only the chunks that changed and compares the Merkle roots.
    /// A qcow2 target is patched in place by `image-convert` (`patch`):
    /// only differing chunks are written. Either reads only the ranges the
    /// guest wrote when the source site tracks changes, else every chunk
    /// holding data. VMDK, VHD and VHDX targets are converted again from
    /// the stopped source, replacing the pre-copy's output once compared
    /// with the source (downtime grows with the disk; docs/relocate.md).
    fn warm(&self) -> (StepSpec, StepSpec) {
        let last = step_id("final", self.name);
        if self.format != ImageFormat::Raw {
            let mut pre = self.convert();
            if self.tracking.is_on() {
                // The source no longer changes under the pre-copy: compare
                // it now, while the guest still runs, so that the final
                // delta need only compare what changed.
                pre.params["verify"] = serde_json::json!(true);
            }
            let mut params = self.convert_params();
            params["replaces"] = serde_json::json!(self.id);
            params["verify"] = serde_json::json!(true);
            let patch = self.format == ImageFormat::Qcow2;
            if patch {
                params["patch"] = serde_json::json!(true);
            }
            let again = StepSpec::new(&last, "image-convert", self.target)
                .params(params)
                .input("image", self.input())
                .output(
                    "image",
                    ArtifactKind::DiskImage {
                        format: self.format,
                    },
                )
                .after(self.id);
            let again = if patch {
                self.tracking.final_delta(again, self.source)
            } else {
                self.tracking.after_collect(again)
            };
            return (self.tracking.precopy(pre), again);
        }
        let params = serde_json::json!({
            "output": self.output.display().to_string(),
            "site": self.target,
            "source_format": self.source_format.as_str(),
            "backing": self.backing,
            "relocation": self.relocation,
        });
        let copy = |id: &str| {
            StepSpec::new(id, "volume-copy", self.target)
                .params(params.clone())
                .input("volume", self.input())
                .output("volume", ArtifactKind::Volume)
        };
        (
            self.tracking.precopy(copy(self.id)),
            self.tracking
                .final_delta(copy(&last).after(self.id), self.source),
        )
    }
}

fn wf_has(wf: &WorkflowBuilder, id: &str) -> bool {
    wf.def().steps.iter().any(|s| s.id == id)
}

/// The endpoint map in the shape `config-adapt` takes.
pub fn adapt_map_json(map: &[EndpointChange]) -> serde_json::Value {
    serde_json::json!(
        map.iter()
            .map(|c| serde_json::json!({
                "kind": c.kind.as_str(),
                "from": c.old,
                "to": c.new,
            }))
            .collect::<Vec<_>>()
    )
}

/// Every unit of `topology` (`instance:…`, `bucket:…`) assigned to `site`.
pub fn everything_to(topology: &Topology, site: &str) -> BTreeMap<String, String> {
    topology
        .resources()
        .into_iter()
        .filter(|r| matches!(r.kind(), ResourceKind::Instance | ResourceKind::Bucket))
        .map(|r| (r.id.as_str().to_owned(), site.to_owned()))
        .collect()
}

/// The migrators a relocation uses: the built-ins of `fluidcloud-migrators`
/// and the conduit's own steps.
pub fn registry() -> Registry {
    let builtins: Vec<Arc<dyn Migrator>> = vec![
        Arc::new(fluidcloud_migrators::ImageConvert),
        Arc::new(fluidcloud_migrators::VolumeCopy),
        Arc::new(fluidcloud_migrators::ConfigAdapt),
        Arc::new(fluidcloud_migrators::ObjectCopy),
        Arc::new(steps::Provision),
        Arc::new(steps::Verify),
        Arc::new(steps::StopSource),
        Arc::new(steps::Cutover),
        Arc::new(tracking::ChangeTrack),
        Arc::new(transfer_step::DiskTransfer),
        Arc::new(config_step::ConfigTransfer),
        Arc::new(transfer_step::BucketTransfer),
    ];
    let mut r = Registry::new();
    for m in builtins {
        r.insert(m);
    }
    r
}

/// The registry `def` needs: the built-ins, plus the discovered plugins
/// (see `fluidcloud_plugins::discover`) when a step names a migrator that
/// is not built in. The plugin processes live as long as the registry.
///
/// # Errors
/// `Config` naming the step and its migrator when neither a built-in nor
/// a discovered plugin has that name (with why each broken plugin was left
/// out).
pub fn registry_for(
    def: &WorkflowDef,
    plugin_env: &BTreeMap<String, Vec<String>>,
) -> Result<Registry> {
    let mut r = registry();
    let missing = |r: &Registry| -> Vec<(String, String)> {
        def.steps
            .iter()
            .filter(|s| r.get(&s.migrator).is_none())
            .map(|s| (s.id.clone(), s.migrator.clone()))
            .collect()
    };
    if missing(&r).is_empty() {
        return Ok(r);
    }
    let taken: Vec<String> = r.names().map(str::to_owned).collect();
    let taken: Vec<&str> = taken.iter().map(String::as_str).collect();
    let config = fluidcloud_plugins::host::HostConfig {
        secrets: fluidcloud_plugins::host::Secrets::from_env(),
        pass_env: plugin_env.clone(),
        ..fluidcloud_plugins::host::HostConfig::default()
    };
    let started = fluidcloud_plugins::host::start_discovered(
        fluidcloud_plugins::discover::discover(),
        &taken,
        &config,
    );
    for (_, m) in started.ok {
        r.insert(Arc::new(m));
    }
    let missing = missing(&r);
    if missing.is_empty() {
        return Ok(r);
    }
    let mut diagnostics: Vec<Diagnostic> = missing
        .iter()
        .map(|(step, migrator)| {
            Diagnostic::error(format!(
                "step {step} uses migrator `{migrator}`: not built in, and no discovered plugin has that name"
            ))
            .with_detail(format!(
                "plugins are found in ${}, ${} and as {}* on $PATH; `fluidcloud migrators list` shows what is found",
                fluidcloud_plugins::discover::PLUGIN_DIR_ENV,
                fluidcloud_plugins::discover::PLUGIN_PATH_ENV,
                fluidcloud_plugins::discover::EXECUTABLE_PREFIX,
            ))
        })
        .collect();
    for (found, why) in started.broken {
        diagnostics.push(Diagnostic::error(format!(
            "plugin {} was left out: {why}",
            found.path.display()
        )));
    }
    Err(Error::Config { diagnostics })
}

/// The resource id of unit `name` of `kind`.
pub fn unit_id(kind: ResourceKind, name: &str) -> String {
    ResourceId::new(kind, name).as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_move_between_internal_domains_only_on_a_label_boundary() {
        let from = vec!["paris.internal".to_owned()];
        assert_eq!(
            move_host("db.shop.paris.internal", &from, "fra.internal").as_deref(),
            Some("db.shop.fra.internal")
        );
        assert_eq!(move_host("xparis.internal", &from, "fra.internal"), None);
        assert_eq!(move_host("shop.example.com", &from, "fra.internal"), None);
    }

    #[test]
    fn target_format_prefers_the_source_then_raw() {
        use ImageFormat::*;
        assert_eq!(target_format(Qcow2, &[Qcow2, Raw]), Some(Qcow2));
        assert_eq!(target_format(Qcow2, &[Vmdk, Raw]), Some(Raw));
        assert_eq!(target_format(Qcow2, &[Vmdk]), Some(Vmdk));
        assert_eq!(target_format(Vhdx, &[Vhdx]), Some(Vhdx));
        assert_eq!(target_format(Vhdx, &[Vhd, Vhdx]), Some(Vhdx));
        assert_eq!(target_format(Qcow2, &[Vhdx]), Some(Vhdx));
        assert_eq!(target_format(Qcow2, &[Vhdx, Vhd]), Some(Vhd));
        assert_eq!(target_format(Qcow2, &[]), None);
    }

    #[test]
    fn addresses_keep_their_host_part() {
        assert_eq!(
            move_address("10.10.0.13", "10.30.0.0/24").as_deref(),
            Some("10.30.0.13")
        );
        assert_eq!(
            move_address("10.10.7.13", "172.16.0.0/16").as_deref(),
            Some("172.16.7.13")
        );
        assert_eq!(move_address("fe80::1", "10.30.0.0/24"), None);
        assert_eq!(move_address("10.10.0.13", "10.30.0.0/20"), None);
    }
}
