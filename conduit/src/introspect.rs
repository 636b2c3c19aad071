//! Introspection: discovering a service's topology on a live site.
//!
//! 1. The site's inventory lists instances; those of the service are kept.
//! 2. Each instance's boot image, volumes and config files are looked up in
//!    the site's image store, block store and inventory (`boots-from`,
//!    `attaches`, `reads`).
//! 3. Every config file is scanned for endpoint references ([`crate::scan`]).
//!    Each reference is resolved: to an instance (by host name or address),
//!    to a bucket (an `s3://` URL, a URL on the site's `object_endpoint`, or
//!    a bucket name under a `bucket` key), or to an external endpoint (a
//!    public host the service only points at). References that *look
//!    internal* — a private or loopback address, or a host under the site's
//!    `internal_domains` or a conventional private suffix (`.internal`,
//!    `.local`, `.lan`) — but resolve to nothing are errors: after a
//!    relocation they would dangle. Hosts listed in the service manifest's
//!    `external` list are accepted as external.
//! 4. A declared service manifest (on the site in `services/NAME.toml`, or
//!    given explicitly) adds what introspection cannot see; the declared
//!    topology is merged into the discovered one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fluidcloud_plugins::{
    ConfigFormat, Diagnostic, EndpointKind, Error as SdkError, ImageFormat, Origin, Relation,
    Resource, ResourceId, ResourceKind, ResourceSpec, Severity, Topology,
};
use serde::Deserialize;

use crate::config::SiteConfig;
use crate::driver::{InstanceRecord, SiteDriver, require_inventory};
use crate::error::{Error, Result};
use crate::scan::{self, Reference, Strength};
use crate::tomlfile;

mod guests;
pub use guests::GuestManifest;

/// A declared service manifest.
///
/// ```toml
/// name = "shop"
/// external = ["shop.example.com"]     # public hosts that stay reachable
/// buckets = ["shop-logs"]             # buckets of the service no config names
///
/// [[instances]]                       # instances the inventory cannot see
/// name = "batch"
/// state = "stopped"
/// vcpus = 1
/// memory_mib = 512
///
/// [[depends]]
/// from = "instance:web"
/// to = "bucket:shop-logs"
/// relation = "reads"
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceManifest {
    /// The service's name.
    pub name: String,
    /// Public hosts (or URLs) that stay reachable from any site.
    #[serde(default)]
    pub external: Vec<String>,
    /// Buckets belonging to the service.
    #[serde(default)]
    pub buckets: Vec<String>,
    /// Instances declared by hand.
    #[serde(default)]
    pub instances: Vec<InstanceRecord>,
    /// Dependencies declared by hand.
    #[serde(default)]
    pub depends: Vec<DeclaredEdge>,
    /// Steps added to every relocation of the service (see
    /// [`crate::relocate::extra`]).
    #[serde(default)]
    pub steps: Vec<crate::relocate::extra::ManifestStep>,
    /// Where the service's config is inside its guests.
    #[serde(default)]
    pub guest: GuestManifest,
}

/// A dependency declared in a manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredEdge {
    /// Dependent resource id.
    pub from: String,
    /// Resource depended on.
    pub to: String,
    /// How.
    pub relation: Relation,
}

impl ServiceManifest {
    /// Parses a manifest read from `path`.
    ///
    /// # Errors
    /// `Config` naming the file, line and key.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        tomlfile::parse(path, text).map_err(|d| Error::Config {
            diagnostics: vec![d],
        })
    }

    /// Reads a manifest file.
    ///
    /// # Errors
    /// `Config` when it cannot be read or parsed.
    pub fn load(path: &Path) -> Result<(Self, String)> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            diagnostics: vec![
                Diagnostic::error(format!("cannot read service manifest: {e}")).in_file(path),
            ],
        })?;
        Ok((Self::parse(path, &text)?, text))
    }
}

