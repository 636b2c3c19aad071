//! `fluidcloud relocate`, `plan`, `status`, `resume`, `rollback`, `report`.
//!
//! `relocate` = introspect → match (or the given target) → plan → show →
//! confirm → execute with progress → report. Everything a relocation
//! decides and does is kept under the sites file's `.fluidcloud/`
//! directory ([`fluidcloud_conduit::relocate::store`]), so `status`,
//! `resume`, `rollback` and `report` need only its id.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use fluidcloud_conduit::relocate::lock::{self, ServiceLock};
use fluidcloud_conduit::relocate::queue::Database;
use fluidcloud_conduit::relocate::report::{self, Report};
use fluidcloud_conduit::relocate::store::{self, Store};
use fluidcloud_conduit::relocate::{self as reloc, BucketMode, PlanInput, Relocation};
use fluidcloud_conduit::{ServiceManifest, SitesFile, drivers, introspect};
use fluidcloud_plugins::ResourceKind;
use fluidcloud_viaduct::{
    Executor, ExecutorConfig, Plan, ProgressEvent, Registry, RunReport, StepState, Workflow,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{print_json, sites_file};
use crate::output::bytes;
use crate::{ExitWith, Globals};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BucketsArg {
    /// Copy every object to the target site.
    Copy,
    /// Leave objects where they are; configs keep pointing at them.
    Repoint,
}

#[derive(Debug, Args)]
pub(crate) struct RelocateArgs {
    /// The site the service runs on now.
    #[arg(long = "from", value_name = "SITE")]
    from: String,
    /// The target site, or `auto` to let the broker choose per instance
    /// and bucket.
    #[arg(long = "to", value_name = "SITE|auto", default_value = "auto")]
    to: String,
    /// The service (default: the only service on the source site).
    #[arg(long)]
    service: Option<String>,
    /// A placement constraint for `--to auto`, e.g. `jurisdiction(*; EU)`.
    /// Repeatable.
    #[arg(long = "constraint", short = 'c', value_name = "CONSTRAINT")]
    constraints: Vec<String>,
    /// What to do with the service's buckets.
    #[arg(long, value_enum, default_value = "copy")]
    buckets: BucketsArg,
    /// Declared service manifest (default: the site's services/NAME.toml).
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// Show the plan and stop.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
    /// How long one object of a bucket copy keeps being retried after
    /// transient failures (an unreachable target) before the bucket step
    /// fails (default 60); `resume` continues from there.
    #[arg(long, value_name = "SECS")]
    retry_budget: Option<f64>,
    /// Between sites reached through agents: bytes per second on the wire
    /// for each pair of sites of this relocation, shared by all its disk
    /// and bucket transfers between them (`100M`, `20MiB`, `1gbit`).
    #[arg(long, value_name = "RATE", value_parser = super::transfer::parse_rate)]
    bwlimit: Option<u64>,
    /// Relocate even though an earlier relocation of this service from this
    /// site is unfinished, or succeeded and stopped its source. (A
    /// relocation that is running is never joined.)
    #[arg(long)]
    force: bool,
}

impl RelocateArgs {
    /// What `fluidcloud demo` runs: `relocate --from SITE --service NAME
    /// --to auto --yes`.
    pub(crate) fn demo(from: &str, service: &str) -> Self {
        Self {
            from: from.to_owned(),
            to: "auto".to_owned(),
            service: Some(service.to_owned()),
            constraints: Vec::new(),
            buckets: BucketsArg::Copy,
            manifest: None,
            dry_run: false,
            yes: true,
            retry_budget: None,
            bwlimit: None,
            force: false,
        }
    }

    /// What `POST /relocations` asks for.
    pub(crate) fn from_api(r: &fluidcloud_broker::runner::RelocationRequest) -> Self {
        use fluidcloud_broker::runner::BucketsMode;
        Self {
            from: r.from.clone(),
            to: r.to.clone(),
            service: r.service.clone(),
            constraints: r.constraints.clone(),
            buckets: match r.buckets {
                BucketsMode::Copy => BucketsArg::Copy,
                BucketsMode::Repoint => BucketsArg::Repoint,
            },
            manifest: None,
            dry_run: false,
            yes: true,
            retry_budget: r.retry_budget_secs,
            bwlimit: None,
            force: r.force,
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct IdArgs {
    /// The relocation id (see `fluidcloud status`).
    id: String,
}

#[derive(Debug, Args)]
pub(crate) struct ReportArgs {
    /// The relocation id (see `fluidcloud status`).
    id: String,
    /// Write the report as one self-contained HTML page to FILE (a Gantt
    /// chart of the steps with the downtime marked, the endpoint map,
    /// config diffs and checksums; it loads nothing from anywhere), to
    /// attach to a change ticket.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct RollbackArgs {
    /// The relocation id (see `fluidcloud status`).
    id: String,
    /// Roll back a relocation that succeeded: the target instances stop and
    /// everything written at the target since cut-over is discarded. (To
    /// keep it, relocate the service back from the target instead.)
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// A relocation id; without it, every relocation is listed.
    id: Option<String>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The store of `file`'s relocations: its state directory, or the
/// database `$FLUIDCLOUD_DATABASE` names.
pub(crate) fn store_of(file: &SitesFile) -> Result<Store> {
    let database = std::env::var(store::DATABASE_ENV)
        .ok()
        .filter(|u| !u.trim().is_empty());
    store_with(file, database.as_deref())
}

/// The store of `file`'s relocations, in the database at `database` if
/// given.
pub(crate) fn store_with(file: &SitesFile, database: Option<&str>) -> Result<Store> {
    let path = std::fs::canonicalize(&file.path).unwrap_or_else(|_| file.path.clone());
    let store = Store::for_sites_file(&path);
    Ok(match database {
        Some(url) => {
            store.with_database(Database::open(url).context("opening the database of relocations")?)
        }
        None => store,
    })
}

/// Refuses to run a relocation in this process when relocations are kept
/// in a database: the workers sharing it run them, and one that ran here
/// would hold no lease they respect.
fn local_run(store: &Store, what: &str) -> Result<()> {
    match store.database() {
        Some(db) => bail!(ExitWith(
            2,
            format!(
                "relocations are kept in the database {} (${}), whose `fluidcloud serve` workers run them: {what} through one of them with --server URL",
                db.location(),
                store::DATABASE_ENV
            )
        )),
        None => Ok(()),
    }
}

pub(crate) fn executor_config() -> ExecutorConfig {
    ExecutorConfig {
        max_concurrency: 4,
        ..ExecutorConfig::default()
    }
}

/// Plans a relocation from the command line's arguments.
pub(crate) async fn make_plan(
    file: &SitesFile,
    store: &Store,
    a: &RelocateArgs,
) -> Result<(Relocation, Workflow, Registry)> {
    let source_cfg = file.site(&a.from)?;
    let driver = drivers::open(&a.from, source_cfg)?;
    let manifest = match &a.manifest {
        Some(p) => Some((p.clone(), ServiceManifest::load(p)?.1)),
        None => None,
    };
    let found = introspect(
        driver.as_ref(),
        source_cfg,
        a.service.as_deref(),
        manifest.clone(),
    )
    .await?;
    let topology = &found.topology;
    let assignments = if a.to == "auto" {
        let placement =
            super::matching::place(file, &a.from, topology, &a.constraints, |_| {}).await?;
        let mut map = BTreeMap::new();
        for asg in &placement.assignments {
            for m in &asg.unit.members {
                if matches!(
                    m.kind(),
                    Some(ResourceKind::Instance | ResourceKind::Bucket)
                ) {
                    map.insert(m.as_str().to_owned(), asg.site.clone());
                }
            }
        }
        map
    } else {
        if !a.constraints.is_empty() {
            bail!(ExitWith(
                2,
                "--constraint applies to `--to auto`; with an explicit --to SITE there is nothing to choose".into()
            ));
        }
        file.site(&a.to)?;
        if a.to == a.from {
            bail!(ExitWith(2, format!("--to {} is the source site", a.to)));
        }
        reloc::everything_to(topology, &a.to)
    };
    if assignments.values().any(|s| s == &a.from) {
        bail!(ExitWith(
            7,
            "the broker would leave part of the service on the source site; nothing to relocate there"
                .into()
        ));
    }
    let id = store::new_id(store, topology.service(), now_secs())?;
    let manifest_path = match (&a.manifest, &manifest) {
        (Some(p), _) => Some(std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())),
        (None, _) => {
            let inv = fluidcloud_conduit::driver::require_inventory(driver.as_ref())?;
            match inv.service_manifest(topology.service()).await? {
                // A site behind an agent: its path is on another machine,
                // so the relocation keeps the text it read.
                Some((_, text)) if driver.agent().is_some() => {
                    let dir = store.state_dir().join("manifests");
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                    let kept = dir.join(format!("{id}.toml"));
                    std::fs::write(&kept, text)
                        .with_context(|| format!("cannot write {}", kept.display()))?;
                    Some(kept)
                }
                found => found.map(|(p, _)| p),
            }
        }
    };
    // Sites keeping buckets on S3 read their credentials when a step runs:
    // check them now, so a missing variable stops us before anything is
    // written.
    for site in assignments.values().chain(std::iter::once(&a.from)) {
        let cfg = file.site(site)?;
        if let (Some(_), Some(c)) = (&cfg.buckets_url, &cfg.credentials) {
            c.resolve(site)?;
        }
    }
    let records = store.dir(&id).join("records");
    let source_instances = fluidcloud_conduit::driver::require_inventory(driver.as_ref())?
        .instances()
        .await?;
    let relocation = reloc::plan(&PlanInput {
        source_instances,
        id,
        records,
        sites: file,
        from: &a.from,
        topology,
        assignments,
        manifest: manifest_path,
        bucket_mode: match a.buckets {
            BucketsArg::Copy => BucketMode::Copy,
            BucketsArg::Repoint => BucketMode::Repoint,
        },
    })?;
    let mut relocation = relocation;
    if let Some(secs) = a.retry_budget {
        if !(secs.is_finite() && (0.0..=86_400.0).contains(&secs)) {
            bail!(ExitWith(
                2,
                "--retry-budget takes 0 to 86400 seconds".into()
            ));
        }
        let ms = (secs * 1000.0).round() as u64;
        for s in &mut relocation.workflow.steps {
            if s.migrator == "object-copy" {
                s.params["retry_budget_ms"] = serde_json::json!(ms);
            }
        }
    }
    if let Some(rate) = a.bwlimit {
        // Between sites of this process data moves without a network to
        // limit; a transfer with a site reached through its agent crosses
        // one.
        let mut sites = relocation.assignments.values().chain([&a.from]);
        let agents = sites.any(|s| file.site(s).is_ok_and(|c| c.agent.is_some()));
        for s in &mut relocation.workflow.steps {
            if agents && matches!(s.migrator.as_str(), "disk-transfer" | "bucket-transfer") {
                s.params["bwlimit"] = serde_json::json!(rate);
            }
        }
        if !agents {
            bail!(ExitWith(
                2,
                "--bwlimit applies to transfers between sites reached through agents, and this relocation has none".into()
            ));
        }
    }
    let registry = reloc::registry_for(&relocation.workflow, &file.plugin_env())?;
    let workflow = Workflow::freeze(relocation.workflow.clone(), &registry)?;
    Ok((relocation, workflow, registry))
}

/// What `plan` and `relocate --dry-run` print.
#[derive(serde::Serialize)]
struct PlanDoc<'a> {
    relocation: &'a Relocation,
    plan: &'a Plan,
}

fn print_plan(r: &Relocation, plan: &Plan) -> Result<()> {
    let targets = r.targets().join(", ");
    outln!(
        "relocation {}: service {} from {} to {}",
        r.id,
        r.service,
        r.from,
        targets
    )?;
    outln!(
        "  {} to move, ~{} on the critical path, {} steps\n",
        bytes(r.bytes_to_move),
        fluidcloud_viaduct::plan::human_seconds(plan.critical_path_seconds),
        plan.steps.len()
    )?;
    out!("{}", plan.render_text())?;
    if !r.endpoint_map.is_empty() {
        outln!(
            "\nendpoint map (applied to {} config files{}):",
            r.workflow
                .steps
                .iter()
                .filter(|s| s.migrator == "config-transfer")
                .count(),
            match r
                .workflow
                .steps
                .iter()
                .filter(|s| s.migrator == "guest-adapt")
                .count()
            {
                0 => String::new(),
                n => format!(" and inside {n} guest(s)"),
            }
        )?;
        for c in &r.endpoint_map {
            outln!("  {:<5} {} -> {}", c.kind.as_str(), c.old, c.new)?;
        }
    }
    Ok(())
}

pub(crate) async fn relocate(g: &Globals, a: RelocateArgs) -> Result<()> {
    if let Some(remote) = g.remote()? {
        return relocate_remote(g, &remote, a).await;
    }
    let file = sites_file(g)?;
    let store = store_of(&file)?;
    if !a.dry_run {
        local_run(&store, "relocate")?;
    }
    let (relocation, workflow, registry) = make_plan(&file, &store, &a).await?;
    let plan = Plan::new(&workflow, &registry).await;
    if a.dry_run {
        if g.json {
            return print_json(&PlanDoc {
                relocation: &relocation,
                plan: &plan,
            });
        }
        print_plan(&relocation, &plan)?;
        outln!("\ndry run: nothing was changed")?;
        return Ok(());
    }
    if !g.json {
        print_plan(&relocation, &plan)?;
        outln!()?;
    }
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            bail!(ExitWith(
                2,
                "not asking for confirmation without a terminal: pass --yes to relocate, or --dry-run to only plan".into()
            ));
        }
        eprint!("relocate {} now? [y/N] ", relocation.service);
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!(ExitWith(1, "not confirmed; nothing was changed".into()));
        }
    }
    let _lock = ServiceLock::acquire(&store, &relocation)?;
    lock::check_earlier(&store, &relocation.from, &relocation.service, a.force)?;
    lock::check_outputs(&relocation).await?;
    store.create(&relocation)?;
    let journal = store
        .journal(&relocation.id)
        .open()
        .with_context(|| format!("opening the journal of {}", relocation.id))?;
    let executor = Executor::new(workflow, registry, journal, executor_config());
    let run = drive(g, executor, &relocation, false).await?;
    finish(g, &store, &relocation, &run)
}

