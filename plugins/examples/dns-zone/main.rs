//! `fluidcloud-migrator-dns-zone`: rewrites a DNS zone file for cut-over.
//!
//! The example plugin of `plugins/README.md`, written with the Rust SDK.
//! It takes a zone file (input `zone`, a config file at the source) and a
//! map of old addresses or names to new ones (param `rewrite`, or else the
//! relocation's `endpoint_map` that fluidcloud passes to every step a
//! service manifest declares), rewrites
//! the data of `A`, `AAAA` and `CNAME` records that point at an old value,
//! bumps the SOA serial so secondaries pick the change up, and writes the
//! result to param `to` (output `zone`). Rollback removes `to`.
//!
//! ```json
//! {"step_id": "dns", "params": {"to": "/srv/zones/shop.zone.new",
//!   "rewrite": {"10.0.0.5": "192.0.2.10"}},
//!  "inputs": {"zone": {"kind": {"type": "config-file"}, "site": "dc-paris",
//!   "locator": "/srv/zones/shop.zone"}}}
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error, Estimate, ExecContext, Migrator, MigratorDescriptor,
    Result, StepOutput, StepRequest,
};

struct DnsZone;

/// What a valid request names.
struct Job {
    zone: PathBuf,
    to: PathBuf,
    site: String,
    rewrite: BTreeMap<String, String>,
}

fn job(request: &StepRequest) -> std::result::Result<Job, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let zone = match request.inputs.get("zone") {
        Some(a) if a.kind == ArtifactKind::ConfigFile => Some(PathBuf::from(&a.locator)),
        Some(a) => {
            diags.push(
                Diagnostic::error(format!("input `zone` is a {}, not a config file", a.kind))
                    .at_key("inputs.zone"),
            );
            None
        }
        None => {
            diags.push(
                Diagnostic::error("needs input `zone` (the zone file)").at_key("inputs.zone"),
            );
            None
        }
    };
    let to = request
        .params
        .get("to")
        .and_then(|v| v.as_str())
        .map(PathBuf::from);
    if to.is_none() {
        diags.push(
            Diagnostic::error("needs param `to`: where to write the rewritten zone")
                .at_key("params.to"),
        );
    }
    let rewrite: Option<BTreeMap<String, String>> = request
        .params
        .get("rewrite")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .or_else(|| from_endpoint_map(request.params.get("endpoint_map")?))
        .filter(|m: &BTreeMap<String, String>| !m.is_empty());
    if rewrite.is_none() {
        diags.push(
            Diagnostic::error(
                "needs param `rewrite` (a map of old values to new ones) or a non-empty `endpoint_map`",
            )
            .at_key("params.rewrite")
            .with_detail("e.g. {\"10.0.0.5\": \"192.0.2.10\"}"),
        );
    }
    match (zone, to, rewrite) {
        (Some(zone), Some(to), Some(rewrite)) if diags.is_empty() => Ok(Job {
            zone,
            to,
            site: request
                .params
                .get("site")
                .and_then(|v| v.as_str())
                .unwrap_or("target")
                .to_owned(),
            rewrite,
        }),
        _ => Err(diags),
    }
}

/// The rewrite map from a relocation's endpoint map (`[{kind, from, to}]`,
/// which fluidcloud gives every manifest step): addresses as they are, host
/// names also in their absolute form (`db.example.` → `db2.example.`), as
/// zone files write CNAME targets.
fn from_endpoint_map(v: &serde_json::Value) -> Option<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for change in v.as_array()? {
        let (Some(kind), Some(from), Some(to)) = (
            change.get("kind").and_then(|k| k.as_str()),
            change.get("from").and_then(|k| k.as_str()),
            change.get("to").and_then(|k| k.as_str()),
        ) else {
            return None;
        };
        match kind {
            "ip" => {
                map.insert(from.to_owned(), to.to_owned());
            }
            "host" => {
                map.insert(from.to_owned(), to.to_owned());
                map.insert(format!("{from}."), format!("{to}."));
            }
            _ => {}
        }
    }
    Some(map)
}

