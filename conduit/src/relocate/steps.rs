//! The conduit's own migrators: the steps of a relocation that act on sites
//! rather than on data.
//!
//! | name | does | rollback |
//! |---|---|---|
//! | `instance-provision` | defines the instance (stopped) at the target through its compute capability | undefines it (stopping it first) |
//! | `service-verify` | compares every image with its source, introspects the service at each target (every reference must resolve there) and finds no old internal endpoint left in the target's config | nothing to undo |
//! | `source-stop` | stops the source instances (never deletes them) | starts them again |
//! | `cutover` | starts the target instances | stops them |
//! | `change-tracking` | begins the source's change tracking, or saves its change sets and ends it (`tracking.rs`) | ends the tracking, folding every write back |
//!
//! Each opens its sites from the sites file named in its parameters, so a
//! journal alone is enough to resume or roll back. All are idempotent:
//! defining an instance that exists with the same record, stopping a
//! stopped instance or starting a running one succeeds without change.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error as SdkError, Estimate, ExecContext, ImageFormat,
    Migrator, MigratorDescriptor, Result as SdkResult, StepOutput, StepRequest,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use fluidcloud_migrators::image::{BackingPolicy, OpenOptions};

use super::EndpointChange;
use crate::config::SitesFile;
use crate::driver::{InstanceRecord, InstanceState, SiteDriver, require_compute};
use crate::drivers;

pub(super) fn params<T: DeserializeOwned>(request: &StepRequest) -> SdkResult<T> {
    serde_path_to_error::deserialize(&request.params).map_err(|e| {
        SdkError::Invalid(vec![
            Diagnostic::error(format!("bad parameters: {}", e.inner()))
                .at_key(format!("params.{}", e.path())),
        ])
    })
}

pub(super) fn validate_params<T: DeserializeOwned>(request: &StepRequest) -> Vec<Diagnostic> {
    match params::<T>(request) {
        Ok(_) => Vec::new(),
        Err(SdkError::Invalid(d)) => d,
        Err(e) => vec![Diagnostic::error(e.to_string())],
    }
}

pub(crate) fn to_sdk(e: crate::Error) -> SdkError {
    match e {
        crate::Error::Site { source, .. } => source,
        crate::Error::Config { diagnostics } => SdkError::Invalid(diagnostics),
        crate::Error::MissingCredential { variable, key, .. } => SdkError::Invalid(vec![
            Diagnostic::error(format!("environment variable {variable} is not set")).at_key(key),
        ]),
        other => SdkError::Precondition(other.to_string()),
    }
}

pub(super) fn open_site(
    sites_file: &Path,
    site: &str,
) -> SdkResult<(SitesFile, Box<dyn SiteDriver>)> {
    let file = SitesFile::load(sites_file, &drivers::kinds()).map_err(to_sdk)?;
    let cfg = file.site(site).map_err(to_sdk)?;
    let driver = drivers::open(site, cfg).map_err(to_sdk)?;
    Ok((file, driver))
}

pub(super) fn descriptor(
    name: &str,
    summary: &str,
    produces: Vec<ArtifactKind>,
) -> MigratorDescriptor {
    MigratorDescriptor {
        name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        summary: summary.into(),
        consumes: Vec::new(),
        produces,
    }
}

