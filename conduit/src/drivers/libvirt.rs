//! The `libvirt` driver: a site is a libvirt daemon and one storage pool.
//!
//! ```toml
//! [sites.kvm-rennes]
//! kind = "libvirt"
//! uri = "qemu+ssh://ops@rennes-1/system"   # or qemu:///system
//! pool = "fluidcloud"                      # disks, kernels and images live here
//! domain_prefix = "fc-"                    # optional: domains of this site
//! ```
//!
//! - **inventory**: the domains (whose names start with `domain_prefix`),
//!   read from their XML: vCPUs, memory, disks in order (the first is the
//!   boot image, the others volumes; each a volume of the pool), direct
//!   kernel boot (kernel, initrd, command line), NICs (network, bridge or
//!   user; MAC, model) and fluidcloud's own metadata element (service,
//!   host name, addresses). A libvirt site holds no config files.
//! - **image-store** and **block-store**: the pool's volumes, one
//!   namespace (libvirt has no distinction); facts from `vol-dumpxml`,
//!   with the format read from the content when the daemon is local.
//! - **compute**: a domain is defined from the instance record (disks by
//!   pool volume, format from the volume, a file serial console), started,
//!   shut down (forced off after `shutdown_timeout_s`), undefined.
//!
//! It talks to libvirt through `virsh` (libvirt-clients), not through the
//! C library: see docs/libvirt.md for why. Byte-level access to volumes
//! (streams, `read_at`, allocation maps) uses the volume's path, so it
//! needs the daemon on this machine; on a remote URI those operations are
//! `NotSupported` (listing, info, define, start, stop work remotely).

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use fluidcloud_plugins::{Diagnostic, Error, ImageFormat, Result};
use tokio::io::AsyncRead;

mod tracking;

use super::DriverDescriptor;
use crate::config::SiteConfig;
use crate::driver::{
    BlockStore, ChangeTracking, Compute, ConfigFileRecord, Extent, ImageRecord, ImageStore,
    InstanceRecord, InstanceState, Inventory, NicKind, NicRecord, ObjectStorage, SiteDriver,
};

/// Registration of the `libvirt` kind.
pub const DESCRIPTOR: DriverDescriptor = DriverDescriptor {
    kind: "libvirt",
    disk_bus: true,
    help: "a libvirt daemon (through virsh): domains as instances, one storage pool as image and block store",
    options: &[
        (
            "uri",
            "the libvirt connection URI: qemu:///system, qemu+ssh://user@host/system",
        ),
        ("pool", "the storage pool holding the site's disks"),
        (
            "domain_prefix",
            "only domains whose names start with it belong to the site (several sites on one daemon)",
        ),
        (
            "shutdown_timeout_s",
            "seconds a graceful shutdown may take before the domain is forced off (default 30)",
        ),
        ("accel", "auto (default), kvm or tcg"),
        (
            "change_tracking",
            "true (default): a relocation's final delta reads only what the guest wrote, from an overlay; false: it re-hashes every disk",
        ),
    ],
    open,
};

/// XML namespace of fluidcloud's metadata element in domain XML.
pub const METADATA_NS: &str = "https://fluidcloud.dev/xmlns/instance/1";

fn open(name: &str, config: &SiteConfig) -> crate::Result<Box<dyn SiteDriver>> {
    let need = |k: &str| crate::Error::Config {
        diagnostics: vec![
            Diagnostic::error(format!("a libvirt site needs `{k}`"))
                .at_key(format!("sites.{name}.{k}")),
        ],
    };
    let uri = config.uri.clone().ok_or_else(|| need("uri"))?;
    let pool = config.pool.clone().ok_or_else(|| need("pool"))?;
    let mut site = LibvirtSite::new(name, uri, pool);
    site.prefix = config.domain_prefix.clone().unwrap_or_default();
    if let Some(t) = config.shutdown_timeout_s {
        site.shutdown_timeout = Duration::from_secs(t);
    }
    site.accel = Accel::from_config(config.accel.as_deref());
    site.change_tracking = config.change_tracking.unwrap_or(true);
    Ok(Box::new(site))
}

/// How guests run: `accel` (`auto`, `kvm`, `tcg`), as for the guest
/// appliance.
pub use crate::guest::Accel;

/// A site that is a libvirt daemon and a storage pool.
#[derive(Debug, Clone)]
pub struct LibvirtSite {
    name: String,
    uri: String,
    pool: String,
    prefix: String,
    shutdown_timeout: Duration,
    accel: Accel,
    /// Whether disks are change-tracked during a relocation
    /// (`change_tracking`, on by default).
    change_tracking: bool,
}

/// Facts of one pool volume.
#[derive(Debug, Clone)]
struct VolFacts {
    path: PathBuf,
    format: Option<String>,
    capacity: u64,
    allocation: u64,
    backing: Option<String>,
}

