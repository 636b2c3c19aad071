//! The example plugins (Rust `dns-zone`, Python `sqlite-dump`) as real
//! processes behind the plugin host, run by the viaduct engine in a real
//! workflow with a SQLite journal: execute, then roll back.
//!
//! `tests/relocate_plugins.rs` runs them inside `fluidcloud relocate`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fluidcloud_plugins::host::{HostConfig, PluginCommand, PluginMigrator};
use fluidcloud_plugins::{Artifact, ArtifactKind};
use fluidcloud_viaduct::{
    Executor, ExecutorConfig, InputBinding, Outcome, ProgressEvent, Registry, RetryPolicy,
    SqliteJournal, StepSpec, StepState, WorkflowBuilder,
};
use serde_json::json;

use common::{dns_zone_plugin, sqlite_plugin};

fn registry() -> Registry {
    let cfg = HostConfig {
        call_timeout: Duration::from_secs(60),
        ..HostConfig::default()
    };
    let dns = PluginMigrator::spawn(PluginCommand::new(dns_zone_plugin()), cfg.clone()).unwrap();
    let sql = PluginMigrator::spawn(PluginCommand::new(sqlite_plugin()), cfg).unwrap();
    Registry::new().with(Arc::new(dns)).with(Arc::new(sql))
}

fn python(code: &str) -> String {
    let o = Command::new("python3")
        .arg("-c")
        .arg(code)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn rows(db: &Path) -> u64 {
    python(&format!(
        "import sqlite3\nprint(sqlite3.connect({:?}).execute('SELECT count(*) FROM orders').fetchone()[0])",
        db.display().to_string()
    ))
    .trim()
    .parse()
    .unwrap()
}

fn given(kind: ArtifactKind, path: &Path) -> InputBinding {
    InputBinding::Given {
        artifact: Artifact {
            kind,
            site: "dc-paris".into(),
            locator: path.display().to_string(),
            size: None,
            checksum: None,
        },
    }
}

const ZONE: &str =
    "@ IN SOA ns1 admin 2026010100 3600 900 604800 300\nwww IN A 10.0.0.5\ndb IN A 10.0.0.7\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_example_plugins_run_in_a_journalled_workflow_and_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("shop.db");
    python(&format!(
        "import sqlite3\nc = sqlite3.connect({:?})\n\
         c.execute('CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)')\n\
         c.executemany('INSERT INTO orders (item) VALUES (?)', [('i%d' % i,) for i in range(400)])\n\
         c.commit()\n",
        src.display().to_string()
    ));
    let zone = d.join("shop.zone");
    std::fs::write(&zone, ZONE).unwrap();
    let (staged, restored, new_zone) = (
        d.join("staged.db"),
        d.join("restored.db"),
        d.join("shop.zone.new"),
    );

    let reg = registry();
    let wf = WorkflowBuilder::new("relocate-shop")
        .step(
            StepSpec::new("db-stage", "sqlite-dump", "edge-rennes")
                .params(json!({"to": staged}))
                .input("db", given(ArtifactKind::Volume, &src))
                .output("db", ArtifactKind::Volume),
        )
        .step(
            StepSpec::new("db-restore", "sqlite-dump", "edge-rennes")
                .params(json!({"to": restored, "site": "edge-rennes"}))
                .input("db", InputBinding::from_step("db-stage", "db", ArtifactKind::Volume))
                .output("db", ArtifactKind::Volume),
        )
        .step(
            StepSpec::new("dns-cutover", "dns-zone", "edge-rennes")
                .params(json!({"to": new_zone, "rewrite": {"10.0.0.5": "192.0.2.5", "10.0.0.7": "192.0.2.7"}}))
                .input("zone", given(ArtifactKind::ConfigFile, &zone))
                .output("zone", ArtifactKind::ConfigFile)
                .after("db-restore"),
        )
        .build(&reg)
        .unwrap();
    let journal = d.join("journal.db");
    let config = ExecutorConfig {
        retry: RetryPolicy::never(),
        ..ExecutorConfig::default()
    };
    let mut ex = Executor::new(
        wf,
        reg.clone(),
        Box::new(SqliteJournal::open(&journal).unwrap()),
        config,
    );
    let mut rx = ex.subscribe();
    let report = ex.run().await.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded, "{report:#?}");
    assert_eq!(rows(&restored), 400);
    let z = std::fs::read_to_string(&new_zone).unwrap();
    assert!(
        z.contains("www IN A 192.0.2.5") && z.contains("db IN A 192.0.2.7"),
        "{z}"
    );
    assert!(z.contains("2026010101"), "serial bumped: {z}");
    let out = report.steps[1].output.as_ref().unwrap();
    assert_eq!(out.artifacts["db"].site, "edge-rennes");
    assert_eq!(out.artifacts["db"].locator, restored.display().to_string());
    let mut progress = 0;
    let mut messages = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            ProgressEvent::StepProgress { step, .. } if step == "db-stage" => progress += 1,
            ProgressEvent::StepMessage { step, text } => messages.push(format!("{step}: {text}")),
            _ => {}
        }
    }
    assert!(
        progress >= 4,
        "plugin progress reaches the engine ({progress})"
    );
    assert!(
        messages.contains(&"dns-cutover: 2 records rewritten".to_owned()),
        "{messages:?}"
    );

    let rolled = ex.rollback().await.unwrap();
    assert!(
        rolled
            .steps
            .iter()
            .all(|s| s.state == StepState::RolledBack),
        "{rolled:#?}"
    );
    assert!(!restored.exists() && !staged.exists() && !new_zone.exists());
    assert_eq!(rows(&src), 400, "the source is never touched");
    assert_eq!(std::fs::read_to_string(&zone).unwrap(), ZONE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_plugin_step_fails_the_run_with_the_plugins_error() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry();
    // Validation goes through the plugin: a missing param is reported at
    // build time, keyed by step.
    let bad = WorkflowBuilder::new("bad")
        .step(
            StepSpec::new("db", "sqlite-dump", "edge-rennes")
                .input("db", given(ArtifactKind::Volume, &dir.path().join("x.db")))
                .output("db", ArtifactKind::Volume),
        )
        .build(&reg)
        .unwrap_err()
        .to_string();
    assert!(bad.contains("needs param `to`"), "{bad}");

    let wf = WorkflowBuilder::new("missing-source")
        .step(
            StepSpec::new("db", "sqlite-dump", "edge-rennes")
                .params(json!({"to": dir.path().join("out.db")}))
                .input(
                    "db",
                    given(ArtifactKind::Volume, &dir.path().join("missing.db")),
                )
                .output("db", ArtifactKind::Volume),
        )
        .build(&reg)
        .unwrap();
    let mut ex = Executor::new(
        wf,
        reg.clone(),
        Box::new(SqliteJournal::open(dir.path().join("j.db")).unwrap()),
        ExecutorConfig::default(),
    );
    let report = ex.run().await.unwrap();
    assert_eq!(report.outcome, Outcome::Failed);
    assert_eq!(
        report.steps[0].attempts, 1,
        "a not-found error is never retried"
    );
    let err = report.steps[0].error.clone().unwrap();
    assert!(
        err.contains("plugin sqlite-dump") && err.contains("missing.db"),
        "{err}"
    );
}

