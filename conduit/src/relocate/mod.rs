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
//! [`plan`] has one planner per resource kind: each instance (its new
//! hostname and addresses into the endpoint map, its record at the target)
//! with the images, volumes and config files it depends on, then each
//! bucket; the steps after them (provision, verify, stop-source, the change
//! tracking's collect, final deltas, cutover, the manifest's extra steps)
//! come last, once the endpoint map is complete.
//!
//! The conduit's own migrators (provision, verify, stop, cut-over) are in
//! [`steps`]; the state a relocation keeps on disk in [`store`].

pub mod clock;
pub mod config_step;
pub mod extra;
pub mod guest_step;
pub mod lock;
pub mod queue;
pub mod report;
pub mod steps;
pub mod store;
pub mod tracking;
pub mod transfer_step;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, EndpointKind, Error as SdkError, ImageFormat, Migrator,
    Resource, ResourceId, ResourceKind, ResourceSpec, Topology,
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
    /// Config files rewritten as files of this machine, (source path,
    /// target path), by relocations planned before config files moved
    /// through the sites' inventories (`config-transfer`); read for their
    /// reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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

/// The directory of a `local` site of this process: the value of
/// `${source_root}` and `${target_root}` in the steps a service manifest
/// adds (`extra.rs`). The data steps never use it: they go through the
/// sites' capabilities.
///
/// # Errors
/// `NotSupported` for any other site.
fn site_root(name: &str, cfg: &SiteConfig) -> Result<PathBuf> {
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

/// `record` adapted to a target site: network and bridge names mapped,
/// MAC addresses kept or regenerated (stable for one relocation id), the
/// disk bus set. A target whose instances name their disks' bus (libvirt)
/// always gets one, so the instance it defines reads back as the same
/// record.
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
    if crate::drivers::names_disk_bus(&target.kind) && has_disks && record.disk_bus.is_none() {
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

/// Where `object-copy` reaches bucket `bucket` of site `site` from this
/// process, as its object storage says ([`crate::driver::ObjectStorage::location`]).
///
/// # Errors
/// `NotSupported` for a site without object storage this process reaches.
fn bucket_location(site: &str, cfg: &SiteConfig, bucket: &str) -> Result<String> {
    let driver = crate::drivers::open(site, cfg)?;
    let site_err = |source: SdkError| Error::Site {
        site: site.to_owned(),
        source,
    };
    driver
        .object_storage()
        .and_then(|o| o.location(bucket))
        .ok_or_else(|| {
            not_supported(
                format!("copying bucket {bucket} to or from a `{}` site", cfg.kind),
                site,
            )
        })?
        .map_err(site_err)
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

/// An instance as planned: its record at the target and the steps it
/// waits for.
struct InstancePlan {
    record: InstanceRecord,
    target: String,
    images: Vec<String>,
    volumes: Vec<String>,
    configs: Vec<String>,
    /// What introspection found inside its guest, if it looked.
    guest: Option<fluidcloud_plugins::GuestFacts>,
    /// The service's config files inside its guest.
    guest_files: Vec<String>,
    /// Its disks at the target, the boot disk first.
    disks: Vec<DiskRef>,
    /// The final deltas of its disks.
    finals: Vec<String>,
    /// (old, new) addresses.
    addresses: Vec<(String, String)>,
}

/// Builds the relocation. Pure planning: reads nothing but `input` and the
/// site directories' locations.
///
/// One planner per resource kind: every instance in the topology's order,
/// with the images, volumes and config files it depends on in the order of
/// its dependencies, then every bucket; then the steps that follow them
/// all (provision, verify, stop-source, the final deltas, cutover, the
/// manifest's extra steps).
///
/// # Errors
/// `Config` when a unit has no target or names an unknown site;
/// `NotSupported` for a site kind without local data, or an image no
/// format of the target can hold.
pub fn plan(input: &PlanInput<'_>) -> Result<Relocation> {
    let mut planner = Planner::new(input)?;
    for r in input.topology.resources() {
        planner.instance(r)?;
    }
    for r in input.topology.resources() {
        planner.bucket(r)?;
    }
    planner.finish()
}

/// What [`plan`] builds up, unit by unit: the workflow so far, the
/// endpoint map and what the last steps need to know.
struct Planner<'a> {
    input: &'a PlanInput<'a>,
    /// The source site.
    from_cfg: &'a SiteConfig,
    /// The sites file (absolute).
    sites_file: PathBuf,
    /// The same, as the steps' parameters give it.
    sites_file_s: String,
    wf: WorkflowBuilder,
    /// Old endpoint → new endpoint, in the order found.
    map: Vec<EndpointChange>,
    bytes_to_move: u64,
    instances: Vec<InstancePlan>,
    /// What runs once the source stopped: every disk's final delta.
    after_stop: Vec<StepSpec>,
    bucket_steps: Vec<String>,
    /// Config file path → the target it is written to.
    configs_done: BTreeMap<String, String>,
    boot_checks: Vec<steps::BootCheckPlan>,
    tracking: Tracking,
}

/// Where an instance goes: what its images, volumes and config files are
/// planned against.
struct Placement<'a> {
    /// The target site.
    target: &'a str,
    tcfg: &'a SiteConfig,
    /// The source site's record of the instance, if it has one.
    source: Option<&'a InstanceRecord>,
}

/// An image or a volume at the source.
struct SourceDisk<'a> {
    name: &'a str,
    locator: &'a str,
    format: ImageFormat,
    allocated: u64,
}