impl LibvirtSite {
    /// The site `name` on daemon `uri`, storage pool `pool` (nothing is
    /// checked until used).
    pub fn new(name: impl Into<String>, uri: impl Into<String>, pool: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            uri: uri.into(),
            pool: pool.into(),
            prefix: String::new(),
            shutdown_timeout: Duration::from_secs(30),
            accel: Accel::Auto,
            change_tracking: true,
        }
    }

    /// Only domains named `prefix` + instance name belong to the site.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Seconds a graceful shutdown may take before the domain is forced off.
    #[must_use]
    pub fn with_shutdown_timeout(mut self, t: Duration) -> Self {
        self.shutdown_timeout = t;
        self
    }

    /// How guests run.
    #[must_use]
    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// The domain name of instance `name`.
    pub fn domain_name(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Whether the daemon runs on this machine (no host in the URI), so
    /// volume paths are files here.
    pub fn is_local(&self) -> bool {
        url::Url::parse(&self.uri)
            .map(|u| u.host_str().is_none_or(str::is_empty) && !u.scheme().contains('+'))
            .unwrap_or(false)
    }

    fn err_local_only(&self, what: &str) -> Error {
        Error::NotSupported {
            operation: format!(
                "{what} on a remote libvirt daemon ({}): volume bytes are reached by path",
                self.uri
            ),
            site: Some(self.name.clone()),
        }
    }

    /// Runs `virsh -c URI ARGS`; stdout on success, a typed error naming
    /// what failed otherwise.
    async fn virsh(&self, args: &[&str], what: &str) -> Result<String> {
        let mut cmd = std::process::Command::new("virsh");
        cmd.arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(std::process::Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .map_err(|e| Error::Transient(format!("worker thread failed: {e}")))?
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::Precondition(format!(
                    "site {}: `virsh` is not installed (Debian: libvirt-clients; scripts/libvirt install)",
                    self.name
                )),
                _ => Error::io(format!("running virsh for site {}", self.name), e),
            })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let msg = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(|l| l.trim().trim_start_matches("error: ").to_owned())
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let lower = msg.to_ascii_lowercase();
        Err(
            if lower.contains("not found")
                || lower.contains("failed to get domain")
                || lower.contains("failed to get pool")
                || lower.contains("failed to get vol")
                || lower.contains("no storage vol with matching")
                || lower.contains("no domain with matching")
            {
                Error::NotFound {
                    what: what.to_owned(),
                    site: Some(self.name.clone()),
                }
            } else if lower.contains("failed to connect") || lower.contains("cannot recv data") {
                Error::Transient(format!(
                    "site {}: cannot reach libvirt at {}: {msg}",
                    self.name, self.uri
                ))
            } else if lower.contains("permission denied") || lower.contains("access denied") {
                Error::PermissionDenied {
                    what: format!("{what}: {msg}"),
                    site: Some(self.name.clone()),
                }
            } else {
                Error::Precondition(format!("site {} ({}): {what}: {msg}", self.name, self.uri))
            },
        )
    }

    fn checked_name<'a>(&self, name: &'a str, what: &str) -> Result<&'a str> {
        let ok = !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0', '\n', '\'', '"', '<', '>', '&']);
        if ok {
            Ok(name)
        } else {
            Err(Error::Invalid(vec![Diagnostic::error(format!(
                "`{name}` is not a valid {what} name on site {} (no `/`, quotes or markup, no leading `.`)",
                self.name
            ))]))
        }
    }

    /// The directory of the pool (its `<target><path>`).
    ///
    /// # Errors
    /// When the pool does not exist or has no target path.
    pub async fn pool_path(&self) -> Result<PathBuf> {
        let xml = self
            .virsh(
                &["pool-dumpxml", &self.pool],
                &format!("storage pool {}", self.pool),
            )
            .await?;
        let doc = parse_xml(&xml, "pool XML")?;
        doc.descendants()
            .find(|n| n.has_tag_name("target"))
            .and_then(|t| t.children().find(|n| n.has_tag_name("path")))
            .and_then(|p| p.text())
            .map(|p| PathBuf::from(p.trim()))
            .ok_or_else(|| Error::NotSupported {
                operation: format!(
                    "storage pool {} without a target path (use a `dir` pool)",
                    self.pool
                ),
                site: Some(self.name.clone()),
            })
    }

    async fn refresh(&self) -> Result<()> {
        self.virsh(
            &["pool-refresh", &self.pool],
            &format!("storage pool {}", self.pool),
        )
        .await
        .map(drop)
    }

    async fn vol_facts(&self, name: &str) -> Result<VolFacts> {
        let name = self.checked_name(name, "volume")?;
        let xml = self
            .virsh(
                &["vol-dumpxml", "--pool", &self.pool, name],
                &format!("volume {name} in pool {}", self.pool),
            )
            .await?;
        let doc = parse_xml(&xml, "volume XML")?;
        let root = doc.root_element();
        let num = |tag: &str| {
            root.children()
                .find(|n| n.has_tag_name(tag))
                .and_then(|n| n.text())
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let target = root.children().find(|n| n.has_tag_name("target"));
        let path = target
            .and_then(|t| t.children().find(|n| n.has_tag_name("path")))
            .and_then(|p| p.text())
            .map(|p| PathBuf::from(p.trim()))
            .ok_or_else(|| Error::Precondition(format!("volume {name} has no path")))?;
        let format = target
            .and_then(|t| t.children().find(|n| n.has_tag_name("format")))
            .and_then(|f| f.attribute("type"))
            .map(str::to_owned);
        let backing = root
            .children()
            .find(|n| n.has_tag_name("backingStore"))
            .and_then(|b| b.children().find(|n| n.has_tag_name("path")))
            .and_then(|p| p.text())
            .map(|p| p.trim().to_owned());
        Ok(VolFacts {
            path,
            format,
            capacity: num("capacity"),
            allocation: num("allocation"),
            backing,
        })
    }

    async fn record_of(&self, name: &str) -> Result<ImageRecord> {
        let f = self.vol_facts(name).await?;
        if self.is_local() {
            let info = fluidcloud_migrators::probe(&f.path).map_err(Error::from)?;
            return Ok(ImageRecord {
                name: name.to_owned(),
                format: info.format,
                virtual_size: info.virtual_size,
                allocated: info.allocated_bytes,
                backing: info.backing_file,
                locator: f.path.display().to_string(),
            });
        }
        let format = match f.format.as_deref() {
            Some("raw") | None => ImageFormat::Raw,
            Some("qcow2") => ImageFormat::Qcow2,
            Some("vmdk") => ImageFormat::Vmdk,
            Some("vpc") => ImageFormat::Vhd,
            Some("vhdx") => ImageFormat::Vhdx,
            Some(other) => {
                return Err(Error::NotSupported {
                    operation: format!("volume {name} in format {other}"),
                    site: Some(self.name.clone()),
                });
            }
        };
        Ok(ImageRecord {
            name: name.to_owned(),
            format,
            virtual_size: f.capacity,
            allocated: f.allocation,
            backing: f.backing,
            locator: f.path.display().to_string(),
        })
    }

    async fn vol_exists(&self, name: &str) -> Result<bool> {
        match self.vol_facts(name).await {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn vol_names(&self) -> Result<Vec<String>> {
        self.refresh().await?;
        let out = self
            .virsh(
                &["vol-list", "--pool", &self.pool],
                &format!("storage pool {}", self.pool),
            )
            .await?;
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| !n.starts_with('.'))
            .map(str::to_owned)
            .collect();
        names.sort();
        Ok(names)
    }

    async fn delete_vol(&self, name: &str) -> Result<()> {
        let name = self.checked_name(name, "volume")?;
        self.vol_facts(name).await?;
        self.virsh(
            &["vol-delete", "--pool", &self.pool, name],
            &format!("volume {name}"),
        )
        .await
        .map(drop)
    }

    /// A local raw volume file, for byte-level access.
    async fn raw_file(&self, name: &str, write: bool) -> Result<(std::fs::File, PathBuf)> {
        if !self.is_local() {
            return Err(self.err_local_only("byte-level volume access"));
        }
        let f = self.vol_facts(name).await?;
        let info = fluidcloud_migrators::probe(&f.path).map_err(Error::from)?;
        if info.format != ImageFormat::Raw {
            return Err(Error::NotSupported {
                operation: format!(
                    "byte-level access to {} volume `{name}` (only raw volumes are addressable)",
                    info.format
                ),
                site: Some(self.name.clone()),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(&f.path)
            .map_err(|e| Error::io(format!("opening {}", f.path.display()), e))?;
        Ok((file, f.path))
    }

    async fn domains(&self) -> Result<Vec<String>> {
        let out = self.virsh(&["list", "--all", "--name"], "domains").await?;
        let mut names: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|n| !n.is_empty() && n.starts_with(&self.prefix))
            .map(str::to_owned)
            .collect();
        names.sort();
        Ok(names)
    }

    async fn domain_state(&self, domain: &str, instance: &str) -> Result<InstanceState> {
        let out = self
            .virsh(&["domstate", domain], &format!("instance {instance}"))
            .await?;
        Ok(match out.trim() {
            "shut off" | "crashed" | "pmsuspended" => InstanceState::Stopped,
            _ => InstanceState::Running,
        })
    }

    async fn domain_xml(&self, domain: &str, instance: &str) -> Result<String> {
        self.virsh(
            &["dumpxml", "--inactive", domain],
            &format!("instance {instance}"),
        )
        .await
    }

    /// The instance record of a domain.
    async fn read_domain(&self, domain: &str, pool_path: &Path) -> Result<InstanceRecord> {
        let instance = domain.strip_prefix(&self.prefix).unwrap_or(domain);
        let xml = self.domain_xml(domain, instance).await?;
        let state = self.domain_state(domain, instance).await?;
        let mut rec = parse_domain(&xml, pool_path, &self.name)?;
        rec.name = instance.to_owned();
        rec.state = state;
        Ok(rec)
    }

    async fn virt_type(&self) -> &'static str {
        match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
            Accel::Auto => {
                let kvm = self
                    .virsh(&["domcapabilities", "--virttype", "kvm"], "kvm")
                    .await
                    .is_ok();
                if kvm { "kvm" } else { "qemu" }
            }
        }
    }

    /// Where a domain's serial console is logged (on the daemon's host).
    pub fn console_path(&self, domain: &str) -> PathBuf {
        PathBuf::from(format!("/var/log/libvirt/qemu/{domain}.console.log"))
    }
}

/// The instance name of `name`'s boot-check trial.
fn trial_name(name: &str) -> String {
    format!("{name}-fc-trial")
}

/// Where a trial domain's overlays are (on the daemon's host).
fn trial_dir(domain: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/libvirt/fluidcloud-trials/{domain}"))
}

/// Creates the qcow2 overlay `overlay` over `base` (read, never written).
async fn overlay_on(base: &Path, format: &str, overlay: &Path) -> Result<()> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(base)
        .arg(overlay)
        .output()
        .await
        .map_err(|e| Error::io("running qemu-img (Debian: qemu-utils)", e))?;
    if !out.status.success() {
        return Err(Error::Precondition(format!(
            "creating the overlay {} over {}: {}",
            overlay.display(),
            base.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn parse_xml<'a>(text: &'a str, what: &str) -> Result<roxmltree::Document<'a>> {
    roxmltree::Document::parse(text)
        .map_err(|e| Error::Precondition(format!("libvirt returned malformed {what}: {e}")))
}

/// XML-escapes text and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

/// A pool path's volume name, or the path itself when it is outside the pool.
fn vol_name(path: &str, pool_path: &Path) -> String {
    let p = Path::new(path);
    match (p.parent(), p.file_name()) {
        (Some(dir), Some(f)) if dir == pool_path => f.to_string_lossy().into_owned(),
        _ => path.to_owned(),
    }
}

/// The instance record a domain's XML describes (name as in the XML,
/// state `stopped`). Disks and kernels are named by pool volume when they
/// are in `pool_path`, else by their full path.
///
/// # Errors
/// `Precondition` for XML that is not a domain.
pub fn parse_domain(xml: &str, pool_path: &Path, site: &str) -> Result<InstanceRecord> {
    let doc = parse_xml(xml, "domain XML")?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(Error::Precondition(format!(
            "site {site}: not a domain XML document"
        )));
    }
    let text = |n: Option<roxmltree::Node<'_, '_>>| {
        n.and_then(|n| n.text())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    let name = text(child(root, "name")).unwrap_or_default();
    let vcpus = text(child(root, "vcpu"))
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let memory_mib = child(root, "memory")
        .map(|m| {
            let v: u64 = m.text().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
            match m.attribute("unit").unwrap_or("KiB") {
                "b" | "bytes" => v >> 20,
                "KiB" | "k" => v >> 10,
                "MiB" | "M" => v,
                "GiB" | "G" => v << 10,
                "TiB" | "T" => v << 20,
                "KB" => v * 1000 / (1 << 20),
                "MB" => v * 1_000_000 / (1 << 20),
                "GB" => v * 1_000_000_000 / (1 << 20),
                _ => v >> 10,
            }
        })
        .unwrap_or(0);
    let mut rec = InstanceRecord::new(name, vcpus, memory_mib);
    if let Some(os) = child(root, "os") {
        let pool_name = |t: Option<String>| t.map(|p| vol_name(&p, pool_path));
        rec.kernel = pool_name(text(child(os, "kernel")));
        rec.initrd = pool_name(text(child(os, "initrd")));
        rec.cmdline = text(child(os, "cmdline"));
    }
    if let Some(meta) = child(root, "metadata")
        && let Some(fc) = meta
            .children()
            .find(|n| n.is_element() && n.tag_name().namespace() == Some(METADATA_NS))
    {
        for n in fc.children().filter(|n| n.is_element()) {
            let v = n.text().map(|t| t.trim().to_owned()).unwrap_or_default();
            match n.tag_name().name() {
                "service" => rec.service = Some(v),
                "hostname" => rec.hostname = Some(v),
                "address" => rec.addresses.push(v),
                "relocation" => rec.created_by = Some(v),
                _ => {}
            }
        }
    }
    let mut buses = Vec::new();
    let mut disks = Vec::new();
    if let Some(devices) = child(root, "devices") {
        for d in devices.children().filter(|n| n.is_element()) {
            match d.tag_name().name() {
                "disk" if d.attribute("device").unwrap_or("disk") == "disk" => {
                    // A disk being change-tracked shows as its own file,
                    // not as the overlay in front of it.
                    let (src, declared) = match tracking::tracked_base(d) {
                        Some(base) => (
                            child(base, "source"),
                            child(base, "format").and_then(|t| t.attribute("type")),
                        ),
                        None => (
                            child(d, "source"),
                            child(d, "driver").and_then(|t| t.attribute("type")),
                        ),
                    };
                    let path = src
                        .and_then(|s| s.attribute("file").or(s.attribute("dev")))
                        .map(|p| vol_name(p, pool_path))
                        .or_else(|| src.and_then(|s| s.attribute("volume")).map(str::to_owned));
                    if let Some(p) = path {
                        // libvirt reads a disk without `<driver type>` as
                        // raw (it never probes); so do we.
                        let format = match declared {
                            None => ImageFormat::Raw,
                            Some(t) => format_of_libvirt(t).ok_or_else(|| Error::NotSupported {
                                operation: format!("disk {p} of domain {}: format `{t}`", rec.name),
                                site: Some(site.to_owned()),
                            })?,
                        };
                        rec.formats.insert(p.clone(), format);
                        disks.push(p);
                    }
                    if let Some(bus) = child(d, "target").and_then(|t| t.attribute("bus")) {
                        buses.push(bus.to_owned());
                    }
                }
                "interface" => {
                    let kind = match d.attribute("type") {
                        Some("network") => NicKind::Network,
                        Some("bridge") => NicKind::Bridge,
                        Some("user") => NicKind::User,
                        _ => continue,
                    };
                    let src = child(d, "source");
                    rec.nics.push(NicRecord {
                        kind,
                        source: src
                            .and_then(|s| s.attribute("network").or(s.attribute("bridge")))
                            .map(str::to_owned),
                        mac: child(d, "mac")
                            .and_then(|m| m.attribute("address"))
                            .map(str::to_ascii_lowercase),
                        model: child(d, "model")
                            .and_then(|m| m.attribute("type"))
                            .map(str::to_owned),
                    });
                }
                _ => {}
            }
        }
    }
    let mut disks = disks.into_iter();
    rec.boot_image = disks.next();
    rec.volumes = disks.collect();
    buses.dedup();
    if buses.len() == 1 {
        rec.disk_bus = buses.pop();
    }
    Ok(rec)
}

/// The first child element of `n` named `tag`.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == tag)
}

/// A disk of a domain to write: path and format.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// The file.
    pub path: PathBuf,
    /// libvirt's name of its format (`raw`, `qcow2`, `vmdk`, `vpc`, `vhdx`).
    pub format: String,
}

/// Domain XML for `rec` with its disks, kernel and initrd resolved to
/// files. The serial console is logged to `console`.
pub fn domain_xml(
    domain: &str,
    virt_type: &str,
    rec: &InstanceRecord,
    disks: &[DiskSpec],
    kernel: Option<&Path>,
    initrd: Option<&Path>,
    console: &Path,
) -> String {
    let mut x = String::new();
    x.push_str(&format!("<domain type='{}'>\n", esc(virt_type)));
    x.push_str(&format!("  <name>{}</name>\n", esc(domain)));
    x.push_str("  <metadata>\n");
    x.push_str(&format!("    <fc:instance xmlns:fc='{METADATA_NS}'>\n"));
    if let Some(s) = &rec.service {
        x.push_str(&format!("      <fc:service>{}</fc:service>\n", esc(s)));
    }
    if let Some(h) = &rec.hostname {
        x.push_str(&format!("      <fc:hostname>{}</fc:hostname>\n", esc(h)));
    }
    for a in &rec.addresses {
        x.push_str(&format!("      <fc:address>{}</fc:address>\n", esc(a)));
    }
    if let Some(r) = &rec.created_by {
        x.push_str(&format!(
            "      <fc:relocation>{}</fc:relocation>\n",
            esc(r)
        ));
    }
    x.push_str("    </fc:instance>\n  </metadata>\n");
    x.push_str(&format!(
        "  <memory unit='MiB'>{}</memory>\n",
        rec.memory_mib
    ));
    x.push_str(&format!("  <vcpu>{}</vcpu>\n", rec.vcpus));
    x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
    if let Some(k) = kernel {
        x.push_str(&format!(
            "    <kernel>{}</kernel>\n",
            esc(&k.display().to_string())
        ));
    }
    if let Some(i) = initrd {
        x.push_str(&format!(
            "    <initrd>{}</initrd>\n",
            esc(&i.display().to_string())
        ));
    }
    if let Some(c) = &rec.cmdline {
        x.push_str(&format!("    <cmdline>{}</cmdline>\n", esc(c)));
    }
    if kernel.is_none() {
        x.push_str("    <boot dev='hd'/>\n");
    }
    x.push_str("  </os>\n  <features><acpi/></features>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n");
    x.push_str("  <devices>\n");
    let bus = rec.disk_bus.as_deref().unwrap_or("virtio");
    let prefix = match bus {
        "virtio" => "vd",
        "ide" => "hd",
        _ => "sd",
    };
    for (i, d) in disks.iter().enumerate() {
        let letter = char::from(b'a' + u8::try_from(i % 26).unwrap_or(0));
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{}'/>\n      <source file='{}'/>\n      <target dev='{prefix}{letter}' bus='{}'/>\n    </disk>\n",
            esc(&d.format),
            esc(&d.path.display().to_string()),
            esc(bus)
        ));
    }
    for n in &rec.nics {
        let (t, src) = match n.kind {
            NicKind::Network => (
                "network",
                n.source.as_ref().map(|s| format!("network='{}'", esc(s))),
            ),
            NicKind::Bridge => (
                "bridge",
                n.source.as_ref().map(|s| format!("bridge='{}'", esc(s))),
            ),
            NicKind::User => ("user", None),
        };
        x.push_str(&format!("    <interface type='{t}'>\n"));
        if let Some(s) = src {
            x.push_str(&format!("      <source {s}/>\n"));
        }
        if let Some(m) = &n.mac {
            x.push_str(&format!("      <mac address='{}'/>\n", esc(m)));
        }
        if let Some(m) = &n.model {
            x.push_str(&format!("      <model type='{}'/>\n", esc(m)));
        }
        x.push_str("    </interface>\n");
    }
    x.push_str(&format!(
        "    <serial type='file'>\n      <source path='{}' append='off'/>\n      <target port='0'/>\n    </serial>\n",
        esc(&console.display().to_string())
    ));
    x.push_str("  </devices>\n</domain>\n");
    x
}