pub(super) fn nothing() -> Estimate {
    Estimate {
        seconds: 0.05,
        ..Estimate::default()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionParams {
    sites_file: PathBuf,
    site: String,
    record: InstanceRecord,
}

/// `instance-provision`: defines an instance, stopped, at the target.
#[derive(Debug, Default, Clone, Copy)]
pub struct Provision;

#[async_trait]
impl Migrator for Provision {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "instance-provision",
            "defines an instance (stopped) at the target site",
            vec![ArtifactKind::Instance],
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<ProvisionParams>(request)
    }

    async fn plan(&self, _request: &StepRequest) -> SdkResult<Estimate> {
        Ok(nothing())
    }

    async fn execute(&self, request: &StepRequest, _ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: ProvisionParams = params(request)?;
        let (_, driver) = open_site(&p.sites_file, &p.site)?;
        let compute = require_compute(driver.as_ref())?;
        let existing = require_inventory_record(driver.as_ref(), &p.record.name).await?;
        match existing {
            Some(r) if same_definition(&r, &p.record) => {}
            Some(r) => {
                return Err(SdkError::Precondition(format!(
                    "site {} already has an instance named {}, {}; it is not adopted",
                    p.site,
                    p.record.name,
                    match &r.created_by {
                        Some(other) if Some(other) != p.record.created_by.as_ref() =>
                            format!("defined by relocation {other}"),
                        Some(_) => "defined by this relocation with another definition".to_owned(),
                        None => "defined by no relocation".to_owned(),
                    }
                )));
            }
            None => compute.define(&p.record).await?,
        }
        let mut out = StepOutput::default();
        out.artifacts.insert(
            "instance".into(),
            Artifact {
                kind: ArtifactKind::Instance,
                site: p.site,
                locator: p.record.name,
                size: None,
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
    ) -> SdkResult<()> {
        let p: ProvisionParams = params(request)?;
        let (_, driver) = open_site(&p.sites_file, &p.site)?;
        let compute = require_compute(driver.as_ref())?;
        match require_inventory_record(driver.as_ref(), &p.record.name).await? {
            Some(r) if same_definition(&r, &p.record) => {
                compute.stop(&p.record.name).await?;
                compute.undefine(&p.record.name).await
            }
            // Not ours (or already gone): leave it.
            _ => Ok(()),
        }
    }
}

/// Equal but for the running state.
fn same_definition(a: &InstanceRecord, b: &InstanceRecord) -> bool {
    let mut a = a.clone();
    a.state = b.state;
    &a == b
}

async fn require_inventory_record(
    driver: &dyn SiteDriver,
    name: &str,
) -> SdkResult<Option<InstanceRecord>> {
    let inv = crate::driver::require_inventory(driver)?;
    Ok(inv.instances().await?.into_iter().find(|i| i.name == name))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    sites_file: PathBuf,
    service: String,
    from: String,
    manifest: Option<PathBuf>,
    targets: Vec<String>,
    #[serde(default)]
    images: Vec<ImagePair>,
    endpoint_map: Vec<EndpointChange>,
    #[serde(default)]
    boot_checks: Vec<BootCheckPlan>,
}

/// An image the verify step compares with its source, guest byte for guest
/// byte, each read in its declared format.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePair {
    /// The source image.
    pub source: String,
    /// Its format, as the source site declares it.
    pub source_format: ImageFormat,
    /// The image at the target.
    pub target: String,
    /// The format the relocation wrote.
    pub target_format: ImageFormat,
    /// Where the source's backing files may be.
    #[serde(default)]
    pub backing: BackingPolicy,
}

/// A boot check the verify step runs (from the target site's
/// `boot_check`): start the relocated instance, wait for its console to
/// match `console`; when the regex captures and the source's console
/// matches too, the two captures must be equal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootCheckPlan {
    /// Target site.
    pub site: String,
    /// Instance name (the same at both sites).
    pub instance: String,
    /// Source site.
    pub source_site: String,
    /// Regular expression, at most one capture group.
    pub console: String,
    /// Seconds to wait.
    pub timeout_s: u64,
}

/// The first match of `re` in `text`: the capture group if any, else the
/// whole match.
fn console_match(re: &regex::Regex, text: &str) -> Option<String> {
    let c = re.captures(text)?;
    c.get(1).or_else(|| c.get(0)).map(|m| m.as_str().to_owned())
}

fn boot_regex(b: &BootCheckPlan) -> SdkResult<regex::Regex> {
    regex::Regex::new(&b.console).map_err(|e| {
        SdkError::Invalid(vec![
            Diagnostic::error(format!("boot check regex `{}`: {e}", b.console))
                .at_key(format!("sites.{}.boot_check.console", b.site)),
        ])
    })
}

async fn boot_check(sites_file: &Path, b: &BootCheckPlan, ctx: &ExecContext) -> SdkResult<String> {
    let re = boot_regex(b)?;
    let (_, target) = open_site(sites_file, &b.site)?;
    let compute = require_compute(target.as_ref())?;
    // A throw-away copy boots, never the instance: its disks stay as the
    // relocation wrote them, and no NIC of it is live next to the source.
    let trial = compute.start_trial(&b.instance).await?;
    ctx.progress.message(&format!(
        "{}: booting a throw-away copy of {} on overlays, unplugged (waiting up to {} s for its console)",
        b.site, b.instance, b.timeout_s
    ));
    let watched = watch_console(compute, &trial, &re, b, ctx).await;
    let ended = compute.end_trial(&b.instance).await;
    let got = watched?;
    ended?;
    // The source's own console, when it has one that matches, must agree.
    let (_, source) = open_site(sites_file, &b.source_site)?;
    if let Some(c) = source.compute() {
        match c.console(&b.instance).await {
            Ok(text) => {
                if let Some(want) = console_match(&re, &text)
                    && want != got
                {
                    return Err(SdkError::Precondition(format!(
                        "instance {} at {} prints `{got}` on its console, the source at {} printed `{want}`: the relocated disk differs",
                        b.instance, b.site, b.source_site
                    )));
                }
            }
            Err(SdkError::NotSupported { .. } | SdkError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads the console of `trial` until `re` matches; the match.
async fn watch_console(
    compute: &dyn crate::driver::Compute,
    trial: &str,
    re: &regex::Regex,
    b: &BootCheckPlan,
    ctx: &ExecContext,
) -> SdkResult<String> {
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(b.timeout_s);
    let got = loop {
        let text = compute.console(trial).await?;
        if let Some(m) = console_match(re, &text) {
            break m;
        }
        if std::time::Instant::now() >= deadline {
            let tail: String = text
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ");
            return Err(SdkError::Precondition(format!(
                "{}: instance {} did not print `{}` on its console within {} s (last lines: {tail})",
                b.site, b.instance, b.console, b.timeout_s
            )));
        }
        if ctx.cancel.is_cancelled() {
            return Err(SdkError::Transient(
                "cancelled while waiting for a boot".into(),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    ctx.progress.message(&format!(
        "{}: {} printed `{got}` after {:.1} s",
        b.site,
        b.instance,
        started.elapsed().as_secs_f64()
    ));
    Ok(got)
}

/// `service-verify`: proves the target complete before the source stops.
#[derive(Debug, Default, Clone, Copy)]
pub struct Verify;

#[async_trait]
impl Migrator for Verify {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "service-verify",
            "compares images with their sources and checks the service resolves at the target",
            Vec::new(),
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<VerifyParams>(request)
    }

    async fn plan(&self, request: &StepRequest) -> SdkResult<Estimate> {
        let p: VerifyParams = params(request)?;
        let bytes: u64 = p
            .images
            .iter()
            .filter_map(|p| std::fs::metadata(&p.source).ok())
            .map(|m| m.len())
            .sum();
        Ok(Estimate {
            bytes_read: 2 * bytes,
            seconds: 2.0 * bytes as f64 / 1.5e9,
            ..Estimate::default()
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: VerifyParams = params(request)?;
        let mut out = StepOutput::default();
        // 1. Every image equal, guest byte for guest byte.
        let total = p.images.len() as u64;
        for (i, pair) in p.images.iter().enumerate() {
            let (src, dst) = (&pair.source, &pair.target);
            let pair = pair.clone();
            let result = tokio::task::spawn_blocking(move || {
                // Both sides read as declared: no probing of guest bytes.
                let a = fluidcloud_migrators::image::open_with(
                    Path::new(&pair.source),
                    &OpenOptions {
                        format: Some(pair.source_format),
                        backing: pair.backing.clone(),
                        ..OpenOptions::default()
                    },
                )?;
                let b = fluidcloud_migrators::image::open_with(
                    Path::new(&pair.target),
                    &OpenOptions {
                        format: Some(pair.target_format),
                        ..OpenOptions::default()
                    },
                )?;
                let size = a.virtual_size();
                fluidcloud_migrators::image::compare(a.as_ref(), b.as_ref(), 0, &|_, _| {})
                    .map(|r| (r, size))
            })
            .await
            .map_err(|e| SdkError::Transient(format!("image comparison task failed: {e}")))?
            .map_err(SdkError::from)?;
            if let (Some(offset), _) = result {
                return Err(SdkError::Corrupt {
                    what: format!("{dst} (it differs from {src})"),
                    offset,
                });
            }
            out.measured.bytes_read += 2 * result.1;
            ctx.progress.progress(i as u64 + 1, Some(total));
        }
        // 2. The service at each target: every reference resolves there.
        let file = SitesFile::load(&p.sites_file, &drivers::kinds()).map_err(to_sdk)?;
        let manifest = match &p.manifest {
            Some(m) => Some((
                m.clone(),
                std::fs::read_to_string(m)
                    .map_err(|e| SdkError::io(format!("reading {}", m.display()), e))?,
            )),
            None => None,
        };
        for t in &p.targets {
            let cfg = file.site(t).map_err(to_sdk)?;
            let driver = drivers::open(t, cfg).map_err(to_sdk)?;
            // Guests are not looked into here: their disks are adapted
            // after the final delta (`guest-adapt`), which checks its own.
            let found = crate::introspect::introspect_with(
                driver.as_ref(),
                cfg,
                Some(&p.service),
                manifest.clone(),
                crate::introspect::Options { guests: false },
            )
            .await
            .map_err(|e| SdkError::Precondition(format!("at {t}: {e}")))?;
            // 3. No config at the target names an old internal endpoint.
            let inv = crate::driver::require_inventory(driver.as_ref())?;
            for r in found.topology.resources() {
                let fluidcloud_plugins::ResourceSpec::ConfigFile {
                    path, guest: None, ..
                } = &r.spec
                else {
                    continue;
                };
                let text = inv.config_file(path).await?.content;
                let text = String::from_utf8_lossy(&text);
                for c in &p.endpoint_map {
                    if let Some(at) = find_token(&text, &c.old) {
                        let line = text[..at].matches('\n').count() + 1;
                        return Err(SdkError::Precondition(format!(
                            "{t}: config/{path}:{line} still names `{}` of {} (should be `{}`)",
                            c.old, p.from, c.new
                        )));
                    }
                }
            }
            ctx.progress
                .message(&format!("{t}: {} resources resolve", found.topology.len()));
        }
        // 4. Boot checks: the relocated instances boot and say the same
        // as their sources.
        for b in &p.boot_checks {
            boot_check(&p.sites_file, b, ctx).await?;
        }
        Ok(out)
    }

    async fn rollback(
        &self,
        _request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        Ok(())
    }
}

/// The first occurrence of `needle` in `hay` not inside a longer host name,
/// address or word (so `10.10.0.1` does not match `10.10.0.13`).
pub fn find_token(hay: &str, needle: &str) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    let word = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut from = 0;
    while let Some(i) = hay[from..].find(needle) {
        let at = from + i;
        let end = at + needle.len();
        let before = hay[..at].chars().next_back();
        let after = hay[end..].chars().next();
        let after_ok = match after {
            None => true,
            // A trailing dot ends a sentence or an FQDN; a dot followed by
            // more name continues the name.
            Some('.') => !hay[end + 1..].chars().next().is_some_and(word),
            Some(c) => !word(c),
        };
        let before_ok = !before.is_some_and(|c| word(c) || c == '.');
        if before_ok && after_ok {
            return Some(at);
        }
        from = at + needle.len().max(1);
        while !hay.is_char_boundary(from) {
            from += 1;
        }
    }
    None
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopParams {
    sites_file: PathBuf,
    site: String,
    instances: Vec<String>,
    /// The relocation's records directory (absent in relocations planned
    /// before it existed: then every listed instance counts as ours).
    #[serde(default)]
    record_dir: Option<PathBuf>,
}

/// `source-stop`: stops the source instances; rollback starts again the
/// ones it stopped (never one that was already stopped: another
/// relocation's stop is not ours to undo).
#[derive(Debug, Default, Clone, Copy)]
pub struct StopSource;

/// Where `source-stop` records, before stopping anything, which instances
/// were running.
fn stop_record(dir: &Path) -> PathBuf {
    dir.join("source-stop.json")
}

async fn set_states(
    sites_file: &Path,
    instances: &[(String, String)],
    state: InstanceState,
) -> SdkResult<()> {
    for (site, name) in instances {
        let (_, driver) = open_site(sites_file, site)?;
        let compute = require_compute(driver.as_ref())?;
        if require_inventory_record(driver.as_ref(), name)
            .await?
            .is_none()
        {
            continue;
        }
        match state {
            InstanceState::Running => compute.start(name).await?,
            InstanceState::Stopped => compute.stop(name).await?,
        }
    }
    Ok(())
}

/// Asks each instance's driver for its state: every one must be `state`
/// now. The moment they all were, for the report's downtime.
async fn confirm_states(
    sites_file: &Path,
    instances: &[(String, String)],
    state: InstanceState,
) -> SdkResult<super::clock::Moment> {
    for (site, name) in instances {
        let (_, driver) = open_site(sites_file, site)?;
        let compute = require_compute(driver.as_ref())?;
        let now = compute.state(name).await?;
        if now != state {
            return Err(SdkError::Precondition(format!(
                "instance {name} on site {site} is {} after being made {}",
                now.as_str(),
                state.as_str()
            )));
        }
    }
    Ok(super::clock::Moment::now())
}

#[async_trait]
impl Migrator for StopSource {
    fn describe(&self) -> MigratorDescriptor {
        descriptor(
            "source-stop",
            "stops (never deletes) the source instances",
            Vec::new(),
        )
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<StopParams>(request)
    }

    async fn plan(&self, _request: &StepRequest) -> SdkResult<Estimate> {
        Ok(nothing())
    }

    async fn execute(&self, request: &StepRequest, _ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: StopParams = params(request)?;
        let (_, driver) = open_site(&p.sites_file, &p.site)?;
        let compute = require_compute(driver.as_ref())?;
        let Some(dir) = &p.record_dir else {
            let pairs: Vec<(String, String)> = p
                .instances
                .iter()
                .map(|i| (p.site.clone(), i.clone()))
                .collect();
            set_states(&p.sites_file, &pairs, InstanceState::Stopped).await?;
            return Ok(StepOutput::default());
        };
        let record = stop_record(dir);
        // Which ones this step stops: read back after a crash, so a resumed
        // run keeps the first run's answer (by then they are all stopped).
        let running: Vec<String> = match std::fs::read(&record) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| SdkError::Corrupt {
                what: format!("stop record {} ({e})", record.display()),
                offset: 0,
            })?,
            Err(_) => {
                let mut running = Vec::new();
                for name in &p.instances {
                    if require_inventory_record(driver.as_ref(), name)
                        .await?
                        .is_some()
                        && compute.state(name).await? == InstanceState::Running
                    {
                        running.push(name.clone());
                    }
                }
                std::fs::create_dir_all(dir)
                    .map_err(|e| SdkError::io(format!("creating {}", dir.display()), e))?;
                super::store::write_atomic(
                    &record,
                    &serde_json::to_vec(&running).unwrap_or_default(),
                )
                .map_err(to_sdk)?;
                running
            }
        };
        for name in &running {
            compute.stop(name).await?;
        }
        let pairs: Vec<(String, String)> = running
            .iter()
            .map(|i| (p.site.clone(), i.clone()))
            .collect();
        let stopped = confirm_states(&p.sites_file, &pairs, InstanceState::Stopped).await?;
        let mut out = StepOutput::default();
        out.facts.insert("stopped".into(), stopped.fact());
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let p: StopParams = params(request)?;
        // Only what this step stopped; no record, nothing stopped by us.
        let stopped: Vec<String> = match &p.record_dir {
            None => p.instances.clone(),
            Some(dir) => match std::fs::read(stop_record(dir)) {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
                Err(_) => Vec::new(),
            },
        };
        let pairs: Vec<(String, String)> =
            stopped.into_iter().map(|i| (p.site.clone(), i)).collect();
        set_states(&p.sites_file, &pairs, InstanceState::Running).await
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CutoverParams {
    sites_file: PathBuf,
    instances: Vec<(String, String)>,
    /// The target sites' boot checks, run on the started instances: the
    /// service is up when they pass.
    #[serde(default)]
    boot_checks: Vec<BootCheckPlan>,
}

/// `cutover`: starts the target instances; rollback stops them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cutover;

#[async_trait]
impl Migrator for Cutover {
    fn describe(&self) -> MigratorDescriptor {
        descriptor("cutover", "starts the service at the target", Vec::new())
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        validate_params::<CutoverParams>(request)
    }

    async fn plan(&self, _request: &StepRequest) -> SdkResult<Estimate> {
        Ok(nothing())
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> SdkResult<StepOutput> {
        let p: CutoverParams = params(request)?;
        set_states(&p.sites_file, &p.instances, InstanceState::Running).await?;
        let mut running =
            confirm_states(&p.sites_file, &p.instances, InstanceState::Running).await?;
        for b in &p.boot_checks {
            let re = boot_regex(b)?;
            let (_, target) = open_site(&p.sites_file, &b.site)?;
            watch_console(require_compute(target.as_ref())?, &b.instance, &re, b, ctx).await?;
            running = super::clock::Moment::now();
        }
        let mut out = StepOutput::default();
        out.facts.insert("running".into(), running.fact());
        Ok(out)
    }

    async fn rollback(
        &self,
        request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> SdkResult<()> {
        let p: CutoverParams = params(request)?;
        set_states(&p.sites_file, &p.instances, InstanceState::Stopped).await
    }
}

#[cfg(test)]
mod tests {
    use super::find_token;

    #[test]
    fn tokens_do_not_match_inside_longer_names() {
        assert_eq!(find_token("host = 10.10.0.13\n", "10.10.0.13"), Some(7));
        assert_eq!(find_token("host = 10.10.0.130\n", "10.10.0.13"), None);
        assert_eq!(find_token("a db.x.internal.", "db.x.internal"), Some(2));
        assert_eq!(find_token("xdb.x.internal", "db.x.internal"), None);
        assert_eq!(find_token("db.x.internal.evil", "db.x.internal"), None);
        assert_eq!(
            find_token("postgres://u@db.x.internal:5432", "db.x.internal"),
            Some(13)
        );
    }
}
