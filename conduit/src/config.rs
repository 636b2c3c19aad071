//! The sites file (`fluidcloud.toml`): which sites exist and what they are.
//!
//! ```toml
//! [sites.dc-paris]
//! kind = "local"                       # driver; `fluidcloud sites kinds` lists them
//! path = "sites/dc-paris"              # relative to this file
//! jurisdiction = "EU/FR"
//! image_formats = ["qcow2", "raw"]
//! internal_domains = ["shop.paris.internal"]
//! object_endpoint = "https://s3.dc-paris.example.net"
//! location = { region = "fr-idf", latitude = 48.86, longitude = 2.35 }
//! cost = { vcpu_hour = 0.031, storage_gib_month = 0.02, egress_gib = 0.01 }
//! capacity = { vcpus = 64, memory_mib = 262144, storage_gib = 4000 }
//! credentials = { access_key_id_env = "PARIS_KEY", secret_access_key_env = "PARIS_SECRET" }
//! ```
//!
//! Which file is read: `--config PATH`, else `$FLUIDCLOUD_CONFIG`, else
//! `./fluidcloud.toml`. Unknown keys are rejected; every error names the
//! file, the line and the key. Secrets are never written in the file, only
//! the names of the environment variables that hold them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fluidcloud_plugins::{Capacity, Cost, Diagnostic, ImageFormat, Location};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tomlfile;

/// Environment variable naming the sites file.
pub const CONFIG_ENV: &str = "FLUIDCLOUD_CONFIG";
/// File name looked for in the current directory.
pub const DEFAULT_FILE: &str = "fluidcloud.toml";

/// Credentials by reference: names of environment variables, never values.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Variable holding the access key id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_env: Option<String>,
    /// Variable holding the secret key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_env: Option<String>,
    /// Variable holding a session or bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
}

impl Credentials {
    /// (field, variable name) pairs that are set.
    pub fn references(&self) -> Vec<(&'static str, &str)> {
        [
            ("access_key_id_env", &self.access_key_id_env),
            ("secret_access_key_env", &self.secret_access_key_env),
            ("token_env", &self.token_env),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }

    /// Reads the referenced variables.
    ///
    /// # Errors
    /// `MissingCredential` naming the site, the key and the variable when one
    /// is not set.
    pub fn resolve(&self, site: &str) -> Result<BTreeMap<&'static str, String>> {
        self.references()
            .into_iter()
            .map(|(key, var)| match std::env::var(var) {
                Ok(v) => Ok((key, v)),
                Err(_) => Err(Error::MissingCredential {
                    site: site.to_owned(),
                    key: format!("sites.{site}.credentials.{key}"),
                    variable: var.to_owned(),
                }),
            })
            .collect()
    }
}

/// One site of the sites file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Driver kind.
    pub kind: String,
    /// Free text shown by `sites show`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Directory of a `local` site (relative paths are relative to the sites file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// API endpoint of a remote site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `aws` sites: the region (`eu-west-3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `aws` sites: one endpoint for EC2, EBS and S3 instead of AWS's (an
    /// emulator, a VPC endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,
    /// `aws` sites: where instances run and where config files live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsConfig>,
    /// `openstack` sites: Keystone and the credentials' variables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openstack: Option<OpenstackConfig>,
    /// Where the site is.
    pub location: Location,
    /// Legal jurisdiction, `/`-separated from broad to narrow (`EU/FR`).
    pub jurisdiction: String,
    /// Prices.
    #[serde(default)]
    pub cost: Cost,
    /// Capacity available for relocated services.
    #[serde(default)]
    pub capacity: Capacity,
    /// Image formats instances of this site can boot from.
    #[serde(default)]
    pub image_formats: Vec<ImageFormat>,
    /// DNS suffixes private to the site: a config reference under one of
    /// them must resolve to something of the service.
    #[serde(default)]
    pub internal_domains: Vec<String>,
    /// URL through which instances reach the site's object storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_endpoint: Option<String>,
    /// IPv4 network (`a.b.c.d/8`, `/16` or `/24`) relocated instances take
    /// addresses from; the host part of each old address is kept
    /// (`10.10.0.13` becomes `10.30.0.13` in `10.30.0.0/24`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// Where the site's buckets live when not in its directory: an S3
    /// location `s3://?endpoint=URL&region=R` (credentials from
    /// `credentials`). Each bucket is a bucket of that endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets_url: Option<String>,
    /// Credentials by environment-variable reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<Credentials>,
    /// `libvirt` sites: the connection URI (`qemu:///system`,
    /// `qemu+ssh://user@host/system`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// `libvirt` sites: the storage pool holding the site's disks, kernels
    /// and images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// `libvirt` sites: the prefix of the domain names that belong to the
    /// site, so several sites can share one daemon (`a-` makes instance
    /// `web` the domain `a-web`). Default: none, every domain is the site's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_prefix: Option<String>,
    /// `libvirt` sites: seconds a graceful shutdown may take before the
    /// domain is forced off (default 30; 0 forces it off at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout_s: Option<u64>,
    /// `libvirt` sites: how guests run, `kvm`, `tcg` (QEMU's software
    /// emulation) or `auto` (kvm when the host offers it; the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// `libvirt` sites: whether a relocation tracks the source's disk
    /// writes (an external snapshot overlay) so that its final delta reads
    /// only those (default true); false re-hashes every disk instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_tracking: Option<bool>,
    /// The site's agent (`https://HOST:PORT`): the site is driven through
    /// `fluidcloud agent` running there, whose own sites file says where
    /// the data lives (so this entry has no `path`, `uri` or `pool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The pinned SHA-256 fingerprint of the agent's certificate
    /// (`sha256:HEX`, as the agent prints it when it starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_fingerprint: Option<String>,
    /// The environment variable holding the agent's bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_token_env: Option<String>,
    /// How instances arriving at this site are adapted to it: network and
    /// bridge names, MAC addresses, disk bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<AdaptConfig>,
    /// A boot check the relocation's verify step runs on instances
    /// arriving at this site, before the source is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_check: Option<BootCheck>,
    /// Directories outside the site's image store that backing files and
    /// VMDK extents of its disks may be in (absolute names allowed there).
    /// Without it a disk's chain stays inside the store: a guest that
    /// writes a header naming `/etc/shadow` gets an error, not the file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_backing_dirs: Vec<PathBuf>,
}