/// libvirt's name of a disk format.
/// The format libvirt's `<driver type>` names.
fn format_of_libvirt(t: &str) -> Option<ImageFormat> {
    match t {
        "raw" => Some(ImageFormat::Raw),
        "qcow2" => Some(ImageFormat::Qcow2),
        "vmdk" => Some(ImageFormat::Vmdk),
        "vpc" => Some(ImageFormat::Vhd),
        "vhdx" => Some(ImageFormat::Vhdx),
        _ => None,
    }
}

fn libvirt_format(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Raw => "raw",
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Vmdk => "vmdk",
        ImageFormat::Vhd => "vpc",
        ImageFormat::Vhdx => "vhdx",
        #[allow(unreachable_patterns)]
        _ => "raw",
    }
}

#[async_trait]
impl SiteDriver for LibvirtSite {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        DESCRIPTOR.kind
    }

    async fn check(&self) -> Result<()> {
        let info = self
            .virsh(
                &["pool-info", &self.pool],
                &format!("storage pool {}", self.pool),
            )
            .await?;
        let active = info
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("running"));
        if active {
            Ok(())
        } else {
            Err(Error::Precondition(format!(
                "site {}: storage pool {} is not active (virsh pool-start {})",
                self.name, self.pool, self.pool
            )))
        }
    }

    fn inventory(&self) -> Option<&dyn Inventory> {
        Some(self)
    }

    fn image_store(&self) -> Option<&dyn ImageStore> {
        Some(self)
    }

    fn block_store(&self) -> Option<&dyn BlockStore> {
        Some(self)
    }

    fn object_storage(&self) -> Option<&dyn ObjectStorage> {
        None
    }

    fn compute(&self) -> Option<&dyn Compute> {
        Some(self)
    }

    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        (self.change_tracking && self.is_local()).then_some(self as &dyn ChangeTracking)
    }

    fn disks(&self) -> Option<&dyn crate::driver::Disks> {
        self.is_local().then_some(self as &dyn crate::driver::Disks)
    }

    fn guests(&self) -> Option<&dyn crate::driver::Guests> {
        self.is_local()
            .then_some(self as &dyn crate::driver::Guests)
    }
}