pub(crate) async fn plan(g: &Globals, mut a: RelocateArgs) -> Result<()> {
    a.dry_run = true;
    relocate(g, a).await
}

/// An executor over `relocation`'s journal, with the migrators (plugins
/// included) its workflow needs: what `resume` and `rollback` start from.
pub(crate) fn reopen(file: &SitesFile, store: &Store, relocation: &Relocation) -> Result<Executor> {
    let journal = store
        .journal(&relocation.id)
        .open()
        .with_context(|| format!("opening the journal of {}", relocation.id))?;
    Ok(Executor::from_journal(
        reloc::registry_for(&relocation.workflow, &file.plugin_env())?,
        journal,
        executor_config(),
    )?)
}

pub(crate) async fn resume(g: &Globals, a: IdArgs) -> Result<()> {
    if let Some(remote) = g.remote()? {
        return resume_remote(g, &remote, a).await;
    }
    let file = sites_file(g)?;
    let store = store_of(&file)?;
    local_run(&store, "resume")?;
    let relocation = store.load(&a.id)?;
    let _lock = ServiceLock::acquire(&store, &relocation)?;
    let executor = reopen(&file, &store, &relocation)?;
    if !g.json {
        outln!("resuming relocation {}", relocation.id)?;
    }
    let run = drive(g, executor, &relocation, false).await?;
    finish(g, &store, &relocation, &run)
}