/// A plugin written as `plugins/README.md` shows: a few lines of Python,
/// here an image converter that only describes itself.
const VHDX_PLUGIN: &str = r#"#!/usr/bin/env python3
import json, sys
for line in sys.stdin:
    req = json.loads(line)
    rid, method = req["id"], req["method"]
    if method == "hello":
        res = {"protocol": "fluidcloud-migrator", "version": "1.0.0", "features": []}
    elif method == "describe":
        res = {"name": "to-vhdx", "version": "0.1.0", "summary": "raw to vhdx",
               "consumes": [{"type": "disk-image", "format": "raw"}],
               "produces": [{"type": "disk-image", "format": "vhdx"}]}
    else:
        res = []
    sys.stdout.write(json.dumps({"id": rid, "result": res}) + "\n")
    sys.stdout.flush()
"#;

#[test]
fn a_plugin_joins_broker_chains_like_a_built_in() {
    use fluidcloud_broker::chain::ChainFinder;
    use fluidcloud_plugins::{ImageFormat, Migrator, MigratorDescriptor};
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("fluidcloud-migrator-to-vhdx");
    std::fs::write(&exe, VHDX_PLUGIN).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plugin = PluginMigrator::spawn(PluginCommand::new(&exe), HostConfig::default()).unwrap();
    let img = |format| ArtifactKind::DiskImage { format };
    let builtin = MigratorDescriptor {
        name: "image-convert".into(),
        version: "0.1.0".into(),
        summary: String::new(),
        consumes: vec![img(ImageFormat::Qcow2), img(ImageFormat::Raw)],
        produces: vec![img(ImageFormat::Qcow2), img(ImageFormat::Raw)],
    };
    let accepted = [img(ImageFormat::Vhdx)].into();
    let without = ChainFinder::new(std::slice::from_ref(&builtin));
    assert_eq!(without.find(img(ImageFormat::Qcow2), &accepted), None);
    let with = ChainFinder::new(&[builtin, plugin.describe()]);
    let chain = with.find(img(ImageFormat::Qcow2), &accepted).unwrap();
    let names: Vec<&str> = chain.iter().map(|s| s.migrator.as_str()).collect();
    assert_eq!(names, ["image-convert", "to-vhdx"]);
    assert_eq!(chain[1].from, img(ImageFormat::Raw));
}

/// The Python plugin of `plugins/README.md`, copied from the README as a
/// newcomer would, runs as a workflow step and rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_plugin_works_in_a_workflow() {
    use std::os::unix::fs::PermissionsExt;

    let readme = include_str!("../plugins/README.md");
    let start = readme.find("```python\n").unwrap() + "```python\n".len();
    let code = &readme[start..start + readme[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("fluidcloud-migrator-hello-py");
    std::fs::write(&exe, code).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hello = PluginMigrator::spawn(PluginCommand::new(&exe), HostConfig::default()).unwrap();
    let reg = Registry::new().with(Arc::new(hello));
    let to = dir.path().join("greeting.txt");
    let missing = WorkflowBuilder::new("greet")
        .step(StepSpec::new("greet", "hello-py", "edge-rennes"))
        .build(&reg)
        .unwrap_err()
        .to_string();
    assert!(missing.contains("needs param `to`"), "{missing}");
    let wf = WorkflowBuilder::new("greet")
        .step(
            StepSpec::new("greet", "hello-py", "edge-rennes")
                .params(json!({ "to": to }))
                .output("greeting", ArtifactKind::ConfigFile),
        )
        .build(&reg)
        .unwrap();
    let mut ex = Executor::new(
        wf,
        reg.clone(),
        Box::new(SqliteJournal::open(dir.path().join("j.db")).unwrap()),
        ExecutorConfig::default(),
    );
    let report = ex.run().await.unwrap();
    assert_eq!(report.outcome, Outcome::Succeeded, "{report:#?}");
    assert_eq!(std::fs::read_to_string(&to).unwrap(), "hello\n");
    ex.rollback().await.unwrap();
    assert!(!to.exists());
}