/// The result of introspection.
#[derive(Debug, Clone)]
pub struct Introspection {
    /// The merged topology.
    pub topology: Topology,
    /// Notes and warnings found on the way.
    pub notes: Vec<Diagnostic>,
}

/// What [`introspect_with`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Look inside the instances' boot disks (`crate::guest`): their config
    /// files become topology nodes, and the instances carry what was found.
    pub guests: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { guests: true }
    }
}

/// Discovers the topology of `service` (or of every instance, when `None`)
/// on a site, looking inside guests. `manifest` overrides the manifest
/// stored on the site.
///
/// # Errors
/// As [`introspect_with`].
pub async fn introspect(
    driver: &dyn SiteDriver,
    site: &SiteConfig,
    service: Option<&str>,
    manifest: Option<(PathBuf, String)>,
) -> Result<Introspection> {
    introspect_with(driver, site, service, manifest, Options::default()).await
}

/// Discovers the topology of `service` (or of every instance, when `None`)
/// on a site. `manifest` overrides the manifest stored on the site.
///
/// # Errors
/// `Site` errors from the driver (missing directory, unreadable image,
/// malformed instance manifest as `Config`); `UnresolvedReference` for an
/// internal-looking reference that resolves to nothing; `Config` for a
/// malformed config file or manifest.
pub async fn introspect_with(
    driver: &dyn SiteDriver,
    site: &SiteConfig,
    service: Option<&str>,
    manifest: Option<(PathBuf, String)>,
    options: Options,
) -> Result<Introspection> {
    let name = driver.name().to_owned();
    let sdk = |e: SdkError| match e {
        SdkError::Invalid(diagnostics) => Error::Config { diagnostics },
        other => Error::site(&name, other),
    };
    driver.check().await.map_err(sdk)?;
    let inventory = require_inventory(driver).map_err(sdk)?;
    let all = inventory.instances().await.map_err(sdk)?;

    let manifest = match (manifest, service) {
        (Some(m), _) => Some(m),
        (None, Some(s)) => inventory.service_manifest(s).await.map_err(sdk)?,
        (None, None) => None,
    };
    let manifest = match manifest {
        Some((path, text)) => Some((ServiceManifest::parse(&path, &text)?, path, text)),
        None => None,
    };
    if let (Some((m, path, text)), Some(s)) = (&manifest, service)
        && m.name != s
    {
        return Err(Error::Config {
            diagnostics: vec![
                Diagnostic::error(format!("manifest is for service `{}`, not `{s}`", m.name))
                    .in_file(path)
                    .at_key("name")
                    .at_line(tomlfile::key_line(text, "name").unwrap_or(1)),
            ],
        });
    }

    let services: BTreeSet<&str> = all.iter().filter_map(|i| i.service.as_deref()).collect();
    let service_name = match service {
        Some(s) => s.to_owned(),
        None if services.len() == 1 => services
            .iter()
            .next()
            .map(|s| (*s).to_owned())
            .unwrap_or_default(),
        None => "*".to_owned(),
    };
    let mine: Vec<&InstanceRecord> = all
        .iter()
        .filter(|i| service.is_none() || i.service.as_deref() == service)
        .collect();
    if mine.is_empty() && manifest.is_none() {
        let known = if services.is_empty() {
            "none".to_owned()
        } else {
            services.iter().copied().collect::<Vec<_>>().join(", ")
        };
        return Err(Error::site(
            &name,
            SdkError::NotFound {
                what: format!("service `{service_name}` (services on this site: {known})"),
                site: None,
            },
        ));
    }

    let mut b = Builder {
        driver,
        site,
        topology: Topology::new(&service_name, &name),
        notes: Vec::new(),
        bucket_names: match driver.object_storage() {
            Some(os) => os.list_buckets().await.map_err(sdk)?.into_iter().collect(),
            None => BTreeSet::new(),
        },
        all_instances: &all,
        external: manifest
            .as_ref()
            .map(|(m, ..)| m.external.iter().map(|e| e.to_ascii_lowercase()).collect())
            .unwrap_or_default(),
        guests: BTreeMap::new(),
        guest_files: manifest
            .as_ref()
            .map(|(m, ..)| m.guest.files.clone())
            .unwrap_or_default(),
    };
    if options.guests {
        let declared = manifest
            .as_ref()
            .map(|(m, ..)| m.guest.clone())
            .unwrap_or_default();
        let (views, notes) = guests::look_inside(driver, &mine, &declared).await;
        b.guests = views;
        b.notes.extend(notes);
    }
    for rec in &mine {
        b.add_instance(rec, Origin::Discovered).await.map_err(sdk)?;
    }
    b.resolve_config_references().await?;

    let mut topology = b.topology;
    let mut notes = b.notes;
    if let Some((m, path, text)) = &manifest {
        let mut declared_b = Builder {
            driver,
            site,
            topology: Topology::new(&service_name, &name),
            notes: Vec::new(),
            bucket_names: BTreeSet::new(),
            all_instances: &all,
            external: BTreeSet::new(),
            guests: BTreeMap::new(),
            guest_files: Vec::new(),
        };
        for rec in &m.instances {
            declared_b
                .add_instance(rec, Origin::Declared)
                .await
                .map_err(sdk)?;
        }
        let mut declared = declared_b.topology;
        let site_buckets = match driver.object_storage() {
            Some(os) => os.list_buckets().await.map_err(sdk)?,
            None => Vec::new(),
        };
        for (i, bucket) in m.buckets.iter().enumerate() {
            if topology.contains(&ResourceId::new(ResourceKind::Bucket, bucket)) {
                // Already discovered: mark it as declared as well.
                let r = Resource::new(
                    bucket,
                    bucket_spec(driver, bucket).await.map_err(sdk)?,
                    Origin::Declared,
                );
                declared.add(r);
            } else if site_buckets.contains(bucket) {
                let r = Resource::new(
                    bucket,
                    bucket_spec(driver, bucket).await.map_err(sdk)?,
                    Origin::Both,
                );
                declared.add(r);
            } else {
                notes.push(
                    Diagnostic::new(
                        Severity::Warning,
                        format!("declared bucket `{bucket}` does not exist on site {name}"),
                    )
                    .in_file(path)
                    .at_key(format!("buckets[{i}]")),
                );
                declared.add(Resource::new(
                    bucket,
                    ResourceSpec::Bucket {
                        objects: 0,
                        bytes: 0,
                    },
                    Origin::Declared,
                ));
            }
        }
        notes.extend(topology.merge(&declared));
        let mut bad = Vec::new();
        for (i, e) in m.depends.iter().enumerate() {
            let key = format!("depends[{i}]");
            let ends = [("from", &e.from), ("to", &e.to)].map(|(field, id)| {
                id.parse::<ResourceId>()
                    .map_err(|msg| (field, msg))
                    .and_then(|id| {
                        if topology.contains(&id) {
                            Ok(id)
                        } else {
                            Err((field, format!("`{id}` is not a resource of service {service_name} on site {name}")))
                        }
                    })
            });
            match ends {
                [Ok(from), Ok(to)] => {
                    let _ = topology.link(&from, &to, e.relation, None);
                }
                [a, b] => {
                    for (field, msg) in [a.err(), b.err()].into_iter().flatten() {
                        bad.push(
                            Diagnostic::error(msg)
                                .in_file(path)
                                .at_key(format!("{key}.{field}"))
                                .at_line(line_of_nth_table(text, "depends", i).unwrap_or(1)),
                        );
                    }
                }
            }
        }
        if !bad.is_empty() {
            return Err(Error::Config { diagnostics: bad });
        }
    }
    Ok(Introspection { topology, notes })
}

