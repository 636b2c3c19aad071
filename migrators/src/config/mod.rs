//! Configuration adaptation: rewriting a service's config files so that
//! every reference to the old site points at the new one.
//!
//! Two kinds of edits, both applied by [`adapt`]:
//!
//! - The [`EndpointMap`] that placement produces (old host, IP, URL,
//!   bucket, path → new), applied to *values* only: in YAML, JSON, TOML,
//!   INI and `.env` files to string scalars, never to keys or comments; in
//!   plain text (nginx.conf and the like) to every line, with token
//!   boundaries so a host never matches inside a longer name.
//! - Explicit [`Rule`]s: set or replace the value at a key path, or
//!   rewrite whole lines matching an anchored pattern. A rule that finds
//!   nothing is an error naming the file and the key or pattern.
//!
//! ## Why edit spans rather than re-serialize
//!
//! Operators read these files. Loading a YAML file into a tree and dumping
//! it again drops comments, reorders keys and re-quotes values, so the
//! diff of a relocation would bury its three real changes in noise — and
//! a reviewer would have to trust it. Each format therefore has a small
//! span-locating parser (`yaml-rust2`'s event parser with markers,
//! `toml_edit`'s spanned document, a scanner for JSON validated by
//! `serde_json`, line parsers for INI and `.env`) that gives every scalar's
//! key path and byte span; new tokens are spliced into those spans and all
//! other bytes stay as they were. The result is parsed again and every
//! value must read back as intended before anything is written.
//!
//! [`unified_diff`] shows what a run would change; [`write_atomic`]
//! replaces a file without a window where it is half written;
//! [`leftovers`] lists references to old endpoints that remain, which is
//! how verification checks that the new config resolves to the new site.
//! [`ConfigAdapt`] is the `config-adapt` migrator built on them.

mod adapt;
pub mod error;
mod fs;
mod json;
mod leaf;
mod lines;
mod map;
mod migrator;
mod rules;
mod toml;
mod yaml;

use std::fmt;
use std::path::Path;

use fluidcloud_plugins::ConfigFormat;
use serde::{Deserialize, Serialize};

pub use adapt::{Adapted, Change, Leftover};
pub use error::{Error, Result};
pub use fs::{DEFAULT_MODE, unified_diff, write_atomic, write_atomic_mode};
pub use map::{EndpointMap, Entry, EntryKind};
pub use migrator::ConfigAdapt;
pub use rules::{Action, Rule};

/// The syntax of a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// YAML (one or several documents).
    Yaml,
    /// JSON.
    Json,
    /// TOML.
    Toml,
    /// INI-style `key = value` with optional `[sections]`.
    Ini,
    /// Shell-style `KEY=value`.
    Env,
    /// Anything else: edited line by line.
    Text,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Yaml => "YAML",
            Self::Json => "JSON",
            Self::Toml => "TOML",
            Self::Ini => "INI",
            Self::Env => ".env",
            Self::Text => "text",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "yaml" | "yml" => Ok(Self::Yaml),
            "json" => Ok(Self::Json),
            "toml" => Ok(Self::Toml),
            "ini" => Ok(Self::Ini),
            "env" | "dotenv" => Ok(Self::Env),
            "text" | "plain" => Ok(Self::Text),
            other => Err(format!(
                "unknown config format `{other}` (yaml, json, toml, ini, env, text)"
            )),
        }
    }
}

impl From<ConfigFormat> for Format {
    fn from(f: ConfigFormat) -> Self {
        match f {
            ConfigFormat::Yaml => Self::Yaml,
            ConfigFormat::Json => Self::Json,
            ConfigFormat::Toml => Self::Toml,
            ConfigFormat::Ini => Self::Ini,
            ConfigFormat::Env => Self::Env,
            ConfigFormat::Text => Self::Text,
        }
    }
}

impl From<Format> for ConfigFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Yaml => Self::Yaml,
            Format::Json => Self::Json,
            Format::Toml => Self::Toml,
            Format::Ini => Self::Ini,
            Format::Env => Self::Env,
            Format::Text => Self::Text,
        }
    }
}

impl Format {
    /// The format of a file, from its name as introspection guesses it
    /// ([`ConfigFormat::from_file_name`], so both agree), refined by its
    /// content: a `.conf`/`.cfg` file that does not read as INI (nginx
    /// style blocks) is plain text, and a file of unknown type that parses
    /// as a JSON object is JSON.
    pub fn detect(path: &Path, content: &str) -> Self {
        let name = path.to_string_lossy();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut format = Self::from(ConfigFormat::from_file_name(&name));
        if file_name.starts_with(".env") {
            format = Self::Env;
        }
        match format {
            Self::Ini if lines::ini_leaves("", content).is_err() => Self::Text,
            Self::Text
                if content.trim_start().starts_with('{')
                    && serde_json::from_str::<serde_json::Value>(content).is_ok() =>
            {
                Self::Json
            }
            f => f,
        }
    }
}

/// Adapts the text of one configuration file: applies the `rules` that
/// [apply](Rule::applies_to) to `file` (others are ignored) and the
/// endpoint map, editing values in place so everything else stays
/// byte-for-byte. `file` names the file in messages and selects the rules.
/// Applying it again to its own result changes nothing.
///
/// # Errors
/// [`Error::Parse`] when `content` is not valid in `format`;
/// [`Error::KeyNotFound`], [`Error::PatternNotFound`] or
/// [`Error::ReplaceNotFound`] when an explicit rule finds nothing;
/// [`Error::NotEditable`] when a value cannot be rewritten safely;
/// [`Error::Broken`] when the result would not parse or read back;
/// [`Error::Invalid`] for a malformed map or rule.
pub fn adapt(
    file: &str,
    content: &str,
    format: Format,
    map: &EndpointMap,
    rules: &[Rule],
) -> Result<Adapted> {
    adapt::adapt(file, content, format, map, rules)
}

/// References to the map's old endpoints still present in the values of a
/// file (every line of a plain text file). Empty means every reference the
/// map knows has been moved to the new site.
///
/// # Errors
/// [`Error::Parse`] naming `file` when `content` is not valid in `format`.
pub fn leftovers(
    file: &str,
    content: &str,
    format: Format,
    map: &EndpointMap,
) -> Result<Vec<Leftover>> {
    adapt::leftovers(file, content, format, map)
}

/// The checksum of a file's content as artifacts carry it:
/// `sha256:<hex>`.
pub fn checksum(content: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(content);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_by_name_then_content() {
        let d = |p: &str, c: &str| Format::detect(Path::new(p), c);
        assert_eq!(d("/c/app.yaml", ""), Format::Yaml);
        assert_eq!(d("/c/.env", "A=1\n"), Format::Env);
        assert_eq!(d("/c/.env.production", "A=1\n"), Format::Env);
        assert_eq!(d("/c/site.env", "A=1\n"), Format::Env);
        assert_eq!(d("/c/postgresql.conf", "port = 5432 # x\n"), Format::Ini);
        assert_eq!(d("/c/nginx.conf", "a = b\n"), Format::Text);
        assert_eq!(
            d("/c/site.conf", "server {\n listen 80;\n}\n"),
            Format::Text
        );
        assert_eq!(d("/c/settings", "{\"a\": 1}"), Format::Json);
        assert_eq!(d("/c/README", "hello"), Format::Text);
        assert_eq!("YML".parse::<Format>(), Ok(Format::Yaml));
        assert!("xml".parse::<Format>().is_err());
        assert_eq!(
            checksum(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