impl<'a> Planner<'a> {
    /// An empty workflow for `input`, begun with the change-tracking
    /// `begin` step when the source site tracks disk writes.
    fn new(input: &'a PlanInput<'a>) -> Result<Self> {
        let from_cfg = input.sites.site(input.from)?;
        let sites_file = std::fs::canonicalize(&input.sites.path).map_err(|e| Error::Site {
            site: input.from.to_owned(),
            source: SdkError::io(format!("sites file {}", input.sites.path.display()), e),
        })?;
        let sites_file_s = sites_file.display().to_string();
        let mut wf = WorkflowBuilder::new(format!(
            "relocate {} from {} ({})",
            input.topology.service(),
            input.from,
            input.id
        ));
        let tracking = Tracking::plan(input, from_cfg, input.topology, &sites_file_s);
        if let Some(begin) = tracking.step(tracking::Op::Begin) {
            wf.push(begin);
        }
        Ok(Self {
            input,
            from_cfg,
            sites_file,
            sites_file_s,
            wf,
            map: Vec::new(),
            bytes_to_move: 0,
            instances: Vec::new(),
            after_stop: Vec::new(),
            bucket_steps: Vec::new(),
            configs_done: BTreeMap::new(),
            boot_checks: Vec::new(),
            tracking,
        })
    }

    /// The target site of `unit`.
    fn target_of(&self, unit: &str) -> Result<(&'a str, &'a SiteConfig)> {
        let input = self.input;
        let t = input
            .assignments
            .get(unit)
            .ok_or_else(|| invalid(format!("no target site for {unit}")))?;
        Ok((t.as_str(), input.sites.site(t)?))
    }

    /// Adds `old` → `new` to the endpoint map, unless it is no change or
    /// `old` is mapped already (the first change of a value wins).
    fn push_change(&mut self, kind: EndpointKind, old: &str, new: String, because: String) {
        if old != new && !self.map.iter().any(|c| c.old == old) {
            self.map.push(EndpointChange {
                kind,
                old: old.to_owned(),
                new,
                because,
            });
        }
    }