pub(crate) async fn rollback(g: &Globals, a: RollbackArgs) -> Result<()> {
    if let Some(remote) = g.remote()? {
        return rollback_remote(g, &remote, a).await;
    }
    let file = sites_file(g)?;
    let store = store_of(&file)?;
    local_run(&store, "roll back")?;
    let relocation = store.load(&a.id)?;
    let _lock = ServiceLock::acquire(&store, &relocation)?;
    rollback_allowed(&store, &relocation, a.force)?;
    let executor = reopen(&file, &store, &relocation)?;
    if !g.json {
        outln!("rolling back relocation {}", relocation.id)?;
    }
    let run = drive(g, executor, &relocation, true).await?;
    let rep = build_report(&store, &relocation)?;
    store.save_report(&relocation.id, &serde_json::to_vec_pretty(&rep)?)?;
    if g.json {
        print_json(&rep)?;
    } else {
        let undone = run
            .steps
            .iter()
            .filter(|s| s.state == StepState::RolledBack)
            .count();
        outln!(
            "rolled back {undone} steps: the target holds nothing of {}, the source runs it",
            relocation.service
        )?;
    }
    if run.exit_code() != 0 {
        let failed: Vec<String> = run
            .steps
            .iter()
            .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.id)))
            .collect();
        bail!(ExitWith(
            1,
            format!(
                "rollback of {} did not complete: {}",
                relocation.id,
                failed.join("; ")
            )
        ));
    }
    Ok(())
}