/// What happens to MAC addresses of relocated instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MacPolicy {
    /// Keep every MAC address (the source is stopped before the target
    /// serves, so they never meet on one network).
    #[default]
    Keep,
    /// A new locally administered `52:54:00:..` address per interface,
    /// derived from the relocation id (stable across resume).
    Generate,
}

/// The EC2 side of an `aws` site: what relocated instances are launched
/// into and where the service's config files are kept.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// The subnet (`subnet-…`) instances get their network interface in,
    /// with the private address the relocation planned for them (the
    /// site's `subnet` should be this subnet's CIDR). Without it, EC2's
    /// default subnet and an address EC2 chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// Security groups (`sg-…`) of that interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// Instance types to choose from, as name prefixes (`["t3.", "m7i."]`);
    /// the smallest current x86_64 type with enough vCPUs and memory wins.
    /// Without it, every type the region offers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instance_types: Vec<String>,
    /// The AMI (`ami-…`) an instance that has no boot disk of its own
    /// starts from; without it such an instance is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_image_id: Option<String>,
    /// The S3 bucket the site's config files (`config/PATH`) and service
    /// manifests (`services/NAME.toml`) live in; instances read them there.
    /// Without it the site keeps no config files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_bucket: Option<String>,
}

/// How an `openstack` site reaches its cloud: Keystone, and the names of
/// the variables holding its password or application credential (never
/// the values).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenstackConfig {
    /// Keystone's URL (`https://keystone.example.net:5000`, with or
    /// without `/v3`).
    pub auth_url: String,
    /// The project (by name) a password authenticates for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The project's domain (default `Default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_domain: Option<String>,
    /// The user (by name) a password belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The user's domain (default `Default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_domain: Option<String>,
    /// The variable holding the user's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// The variable holding an application credential's id (instead of a
    /// user and password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_credential_id_env: Option<String>,
    /// The variable holding that application credential's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_credential_secret_env: Option<String>,
    /// The catalog interface to use: `public` (default), `internal`,
    /// `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// A PEM file of the CA that signs the cloud's certificates, besides
    /// the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cacert: Option<PathBuf>,
}

/// How instances arriving at a site are adapted to it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptConfig {
    /// Source network name -> this site's network name.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// Source bridge name -> this site's bridge name.
    #[serde(default)]
    pub bridges: BTreeMap<String, String>,
    /// Keep or regenerate MAC addresses.
    #[serde(default)]
    pub mac: MacPolicy,
    /// Bus every disk is attached on here (`virtio`, `sata`, `scsi`, `ide`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bus: Option<String>,
    /// Adapt inside arriving guests (their config files, network settings,
    /// `/etc/hosts`, fstab), after the final delta; default true. Turn it
    /// off for a guest fluidcloud cannot read (an encrypted root) whose
    /// settings need no change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<bool>,
    /// Remove cloud-init's instance state inside arriving guests, so that
    /// cloud-init runs again at their first boot here.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cloud_init_reset: bool,
}

