//! Resources: the parts of a service that a relocation moves or adapts.
//!
//! Every resource has a stable id of the form `kind:name` (for example
//! `instance:web`, `volume:db-data`, `endpoint:host:db.shop.internal`).
//! Ids are derived from what the resource *is*, never from discovery order,
//! so two introspections of the same site give the same ids and a declared
//! manifest can name resources before they are discovered.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The kinds of resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    /// A virtual machine (or container-like instance).
    Instance,
    /// A block volume attached to an instance.
    Volume,
    /// A disk image an instance boots from.
    Image,
    /// An object-storage bucket.
    Bucket,
    /// A configuration file of the service.
    ConfigFile,
    /// Something a config file points at: host, IP address, URL or bucket name.
    Endpoint,
}

impl ResourceKind {
    /// The id prefix and display name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Instance => "instance",
            Self::Volume => "volume",
            Self::Image => "image",
            Self::Bucket => "bucket",
            Self::ConfigFile => "config",
            Self::Endpoint => "endpoint",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Stable id of a resource: `kind:name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct ResourceId(String);

impl ResourceId {
    /// The id of the resource of `kind` called `name`.
    pub fn new(kind: ResourceKind, name: &str) -> Self {
        Self(format!("{}:{name}", kind.as_str()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The kind encoded in the id.
    pub fn kind(&self) -> Option<ResourceKind> {
        let prefix = self.0.split_once(':')?.0;
        [
            ResourceKind::Instance,
            ResourceKind::Volume,
            ResourceKind::Image,
            ResourceKind::Bucket,
            ResourceKind::ConfigFile,
            ResourceKind::Endpoint,
        ]
        .into_iter()
        .find(|k| k.as_str() == prefix)
    }

    /// The name part (after the first `:`).
    pub fn name(&self) -> &str {
        self.0.split_once(':').map_or(self.0.as_str(), |(_, n)| n)
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ResourceId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let id = Self(s.to_owned());
        match (id.kind(), id.name().is_empty()) {
            (Some(_), false) => Ok(id),
            _ => Err(format!(
                "`{s}` is not a resource id (expected KIND:NAME with KIND one of \
                 instance, volume, image, bucket, config, endpoint)"
            )),
        }
    }
}

/// Disk image container formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Plain bytes, possibly sparse.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk.
    Vmdk,
    /// Microsoft Virtual Hard Disk (v1).
    Vhd,
    /// Microsoft Hyper-V virtual hard disk v2.
    Vhdx,
}

impl ImageFormat {
    /// Every format.
    pub const ALL: [ImageFormat; 5] = [Self::Raw, Self::Qcow2, Self::Vmdk, Self::Vhd, Self::Vhdx];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
            Self::Vmdk => "vmdk",
            Self::Vhd => "vhd",
            Self::Vhdx => "vhdx",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ImageFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown image format `{s}` (known: raw, qcow2, vmdk, vhd, vhdx)")
            })
    }
}

/// Syntax of a configuration file, which decides how it is read and edited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum ConfigFormat {
    /// YAML.
    Yaml,
    /// JSON.
    Json,
    /// TOML.
    Toml,
    /// INI-style `key = value` with optional `[sections]`.
    Ini,
    /// Shell-style `KEY=value` environment file.
    Env,
    /// Anything else: scanned as text.
    Text,
}

impl ConfigFormat {
    /// Guesses the format from a file name.
    pub fn from_file_name(name: &str) -> Self {
        let lower = name.to_ascii_lowercase();
        let ext = lower.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
        match ext {
            "yaml" | "yml" => Self::Yaml,
            "json" => Self::Json,
            "toml" => Self::Toml,
            "ini" | "cfg" | "conf" if !lower.ends_with("nginx.conf") => Self::Ini,
            "env" => Self::Env,
            _ if lower == ".env" || lower.ends_with("/.env") => Self::Env,
            _ => Self::Text,
        }
    }
}

/// What an endpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum EndpointKind {
    /// A DNS host name.
    Host,
    /// An IPv4 or IPv6 address.
    Ip,
    /// A URL.
    Url,
    /// A bucket name.
    Bucket,
}

impl EndpointKind {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Ip => "ip",
            Self::Url => "url",
            Self::Bucket => "bucket",
        }
    }
}

/// Kind-specific facts about a resource.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ResourceSpec {
    /// A virtual machine.
    Instance {
        /// Number of virtual CPUs.
        vcpus: u32,
        /// Memory in MiB.
        memory_mib: u64,
        /// `running` or `stopped`.
        state: String,
        /// Host name the service's other parts use to reach it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
        /// Addresses it answers on.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        addresses: Vec<String>,
        /// What introspection found inside its boot disk, when it looked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest: Option<GuestFacts>,
    },
    /// A block volume.
    Volume {
        /// Container format of the volume's backing file.
        format: ImageFormat,
        /// Size the guest sees, in bytes.
        virtual_size: u64,
        /// Bytes actually allocated on the site.
        allocated: u64,
        /// Where it lives on the site (path or driver-specific locator).
        locator: String,
    },
    /// A disk image.
    Image {
        /// Container format.
        format: ImageFormat,
        /// Size the guest sees, in bytes.
        virtual_size: u64,
        /// Bytes actually allocated on the site.
        allocated: u64,
        /// Where it lives on the site.
        locator: String,
        /// Backing file, for images in a chain.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backing: Option<String>,
    },
    /// An object-storage bucket.
    Bucket {
        /// Number of objects.
        objects: u64,
        /// Sum of object sizes in bytes.
        bytes: u64,
    },
    /// A configuration file.
    ConfigFile {
        /// Its syntax.
        format: ConfigFormat,
        /// Path relative to the site's config root; inside a guest, its
        /// absolute path there.
        path: String,
        /// Size in bytes.
        bytes: u64,
        /// The instance whose disk holds it, for a file inside a guest
        /// (it moves with the disk and is adapted there).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest: Option<String>,
    },
    /// A reference found in configuration.
    Endpoint {
        /// What the value is.
        endpoint: EndpointKind,
        /// The value as written in the config.
        value: String,
        /// True when it resolves to nothing of the service (a public URL the
        /// service only points at, declared external).
        external: bool,
    },
}

impl ResourceSpec {
    /// The kind of resource this spec describes.
    pub fn kind(&self) -> ResourceKind {
        match self {
            Self::Instance { .. } => ResourceKind::Instance,
            Self::Volume { .. } => ResourceKind::Volume,
            Self::Image { .. } => ResourceKind::Image,
            Self::Bucket { .. } => ResourceKind::Bucket,
            Self::ConfigFile { .. } => ResourceKind::ConfigFile,
            Self::Endpoint { .. } => ResourceKind::Endpoint,
        }
    }

    /// Bytes a relocation has to move for this resource (allocated data).
    pub fn bytes_to_move(&self) -> u64 {
        match self {
            Self::Volume { allocated, .. } | Self::Image { allocated, .. } => *allocated,
            Self::Bucket { bytes, .. } | Self::ConfigFile { bytes, .. } => *bytes,
            Self::Instance { .. } | Self::Endpoint { .. } => 0,
        }
    }
}

/// What introspection found inside an instance's boot disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GuestFacts {
    /// The operating system family (`linux`); empty when no root was found.
    pub os: String,
    /// Its root filesystem, e.g. `partition 1 (ext4)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// Why nothing inside it can be read or adapted, when so (an encrypted
    /// or unrecognised filesystem).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One resource of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Resource {
    /// Stable id, `kind:name`.
    pub id: ResourceId,
    /// Human name (the part after `kind:`).
    pub name: String,
    /// Kind-specific facts.
    pub spec: ResourceSpec,
    /// Where the resource came from: `discovered` or `declared`.
    pub origin: Origin,
}