/// A succeeded relocation is rolled back only with `force`: its target
/// has run the service since cut-over.
///
/// # Errors
/// `ExitWith(7)` explaining what would be lost and the alternative.
pub(crate) fn rollback_allowed(store: &Store, r: &Relocation, force: bool) -> Result<()> {
    let status = report::status(&store.entries(&r.id)?);
    if status == "succeeded" && !force {
        bail!(ExitWith(
            7,
            format!(
                "relocation {} succeeded: the service has run at {} since cut-over, and rolling back discards everything written there since; relocate it back from {} to keep that data (fluidcloud relocate --from {} ...), or pass --force to roll back anyway",
                r.id,
                r.targets().join(", "),
                r.targets().join(", "),
                r.targets().first().map_or("the target", String::as_str)
            )
        ));
    }
    Ok(())
}

pub(crate) async fn status(g: &Globals, a: StatusArgs) -> Result<()> {
    if let Some(remote) = g.remote()? {
        return status_remote(g, &remote, a).await;
    }
    let file = sites_file(g)?;
    let store = store_of(&file)?;
    match a.id {
        Some(id) => {
            let r = store.load(&id)?;
            let rep = build_report(&store, &r)?;
            if g.json {
                return print_json(&rep);
            }
            print_status(
                [&rep.id, rep.status.as_str(), &rep.service, &rep.from],
                &rep.targets,
                rep.steps.iter().map(|s| {
                    vec![
                        s.id.clone(),
                        s.state.as_str().to_owned(),
                        s.attempts.to_string(),
                        s.error.clone().unwrap_or_default(),
                    ]
                }),
            )?;
            Ok(())
        }
        None => {
            let mut all = Vec::new();
            for id in store.list()? {
                let r = store.load(&id)?;
                all.push(build_report(&store, &r)?);
            }
            let lines: Vec<Line<'_>> = all
                .iter()
                .map(|r| Line {
                    id: &r.id,
                    status: &r.status,
                    service: &r.service,
                    from: &r.from,
                    targets: &r.targets,
                })
                .collect();
            print_relocations(g, &lines)?;
            Ok(())
        }
    }
}