impl crate::guest::FileGuests for LibvirtSite {
    fn accel(&self) -> Accel {
        self.accel
    }
}

/// The pool's files as disks. Called on blocking threads of the runtime
/// (as [`crate::driver::Disks`] says), so the daemon is asked through it.
impl crate::driver::Disks for LibvirtSite {
    fn read(
        &self,
        store: crate::driver::DiskStore,
        name: &str,
        format: ImageFormat,
    ) -> Result<Box<dyn fluidcloud_migrators::image::ImageReader>> {
        self.files()?.read(store, name, format)
    }

    fn write(
        &self,
        store: crate::driver::DiskStore,
        name: &str,
        format: ImageFormat,
        virtual_size: u64,
        owner: &str,
    ) -> Result<Box<dyn crate::driver::DiskWriter>> {
        let inner = self
            .files()?
            .write(store, name, format, virtual_size, owner)?;
        Ok(Box::new(RefreshingWriter {
            inner,
            site: self.clone(),
        }))
    }

    fn holder(
        &self,
        store: crate::driver::DiskStore,
        name: &str,
    ) -> Result<Option<Option<String>>> {
        self.files()?.holder(store, name)
    }

    fn remove(&self, store: crate::driver::DiskStore, name: &str, owner: &str) -> Result<bool> {
        let removed = self.files()?.remove_disk(store, name, owner)?;
        if removed {
            tokio::runtime::Handle::try_current()
                .map_err(|e| Error::Transient(format!("no runtime to ask libvirt with: {e}")))?
                .block_on(self.refresh())?;
        }
        Ok(removed)
    }
}