    /// An instance: its hostname and addresses at the target (into the
    /// endpoint map), its record there, and the images, volumes and config
    /// files it depends on. Any other resource is left alone.
    fn instance(&mut self, r: &Resource) -> Result<()> {
        let ResourceSpec::Instance {
            vcpus,
            memory_mib,
            hostname,
            addresses,
            guest,
            ..
        } = &r.spec
        else {
            return Ok(());
        };
        let input = self.input;
        let unit = r.id.as_str().to_owned();
        let (target, tcfg) = self.target_of(&unit)?;
        let at = Placement {
            target,
            tcfg,
            source: input.source_instances.iter().find(|i| i.name == r.name),
        };
        let new_host = self.moved_host(hostname.as_deref(), &unit, &at);
        let new_addresses = self.moved_addresses(addresses, &unit, &at);
        let address_pairs = addresses
            .iter()
            .cloned()
            .zip(new_addresses.iter().cloned())
            .collect();
        let source_rec = at.source;
        let mut plan = InstancePlan {
            record: InstanceRecord {
                name: r.name.clone(),
                service: Some(input.topology.service().to_owned()),
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
            guest: guest.clone(),
            guest_files: Vec::new(),
            disks: Vec::new(),
            finals: Vec::new(),
            addresses: address_pairs,
        };
        self.dependencies(r, &at, &mut plan)?;
        adapt_record(&mut plan.record, tcfg, &input.id);
        if let Some(check) = &tcfg.boot_check {
            self.boot_checks.push(steps::BootCheckPlan {
                site: target.to_owned(),
                instance: plan.record.name.clone(),
                source_site: input.from.to_owned(),
                console: check.console.clone(),
                timeout_s: check.timeout_s,
            });
        }
        self.instances.push(plan);
        Ok(())
    }

    /// The hostname at the target (moved into the target's first internal
    /// domain when it is in one of the source's), its change into the
    /// endpoint map; empty without a hostname.
    fn moved_host(&mut self, hostname: Option<&str>, unit: &str, at: &Placement<'_>) -> String {
        let from_domains = &self.from_cfg.internal_domains;
        let new_host = match (hostname, at.tcfg.internal_domains.first()) {
            (Some(h), Some(d)) => move_host(h, from_domains, d).unwrap_or_else(|| h.to_owned()),
            (Some(h), None) => h.to_owned(),
            (None, _) => String::new(),
        };
        if let Some(h) = hostname {
            let because = format!("{unit} moves to {}", at.target);
            self.push_change(EndpointKind::Host, h, new_host.clone(), because);
        }
        new_host
    }

    /// The addresses at the target (moved into its subnet, keeping their
    /// host part), each change into the endpoint map.
    fn moved_addresses(
        &mut self,
        addresses: &[String],
        unit: &str,
        at: &Placement<'_>,
    ) -> Vec<String> {
        let mut new_addresses = Vec::new();
        for a in addresses {
            let moved = at
                .tcfg
                .subnet
                .as_deref()
                .and_then(|net| move_address(a, net))
                .unwrap_or_else(|| a.clone());
            let because = format!("{unit} moves to {}", at.target);
            self.push_change(EndpointKind::Ip, a, moved.clone(), because);
            new_addresses.push(moved);
        }
        new_addresses
    }

    /// What instance `r` depends on, in the order of its dependencies:
    /// each image, volume and config file to its planner.
    fn dependencies(
        &mut self,
        r: &Resource,
        at: &Placement<'_>,
        plan: &mut InstancePlan,
    ) -> Result<()> {
        let topo = self.input.topology;
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
                }
                | ResourceSpec::Volume {
                    allocated,
                    locator,
                    format,
                    ..
                } => {
                    let disk = SourceDisk {
                        name: &dep.name,
                        locator,
                        format: *format,
                        allocated: *allocated,
                    };
                    if dep.kind() == ResourceKind::Image {
                        self.image(at, &disk, plan)?;
                    } else {
                        self.volume(at, &disk, plan);
                    }
                }
                ResourceSpec::ConfigFile {
                    path,
                    guest: Some(_),
                    ..
                } => plan.guest_files.push(path.clone()),
                ResourceSpec::ConfigFile { path, .. } => self.config(at, path, plan)?,
                _ => {}
            }
        }
        Ok(())
    }
}