/// Disk buses a domain can use.
pub const DISK_BUSES: [&str; 4] = ["virtio", "sata", "scsi", "ide"];

/// A boot check: the relocated instance is started and its serial console
/// must show a line matching `console` within `timeout_s`. When the regex
/// has a capture group and the source's console shows a match too, both
/// captures must be equal (e.g. a checksum the guest prints of its disk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootCheck {
    /// Regular expression searched in the console output.
    pub console: String,
    /// Seconds to wait for it (default 300).
    #[serde(default = "default_boot_timeout")]
    pub timeout_s: u64,
}

fn default_boot_timeout() -> u64 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    sites: BTreeMap<String, SiteConfig>,
    #[serde(default)]
    plugins: BTreeMap<String, PluginConfig>,
    #[serde(default)]
    limits: Limits,
}

/// `[limits]`: how many relocations run at once, across every worker of
/// `fluidcloud serve --database` (a worker alone applies them too). A
/// relocation counts at its source, at each target and in each
/// source→target pair; without a key, that scope is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Relocations running at once in all.
    #[serde(default)]
    pub running: Option<u32>,
    /// Relocations at once involving any one site.
    #[serde(default)]
    pub per_site: Option<u32>,
    /// Relocations at once between one source and one target site.
    #[serde(default)]
    pub per_pair: Option<u32>,
    /// Per-site limits replacing `per_site`, e.g. `edge-1 = 1` for a site
    /// with a thin uplink.
    #[serde(default)]
    pub sites: BTreeMap<String, u32>,
}

impl Limits {
    /// Every limited scope and its limit: `global`, `site:NAME` for each of
    /// `sites`, `pair:FROM>TO` for each ordered pair of them.
    pub fn scopes<'a>(
        &self,
        sites: impl IntoIterator<Item = &'a String> + Clone,
    ) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        if let Some(n) = self.running {
            out.push(("global".to_owned(), n));
        }
        for s in sites.clone() {
            if let Some(n) = self.sites.get(s).copied().or(self.per_site) {
                out.push((format!("site:{s}"), n));
            }
            if let Some(n) = self.per_pair {
                for t in sites.clone() {
                    if t != s {
                        out.push((format!("pair:{s}>{t}"), n));
                    }
                }
            }
        }
        out
    }

    fn validate(&self, sites: &BTreeMap<String, SiteConfig>, diags: &mut Vec<Diagnostic>) {
        let named = [
            ("limits.running", self.running),
            ("limits.per_site", self.per_site),
            ("limits.per_pair", self.per_pair),
        ];
        for (key, n) in named {
            if n == Some(0) {
                diags.push(
                    Diagnostic::error(
                        "a limit of 0 would run nothing; remove the key for no limit",
                    )
                    .at_key(key),
                );
            }
        }
        for (site, n) in &self.sites {
            let key = format!("limits.sites.{site}");
            if !sites.contains_key(site) {
                diags
                    .push(Diagnostic::error(format!("no site `{site}` in this file")).at_key(&key));
            } else if *n == 0 {
                diags.push(
                    Diagnostic::error(
                        "a limit of 0 would run nothing; remove the key for no limit",
                    )
                    .at_key(&key),
                );
            }
        }
    }
}

/// A plugin's entry, `[plugins.NAME]` (NAME: its executable's name, with or
/// without the `fluidcloud-migrator-` prefix).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Environment variables the plugin process gets from fluidcloud's,
    /// besides PATH, HOME and LANG. Nothing else is passed: tokens and
    /// cloud credentials stay with fluidcloud.
    #[serde(default)]
    pub env: Vec<String>,
}

/// A parsed and validated sites file.
#[derive(Debug, Clone)]
pub struct SitesFile {
    /// The file it was read from.
    pub path: PathBuf,
    /// Sites by name, in name order.
    pub sites: BTreeMap<String, SiteConfig>,
    /// Plugin entries by executable name.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// How many relocations run at once.
    pub limits: Limits,
}

impl SitesFile {
    /// The variables each plugin may have, as the plugin host takes them.
    pub fn plugin_env(&self) -> BTreeMap<String, Vec<String>> {
        self.plugins
            .iter()
            .map(|(k, v)| (k.clone(), v.env.clone()))
            .collect()
    }
}