impl LibvirtSite {
    fn files(&self) -> Result<super::filedisk::FileDisks> {
        let dir = tokio::runtime::Handle::try_current()
            .map_err(|e| Error::Transient(format!("no runtime to ask libvirt with: {e}")))?
            .block_on(self.pool_path())?;
        Ok(super::filedisk::FileDisks::new(
            self.name.clone(),
            dir.clone(),
            dir,
            Vec::new(),
        ))
    }
}

/// A disk written into the pool: the pool is refreshed once it is
/// complete, so that libvirt lists it.
struct RefreshingWriter {
    inner: Box<dyn crate::driver::DiskWriter>,
    site: LibvirtSite,
}

impl crate::driver::DiskWriter for RefreshingWriter {
    fn current(&self) -> Result<Box<dyn fluidcloud_migrators::image::ImageReader>> {
        self.inner.current()
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.write_at(offset, data)
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.zero(offset, len)
    }

    fn finish(&self) -> Result<ImageRecord> {
        let record = self.inner.finish()?;
        tokio::runtime::Handle::try_current()
            .map_err(|e| Error::Transient(format!("no runtime to ask libvirt with: {e}")))?
            .block_on(self.site.refresh())?;
        Ok(record)
    }
}

#[async_trait]
impl Inventory for LibvirtSite {
    async fn instances(&self) -> Result<Vec<InstanceRecord>> {
        let pool_path = self.pool_path().await?;
        let mut out = Vec::new();
        for d in self.domains().await? {
            match self.read_domain(&d, &pool_path).await {
                Ok(r) => out.push(r),
                // Undefined between the listing and the read.
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn config_file(&self, path: &str) -> Result<ConfigFileRecord> {
        let p = Path::new(path);
        let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(Error::Invalid(vec![Diagnostic::error(format!(
                "config path `{path}` must be relative and stay inside the site's config root"
            ))]));
        }
        Err(Error::NotFound {
            what: format!("config file {path} (a libvirt site holds no config files)"),
            site: Some(self.name.clone()),
        })
    }

    async fn config_files(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn service_manifest(&self, service: &str) -> Result<Option<(PathBuf, String)>> {
        self.checked_name(service, "service")?;
        Ok(None)
    }
}

#[async_trait]
impl ImageStore for LibvirtSite {
    async fn list_images(&self) -> Result<Vec<String>> {
        self.vol_names().await
    }

    async fn image_info(&self, name: &str) -> Result<ImageRecord> {
        if name.contains('/') {
            return Err(Error::Invalid(vec![Diagnostic::error(format!(
                "`{name}` is not a volume of pool {} on site {} (fluidcloud moves disks and kernels that are volumes of the site's pool)",
                self.pool, self.name
            ))]));
        }
        self.record_of(name).await
    }

    async fn put_image(
        &self,
        name: &str,
        data: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<u64> {
        let name = self.checked_name(name, "image")?;
        if !self.is_local() {
            return Err(self.err_local_only("storing an image"));
        }
        let exists =
            || Error::Precondition(format!("image {name} already exists on site {}", self.name));
        if self.vol_exists(name).await? {
            return Err(exists());
        }
        let dir = self.pool_path().await?;
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let result: Result<u64> = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
            let n = tokio::io::copy(data, &mut f)
                .await
                .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
            f.sync_all()
                .await
                .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
            // A hard link publishes only if the name is free.
            std::fs::hard_link(&tmp, &path).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => exists(),
                _ => Error::io(format!("publishing {}", path.display()), e),
            })?;
            Ok(n)
        }
        .await;
        let _ = std::fs::remove_file(&tmp);
        let n = result?;
        self.refresh().await?;
        Ok(n)
    }

    async fn open_image(&self, name: &str) -> Result<Box<dyn AsyncRead + Send + Unpin>> {
        if !self.is_local() {
            return Err(self.err_local_only("reading an image"));
        }
        let f = self.vol_facts(name).await?;
        let file = tokio::fs::File::open(&f.path)
            .await
            .map_err(|e| Error::io(format!("opening {}", f.path.display()), e))?;
        Ok(Box::new(file))
    }

    async fn delete_image(&self, name: &str) -> Result<()> {
        self.delete_vol(name).await
    }
}

#[async_trait]
impl BlockStore for LibvirtSite {
    async fn list_volumes(&self) -> Result<Vec<String>> {
        self.vol_names().await
    }