impl Planner<'_> {
    /// An image an instance boots: a disk the guest writes (pre-copied
    /// while the source runs, its last writes sent once it stopped), or
    /// its kernel or initrd (copied once, byte for byte). An image several
    /// instances boot is moved once.
    fn image(
        &mut self,
        at: &Placement<'_>,
        disk: &SourceDisk<'_>,
        plan: &mut InstancePlan,
    ) -> Result<()> {
        let is_kernel = at
            .source
            .is_some_and(|s| s.kernel.as_deref() == Some(disk.name));
        let is_initrd = at
            .source
            .is_some_and(|s| s.initrd.as_deref() == Some(disk.name));
        let to = image_format(disk, is_kernel || is_initrd, at)?;
        let new_name = if is_kernel || is_initrd {
            disk.name.to_owned()
        } else {
            format!("{}.{}", file_stem(disk.name), image_ext(to))
        };
        let id = step_id("image", disk.name);
        if !wf_has(&self.wf, &id) {
            self.bytes_to_move += disk.allocated;
            self.image_steps(at, disk, &id, &new_name, to, is_kernel || is_initrd);
        }
        if is_kernel {
            plan.record.kernel = Some(new_name);
        } else if is_initrd {
            plan.record.initrd = Some(new_name);
        } else {
            plan.record.formats.insert(new_name.clone(), to);
            plan.disks.insert(
                0,
                DiskRef {
                    store: DiskStore::Image,
                    name: new_name.clone(),
                    format: to,
                },
            );
            plan.finals.push(step_id("final", disk.name));
            plan.record.boot_image = Some(new_name);
        }
        plan.images.push(id);
        Ok(())
    }

    /// The steps writing image `disk` at the target as `new_name`, in
    /// format `to`; `host_file`: a kernel or initrd.
    fn image_steps(
        &mut self,
        at: &Placement<'_>,
        disk: &SourceDisk<'_>,
        id: &str,
        new_name: &str,
        to: ImageFormat,
        host_file: bool,
    ) {
        let transfer = self.site_disk(at.target, DiskStore::Image, disk, new_name, to);
        if host_file {
            // Files the guest never writes: one transfer, compared end to
            // end by its Merkle roots.
            self.wf.push(transfer.step(id));
        } else {
            // A disk the running guest writes: pre-copied now, its last
            // writes sent once it stopped.
            let (pre, last) = transfer.warm(id, &step_id("final", disk.name));
            self.wf.push(pre);
            self.after_stop.push(last);
        }
    }

    /// A volume an instance uses: raw at the target, copied while the
    /// source runs (`precopy:`) and again once it stopped (`sync:`), which
    /// sends only what changed.
    fn volume(&mut self, at: &Placement<'_>, disk: &SourceDisk<'_>, plan: &mut InstancePlan) {
        let new_name = format!("{}.raw", file_stem(disk.name));
        let pre = step_id("precopy", disk.name);
        let sync = step_id("sync", disk.name);
        self.bytes_to_move += disk.allocated;
        let transfer = self.site_disk(
            at.target,
            DiskStore::Volume,
            disk,
            &new_name,
            ImageFormat::Raw,
        );
        let (first, last) = transfer.warm(&pre, &sync);
        self.wf.push(first);
        self.after_stop.push(last);
        plan.record
            .formats
            .insert(new_name.clone(), ImageFormat::Raw);
        plan.disks.push(DiskRef {
            store: DiskStore::Volume,
            name: new_name.clone(),
            format: ImageFormat::Raw,
        });
        plan.finals.push(sync);
        plan.record.volumes.push(new_name);
        plan.volumes.push(pre);
    }

    /// Disk `disk` moved into `store` at `target`, as `new_name` in
    /// format `to`.
    fn site_disk<'s>(
        &'s self,
        target: &'s str,
        store: DiskStore,
        disk: &SourceDisk<'_>,
        new_name: &str,
        to: ImageFormat,
    ) -> SiteDisk<'s> {
        SiteDisk {
            target,
            from: self.input.from,
            relocation: &self.input.id,
            sites_file: &self.sites_file_s,
            source: DiskRef {
                store,
                name: disk.name.to_owned(),
                format: disk.format,
            },
            into: DiskRef {
                store,
                name: new_name.to_owned(),
                format: to,
            },
            locator: disk.locator.to_owned(),
            allocated: disk.allocated,
            tracking: &self.tracking,
            leaves: self
                .input
                .records
                .join("leaves")
                .join(format!("{}-{new_name}.json", store.as_str())),
        }
    }

    /// A config file an instance reads: rewritten with the endpoint map
    /// into the target (`config:PATH`), once however many instances read
    /// it, which must then be placed on the same site.
    fn config(&mut self, at: &Placement<'_>, path: &str, plan: &mut InstancePlan) -> Result<()> {
        let target = at.target;
        let id = step_id("config", path);
        if let Some(other) = self.configs_done.get(path) {
            if other != target {
                return Err(invalid(format!(
                    "config file {path} is read by instances placed on {other} and {target}; place them together"
                )));
            }
        } else {
            self.configs_done.insert(path.to_owned(), target.to_owned());
            let step = StepSpec::new(&id, "config-transfer", target)
                .params(serde_json::json!({
                    "sites_file": self.sites_file_s,
                    "from": self.input.from,
                    "site": target,
                    "path": path,
                    "relocation": self.input.id,
                }))
                .output("config", ArtifactKind::ConfigFile);
            self.wf.push(step);
        }
        plan.record.config_files.push(path.to_owned());
        plan.configs.push(id);
        Ok(())
    }

    /// A bucket: copied to its target (`bucket:NAME`), agent to agent or
    /// between object stores, or left in place (`--buckets repoint`). Any
    /// other resource is left alone.
    fn bucket(&mut self, r: &Resource) -> Result<()> {
        let ResourceSpec::Bucket { bytes, .. } = &r.spec else {
            return Ok(());
        };
        let unit = r.id.as_str().to_owned();
        let (target, tcfg) = self.target_of(&unit)?;
        let id = step_id("bucket", &r.name);
        let step = if self.from_cfg.agent.is_some() || tcfg.agent.is_some() {
            self.bucket_transfer(&id, &r.name, *bytes, target)?
        } else {
            self.object_copy(&id, &r.name, *bytes, target, tcfg)?
        };
        if self.input.bucket_mode == BucketMode::Copy {
            self.bytes_to_move += bytes;
            let from_cfg = self.from_cfg;
            if let (Some(old), Some(new)) = (&from_cfg.object_endpoint, &tcfg.object_endpoint) {
                self.push_change(
                    EndpointKind::Url,
                    old,
                    new.clone(),
                    format!("{unit} moves to {target}"),
                );
            }
        }
        self.wf.push(step);
        self.bucket_steps.push(id);
        Ok(())
    }

    /// The `bucket-transfer` step of bucket `name` when either site is
    /// reached through its agent (copied: leaving it in place is refused).
    fn bucket_transfer(&self, id: &str, name: &str, bytes: u64, target: &str) -> Result<StepSpec> {
        let input = self.input;
        if input.bucket_mode != BucketMode::Copy {
            return Err(not_supported(
                format!(
                    "bucket {name}: leaving buckets in place (`--buckets repoint`) at a site reached through its agent"
                ),
                target,
            ));
        }
        Ok(StepSpec::new(id, "bucket-transfer", target)
            .params(serde_json::json!({
                "sites_file": self.sites_file_s,
                "from": input.from,
                "site": target,
                "bucket": name,
                "relocation": input.id,
                "bytes": bytes,
            }))
            .output("bucket", ArtifactKind::Bucket))
    }

    /// The `object-copy` step of bucket `name` between sites whose buckets
    /// this process reaches: a copy, or in place (`--buckets repoint`).
    fn object_copy(
        &self,
        id: &str,
        name: &str,
        bytes: u64,
        target: &str,
        tcfg: &SiteConfig,
    ) -> Result<StepSpec> {
        let input = self.input;
        let source = bucket_location(input.from, self.from_cfg, name)?;
        let mut params = serde_json::json!({
            "mode": input.bucket_mode.as_str(),
            "record_dir": input.records.display().to_string(),
        });
        if input.bucket_mode == BucketMode::Copy {
            params["target"] = serde_json::json!(bucket_location(target, tcfg, name)?);
        }
        Ok(StepSpec::new(id, "object-copy", target)
            .params(params)
            .input(
                "bucket",
                given(ArtifactKind::Bucket, input.from, source, Some(bytes)),
            )
            .output("bucket", ArtifactKind::Bucket))
    }
}

