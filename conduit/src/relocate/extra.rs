//! Steps a service manifest adds to its relocations: a database dump and
//! restore, a DNS cut-over, anything a migrator (built in or a plugin)
//! does that fluidcloud cannot infer from the topology.
//!
//! ```toml
//! [[steps]]
//! name = "orders-db"              # the workflow step is `step:orders-db`
//! migrator = "sqlite-dump"        # a built-in or a discovered plugin
//! phase = "downtime"              # copy (default) | downtime | after-cutover
//! instance = "db"                 # whose target site ${target_*} means
//! [steps.inputs.db]
//! kind = "volume"                 # volume, bucket, config-file, instance, disk-image:FORMAT
//! locator = "${source_root}/data/orders.sqlite"
//! [steps.params]
//! to = "${target_root}/data/orders.sqlite"
//! ```
//!
//! Phases: `copy` steps run with the data copies, while the source still
//! runs, and `verify` waits for them; `downtime` steps run after the source
//! stopped and before `cutover` (a consistent database dump); `after-cutover`
//! steps run once the target serves (a DNS change).
//!
//! Strings in `params` and input locators may use `${source_root}`,
//! `${target_root}` (site directories), `${source_site}`, `${target_site}`,
//! `${service}` and `${relocation}`. Every step also gets `site` (the
//! target site) and `endpoint_map` (`[{kind, from, to}]`, as `config-adapt`
//! takes it) in its params unless the manifest sets them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fluidcloud_plugins::{ArtifactKind, Diagnostic};
use fluidcloud_viaduct::{StepSpec, WorkflowDef};
use serde::{Deserialize, Serialize};

use super::given;
use crate::error::{Error, Result};

/// When a manifest step runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// With the data copies, before `verify`.
    #[default]
    Copy,
    /// After `stop-source`, before `cutover`.
    Downtime,
    /// After `cutover`.
    AfterCutover,
}

/// One input artifact of a manifest step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestInput {
    /// `volume`, `bucket`, `config-file`, `instance`, `endpoint-map` or
    /// `disk-image:FORMAT`.
    pub kind: String,
    /// Where it is (placeholders allowed).
    pub locator: String,
    /// `source` (default) or `target`: which site the artifact is on.
    #[serde(default)]
    pub at: Option<String>,
}

/// A step declared in a service manifest's `[[steps]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestStep {
    /// Its name; the workflow step is `step:NAME`.
    pub name: String,
    /// The migrator to run.
    pub migrator: String,
    /// When it runs.
    #[serde(default)]
    pub phase: Phase,
    /// The instance whose target site the step works on (default: the
    /// relocation's first target).
    #[serde(default)]
    pub instance: Option<String>,
    /// Named input artifacts.
    #[serde(default)]
    pub inputs: BTreeMap<String, ManifestInput>,
    /// Migrator parameters.
    #[serde(default)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// What [`add_steps`] needs to know about the relocation.
pub(crate) struct Context<'a> {
    pub manifest: &'a Path,
    pub service: &'a str,
    pub relocation: &'a str,
    pub from: &'a str,
    /// The source site's directory, when it has one here.
    pub from_root: Option<PathBuf>,
    /// Target site per instance name.
    pub instance_targets: BTreeMap<String, String>,
    /// The relocation's first target site.
    pub primary: &'a str,
    /// Site directory of each target that has one here.
    pub roots: BTreeMap<String, PathBuf>,
    /// The endpoint map, as `config-adapt` takes it.
    pub endpoint_map: serde_json::Value,
}

const PLACEHOLDERS: &[&str] = &[
    "source_root",
    "target_root",
    "source_site",
    "target_site",
    "service",
    "relocation",
];

fn error(ctx: &Context<'_>, key: String, msg: String) -> Error {
    Error::Config {
        diagnostics: vec![Diagnostic::error(msg).in_file(ctx.manifest).at_key(key)],
    }
}