    async fn volume_info(&self, name: &str) -> Result<ImageRecord> {
        self.image_info(name).await
    }

    async fn create_volume(&self, name: &str, size: u64) -> Result<()> {
        let name = self.checked_name(name, "volume")?;
        if self.vol_exists(name).await? {
            return Err(Error::Precondition(format!(
                "volume {name} already exists on site {}",
                self.name
            )));
        }
        let size_s = size.to_string();
        self.virsh(
            &[
                "vol-create-as",
                "--pool",
                &self.pool,
                "--name",
                name,
                "--capacity",
                &size_s,
                "--allocation",
                "0",
                "--format",
                "raw",
            ],
            &format!("volume {name}"),
        )
        .await
        .map(drop)
    }

    async fn read_at(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let (file, path) = self.raw_file(name, false).await?;
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
            }
        }
        Ok(done)
    }

    async fn write_at(&self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        let (file, path) = self.raw_file(name, true).await?;
        let size = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > size)
        {
            return Err(Error::Precondition(format!(
                "write of {} bytes at offset {offset} goes past the end of volume {name} ({size} bytes)",
                data.len()
            )));
        }
        file.write_all_at(data, offset)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    async fn allocation(&self, name: &str) -> Result<Vec<Extent>> {
        let (file, path) = self.raw_file(name, false).await?;
        tokio::task::spawn_blocking(move || {
            super::local::allocation_map(&file)
                .map_err(|e| Error::io(format!("mapping {}", path.display()), e))
        })
        .await
        .map_err(|e| Error::Transient(format!("worker thread failed: {e}")))?
    }

    async fn flush(&self, name: &str) -> Result<()> {
        let (mut file, path) = self.raw_file(name, true).await?;
        file.flush()
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(format!("syncing {}", path.display()), e))
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        self.delete_vol(name).await
    }
}