/// One relocation in `status`'s list.
struct Line<'a> {
    id: &'a str,
    status: &'a str,
    service: &'a str,
    from: &'a str,
    targets: &'a [String],
}

/// `status` without an id: JSON rows or a table.
fn print_relocations(g: &Globals, all: &[Line<'_>]) -> Result<()> {
    if g.json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id, "service": r.service, "from": r.from,
                    "targets": r.targets, "status": r.status,
                })
            })
            .collect();
        return print_json(&rows);
    }
    if all.is_empty() {
        outln!("no relocations yet (fluidcloud relocate --from SITE)")?;
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|r| {
            vec![
                r.id.to_owned(),
                r.status.to_owned(),
                r.service.to_owned(),
                r.from.to_owned(),
                r.targets.join(","),
            ]
        })
        .collect();
    out!(
        "{}",
        crate::output::table(&["ID", "STATUS", "SERVICE", "FROM", "TO"], &rows)
    )?;
    Ok(())
}

pub(crate) async fn report_cmd(g: &Globals, a: ReportArgs) -> Result<()> {
    let rep = match g.remote()? {
        Some(remote) => report_remote(&remote, &a.id).await?,
        None => {
            let file = sites_file(g)?;
            let store = store_of(&file)?;
            let r = store.load(&a.id)?;
            build_report(&store, &r)?
        }
    };
    if let Some(path) = &a.html {
        return write_html_report(g, &rep, path);
    }
    if g.json {
        return print_json(&rep);
    }
    print_report(&rep)?;
    Ok(())
}

/// Writes `rep` as one self-contained HTML page (the dashboard's report
/// view, nothing loaded from anywhere), atomically.
fn write_html_report(g: &Globals, rep: &Report, path: &std::path::Path) -> Result<()> {
    let page = fluidcloud_broker::ui::report_page(
        &format!("fluidcloud report {} ({})", rep.id, rep.status),
        &serde_json::to_value(rep)?,
    );
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, page.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    if g.json {
        return print_json(&serde_json::json!({ "id": rep.id, "html": path, "bytes": page.len() }));
    }
    outln!(
        "wrote the report of {} to {} ({})",
        rep.id,
        path.display(),
        bytes(page.len() as u64)
    )?;
    Ok(())
}

pub(crate) fn build_report(store: &Store, r: &Relocation) -> Result<Report> {
    let entries = store.entries(&r.id)?;
    Ok(report::build(r, &entries, &unified_diff))
}

fn unified_diff(path: &str, old: &str, new: &str) -> String {
    fluidcloud_migrators::config::unified_diff(path, old, new)
}

fn secs(s: f64) -> String {
    fluidcloud_viaduct::plan::human_seconds(s)
}

fn print_report(rep: &Report) -> Result<()> {
    outln!(
        "relocation {}: {} — {} from {} to {}",
        rep.id,
        rep.status,
        rep.service,
        rep.from,
        rep.targets.join(", ")
    )?;
    let mut down = rep
        .downtime_seconds
        .map_or_else(|| "-".to_owned(), |d| format!("{d:.2} s"));
    if !rep.downtime_stages.is_empty() {
        let stages: Vec<String> = rep
            .downtime_stages
            .iter()
            .map(|s| format!("{} {:.2} s", s.stage, s.seconds))
            .collect();
        down = format!("{down} ({})", stages.join(", "));
    }
    outln!(
        "  {} total, downtime {down}, {} read, {} written",
        secs(rep.seconds),
        bytes(rep.bytes_read),
        bytes(rep.bytes_written)
    )?;
    let fd = &rep.final_delta;
    if fd.disks_tracked + fd.disks_rehashed > 0 {
        let changed = fd
            .changed_bytes
            .map(|b| format!(" ({} written by the guests during the pre-copy)", bytes(b)))
            .unwrap_or_default();
        outln!(
            "  final delta: {} disk(s) read from change tracking{changed}, {} re-hashed",
            fd.disks_tracked,
            fd.disks_rehashed
        )?;
    }
    outln!()?;
    let rows: Vec<Vec<String>> = rep
        .steps
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.state.as_str().to_owned(),
                s.seconds
                    .map_or_else(|| "-".into(), |t| format!("{t:.2} s")),
                bytes(s.bytes_read),
                bytes(s.bytes_sent),
                bytes(s.bytes_written),
                s.throughput
                    .map_or_else(|| "-".into(), |t| format!("{}/s", bytes(t as u64))),
            ]
        })
        .collect();
    out!(
        "{}",
        crate::output::table(
            &["STEP", "STATE", "TIME", "READ", "SENT", "WRITTEN", "RATE"],
            &rows
        )
    )?;
    let mut sums: Vec<String> = rep
        .steps
        .iter()
        .flat_map(|s| s.outputs.iter())
        .filter_map(|o| {
            // A name in a site's store reads as `SITE:NAME`; paths and
            // URLs as they are.
            let at = if o.locator.contains("://") || o.locator.starts_with('/') {
                o.locator.clone()
            } else {
                format!("{}:{}", o.site, o.locator)
            };
            o.checksum.as_ref().map(|c| format!("  {c}  {at}"))
        })
        .collect();
    sums.sort();
    sums.dedup();
    if !sums.is_empty() {
        outln!("\nchecksums at the target (volumes and buckets verified equal to their source):")?;
        for s in sums {
            outln!("{s}")?;
        }
    }
    if !rep.endpoint_map.is_empty() {
        outln!("\nendpoint map:")?;
        for c in &rep.endpoint_map {
            outln!("  {} -> {}", c.old, c.new)?;
        }
    }
    let diffs: Vec<&str> = rep
        .config
        .iter()
        .map(|c| c.diff.as_str())
        .filter(|d| !d.is_empty())
        .collect();
    if !diffs.is_empty() {
        outln!("\nconfig changes:")?;
        for d in diffs {
            out!("{d}")?;
        }
    }
    if !rep.warnings.is_empty() {
        outln!("\nwarnings:")?;
        for w in &rep.warnings {
            outln!("  {w}")?;
        }
    }
    Ok(())
}