/// `text` with every `${name}` replaced by `values[name]`.
fn expand(text: &str, values: &BTreeMap<&str, String>) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`${{` without a closing `}}` in {text:?}"))?;
        let name = &after[..end];
        let value = values.get(name).ok_or_else(|| {
            if PLACEHOLDERS.contains(&name) {
                return format!(
                    "${{{name}}} has no value here: that site keeps no directory on this machine"
                );
            }
            format!(
                "unknown placeholder ${{{name}}} (known: {})",
                PLACEHOLDERS
                    .iter()
                    .map(|p| format!("${{{p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        out.push_str(value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands placeholders in every string of `v`; errors name the key path.
fn expand_json(
    v: &mut serde_json::Value,
    key: &str,
    values: &BTreeMap<&str, String>,
) -> std::result::Result<(), (String, String)> {
    match v {
        serde_json::Value::String(s) => {
            *s = expand(s, values).map_err(|e| (key.to_owned(), e))?;
        }
        serde_json::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_json(item, &format!("{key}[{i}]"), values)?;
            }
        }
        serde_json::Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                expand_json(item, &format!("{key}.{k}"), values)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Parses `volume`, `config-file`, `disk-image:qcow2`, ….
fn parse_kind(s: &str) -> Option<ArtifactKind> {
    let v = match s.split_once(':') {
        Some(("disk-image", format)) => {
            serde_json::json!({"type": "disk-image", "format": format})
        }
        Some(_) => return None,
        None => serde_json::json!({ "type": s }),
    };
    serde_json::from_value(v).ok()
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Adds the manifest's `steps` to `def` (see the module docs).
///
/// # Errors
/// `Config` naming the manifest and the key (`steps[1].params.to`) for a
/// bad name, an unknown instance, kind or placeholder.
pub(crate) fn add_steps(
    mut def: WorkflowDef,
    steps: &[ManifestStep],
    ctx: &Context<'_>,
) -> Result<WorkflowDef> {
    for (i, s) in steps.iter().enumerate() {
        let key = |k: &str| format!("steps[{i}]{k}");
        if !valid_name(&s.name) {
            return Err(error(
                ctx,
                key(".name"),
                format!(
                    "step name {:?}: use 1 to 64 letters, digits, `-`, `_` or `.`",
                    s.name
                ),
            ));
        }
        let id = format!("step:{}", s.name);
        if def.steps.iter().any(|d| d.id == id) {
            return Err(error(
                ctx,
                key(".name"),
                format!("two steps are named {:?}", s.name),
            ));
        }
        let target = match &s.instance {
            None => ctx.primary.to_owned(),
            Some(n) => ctx.instance_targets.get(n).cloned().ok_or_else(|| {
                error(
                    ctx,
                    key(".instance"),
                    format!("the service {} has no instance {n:?}", ctx.service),
                )
            })?,
        };
        let mut values: BTreeMap<&str, String> = [
            ("source_site", ctx.from.to_owned()),
            ("target_site", target.clone()),
            ("service", ctx.service.to_owned()),
            ("relocation", ctx.relocation.to_owned()),
        ]
        .into_iter()
        .collect();
        if let Some(r) = &ctx.from_root {
            values.insert("source_root", r.display().to_string());
        }
        if let Some(r) = ctx.roots.get(&target) {
            values.insert("target_root", r.display().to_string());
        }

        let mut params = serde_json::Value::Object(s.params.clone());
        expand_json(&mut params, &key(".params"), &values).map_err(|(k, e)| error(ctx, k, e))?;
        params.as_object_mut().into_iter().for_each(|p| {
            p.entry("site").or_insert_with(|| serde_json::json!(target));
            p.entry("endpoint_map")
                .or_insert_with(|| ctx.endpoint_map.clone());
        });
        let mut spec = StepSpec::new(&id, &s.migrator, &target).params(params);
        for (name, input) in &s.inputs {
            let ikey = key(&format!(".inputs.{name}"));
            let kind = parse_kind(&input.kind).ok_or_else(|| {
                error(
                    ctx,
                    format!("{ikey}.kind"),
                    format!(
                        "unknown artifact kind {:?} (volume, bucket, config-file, instance, endpoint-map, disk-image:FORMAT)",
                        input.kind
                    ),
                )
            })?;
            let locator = expand(&input.locator, &values)
                .map_err(|e| error(ctx, format!("{ikey}.locator"), e))?;
            let site = match input.at.as_deref() {
                None | Some("source") => ctx.from,
                Some("target") => target.as_str(),
                Some(other) => {
                    return Err(error(
                        ctx,
                        format!("{ikey}.at"),
                        format!("`at` is `source` or `target`, not {other:?}"),
                    ));
                }
            };
            spec = spec.input(name, given(kind, site, locator, None));
        }
        let (before, after) = match s.phase {
            Phase::Copy => ("verify", None),
            Phase::Downtime => ("cutover", Some("stop-source")),
            Phase::AfterCutover => ("", Some("cutover")),
        };
        if let Some(a) = after {
            spec = spec.after(a);
        }
        if let Some(b) = def.steps.iter_mut().find(|d| d.id == before) {
            b.after.push(id.clone());
        }
        def.steps.push(spec);
    }
    Ok(def)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<&'static str, String> {
        [("target_root", "/t".to_owned()), ("service", "shop".into())]
            .into_iter()
            .collect()
    }

    #[test]
    fn placeholders_expand_and_unknown_ones_are_named() {
        assert_eq!(
            expand("${target_root}/db/${service}.sqlite", &values()).unwrap(),
            "/t/db/shop.sqlite"
        );
        assert_eq!(
            expand("no placeholder {x}", &values()).unwrap(),
            "no placeholder {x}"
        );
        let e = expand("${target_dir}/x", &values()).unwrap_err();
        assert!(e.contains("unknown placeholder ${target_dir}"), "{e}");
        let e = expand("${source_root}/x", &values()).unwrap_err();
        assert!(e.contains("${source_root} has no value here"), "{e}");
        assert!(expand("${target_root", &values()).is_err());
    }

    #[test]
    fn nested_params_expand_with_their_key_in_errors() {
        let mut v = serde_json::json!({"a": ["${service}", {"b": "${nope}"}]});
        let (key, _) = expand_json(&mut v, "steps[0].params", &values()).unwrap_err();
        assert_eq!(key, "steps[0].params.a[1].b");
        let mut v = serde_json::json!({"a": ["${service}", 3]});
        expand_json(&mut v, "p", &values()).unwrap();
        assert_eq!(v, serde_json::json!({"a": ["shop", 3]}));
    }

    #[test]
    fn artifact_kinds_parse_from_their_names() {
        assert_eq!(parse_kind("volume"), Some(ArtifactKind::Volume));
        assert_eq!(parse_kind("config-file"), Some(ArtifactKind::ConfigFile));
        assert_eq!(
            parse_kind("disk-image:qcow2"),
            Some(ArtifactKind::DiskImage {
                format: fluidcloud_plugins::ImageFormat::Qcow2
            })
        );
        assert_eq!(parse_kind("disk-image:floppy"), None);
        assert_eq!(parse_kind("database"), None);
    }
}