/// Line of the `n`-th `[[table]]` header in a TOML text.
fn line_of_nth_table(text: &str, table: &str, n: usize) -> Option<u32> {
    let header = format!("[[{table}]]");
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == header)
        .nth(n)
        .map(|(i, _)| u32::try_from(i + 1).unwrap_or(u32::MAX))
}

async fn bucket_spec(
    driver: &dyn SiteDriver,
    bucket: &str,
) -> fluidcloud_plugins::Result<ResourceSpec> {
    let os = crate::driver::require_object_storage(driver)?;
    let s = os.summary(bucket).await?;
    Ok(ResourceSpec::Bucket {
        objects: s.objects,
        bytes: s.bytes,
    })
}

struct Builder<'a> {
    driver: &'a dyn SiteDriver,
    site: &'a SiteConfig,
    topology: Topology,
    notes: Vec<Diagnostic>,
    bucket_names: BTreeSet<String>,
    all_instances: &'a [InstanceRecord],
    external: BTreeSet<String>,
    /// What was found inside guests, by instance.
    guests: BTreeMap<String, crate::guest::GuestView>,
    /// The manifest's `[guest] files`.
    guest_files: Vec<String>,
}

/// What a reference designates.
enum Target {
    Instance(String),
    Bucket(String),
    /// Buckets referenced in the same file (an object-storage endpoint URL).
    ObjectEndpoint,
    External,
    Unresolved,
    Ignore,
}