#[async_trait]
impl Compute for LibvirtSite {
    async fn define(&self, record: &InstanceRecord) -> Result<()> {
        let name = self.checked_name(&record.name, "instance")?;
        let domain = self.domain_name(name);
        if self.domains().await?.contains(&domain) {
            return Err(Error::Precondition(format!(
                "instance {name} already exists on site {} (domain {domain})",
                self.name
            )));
        }
        self.refresh().await?;
        let mut disks = Vec::new();
        for d in record.boot_image.iter().chain(&record.volumes) {
            let info = self.image_info(d).await?;
            // The format the relocation wrote, never one read from the
            // disk: a raw disk may begin with any header.
            let format = record.formats.get(d).copied().ok_or_else(|| {
                Error::Precondition(format!(
                    "instance {name}: disk {d} has no declared format (`format` of the record)"
                ))
            })?;
            disks.push(DiskSpec {
                path: PathBuf::from(&info.locator),
                format: libvirt_format(format).to_owned(),
            });
        }
        let mut kernel = None;
        let mut initrd = None;
        if let Some(k) = &record.kernel {
            kernel = Some(PathBuf::from(self.image_info(k).await?.locator));
        }
        if let Some(i) = &record.initrd {
            initrd = Some(PathBuf::from(self.image_info(i).await?.locator));
        }
        let xml = domain_xml(
            &domain,
            self.virt_type().await,
            record,
            &disks,
            kernel.as_deref(),
            initrd.as_deref(),
            &self.console_path(&domain),
        );
        let mut tmp = tempfile::NamedTempFile::new()
            .map_err(|e| Error::io("creating a temporary domain XML file", e))?;
        tmp.write_all(xml.as_bytes())
            .map_err(|e| Error::io("writing a temporary domain XML file", e))?;
        let path = tmp.path().display().to_string();
        self.virsh(&["define", &path], &format!("instance {name}"))
            .await
            .map(drop)
    }

    async fn start(&self, name: &str) -> Result<()> {
        let name = self.checked_name(name, "instance")?;
        let domain = self.domain_name(name);
        if self.domain_state(&domain, name).await? == InstanceState::Running {
            return Ok(());
        }
        self.virsh(&["start", &domain], &format!("instance {name}"))
            .await
            .map(drop)
    }