fn finish(g: &Globals, store: &Store, r: &Relocation, run: &RunReport) -> Result<()> {
    let rep = build_report(store, r)?;
    let path = store.save_report(&r.id, &serde_json::to_vec_pretty(&rep)?)?;
    if g.json {
        print_json(&rep)?;
    } else {
        outln!()?;
        print_report(&rep)?;
        outln!("\nreport saved to {path}")?;
    }
    match run.exit_code() {
        0 => Ok(()),
        fluidcloud_viaduct::EXIT_CANCELLED => bail!(ExitWith(
            130,
            format!(
                "relocation {} interrupted; `fluidcloud resume {}` continues it, `fluidcloud rollback {}` undoes it",
                r.id, r.id, r.id
            )
        )),
        _ => {
            let failed = run
                .steps
                .iter()
                .find(|s| s.state == StepState::Failed)
                .map(|s| {
                    format!(
                        "step {} failed: {}",
                        s.id,
                        s.error.as_deref().unwrap_or("unknown error")
                    )
                })
                .unwrap_or_else(|| "a step failed".into());
            bail!(ExitWith(
                1,
                format!(
                    "relocation {} failed: {failed}; the source is untouched until cut-over. `fluidcloud resume {}` retries, `fluidcloud rollback {}` cleans the target",
                    r.id, r.id, r.id
                )
            ))
        }
    }
}

/// Runs (or rolls back) with progress bars on a terminal.
async fn drive(
    g: &Globals,
    mut executor: Executor,
    r: &Relocation,
    rollback: bool,
) -> Result<RunReport> {
    let multi = MultiProgress::with_draw_target(if g.json {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    });
    let overall = multi.add(ProgressBar::new(r.bytes_to_move.max(1)));
    overall.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    overall.set_prefix(if rollback { "rollback" } else { "relocate" });
    let step_style = ProgressStyle::with_template(
        "{prefix:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let data_steps: std::collections::HashSet<String> = r
        .workflow
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s.migrator.as_str(),
                "disk-transfer" | "bucket-transfer" | "object-copy"
            ) && !s.id.starts_with("sync:")
        })
        .map(|s| s.id.clone())
        .collect();
    let mut events = executor.subscribe();
    let canceller = executor.canceller();
    let ctrl_c = canceller.on_ctrl_c();
    // Without a terminal (a CI log, a pipe) the bars are hidden, and so is
    // `println` on them: the same lines then go to stderr as they are.
    let plain = !g.json && multi.is_hidden();
    let ui = tokio::spawn(async move {
        let say = |line: &str| {
            if plain {
                eprintln!("{line}");
            } else {
                let _ = multi.println(line);
            }
        };
        let mut bars: HashMap<String, ProgressBar> = HashMap::new();
        let mut done: HashMap<String, u64> = HashMap::new();
        let mut lines = Vec::new();
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            match ev {
                ProgressEvent::StepStarted { step, .. } => {
                    let bar = multi.add(ProgressBar::new(0));
                    bar.set_style(step_style.clone());
                    bar.set_prefix(step.clone());
                    bars.insert(step, bar);
                }
                ProgressEvent::StepProgress {
                    step,
                    done: d,
                    total,
                    ..
                } => {
                    if let Some(b) = bars.get(&step) {
                        if let Some(t) = total {
                            b.set_length(t);
                        }
                        b.set_position(d);
                    }
                    if data_steps.contains(&step) {
                        done.insert(step, d);
                        overall.set_position(done.values().sum());
                    }
                }
                ProgressEvent::StepMessage { step, text } => {
                    // A config step's message carries its whole diff,
                    // which the report shows: one line here.
                    let first = text.lines().next().unwrap_or_default();
                    let more = if text.lines().nth(1).is_some() {
                        " (details in the report)"
                    } else {
                        ""
                    };
                    say(&format!("  {step}: {first}{more}"));
                }
                ProgressEvent::StepRetrying {
                    step,
                    attempt,
                    delay_ms,
                    error,
                } => {
                    say(&format!(
                        "  {step}: attempt {attempt} failed ({error}); retrying in {:.1} s",
                        delay_ms as f64 / 1000.0
                    ));
                }
                ProgressEvent::StepFinished {
                    step,
                    state,
                    elapsed_ms,
                    ..
                } => {
                    if let Some(b) = bars.remove(&step) {
                        b.finish_and_clear();
                        multi.remove(&b);
                    }
                    let line = format!(
                        "  {:<9} {step} ({:.2} s)",
                        state.as_str(),
                        elapsed_ms as f64 / 1000.0
                    );
                    say(&line);
                    lines.push(line);
                }
                ProgressEvent::StepRolledBack { step } => {
                    say(&format!("  rolled back {step}"));
                }
                ProgressEvent::RunFinished { .. } => break,
            }
        }
        overall.finish_and_clear();
        lines
    });
    let result = if rollback {
        executor.rollback().await
    } else {
        executor.run().await
    };
    ctrl_c.abort();
    drop(executor);
    // An appliance a failed run left waiting for its `guest-adapt`.
    fluidcloud_conduit::guest::release(&r.id);
    let _ = tokio::time::timeout(Duration::from_secs(2), ui).await;
    Ok(result?)
}