impl SitesFile {
    /// Reads the file chosen by `explicit`, `$FLUIDCLOUD_CONFIG` or the
    /// default name, and validates it against the known driver `kinds`.
    ///
    /// # Errors
    /// `NoConfig` when no file is found; `Config` with diagnostics for a
    /// malformed or invalid file.
    pub fn discover(explicit: Option<&Path>, kinds: &[&str]) -> Result<Self> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os(CONFIG_ENV) {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => {
                    let p = PathBuf::from(DEFAULT_FILE);
                    if !p.exists() {
                        return Err(Error::NoConfig);
                    }
                    p
                }
            },
        };
        Self::load(&path, kinds)
    }

    /// Reads and validates one sites file.
    ///
    /// # Errors
    /// `Config` naming the file (and line and key) when it cannot be read,
    /// does not parse, or fails validation.
    pub fn load(path: &Path, kinds: &[&str]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            diagnostics: vec![
                Diagnostic::error(format!("cannot read sites file: {e}")).in_file(path),
            ],
        })?;
        Self::parse(path, &text, kinds)
    }

    /// Parses and validates sites-file `text` said to come from `path`.
    ///
    /// # Errors
    /// As [`SitesFile::load`].
    pub fn parse(path: &Path, text: &str, kinds: &[&str]) -> Result<Self> {
        let raw: RawFile = tomlfile::parse(path, text).map_err(|d| Error::Config {
            diagnostics: vec![d],
        })?;
        // Site paths are relative to the sites file; made absolute here, so
        // locators stay valid whatever the working directory of a step.
        let base = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
        let mut diags = Vec::new();
        let mut sites = BTreeMap::new();
        for (name, mut site) in raw.sites {
            validate_site(&name, &site, kinds, &mut diags);
            if let Some(p) = &site.path
                && p.is_relative()
            {
                site.path = Some(base.join(p));
            }
            for d in &mut site.allow_backing_dirs {
                if d.is_relative() {
                    *d = base.join(&*d);
                }
            }
            sites.insert(name, site);
        }
        raw.limits.validate(&sites, &mut diags);
        if sites.is_empty() {
            diags.push(
                Diagnostic::error("no sites defined (add a [sites.NAME] table)").at_key("sites"),
            );
        }
        if diags.is_empty() {
            // Whatever this process prints or stores from now on hides the
            // values of the credentials the sites file names.
            for site in sites.values() {
                if let Some(c) = &site.credentials {
                    fluidcloud_plugins::redact::register_env(
                        c.references().into_iter().map(|(_, var)| var),
                    );
                }
            }
            Ok(Self {
                path: path.to_path_buf(),
                sites,
                plugins: raw.plugins,
                limits: raw.limits,
            })
        } else {
            for d in &mut diags {
                d.file = Some(path.to_path_buf());
                if d.line.is_none()
                    && let Some(line) = d.key.as_deref().and_then(|k| tomlfile::key_line(text, k))
                {
                    d.line = Some(line);
                }
            }
            Err(Error::Config { diagnostics: diags })
        }
    }

    /// The site called `name`.
    ///
    /// # Errors
    /// `UnknownSite` listing the sites that exist.
    pub fn site(&self, name: &str) -> Result<&SiteConfig> {
        self.sites.get(name).ok_or_else(|| Error::UnknownSite {
            name: name.to_owned(),
            known: self.sites.keys().cloned().collect::<Vec<_>>().join(", "),
            file: self.path.clone(),
        })
    }
}

impl SiteConfig {
    /// The site's facts in the shared vocabulary, with the capabilities a
    /// driver detected.
    pub fn info(
        &self,
        name: &str,
        capabilities: std::collections::BTreeSet<fluidcloud_plugins::Capability>,
    ) -> fluidcloud_plugins::SiteInfo {
        fluidcloud_plugins::SiteInfo {
            name: name.to_owned(),
            kind: self.kind.clone(),
            location: self.location.clone(),
            jurisdiction: self.jurisdiction.clone(),
            cost: self.cost.clone(),
            capacity: self.capacity.clone(),
            image_formats: self.image_formats.iter().copied().collect(),
            capabilities,
            rtt_ms: None,
        }
    }
}

/// The network octets and prefix length of `a.b.c.d/8|16|24`.
pub fn parse_subnet(net: &str) -> Option<([u8; 4], u8)> {
    let (addr, len) = net.split_once('/')?;
    let addr: std::net::Ipv4Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    matches!(len, 8 | 16 | 24).then_some((addr.octets(), len))
}

/// `old` moved into `subnet`: the network octets of `subnet` and the host
/// octets of `old`. `None` when either does not parse.
pub fn move_address(old: &str, subnet: &str) -> Option<String> {
    let old: std::net::Ipv4Addr = old.parse().ok()?;
    let (net, len) = parse_subnet(subnet)?;
    let keep = usize::from(len / 8);
    let mut o = old.octets();
    o[..keep].copy_from_slice(&net[..keep]);
    Some(std::net::Ipv4Addr::from(o).to_string())
}

