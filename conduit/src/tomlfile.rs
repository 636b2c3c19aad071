//! Typed TOML files with errors that name the file, the line and the key.
//!
//! Every TOML file fluidcloud reads (the sites file, instance manifests,
//! service manifests) goes through [`parse`], which deserializes with
//! `deny_unknown_fields` types and turns any failure into a [`Diagnostic`]
//! carrying the file, the 1-based line and the dotted key path. Semantic
//! checks done after parsing use [`key_line`] to point at the same places.

use std::path::Path;

use fluidcloud_plugins::Diagnostic;
use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

/// Parses `text` (read from `file`) into `T`.
///
/// # Errors
/// A diagnostic naming the file, line and key path of the first problem.
pub fn parse<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, Diagnostic> {
    let de = toml::Deserializer::parse(text).map_err(|e| to_diag(file, text, "", &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        to_diag(file, text, &key, e.inner())
    })
}

fn to_diag(file: &Path, text: &str, key: &str, e: &toml::de::Error) -> Diagnostic {
    let mut d = Diagnostic::error(e.message().trim().to_owned()).in_file(file);
    let line = e
        .span()
        .map(|s| line_of(text, s.start))
        .or_else(|| (!key.is_empty()).then(|| key_line(text, key)).flatten());
    if let Some(line) = line {
        d = d.at_line(line);
    }
    if !key.is_empty() {
        d = d.at_key(key);
    }
    d
}

/// 1-based line number of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> u32 {
    let upto = text.get(..offset.min(text.len())).unwrap_or(text);
    u32::try_from(upto.bytes().filter(|&b| b == b'\n').count() + 1).unwrap_or(u32::MAX)
}

/// Line where the dotted `key` (e.g. `sites.dc-paris.kind`) is defined, or
/// the nearest enclosing table that exists. `None` when the text does not
/// parse or not even the first segment exists.
pub fn key_line(text: &str, key: &str) -> Option<u32> {
    let root = DeTable::parse(text).ok()?;
    let mut table: &DeTable<'_> = root.get_ref();
    let mut best = None;
    for segment in key.split('.') {
        let (k, v) = table.get_key_value(segment)?;
        best = Some(line_of(text, k.span().start));
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[allow(dead_code)]
        sites: std::collections::BTreeMap<String, Entry>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        #[allow(dead_code)]
        kind: String,
        #[allow(dead_code)]
        #[serde(default)]
        size: u32,
    }

    #[test]
    fn unknown_key_names_file_line_and_path() {
        let text = "[sites.a]\nkind = \"local\"\n\n[sites.b]\nkind = \"local\"\ncolour = \"red\"\n";
        let d = parse::<File>(Path::new("f.toml"), text).unwrap_err();
        assert_eq!(d.file.as_deref(), Some(Path::new("f.toml")));
        assert_eq!(d.line, Some(6), "{d}");
        assert_eq!(d.key.as_deref(), Some("sites.b.colour"), "{d}");
        assert!(d.summary.contains("colour"), "{d}");
    }

    #[test]
    fn wrong_type_and_syntax_errors_have_lines() {
        let text = "[sites.a]\nkind = \"local\"\nsize = \"big\"\n";
        let d = parse::<File>(Path::new("f.toml"), text).unwrap_err();
        assert_eq!(d.line, Some(3), "{d}");
        assert_eq!(d.key.as_deref(), Some("sites.a.size"));

        let d = parse::<File>(Path::new("f.toml"), "[sites.a]\nkind = \n").unwrap_err();
        assert_eq!(d.line, Some(2), "{d}");
    }

    #[test]
    fn missing_field_points_at_its_table() {
        let text = "[sites.a]\nkind = \"local\"\n[sites.b]\nsize = 1\n";
        let d = parse::<File>(Path::new("f.toml"), text).unwrap_err();
        assert!(d.summary.contains("kind"), "{d}");
        assert_eq!(d.key.as_deref(), Some("sites.b"), "{d}");
        assert_eq!(d.line, Some(3), "{d}");
    }

    #[test]
    fn key_line_walks_nested_tables() {
        let text = "top = 1\n[sites.x]\nkind = \"local\"\n[sites.x.cost]\negress = 1\n";
        assert_eq!(key_line(text, "sites.x.kind"), Some(3));
        assert_eq!(key_line(text, "sites.x.cost.egress"), Some(5));
        assert_eq!(key_line(text, "nope"), None);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }
}