// ---- `--server URL`: the same commands against `fluidcloud serve` ----

use crate::remote::{Remote, SseEvent};
use fluidcloud_broker::runner::{BucketsMode, RelocationRequest, RelocationView};

/// Prints a run's step transitions as `drive` does, from the service's
/// events.
fn print_event(g: &Globals, ev: &SseEvent) {
    if g.json {
        return;
    }
    let d = &ev.data;
    let step = d["step"].as_str().unwrap_or("");
    match ev.name.as_str() {
        "step-finished" => eprintln!(
            "  {:<9} {step} ({:.2} s)",
            d["state"].as_str().unwrap_or(""),
            d["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
        ),
        "step-rolled-back" => eprintln!("  rolled back {step}"),
        "step-retrying" => eprintln!(
            "  {step}: attempt {} failed ({}); retrying",
            d["attempt"],
            d["error"].as_str().unwrap_or("")
        ),
        "step-message" => eprintln!("  {step}: {}", d["text"].as_str().unwrap_or("")),
        _ => {}
    }
}

/// Follows the events of `id` to their end; the final state.
async fn follow(g: &Globals, remote: &Remote, id: &str) -> Result<RelocationView> {
    let what = format!("following relocation {id}");
    remote
        .events(&format!("/relocations/{id}/events"), &what, |ev| {
            print_event(g, ev)
        })
        .await?;
    remote
        .get(
            &format!("/relocations/{id}"),
            &format!("reading relocation {id}"),
        )
        .await
}

fn report_of(v: &RelocationView) -> Result<Option<Report>> {
    v.report
        .clone()
        .map(serde_json::from_value)
        .transpose()
        .context("the service sent a report this client cannot read")
}

/// The end of a remote run: the report, and the local commands' exit codes.
fn finish_remote(g: &Globals, v: &RelocationView) -> Result<()> {
    let rep = report_of(v)?;
    match &rep {
        Some(rep) if g.json => print_json(rep)?,
        Some(rep) => {
            outln!()?;
            print_report(rep)?;
        }
        None if g.json => print_json(v)?,
        None => {}
    }
    let id = &v.id;
    match v.status.as_str() {
        "succeeded" | "rolled-back" => Ok(()),
        "cancelled" | "interrupted" => bail!(ExitWith(
            130,
            format!(
                "relocation {id} {}; `fluidcloud --server URL resume {id}` continues it, `fluidcloud --server URL rollback {id}` undoes it",
                v.status
            )
        )),
        _ => {
            let failed = v
                .steps
                .iter()
                .find(|s| s.state == "failed")
                .map(|s| {
                    format!(
                        "step {} failed: {}",
                        s.id,
                        s.error.as_deref().unwrap_or("unknown error")
                    )
                })
                .unwrap_or_else(|| format!("status {}", v.status));
            bail!(ExitWith(1, format!("relocation {id} failed: {failed}")))
        }
    }
}

pub(crate) async fn relocate_remote(g: &Globals, remote: &Remote, a: RelocateArgs) -> Result<()> {
    if a.manifest.is_some() || a.dry_run {
        bail!(ExitWith(
            2,
            "--manifest and --dry-run run only locally; with --server the service plans and runs"
                .into()
        ));
    }
    let req = RelocationRequest {
        from: a.from.clone(),
        to: a.to.clone(),
        service: a.service.clone(),
        constraints: a.constraints.clone(),
        buckets: match a.buckets {
            BucketsArg::Copy => BucketsMode::Copy,
            BucketsArg::Repoint => BucketsMode::Repoint,
        },
        retry_budget_secs: a.retry_budget,
        force: a.force,
        tenant: None,
    };
    let v: RelocationView = remote
        .post("/relocations", &req, "starting the relocation")
        .await?;
    if !g.json {
        outln!(
            "relocation {}: service {} from {} to {}, running on the service",
            v.id,
            v.service,
            v.from,
            v.targets.join(", ")
        )?;
    }
    let v = follow(g, remote, &v.id).await?;
    finish_remote(g, &v)
}

/// `POST /relocations/ID/ACTION` (resume or rollback), then its events to
/// the end; the final state.
async fn act_and_follow(
    g: &Globals,
    remote: &Remote,
    id: &str,
    action: &str,
    doing: &str,
) -> Result<RelocationView> {
    let v: RelocationView = remote
        .post(
            &format!("/relocations/{id}/{action}"),
            &serde_json::json!({}),
            &format!("{doing} {id}"),
        )
        .await?;
    if !g.json {
        outln!("{doing} relocation {}", v.id)?;
    }
    follow(g, remote, &v.id).await
}

pub(crate) async fn resume_remote(g: &Globals, remote: &Remote, a: IdArgs) -> Result<()> {
    let v = act_and_follow(g, remote, &a.id, "resume", "resuming").await?;
    finish_remote(g, &v)
}

pub(crate) async fn rollback_remote(g: &Globals, remote: &Remote, a: RollbackArgs) -> Result<()> {
    let action = if a.force {
        "rollback?force=true"
    } else {
        "rollback"
    };
    let v = act_and_follow(g, remote, &a.id, action, "rolling back").await?;
    if g.json {
        match report_of(&v)? {
            Some(rep) => print_json(&rep)?,
            None => print_json(&v)?,
        }
    } else {
        let undone = v.steps.iter().filter(|s| s.state == "rolled-back").count();
        outln!(
            "rolled back {undone} steps: the target holds nothing of {}, the source runs it",
            v.service
        )?;
    }
    if v.status != "rolled-back" {
        let failed: Vec<String> = v
            .steps
            .iter()
            .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.id)))
            .collect();
        bail!(ExitWith(
            1,
            format!(
                "rollback of {} did not complete ({}): {}",
                v.id,
                v.status,
                failed.join("; ")
            )
        ));
    }
    Ok(())
}