impl Planner<'_> {
    /// The steps that follow every instance and bucket, and the
    /// relocation: the endpoint map given to every config step,
    /// `provision:` per instance, `verify`, `stop-source`, the change
    /// tracking's `collect`, every disk's final delta, `cutover`, then the
    /// manifest's extra steps.
    fn finish(mut self) -> Result<Relocation> {
        self.map_to_configs();
        let provisioned = self.provision();
        let targets: Vec<String> = {
            let mut t: Vec<String> = self.input.assignments.values().cloned().collect();
            t.sort();
            t.dedup();
            t
        };
        let primary = targets.first().cloned().ok_or_else(|| {
            invalid("nothing to relocate: the service has no instances or buckets")
        })?;
        self.verify(&targets, &primary, &provisioned);
        let prepared = self.guest_steps();
        self.stop_source(&prepared);
        self.cutover(&primary);
        let workflow = std::mem::replace(&mut self.wf, WorkflowBuilder::new("")).into_def();
        let workflow = self.extra_steps(workflow, &targets, &primary)?;
        let input = self.input;
        Ok(Relocation {
            id: input.id.clone(),
            service: input.topology.service().to_owned(),
            from: input.from.to_owned(),
            assignments: input.assignments.clone(),
            sites_file: self.sites_file,
            manifest: input.manifest.clone(),
            bucket_mode: input.bucket_mode,
            endpoint_map: self.map,
            workflow,
            bytes_to_move: self.bytes_to_move,
            config_files: Vec::new(),
        })
    }

    /// The endpoint map is known only now: gives it to every config step.
    fn map_to_configs(&mut self) {
        let map_json = adapt_map_json(&self.map);
        let mut def = std::mem::replace(&mut self.wf, WorkflowBuilder::new("")).into_def();
        for s in &mut def.steps {
            if s.migrator == "config-adapt" || s.migrator == "config-transfer" {
                s.params["map"] = map_json.clone();
            }
        }
        self.wf = WorkflowBuilder::from_def(def);
    }

    /// `provision:` per instance, after its images, volumes and config
    /// files: their ids.
    fn provision(&mut self) -> Vec<String> {
        let mut ids = Vec::new();
        for p in &self.instances {
            let id = step_id("provision", &p.record.name);
            let mut spec = StepSpec::new(&id, "instance-provision", &p.target)
                .params(serde_json::json!({
                    "sites_file": self.sites_file_s,
                    "site": p.target,
                    "record": p.record,
                }))
                .output("instance", ArtifactKind::Instance);
            for v in p.images.iter().chain(&p.volumes).chain(&p.configs) {
                spec = spec.after(v);
            }
            self.wf.push(spec);
            ids.push(id);
        }
        ids
    }

    /// `verify` on `primary`, after every instance was provisioned and
    /// every bucket moved.
    fn verify(&mut self, targets: &[String], primary: &str, provisioned: &[String]) {
        let input = self.input;
        let mut verify =
            StepSpec::new("verify", "service-verify", primary).params(serde_json::json!({
                "sites_file": self.sites_file_s,
                "service": input.topology.service(),
                "from": input.from,
                "manifest": input.manifest.as_ref().map(|m| m.display().to_string()),
                "targets": targets,
                "endpoint_map": self.map,
                "boot_checks": self.boot_checks,
            }));
        for id in provisioned.iter().chain(&self.bucket_steps) {
            verify = verify.after(id);
        }
        self.wf.push(verify);
    }

    /// Per instance whose guest introspection looked into, unless its
    /// target turns it off: `guest-prepare:` after `verify` (the source
    /// still runs) and `guest-adapt:` after its final deltas, which
    /// `cutover` waits for (`guest_step.rs`). The prepare steps' ids.
    fn guest_steps(&mut self) -> Vec<String> {
        let map = adapt_map_json(&self.map);
        let planned: Vec<(String, String, serde_json::Value, Vec<String>)> = self
            .instances
            .iter()
            .filter_map(|p| {
                let params = self.guest_params(p, &map)?;
                Some((
                    p.record.name.clone(),
                    p.target.clone(),
                    params,
                    p.finals.clone(),
                ))
            })
            .collect();
        let mut prepared = Vec::new();
        for (name, target, params, finals) in planned {
            let prepare = step_id("guest-prepare", &name);
            self.wf.push(
                StepSpec::new(&prepare, "guest-prepare", &target)
                    .params(params.clone())
                    .after("verify"),
            );
            let mut adapt = StepSpec::new(step_id("guest-adapt", &name), "guest-adapt", &target)
                .params(params)
                .after(&prepare);
            for f in &finals {
                adapt = adapt.after(f);
            }
            self.after_stop.push(adapt);
            prepared.push(prepare);
        }
        prepared
    }

    /// The parameters of instance `p`'s guest steps; `None` when its guest
    /// was not looked into or its target turns adaptation off.
    fn guest_params(&self, p: &InstancePlan, map: &serde_json::Value) -> Option<serde_json::Value> {
        let facts = p.guest.as_ref()?;
        let tcfg = self.input.sites.site(&p.target).ok()?;
        let adapt = tcfg.adapt.clone().unwrap_or_default();
        if adapt.guest == Some(false) || p.disks.is_empty() {
            return None;
        }
        let source = self
            .input
            .source_instances
            .iter()
            .find(|s| s.name == p.record.name);
        let macs = source
            .map(|s| {
                s.nics
                    .iter()
                    .zip(&p.record.nics)
                    .filter_map(|(a, b)| Some((a.mac.clone()?, b.mac.clone()?)))
                    .collect()
            })
            .unwrap_or_default();
        let new_bus = match (
            source.and_then(|s| s.disk_bus.as_deref()),
            &p.record.disk_bus,
        ) {
            (Some(a), Some(b)) if a != b => Some(b.clone()),
            _ => None,
        };
        let params = guest_step::GuestParams {
            sites_file: self.sites_file.clone(),
            from: self.input.from.to_owned(),
            site: p.target.clone(),
            instance: p.record.name.clone(),
            relocation: self.input.id.clone(),
            disks: p.disks.clone(),
            plan: crate::guest::GuestPlan {
                map: map.clone(),
                addresses: p.addresses.clone(),
                subnet: tcfg.subnet.clone(),
                macs,
                files: p.guest_files.clone(),
                new_bus,
                reset_cloud_init: adapt.cloud_init_reset,
            },
            problem: facts.problem.clone(),
        };
        serde_json::to_value(&params).ok()
    }

    /// `stop-source`, after `verify` (and the guests' `guest-prepare`):
    /// stops (never deletes) the source instances.
    fn stop_source(&mut self, after: &[String]) {
        let input = self.input;
        let source_instances: Vec<String> = self
            .instances
            .iter()
            .map(|p| p.record.name.clone())
            .collect();
        let mut stop = StepSpec::new("stop-source", "source-stop", input.from)
            .params(serde_json::json!({
                "sites_file": self.sites_file_s,
                "site": input.from,
                "instances": source_instances,
                "record_dir": input.records.display().to_string(),
            }))
            .after("verify");
        for id in after {
            stop = stop.after(id);
        }
        self.wf.push(stop);
    }

    /// After `stop-source`: the change tracking's `collect`, every disk's
    /// final delta, then `cutover` on `primary`, after them all.
    fn cutover(&mut self, primary: &str) {
        let mut cutover = StepSpec::new("cutover", "cutover", primary).params(serde_json::json!({
            "sites_file": self.sites_file_s,
            "instances": self
                .instances
                .iter()
                .map(|p| (p.target.clone(), p.record.name.clone()))
                .collect::<Vec<_>>(),
            "boot_checks": self.boot_checks,
        }));
        cutover = cutover.after("stop-source");
        if let Some(collect) = self.tracking.step(tracking::Op::Collect) {
            self.wf.push(collect.after("stop-source"));
        }
        for last in std::mem::take(&mut self.after_stop) {
            let id = last.id.clone();
            self.wf.push(last.after("stop-source"));
            cutover = cutover.after(id);
        }
        self.wf.push(cutover);
    }

    /// `workflow` with the steps the service manifest adds, if any.
    fn extra_steps(
        &self,
        workflow: WorkflowDef,
        targets: &[String],
        primary: &str,
    ) -> Result<WorkflowDef> {
        let input = self.input;
        let Some(m) = &input.manifest else {
            return Ok(workflow);
        };
        let steps = crate::introspect::ServiceManifest::load(m)?.0.steps;
        if steps.is_empty() {
            return Ok(workflow);
        }
        let ctx = extra::Context {
            manifest: m,
            service: input.topology.service(),
            relocation: &input.id,
            from: input.from,
            from_root: site_root(input.from, self.from_cfg).ok(),
            instance_targets: self
                .instances
                .iter()
                .map(|p| (p.record.name.clone(), p.target.clone()))
                .collect(),
            primary,
            roots: targets
                .iter()
                .filter_map(|t| {
                    let root = site_root(t, input.sites.site(t).ok()?).ok()?;
                    Some((t.clone(), root))
                })
                .collect(),
            endpoint_map: adapt_map_json(&self.map),
        };
        extra::add_steps(workflow, &steps, &ctx)
    }
}