const PRIVATE_SUFFIXES: &[&str] = &[
    ".internal",
    ".local",
    ".lan",
    ".localdomain",
    ".home.arpa",
    ".intranet",
];

impl Builder<'_> {
    async fn add_instance(
        &mut self,
        rec: &InstanceRecord,
        origin: Origin,
    ) -> fluidcloud_plugins::Result<()> {
        let inst = Resource::new(
            &rec.name,
            ResourceSpec::Instance {
                vcpus: rec.vcpus,
                memory_mib: rec.memory_mib,
                state: rec.state.as_str().to_owned(),
                hostname: rec.hostname.clone(),
                addresses: rec.addresses.clone(),
                guest: self.guests.get(&rec.name).map(|v| v.facts.clone()),
            },
            origin,
        );
        let inst_id = inst.id.clone();
        self.topology.add(inst);
        // The boot disk, and the kernel and initrd of a direct kernel boot:
        // all images the instance boots from, carried with it.
        for image in rec.boot_image.iter().chain(&rec.kernel).chain(&rec.initrd) {
            let store = crate::driver::require_image_store(self.driver)?;
            let info = store.image_info(image).await?;
            // Kernels and initrds are files the hypervisor reads, copied
            // byte for byte; disks have the format their site declares.
            let format = if rec.boot_image.as_ref() == Some(image) {
                self.declared_format(rec, image, info.format)?
            } else {
                ImageFormat::Raw
            };
            let r = Resource::new(
                image,
                ResourceSpec::Image {
                    format,
                    virtual_size: info.virtual_size,
                    allocated: info.allocated,
                    locator: info.locator,
                    backing: info.backing,
                },
                origin,
            );
            let id = r.id.clone();
            self.topology.add(r);
            self.topology
                .link(&inst_id, &id, Relation::BootsFrom, None)?;
        }
        for vol in &rec.volumes {
            let store = crate::driver::require_block_store(self.driver)?;
            let info = store.volume_info(vol).await?;
            let format = self.declared_format(rec, vol, info.format)?;
            let r = Resource::new(
                vol,
                ResourceSpec::Volume {
                    format,
                    virtual_size: info.virtual_size,
                    allocated: info.allocated,
                    locator: info.locator,
                },
                origin,
            );
            let id = r.id.clone();
            self.topology.add(r);
            self.topology
                .link(&inst_id, &id, Relation::Attaches, None)?;
        }
        for path in &rec.config_files {
            let inv = require_inventory(self.driver)?;
            let file = inv.config_file(path).await?;
            let r = Resource::new(
                path,
                ResourceSpec::ConfigFile {
                    format: ConfigFormat::from_file_name(path),
                    path: path.clone(),
                    bytes: file.content.len() as u64,
                    guest: None,
                },
                origin,
            );
            let id = r.id.clone();
            self.topology.add(r);
            self.topology.link(&inst_id, &id, Relation::Reads, None)?;
        }
        for (path, bytes) in self.guest_configs(&rec.name) {
            let r = Resource::new(
                format!("{}:{path}", rec.name),
                ResourceSpec::ConfigFile {
                    format: ConfigFormat::from_file_name(&path),
                    path,
                    bytes,
                    guest: Some(rec.name.clone()),
                },
                origin,
            );
            let id = r.id.clone();
            self.topology.add(r);
            self.topology.link(&inst_id, &id, Relation::Reads, None)?;
        }
        Ok(())
    }

    /// The service's config files inside guest `instance`: those the
    /// manifest names, and those of its scanned directories with a
    /// reference to an instance or a bucket of the site (network settings
    /// excepted, but `/etc/hosts` included: they are adapted as the
    /// guest's own). (path, size).
    fn guest_configs(&self, instance: &str) -> Vec<(String, u64)> {
        let Some(view) = self.guests.get(instance) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (path, content) in &view.files {
            let declared = self.guest_files.iter().any(|f| f == path);
            let system = crate::guest::adapt::is_network_file(path) && path != "/etc/hosts";
            if !declared && system {
                continue;
            }
            let refers = scan::scan(path, ConfigFormat::from_file_name(path), content)
                .map(|refs| {
                    refs.iter()
                        .any(|r| matches!(self.resolve(r), Target::Instance(_) | Target::Bucket(_)))
                })
                .unwrap_or(false);
            if declared || refers {
                out.push((path.clone(), content.len() as u64));
            }
        }
        out
    }

    /// The content of config file `cfg` (`path`, inside guest `guest`
    /// when set).
    async fn config_content(
        &self,
        path: &str,
        guest: Option<&str>,
    ) -> fluidcloud_plugins::Result<Vec<u8>> {
        match guest {
            Some(g) => self
                .guests
                .get(g)
                .and_then(|v| v.files.get(path))
                .cloned()
                .ok_or_else(|| SdkError::NotFound {
                    what: format!("{path} inside instance {g}"),
                    site: Some(self.driver.name().to_owned()),
                }),
            None => Ok(require_inventory(self.driver)?
                .config_file(path)
                .await?
                .content),
        }
    }

    /// The format disk `disk` of `rec` is relocated as: what its site
    /// declares, checked against what its content looks like. A declared
    /// raw disk stays raw whatever its bytes hold (a guest can write a
    /// qcow2 header naming a host file into its raw disk: CVE-2008-2004's
    /// class); a declared format its content contradicts is an error, never
    /// a reinterpretation. Without a declaration only raw-looking content
    /// is taken as raw.
    fn declared_format(
        &self,
        rec: &InstanceRecord,
        disk: &str,
        content: ImageFormat,
    ) -> fluidcloud_plugins::Result<ImageFormat> {
        let where_ = || {
            format!(
                "disk {disk} of instance {} on site {}",
                rec.name,
                self.driver.name()
            )
        };
        match rec.formats.get(disk).copied() {
            Some(ImageFormat::Raw) => Ok(ImageFormat::Raw),
            Some(declared) if declared == content => Ok(declared),
            Some(declared) => Err(SdkError::Precondition(format!(
                "{} is declared {declared} but its content is {content}: fix the declaration (fluidcloud never reinterprets a disk)",
                where_()
            ))),
            None if content == ImageFormat::Raw => Ok(ImageFormat::Raw),
            None => Err(SdkError::Precondition(format!(
                "{} has no declared format and its content looks like {content}; declare it (a local site: `[format]` in instances/{}.toml; libvirt: the disk's `<driver type>`): a disk's own bytes never choose how it is read",
                where_(),
                rec.name
            ))),
        }
    }

    fn looks_internal(&self, host: &str) -> bool {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return match ip {
                IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local(),
                IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
            };
        }
        let h = host.to_ascii_lowercase();
        let h = h.trim_end_matches('.');
        !h.contains('.')
            || PRIVATE_SUFFIXES.iter().any(|s| h.ends_with(s))
            || self.site.internal_domains.iter().any(|d| {
                let d = d.trim_start_matches('.').to_ascii_lowercase();
                h == d || h.ends_with(&format!(".{d}"))
            })
    }

    fn instance_by_host(&self, host: &str) -> Option<&InstanceRecord> {
        let h = host.to_ascii_lowercase();
        self.all_instances.iter().find(|i| {
            i.hostname
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(&h))
                || i.addresses.iter().any(|a| a == &h)
        })
    }

    fn object_endpoint_host(&self) -> Option<String> {
        let ep = self.site.object_endpoint.as_deref()?;
        url::Url::parse(ep)
            .ok()?
            .host_str()
            .map(str::to_ascii_lowercase)
    }

    fn resolve(&self, r: &Reference) -> Target {
        if r.endpoint == EndpointKind::Bucket {
            return if self.bucket_names.contains(&r.value) {
                Target::Bucket(r.value.clone())
            } else {
                Target::Unresolved
            };
        }
        let Some(host) = r.host.as_deref() else {
            return Target::Ignore;
        };
        let host_l = host.to_ascii_lowercase();
        // Wildcard and loopback addresses mean "this machine" wherever it runs.
        let self_address = match host_l.parse::<IpAddr>() {
            Ok(ip) => ip.is_unspecified() || ip.is_loopback(),
            Err(_) => host_l == "localhost" || host_l.ends_with(".localhost"),
        };
        if self_address {
            return Target::Ignore;
        }
        if r.endpoint == EndpointKind::Url
            && let Ok(u) = url::Url::parse(&r.value)
        {
            if u.scheme() == "s3" {
                return if self.bucket_names.contains(host) {
                    Target::Bucket(host.to_owned())
                } else {
                    Target::Unresolved
                };
            }
            if let Some(ep) = self.object_endpoint_host() {
                if host_l == ep {
                    let first = u.path_segments().and_then(|mut s| s.next()).unwrap_or("");
                    return if first.is_empty() {
                        Target::ObjectEndpoint
                    } else if self.bucket_names.contains(first) {
                        Target::Bucket(first.to_owned())
                    } else {
                        Target::Unresolved
                    };
                }
                if let Some(b) = host_l.strip_suffix(&format!(".{ep}")) {
                    return if self.bucket_names.contains(b) {
                        Target::Bucket(b.to_owned())
                    } else {
                        Target::Unresolved
                    };
                }
            }
        }
        if let Some(inst) = self.instance_by_host(&host_l) {
            return Target::Instance(inst.name.clone());
        }
        if self.external.contains(&host_l) || self.external.contains(&r.value.to_ascii_lowercase())
        {
            return Target::External;
        }
        if self.looks_internal(&host_l) {
            return Target::Unresolved;
        }
        match r.strength {
            Strength::Strong => Target::External,
            Strength::Weak => Target::Ignore,
        }
    }

    async fn resolve_config_references(&mut self) -> Result<()> {
        let site_name = self.driver.name().to_owned();
        let sdk = |e: SdkError| Error::site(&site_name, e);
        let configs: Vec<Resource> = self
            .topology
            .resources()
            .into_iter()
            .filter(|r| r.kind() == ResourceKind::ConfigFile)
            .cloned()
            .collect();
        // First pass: scan and resolve everything, so object-endpoint URLs
        // can be tied to the buckets of the same file.
        let mut resolved: Vec<(ResourceId, Reference, Target)> = Vec::new();
        for cfg in &configs {
            let ResourceSpec::ConfigFile {
                format,
                path,
                guest,
                ..
            } = &cfg.spec
            else {
                continue;
            };
            let content = self
                .config_content(path, guest.as_deref())
                .await
                .map_err(sdk)?;
            let shown = match guest {
                Some(g) => format!("{g}:{path}"),
                None => format!("config/{path}"),
            };
            let refs = scan::scan(&shown, *format, &content).map_err(|d| Error::Config {
                diagnostics: vec![d],
            })?;
            for r in refs {
                let t = self.resolve(&r);
                if matches!(t, Target::Unresolved) && guest.is_some() {
                    // Inside a guest, system files name addresses of the
                    // old network that no service resource answers on.
                    self.notes.push(
                        Diagnostic::new(
                            Severity::Note,
                            format!("`{}` resolves to nothing of the service", r.value),
                        )
                        .in_file(&shown)
                        .at_key(r.key.clone()),
                    );
                    continue;
                }
                if let Target::Unresolved = t {
                    return Err(Error::UnresolvedReference {
                        site: site_name.clone(),
                        file: format!("config/{path}"),
                        key: match r.line {
                            Some(l) if !r.key.starts_with("line ") => {
                                format!("{} (line {l})", r.key)
                            }
                            _ => r.key.clone(),
                        },
                        value: r.value.clone(),
                    });
                }
                resolved.push((cfg.id.clone(), r, t));
            }
        }
        let mut buckets_by_file: BTreeMap<ResourceId, BTreeSet<String>> = BTreeMap::new();
        for (cfg, _, t) in &resolved {
            if let Target::Bucket(b) = t {
                buckets_by_file
                    .entry(cfg.clone())
                    .or_default()
                    .insert(b.clone());
            }
        }
        let all_buckets: BTreeSet<String> = buckets_by_file.values().flatten().cloned().collect();
        for b in &all_buckets {
            let spec = bucket_spec(self.driver, b).await.map_err(sdk)?;
            self.topology
                .add(Resource::new(b, spec, Origin::Discovered));
        }
        for (cfg, r, t) in resolved {
            let targets: Vec<ResourceId> = match &t {
                Target::Instance(n) => {
                    let id = ResourceId::new(ResourceKind::Instance, n);
                    if self.topology.contains(&id) {
                        vec![id]
                    } else {
                        self.notes.push(
                            Diagnostic::new(
                                Severity::Warning,
                                format!(
                                    "`{}` is instance {n}, which belongs to another service and is not relocated with this one",
                                    r.value
                                ),
                            )
                            .in_file(format!("config/{}", cfg.name()))
                            .at_key(r.key.clone()),
                        );
                        vec![]
                    }
                }
                Target::Bucket(b) => vec![ResourceId::new(ResourceKind::Bucket, b)],
                Target::ObjectEndpoint => {
                    let same_file = buckets_by_file.get(&cfg).cloned().unwrap_or_default();
                    let set = if same_file.is_empty() {
                        all_buckets.clone()
                    } else {
                        same_file
                    };
                    set.iter()
                        .map(|b| ResourceId::new(ResourceKind::Bucket, b))
                        .collect()
                }
                Target::External => vec![],
                Target::Ignore | Target::Unresolved => continue,
            };
            let external = matches!(t, Target::External);
            let ep = Resource::endpoint(r.endpoint, &r.value, external);
            let ep_id = ep.id.clone();
            self.topology.add(ep);
            self.topology
                .link(
                    &cfg,
                    &ep_id,
                    Relation::ReferencesEndpoint,
                    Some(r.key.clone()),
                )
                .map_err(sdk)?;
            for target in targets {
                self.topology
                    .link(&ep_id, &target, Relation::ResolvesTo, None)
                    .map_err(sdk)?;
                if target.kind() == Some(ResourceKind::Bucket) {
                    for reader in self.readers_of(&cfg) {
                        self.topology
                            .link(&reader, &target, Relation::Reads, None)
                            .map_err(sdk)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Instances that read config file `cfg`.
    fn readers_of(&self, cfg: &ResourceId) -> Vec<ResourceId> {
        self.topology
            .edges()
            .into_iter()
            .filter(|e| &e.to == cfg && e.relation == Relation::Reads)
            .map(|e| e.from)
            .collect()
    }
}