/// How a resource became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Seen on the live site.
    Discovered,
    /// Declared in a service manifest only.
    Declared,
    /// Both declared and seen.
    Both,
}

impl Resource {
    /// A resource named `name` with `spec`; the id follows from both.
    pub fn new(name: impl Into<String>, spec: ResourceSpec, origin: Origin) -> Self {
        let name = name.into();
        Self {
            id: ResourceId::new(spec.kind(), &name),
            name,
            spec,
            origin,
        }
    }

    /// The endpoint resource for a value found in configuration.
    pub fn endpoint(endpoint: EndpointKind, value: &str, external: bool) -> Self {
        Self::new(
            format!("{}:{value}", endpoint.as_str()),
            ResourceSpec::Endpoint {
                endpoint,
                value: value.to_owned(),
                external,
            },
            Origin::Discovered,
        )
    }

    /// The kind of this resource.
    pub fn kind(&self) -> ResourceKind {
        self.spec.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_kind_colon_name_and_parse_back() {
        let id = ResourceId::new(ResourceKind::ConfigFile, "shop/app.yaml");
        assert_eq!(id.as_str(), "config:shop/app.yaml");
        assert_eq!(id.kind(), Some(ResourceKind::ConfigFile));
        assert_eq!(id.name(), "shop/app.yaml");
        assert_eq!("config:shop/app.yaml".parse::<ResourceId>().unwrap(), id);
        let e = Resource::endpoint(EndpointKind::Url, "https://a.example/x", true);
        assert_eq!(e.id.as_str(), "endpoint:url:https://a.example/x");
        assert_eq!(e.id.name(), "url:https://a.example/x");
        assert!("disk:x".parse::<ResourceId>().is_err());
        assert!("volume:".parse::<ResourceId>().is_err());
    }

    #[test]
    fn config_format_follows_the_extension() {
        assert_eq!(ConfigFormat::from_file_name("app.YAML"), ConfigFormat::Yaml);
        assert_eq!(ConfigFormat::from_file_name("shop/.env"), ConfigFormat::Env);
        assert_eq!(ConfigFormat::from_file_name("prod.env"), ConfigFormat::Env);
        assert_eq!(ConfigFormat::from_file_name("pg.conf"), ConfigFormat::Ini);
        assert_eq!(
            ConfigFormat::from_file_name("web/nginx.conf"),
            ConfigFormat::Text
        );
        assert_eq!(ConfigFormat::from_file_name("README"), ConfigFormat::Text);
    }

    #[test]
    fn image_format_parses_case_insensitively() {
        assert_eq!("QCOW2".parse::<ImageFormat>().unwrap(), ImageFormat::Qcow2);
        assert!(
            "qcow3"
                .parse::<ImageFormat>()
                .unwrap_err()
                .contains("qcow3")
        );
    }

    #[test]
    fn spec_serializes_with_a_kind_tag() {
        let r = Resource::new(
            "media",
            ResourceSpec::Bucket {
                objects: 3,
                bytes: 10,
            },
            Origin::Discovered,
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["spec"]["kind"], "bucket");
        assert_eq!(v["id"], "bucket:media");
        assert_eq!(r.spec.bytes_to_move(), 10);
    }
}