/// The format image `disk` takes at its target: the source's, else raw,
/// else one `image-convert` writes ([`target_format`]) among those the
/// target accepts; raw for a kernel or initrd (`host_file`).
fn image_format(disk: &SourceDisk<'_>, host_file: bool, at: &Placement<'_>) -> Result<ImageFormat> {
    let target = at.target;
    let accepted: Vec<ImageFormat> = if host_file {
        // Kernels and initrds are files the hypervisor
        // reads, never disk images: copied byte for byte.
        vec![ImageFormat::Raw]
    } else {
        at.tcfg.image_formats.clone()
    };
    target_format(disk.format, &accepted).ok_or_else(|| {
        let why = if accepted.is_empty() {
            format!("{target} accepts no disk image format (`image_formats` is empty)")
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
        not_supported(
            format!("image {} ({}): {why}", disk.name, disk.format),
            target,
        )
    })
}

/// `name` without its extension.
fn file_stem(name: &str) -> String {
    Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_owned())
}

/// One disk moved from the source site into the target's image or block
/// store (`disk-transfer`).
struct SiteDisk<'a> {
    target: &'a str,
    from: &'a str,
    relocation: &'a str,
    sites_file: &'a str,
    source: DiskRef,
    into: DiskRef,
    /// The disk's locator at the source, which its change set is named by.
    locator: String,
    allocated: u64,
    tracking: &'a Tracking,
    /// Where the leaves of its last verified run are kept.
    leaves: PathBuf,
}

impl SiteDisk<'_> {
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
                "leaves": self.leaves.display().to_string(),
            }))
            .output("disk", kind)
    }

    /// A pre-copy while the source runs, and the final delta once it
    /// stopped: the same transfer again, which writes only what differs,
    /// and looks only at what the guest wrote when the source tracked it.
    fn warm(&self, id: &str, last: &str) -> (StepSpec, StepSpec) {
        (
            self.tracking.precopy(self.step(id)),
            self.tracking
                .final_delta(self.step(last).after(id), &self.locator),
        )
    }
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
        Arc::new(guest_step::GuestPrepare),
        Arc::new(guest_step::GuestAdapt),
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