/// Rewrites `text`; returns the new zone and the number of records changed.
fn rewrite_zone(text: &str, map: &BTreeMap<String, String>) -> (String, usize) {
    let mut out = String::with_capacity(text.len());
    let mut changed = 0;
    let mut want_serial = false;
    for line in text.split_inclusive('\n') {
        let (data, comment) = match line.find(';') {
            Some(i) => line.split_at(i),
            None => (line, ""),
        };
        let tokens: Vec<&str> = data.split_whitespace().collect();
        let rtype = tokens.iter().position(|t| {
            matches!(
                t.to_ascii_uppercase().as_str(),
                "A" | "AAAA" | "CNAME" | "SOA"
            )
        });
        let mut new_data = data.to_owned();
        match rtype.map(|i| (i, tokens[i].to_ascii_uppercase())) {
            Some((i, t)) if t == "SOA" => {
                // MNAME RNAME then SERIAL, maybe on the next lines after "(".
                want_serial = true;
                new_data = bump_serial(data, &tokens[i + 1..], 2, &mut want_serial);
            }
            Some((i, _)) if i + 1 < tokens.len() => {
                let rdata = tokens[tokens.len() - 1];
                if let Some(new) = map.get(rdata)
                    && let Some(at) = data.rfind(rdata)
                {
                    new_data = format!("{}{new}{}", &data[..at], &data[at + rdata.len()..]);
                    changed += 1;
                }
            }
            _ if want_serial => new_data = bump_serial(data, &tokens, 0, &mut want_serial),
            _ => {}
        }
        out.push_str(&new_data);
        out.push_str(comment);
    }
    (out, changed)
}

/// Replaces the first number among `tokens[skip..]` (ignoring parentheses)
/// by itself plus one.
fn bump_serial(data: &str, tokens: &[&str], skip: usize, want: &mut bool) -> String {
    let mut numbers = tokens
        .iter()
        .map(|t| t.trim_matches(|c| c == '(' || c == ')'))
        .filter(|t| !t.is_empty())
        .skip(skip);

    if let Some(t) = numbers.next()
        && let Ok(n) = t.parse::<u64>()
    {
        *want = false;
        if let Some(at) = data.find(t) {
            return format!("{}{}{}", &data[..at], n + 1, &data[at + t.len()..]);
        }
    }
    data.to_owned()
}

#[async_trait]
impl Migrator for DnsZone {
    fn describe(&self) -> MigratorDescriptor {
        MigratorDescriptor {
            name: "dns-zone".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            summary: "rewrites A/AAAA/CNAME records of a DNS zone file for cut-over".into(),
            consumes: vec![ArtifactKind::ConfigFile],
            produces: vec![ArtifactKind::ConfigFile],
        }
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        job(request).err().unwrap_or_default()
    }

    async fn plan(&self, request: &StepRequest) -> Result<Estimate> {
        let j = job(request).map_err(Error::Invalid)?;
        let len = std::fs::metadata(&j.zone)
            .map_err(|e| Error::io(format!("stat {}", j.zone.display()), e))?
            .len();
        Ok(Estimate {
            bytes_read: len,
            bytes_written: len,
            ..Estimate::default()
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> Result<StepOutput> {
        let j = job(request).map_err(Error::Invalid)?;
        let text = std::fs::read_to_string(&j.zone)
            .map_err(|e| Error::io(format!("read {}", j.zone.display()), e))?;
        let total = text.len() as u64;
        ctx.progress.progress(0, Some(total));
        let (new, changed) = rewrite_zone(&text, &j.rewrite);
        if ctx.cancel.is_cancelled() {
            return Err(fluidcloud_plugins::serve::cancelled("before writing"));
        }
        // Write then rename: a re-run after a crash finds either nothing or
        // the whole file.
        if let Some(dir) = j.to.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let tmp = j.to.with_extension(format!("tmp-{}", request.step_id));
        std::fs::write(&tmp, &new).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &j.to)
            .map_err(|e| Error::io(format!("rename to {}", j.to.display()), e))?;
        ctx.progress.progress(total, Some(total));
        ctx.progress
            .message(&format!("{changed} records rewritten"));
        eprintln!(
            "dns-zone: {} -> {}: {changed} records rewritten",
            j.zone.display(),
            j.to.display()
        );
        let mut out = StepOutput::default();
        out.measured.bytes_read = total;
        out.measured.bytes_written = new.len() as u64;
        out.artifacts.insert(
            "zone".into(),
            Artifact {
                kind: ArtifactKind::ConfigFile,
                site: j.site,
                locator: j.to.display().to_string(),
                size: Some(new.len() as u64),
                checksum: None,
            },
        );
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> Result<()> {
        let Ok(j) = job(request) else { return Ok(()) };
        match std::fs::remove_file(&j.to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("remove {}", j.to.display()), e));
            }
            _ => {}
        }
        // The directory execute may have created goes too, if now empty.
        if let Some(dir) = j.to.parent() {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    fluidcloud_plugins::serve(DnsZone)
}