/// The keys of a site reached through its agent.
fn validate_agent(name: &str, site: &SiteConfig, diags: &mut Vec<Diagnostic>) {
    let key = |k: &str| format!("sites.{name}.{k}");
    if let Some(a) = &site.agent {
        let ok = url::Url::parse(a)
            .is_ok_and(|u| u.scheme() == "https" && u.host().is_some() && u.path() == "/");
        if !ok {
            diags.push(
                Diagnostic::error(format!("`{a}` is not an agent URL (https://HOST:PORT)"))
                    .at_key(key("agent")),
            );
        }
    }
    match &site.agent_fingerprint {
        None => diags.push(
            Diagnostic::error(
                "a site with `agent` needs `agent_fingerprint`, the sha256:HEX the agent printed when it started",
            )
            .at_key(format!("sites.{name}")),
        ),
        Some(f) => {
            if let Err(e) = f.parse::<fluidcloud_broker::tls::Fingerprint>() {
                diags.push(Diagnostic::error(e.to_string()).at_key(key("agent_fingerprint")));
            }
        }
    }
    if let Some(v) = &site.agent_token_env {
        let ok = !v.is_empty()
            && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !v.as_bytes()[0].is_ascii_digit();
        if !ok {
            diags.push(
                Diagnostic::error(format!(
                    "`{v}` is not an environment variable name (the token is given by variable name, never inline)"
                ))
                .at_key(key("agent_token_env")),
            );
        }
    }
    for (k, set) in [
        ("path", site.path.is_some()),
        ("uri", site.uri.is_some()),
        ("pool", site.pool.is_some()),
    ] {
        if set {
            diags.push(
                Diagnostic::error(format!(
                    "a site reached through its agent has no `{k}`: the agent's own sites file says where its data lives"
                ))
                .at_key(key(k)),
            );
        }
    }
}