pub(crate) async fn status_remote(g: &Globals, remote: &Remote, a: StatusArgs) -> Result<()> {
    let Some(id) = a.id else {
        let all: Vec<RelocationView> = remote.get("/relocations", "listing relocations").await?;
        let lines: Vec<Line<'_>> = all
            .iter()
            .map(|r| Line {
                id: &r.id,
                status: &r.status,
                service: &r.service,
                from: &r.from,
                targets: &r.targets,
            })
            .collect();
        print_relocations(g, &lines)?;
        return Ok(());
    };
    let v: RelocationView = remote
        .get(
            &format!("/relocations/{id}"),
            &format!("reading relocation {id}"),
        )
        .await?;
    if g.json {
        return match report_of(&v)? {
            Some(rep) => print_json(&rep),
            None => print_json(&v),
        };
    }
    print_status(
        [&v.id, &v.status, &v.service, &v.from],
        &v.targets,
        v.steps.iter().map(|s| {
            vec![
                s.id.clone(),
                s.state.clone(),
                s.attempts.to_string(),
                s.error.clone().unwrap_or_default(),
            ]
        }),
    )?;
    Ok(())
}

/// `status ID` in text, local or remote: `[id, status, service, from]`,
/// the targets, and a row per step (id, state, attempts, last error).
fn print_status(
    head: [&str; 4],
    targets: &[String],
    steps: impl Iterator<Item = Vec<String>>,
) -> Result<()> {
    let [id, status, service, from] = head;
    outln!(
        "{id}: {status} ({service} from {from} to {})",
        targets.join(", ")
    )?;
    let rows: Vec<Vec<String>> = steps.collect();
    out!(
        "{}",
        crate::output::table(&["STEP", "STATE", "ATTEMPTS", "LAST ERROR"], &rows)
    )?;
    Ok(())
}

async fn report_remote(remote: &Remote, id: &str) -> Result<Report> {
    let v: RelocationView = remote
        .get(
            &format!("/relocations/{id}"),
            &format!("reading relocation {id}"),
        )
        .await?;
    let Some(rep) = report_of(&v)? else {
        bail!(ExitWith(
            7,
            format!(
                "relocation {} is {}: the report comes when the run ends (`status` shows the steps)",
                v.id, v.status
            )
        ));
    };
    Ok(rep)
}