    async fn stop(&self, name: &str) -> Result<()> {
        let name = self.checked_name(name, "instance")?;
        let domain = self.domain_name(name);
        let what = format!("instance {name}");
        if self.domain_state(&domain, name).await? == InstanceState::Stopped {
            return Ok(());
        }
        if !self.shutdown_timeout.is_zero() {
            // Graceful first; a guest that ignores ACPI is forced off below.
            let _ = self.virsh(&["shutdown", &domain], &what).await;
            let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
            while tokio::time::Instant::now() < deadline {
                if self.domain_state(&domain, name).await? == InstanceState::Stopped {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        match self.virsh(&["destroy", &domain], &what).await {
            Ok(_) => Ok(()),
            // It stopped on its own meanwhile.
            Err(_) if self.domain_state(&domain, name).await? == InstanceState::Stopped => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn state(&self, name: &str) -> Result<InstanceState> {
        let name = self.checked_name(name, "instance")?;
        self.domain_state(&self.domain_name(name), name).await
    }

    async fn undefine(&self, name: &str) -> Result<()> {
        let name = self.checked_name(name, "instance")?;
        let domain = self.domain_name(name);
        if self.domain_state(&domain, name).await? == InstanceState::Running {
            return Err(Error::Precondition(format!(
                "instance {name} on site {} is running; stop it before undefining",
                self.name
            )));
        }
        self.virsh(&["undefine", &domain], &format!("instance {name}"))
            .await
            .map(drop)
    }

    async fn start_trial(&self, name: &str) -> Result<String> {
        let name = self.checked_name(name, "instance")?;
        if !self.is_local() {
            return Err(self.err_local_only("a boot check on overlays"));
        }
        self.end_trial(name).await?;
        let pool = self.pool_path().await?;
        let rec = self.read_domain(&self.domain_name(name), &pool).await?;
        let trial = trial_name(name);
        let domain = self.domain_name(&trial);
        let dir = trial_dir(&domain);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let at = |n: &String| {
            let p = Path::new(n);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                pool.join(p)
            }
        };
        let mut disks = Vec::new();
        for (i, d) in rec.boot_image.iter().chain(&rec.volumes).enumerate() {
            let format = rec.formats.get(d).copied().unwrap_or(ImageFormat::Raw);
            let overlay = dir.join(format!("disk{i}.qcow2"));
            overlay_on(&at(d), libvirt_format(format), &overlay).await?;
            disks.push(DiskSpec {
                path: overlay,
                format: "qcow2".to_owned(),
            });
        }
        let copy = InstanceRecord {
            name: trial.clone(),
            // Unplugged: no address or MAC of the instance is live twice.
            nics: Vec::new(),
            ..rec.clone()
        };
        let console = self.console_path(&domain);
        let _ = std::fs::remove_file(&console);
        let xml = domain_xml(
            &domain,
            self.virt_type().await,
            &copy,
            &disks,
            rec.kernel.as_ref().map(at).as_deref(),
            rec.initrd.as_ref().map(at).as_deref(),
            &console,
        );
        let mut tmp = tempfile::NamedTempFile::new()
            .map_err(|e| Error::io("creating a temporary domain XML file", e))?;
        tmp.write_all(xml.as_bytes())
            .map_err(|e| Error::io("writing a temporary domain XML file", e))?;
        let path = tmp.path().display().to_string();
        // Transient: gone from libvirt once destroyed.
        self.virsh(
            &["create", &path],
            &format!("boot check of instance {name}"),
        )
        .await?;
        Ok(trial)
    }

    async fn end_trial(&self, name: &str) -> Result<()> {
        let name = self.checked_name(name, "instance")?;
        let domain = self.domain_name(&trial_name(name));
        if self.domains().await?.contains(&domain) {
            self.virsh(
                &["destroy", &domain],
                &format!("boot check of instance {name}"),
            )
            .await?;
        }
        let dir = trial_dir(&domain);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
        }
    }

    async fn console(&self, name: &str) -> Result<String> {
        let name = self.checked_name(name, "instance")?;
        let domain = self.domain_name(name);
        let xml = self.domain_xml(&domain, name).await?;
        let doc = parse_xml(&xml, "domain XML")?;
        let path = doc
            .descendants()
            .filter(|n| n.has_tag_name("serial") && n.attribute("type") == Some("file"))
            .find_map(|n| {
                n.children()
                    .find(|c| c.has_tag_name("source"))
                    .and_then(|s| s.attribute("path"))
                    .map(PathBuf::from)
            })
            .ok_or_else(|| Error::NotSupported {
                operation: format!("reading the console of {name}: it is not logged to a file"),
                site: Some(self.name.clone()),
            })?;
        if !self.is_local() {
            return Err(self.err_local_only("reading a console log"));
        }
        match std::fs::read(&path) {
            Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            // Never started: nothing printed yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_written_domain_reads_back_as_the_same_record() {
        let mut rec = InstanceRecord::new("web", 2, 512);
        rec.service = Some("shop".into());
        rec.hostname = Some("web.shop.internal".into());
        rec.addresses = vec!["10.0.0.5".into(), "10.0.0.6".into()];
        rec.boot_image = Some("web.raw".into());
        rec.volumes = vec!["data.raw".into()];
        rec.kernel = Some("vmlinuz".into());
        rec.initrd = Some("initrd.img".into());
        rec.cmdline = Some("console=ttyS0 root=<none> & more".into());
        rec.disk_bus = Some("virtio".into());
        rec.nics = vec![
            NicRecord {
                kind: NicKind::Bridge,
                source: Some("br0".into()),
                mac: Some("52:54:00:aa:bb:cc".into()),
                model: Some("virtio".into()),
            },
            NicRecord {
                kind: NicKind::Network,
                source: Some("default".into()),
                mac: None,
                model: None,
            },
        ];
        let pool = Path::new("/pool");
        let disks = [
            DiskSpec {
                path: "/pool/web.raw".into(),
                format: "raw".into(),
            },
            DiskSpec {
                path: "/pool/data.raw".into(),
                format: "vpc".into(),
            },
        ];
        // The declared formats come back from `<driver type>` (vpc is VHD).
        rec.formats = [
            ("web.raw".to_owned(), ImageFormat::Raw),
            ("data.raw".to_owned(), ImageFormat::Vhd),
        ]
        .into();
        let xml = domain_xml(
            "fc-web",
            "qemu",
            &rec,
            &disks,
            Some(Path::new("/pool/vmlinuz")),
            Some(Path::new("/pool/initrd.img")),
            Path::new("/var/log/c.log"),
        );
        let mut back = parse_domain(&xml, pool, "s").unwrap();
        assert_eq!(back.name, "fc-web");
        back.name = "web".into();
        assert_eq!(back, rec);
    }

    #[test]
    fn a_disk_without_a_driver_type_is_raw_and_an_unknown_one_is_refused() {
        let xml = |driver: &str| {
            format!(
                "<domain><name>d</name><devices><disk type='file' device='disk'>{driver}<source file='/pool/a.img'/><target dev='vda'/></disk></devices></domain>"
            )
        };
        let r = parse_domain(&xml(""), Path::new("/pool"), "s").unwrap();
        assert_eq!(r.formats.get("a.img"), Some(&ImageFormat::Raw));
        let r = parse_domain(
            &xml("<driver name='qemu' type='qcow2'/>"),
            Path::new("/pool"),
            "s",
        )
        .unwrap();
        assert_eq!(r.formats.get("a.img"), Some(&ImageFormat::Qcow2));
        let e = parse_domain(
            &xml("<driver name='qemu' type='qed'/>"),
            Path::new("/pool"),
            "s",
        )
        .unwrap_err();
        assert!(e.to_string().contains("format `qed`"), "{e}");
    }

    #[test]
    fn disks_outside_the_pool_keep_their_path() {
        let xml = "<domain type='kvm'><name>x</name><memory unit='KiB'>1048576</memory><vcpu>1</vcpu>\
            <devices><disk type='file' device='disk'><source file='/elsewhere/a.qcow2'/><target dev='vda' bus='virtio'/></disk>\
            <disk type='file' device='cdrom'><source file='/pool/x.iso'/></disk></devices></domain>";
        let r = parse_domain(xml, Path::new("/pool"), "s").unwrap();
        assert_eq!(r.memory_mib, 1024);
        assert_eq!(r.boot_image.as_deref(), Some("/elsewhere/a.qcow2"));
        assert!(r.volumes.is_empty());
    }

    #[test]
    fn local_and_remote_uris() {
        assert!(LibvirtSite::new("a", "qemu:///system", "p").is_local());
        assert!(!LibvirtSite::new("a", "qemu+ssh://h/system", "p").is_local());
        assert!(!LibvirtSite::new("a", "qemu://h/system", "p").is_local());
    }
}