fn validate_site(name: &str, site: &SiteConfig, kinds: &[&str], diags: &mut Vec<Diagnostic>) {
    let key = |k: &str| format!("sites.{name}.{k}");
    let valid_name = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if !valid_name {
        diags.push(
            Diagnostic::error(format!(
                "site name `{name}` must be 1-63 lowercase letters, digits or dashes, not starting with a dash"
            ))
            .at_key(format!("sites.{name}")),
        );
    }
    if !kinds.contains(&site.kind.as_str()) {
        diags.push(
            Diagnostic::error(format!("unknown site kind `{}`", site.kind))
                .at_key(key("kind"))
                .with_detail(format!("known kinds: {}", kinds.join(", "))),
        );
    }
    let loc = &site.location;
    if !(-90.0..=90.0).contains(&loc.latitude) {
        diags.push(
            Diagnostic::error(format!("latitude {} is outside -90..90", loc.latitude))
                .at_key(key("location.latitude")),
        );
    }
    if !(-180.0..=180.0).contains(&loc.longitude) {
        diags.push(
            Diagnostic::error(format!("longitude {} is outside -180..180", loc.longitude))
                .at_key(key("location.longitude")),
        );
    }
    if site.jurisdiction.trim().is_empty() || site.jurisdiction.split('/').any(str::is_empty) {
        diags.push(
            Diagnostic::error(format!(
                "jurisdiction `{}` must be non-empty parts separated by `/`, e.g. EU/FR",
                site.jurisdiction
            ))
            .at_key(key("jurisdiction")),
        );
    }
    let c = &site.cost;
    for (field, v) in [
        ("vcpu_hour", c.vcpu_hour),
        ("memory_gib_hour", c.memory_gib_hour),
        ("storage_gib_month", c.storage_gib_month),
        ("egress_gib", c.egress_gib),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            diags.push(
                Diagnostic::error(format!("cost must be a non-negative number, got {v}"))
                    .at_key(key(&format!("cost.{field}"))),
            );
        }
    }
    if let Some(ep) = &site.object_endpoint
        && url::Url::parse(ep)
            .map(|u| u.host_str().is_none())
            .unwrap_or(true)
    {
        diags.push(
            Diagnostic::error(format!("`{ep}` is not a URL with a host"))
                .at_key(key("object_endpoint")),
        );
    }
    if let Some(net) = &site.subnet
        && parse_subnet(net).is_none()
    {
        diags.push(
            Diagnostic::error(format!(
                "`{net}` is not an IPv4 network ending in /8, /16 or /24 (e.g. 10.30.0.0/24)"
            ))
            .at_key(key("subnet")),
        );
    }
    if let Some(u) = &site.buckets_url
        && !u.starts_with("s3://")
    {
        diags.push(
            Diagnostic::error(format!(
                "`{u}` is not an s3:// location (s3://?endpoint=http://HOST:PORT&region=REGION)"
            ))
            .at_key(key("buckets_url")),
        );
    }
    if let Some(creds) = &site.credentials {
        for (field, var) in creds.references() {
            let ok = !var.is_empty()
                && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !var.as_bytes()[0].is_ascii_digit();
            if !ok {
                diags.push(
                    Diagnostic::error(format!(
                        "`{var}` is not an environment variable name (credentials are given by variable name, never inline)"
                    ))
                    .at_key(key(&format!("credentials.{field}"))),
                );
            }
        }
    }
    if site.agent.is_some() {
        validate_agent(name, site, diags);
    } else if site.agent_fingerprint.is_some() || site.agent_token_env.is_some() {
        diags.push(
            Diagnostic::error(
                "agent_fingerprint and agent_token_env apply to a site with `agent = \"https://HOST:PORT\"`",
            )
            .at_key(format!("sites.{name}")),
        );
    }
    if site.kind == "libvirt" && site.agent.is_none() {
        match &site.uri {
            None => diags.push(
                Diagnostic::error(
                    "a libvirt site needs `uri`, e.g. qemu:///system or qemu+ssh://host/system",
                )
                .at_key(format!("sites.{name}")),
            ),
            Some(u) if url::Url::parse(u).is_err() || !u.contains(":/") => diags.push(
                Diagnostic::error(format!(
                    "`{u}` is not a libvirt URI (e.g. qemu:///system, qemu+ssh://host/system)"
                ))
                .at_key(key("uri")),
            ),
            Some(_) => {}
        }
        match &site.pool {
            None => diags.push(
                Diagnostic::error("a libvirt site needs `pool`, the storage pool of its disks")
                    .at_key(format!("sites.{name}")),
            ),
            Some(p) if p.is_empty() || p.contains(['/', ' ']) => diags.push(
                Diagnostic::error(format!("`{p}` is not a storage pool name")).at_key(key("pool")),
            ),
            Some(_) => {}
        }
        if let Some(p) = &site.domain_prefix
            && !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            diags.push(
                Diagnostic::error(format!(
                    "`{p}` is not a domain-name prefix (letters, digits, `-`, `_`, `.`)"
                ))
                .at_key(key("domain_prefix")),
            );
        }
    } else {
        for (k, set) in [
            ("uri", site.uri.is_some()),
            ("pool", site.pool.is_some()),
            ("domain_prefix", site.domain_prefix.is_some()),
            ("shutdown_timeout_s", site.shutdown_timeout_s.is_some()),
            // A local site's guest appliance runs with it too.
            ("accel", site.accel.is_some() && site.agent.is_some()),
        ] {
            let agent = site.agent.is_some();
            if set && agent && !matches!(k, "uri" | "pool") {
                diags.push(
                    Diagnostic::error(format!(
                        "`{k}` belongs in the agent's own sites file: a site reached through its agent is configured there"
                    ))
                    .at_key(key(k)),
                );
            } else if set && !agent {
                diags.push(
                    Diagnostic::error(format!("`{k}` applies to libvirt sites only"))
                        .at_key(key(k)),
                );
            }
        }
    }
    if let Some(a) = &site.accel
        && site.agent.is_none()
        && !["auto", "kvm", "tcg"].contains(&a.as_str())
    {
        diags.push(
            Diagnostic::error(format!("unknown accel `{a}` (auto, kvm or tcg)"))
                .at_key(key("accel")),
        );
    }
    if let Some(a) = &site.adapt {
        if let Some(bus) = &a.disk_bus
            && !DISK_BUSES.contains(&bus.as_str())
        {
            diags.push(
                Diagnostic::error(format!(
                    "unknown disk bus `{bus}` (one of {})",
                    DISK_BUSES.join(", ")
                ))
                .at_key(key("adapt.disk_bus")),
            );
        }
        for (table, map) in [("networks", &a.networks), ("bridges", &a.bridges)] {
            for (from, to) in map {
                if from.is_empty() || to.is_empty() {
                    diags.push(
                        Diagnostic::error(format!("empty name in `{from}` = `{to}`"))
                            .at_key(key(&format!("adapt.{table}"))),
                    );
                }
            }
        }
    }
    if let Some(b) = &site.boot_check {
        match regex::Regex::new(&b.console) {
            Err(e) => diags.push(
                Diagnostic::error(format!("`{}` is not a regular expression: {e}", b.console))
                    .at_key(key("boot_check.console")),
            ),
            Ok(re) if re.captures_len() > 2 => diags.push(
                Diagnostic::error("a boot check regex has at most one capture group")
                    .at_key(key("boot_check.console")),
            ),
            Ok(_) => {}
        }
        if b.timeout_s == 0 {
            diags.push(
                Diagnostic::error("timeout_s must be at least 1")
                    .at_key(key("boot_check.timeout_s")),
            );
        }
    }
    if site.kind == "local" && site.path.is_none() && site.agent.is_none() {
        diags.push(
            Diagnostic::error("a local site needs `path`, the site's directory")
                .at_key(format!("sites.{name}")),
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KINDS: &[&str] = &["local"];

    fn good() -> String {
        r#"
[sites.dc-paris]
kind = "local"
path = "sites/paris"
jurisdiction = "EU/FR"
image_formats = ["qcow2", "raw"]
location = { region = "fr-idf", latitude = 48.86, longitude = 2.35 }
cost = { vcpu_hour = 0.03, egress_gib = 0.01 }
credentials = { access_key_id_env = "PARIS_KEY" }
"#
        .to_owned()
    }

    #[test]
    fn parses_and_resolves_relative_paths() {
        let f = SitesFile::parse(Path::new("/etc/fc/fluidcloud.toml"), &good(), KINDS).unwrap();
        let s = f.site("dc-paris").unwrap();
        assert_eq!(s.path.as_deref(), Some(Path::new("/etc/fc/sites/paris")));
        assert_eq!(s.image_formats, vec![ImageFormat::Qcow2, ImageFormat::Raw]);
        assert_eq!(s.cost.currency, "EUR");
        let err = f.site("nope").unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("dc-paris"), "{err}");
        // A sites file named relative to the working directory still gives
        // absolute site paths.
        let f = SitesFile::parse(Path::new("fluidcloud.toml"), &good(), KINDS).unwrap();
        let p = f.site("dc-paris").unwrap().path.clone().unwrap();
        assert_eq!(p, std::env::current_dir().unwrap().join("sites/paris"));
    }

    #[test]
    fn limits_name_their_scopes_and_bad_ones_name_their_key() {
        let text = format!(
            "{}\n[limits]\nrunning = 8\nper_site = 3\nper_pair = 2\nsites = {{ dc-paris = 1 }}\n",
            good()
        );
        let f = SitesFile::parse(Path::new("f.toml"), &text, KINDS).unwrap();
        let sites = ["dc-paris".to_owned(), "edge".to_owned()];
        assert_eq!(
            f.limits.scopes(&sites),
            [
                ("global".to_owned(), 8),
                ("site:dc-paris".to_owned(), 1),
                ("pair:dc-paris>edge".to_owned(), 2),
                ("site:edge".to_owned(), 3),
                ("pair:edge>dc-paris".to_owned(), 2),
            ]
        );
        for (bad, key) in [
            ("per_pair = 0", "limits.per_pair"),
            ("sites = { nowhere = 2 }", "limits.sites.nowhere"),
        ] {
            let text = format!("{}\n[limits]\n{bad}\n", good());
            let Err(Error::Config { diagnostics }) =
                SitesFile::parse(Path::new("f.toml"), &text, KINDS)
            else {
                panic!("accepted {bad}")
            };
            assert_eq!(diagnostics[0].key.as_deref(), Some(key), "{bad}");
            assert!(diagnostics[0].line.is_some(), "{bad}: {:?}", diagnostics[0]);
        }
    }

    #[test]
    fn inline_secret_is_rejected_with_its_key() {
        let text = good().replace(
            "credentials = { access_key_id_env = \"PARIS_KEY\" }",
            "credentials = { secret_access_key = \"hunter2\" }",
        );
        let Err(Error::Config { diagnostics }) =
            SitesFile::parse(Path::new("f.toml"), &text, KINDS)
        else {
            panic!("accepted an inline secret")
        };
        assert_eq!(
            diagnostics[0].key.as_deref(),
            Some("sites.dc-paris.credentials.secret_access_key")
        );
        assert_eq!(diagnostics[0].line, Some(9));
    }

    #[test]
    fn semantic_errors_are_all_reported_with_lines() {
        let text = good()
            .replace("kind = \"local\"", "kind = \"floppy\"")
            .replace("latitude = 48.86", "latitude = 148.86")
            .replace("\"EU/FR\"", "\"EU//FR\"")
            .replace("PARIS_KEY", "my secret");
        let Err(Error::Config { diagnostics }) =
            SitesFile::parse(Path::new("f.toml"), &text, KINDS)
        else {
            panic!("accepted invalid sites")
        };
        let keys: Vec<_> = diagnostics.iter().map(|d| d.key.clone().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "sites.dc-paris.kind",
                "sites.dc-paris.location.latitude",
                "sites.dc-paris.jurisdiction",
                "sites.dc-paris.credentials.access_key_id_env",
            ]
        );
        assert_eq!(diagnostics[0].line, Some(3));
        assert!(diagnostics[0].detail.as_deref().unwrap().contains("local"));
        assert!(
            diagnostics
                .iter()
                .all(|d| d.file.as_deref() == Some(Path::new("f.toml")))
        );
    }

    #[test]
    fn local_site_without_path_and_empty_file_are_errors() {
        let text = good().replace("path = \"sites/paris\"\n", "");
        let e = SitesFile::parse(Path::new("f.toml"), &text, KINDS).unwrap_err();
        assert!(e.to_string().contains("needs `path`"), "{e}");
        let e = SitesFile::parse(Path::new("f.toml"), "", KINDS).unwrap_err();
        assert!(e.to_string().contains("no sites"), "{e}");
    }

    const LV: &[&str] = &["local", "libvirt"];

    fn libvirt(extra: &str) -> String {
        format!(
            r#"[sites.kvm]
kind = "libvirt"
jurisdiction = "EU/FR"
location = {{ region = "r", latitude = 1.0, longitude = 2.0 }}
{extra}
"#
        )
    }

    fn keys(text: &str) -> Vec<(String, Option<u32>)> {
        match SitesFile::parse(Path::new("f.toml"), text, LV) {
            Err(Error::Config { diagnostics }) => diagnostics
                .into_iter()
                .map(|d| (d.key.unwrap_or_default(), d.line))
                .collect(),
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn a_libvirt_site_parses_with_its_mapping_and_boot_check() {
        let text = libvirt(
            r#"uri = "qemu+ssh://ops@host/system"
pool = "default"
domain_prefix = "fc-"
accel = "tcg"
boot_check = { console = "SUM ([0-9a-f]+)", timeout_s = 60 }
adapt = { networks = { default = "prod" }, bridges = { br0 = "br1" }, mac = "generate", disk_bus = "sata" }"#,
        );
        let f = SitesFile::parse(Path::new("f.toml"), &text, LV).unwrap();
        let s = f.site("kvm").unwrap();
        let a = s.adapt.as_ref().unwrap();
        assert_eq!(a.mac, MacPolicy::Generate);
        assert_eq!(a.networks["default"], "prod");
        assert_eq!(s.boot_check.as_ref().unwrap().timeout_s, 60);
    }

    #[test]
    fn libvirt_keys_are_checked_and_named_with_their_lines() {
        assert_eq!(
            keys(&libvirt("")),
            [
                ("sites.kvm".to_owned(), Some(1)),
                ("sites.kvm".to_owned(), Some(1))
            ]
        );
        let bad = libvirt(
            r#"uri = "not a uri"
pool = "a/b"
accel = "warp"
boot_check = { console = "(unclosed" }
adapt = { disk_bus = "usb", mac = "keep" }"#,
        );
        let k: Vec<String> = keys(&bad).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            k,
            [
                "sites.kvm.uri",
                "sites.kvm.pool",
                "sites.kvm.accel",
                "sites.kvm.adapt.disk_bus",
                "sites.kvm.boot_check.console",
            ]
        );
        // Unknown keys in the mapping are refused with their line.
        let typo = libvirt("uri = \"qemu:///system\"\npool = \"p\"\nadapt = { macs = \"keep\" }");
        let k = keys(&typo);
        assert!(k[0].0.contains("macs"), "{k:?}");
        assert_eq!(k[0].1, Some(7));
        // libvirt keys on a local site are errors.
        let local = good().replace("path = \"sites/paris\"", "path = \"p\"\npool = \"x\"");
        let k: Vec<String> = keys(&local).into_iter().map(|(k, _)| k).collect();
        assert_eq!(k, ["sites.dc-paris.pool"]);
    }

    #[test]
    fn missing_credential_variable_names_site_key_and_variable() {
        let c = Credentials {
            access_key_id_env: Some("FC_TEST_SURELY_UNSET_VAR".into()),
            ..Credentials::default()
        };
        let e = c.resolve("dc-paris").unwrap_err().to_string();
        assert!(e.contains("FC_TEST_SURELY_UNSET_VAR"), "{e}");
        assert!(
            e.contains("sites.dc-paris.credentials.access_key_id_env"),
            "{e}"
        );
    }
}
