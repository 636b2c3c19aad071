//! The two example plugins, run as processes through the host.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fluidcloud_plugins::harness::{Event, Recorder};
use fluidcloud_plugins::host::{HostConfig, PluginCommand, PluginMigrator};
use fluidcloud_plugins::{
    Artifact, ArtifactKind, CancelFlag, Error, ExecContext, Migrator, StepRequest,
};
use serde_json::json;

fn python_plugin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/sqlite-dump/fluidcloud-migrator-sqlite-dump")
}

fn cfg() -> HostConfig {
    HostConfig {
        call_timeout: Duration::from_secs(30),
        ..HostConfig::default()
    }
}

fn input(kind: ArtifactKind, path: &Path) -> Artifact {
    Artifact {
        kind,
        site: "dc-paris".into(),
        locator: path.display().to_string(),
        size: None,
        checksum: None,
    }
}

const ZONE: &str = "\
$ORIGIN shop.example.
$TTL 300
@   IN SOA ns1.shop.example. admin.shop.example. (
        2026112201 ; serial
        3600 900 604800 300 )
    IN NS  ns1
ns1 IN A   10.0.0.2
www IN A   10.0.0.5   ; the web VM
app IN A   10.0.0.6
db  IN CNAME app
v6  IN AAAA fd00::5
txt IN TXT \"10.0.0.5 stays in text\"
";

fn dns() -> PluginMigrator {
    PluginMigrator::spawn(
        PluginCommand::new(env!("CARGO_BIN_EXE_fluidcloud-migrator-dns-zone")),
        cfg(),
    )
    .unwrap()
}

#[tokio::test]
async fn the_rust_example_rewrites_a_zone_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let zone = dir.path().join("shop.zone");
    std::fs::write(&zone, ZONE).unwrap();
    let to = dir.path().join("shop.zone.new");
    let m = dns();
    assert_eq!(m.describe().name, "dns-zone");
    assert_eq!(m.describe().consumes, [ArtifactKind::ConfigFile]);
    let mut req = StepRequest {
        step_id: "dns".into(),
        params: json!({}),
        inputs: Default::default(),
    };
    let keys: Vec<String> = m.validate(&req).into_iter().filter_map(|d| d.key).collect();
    assert_eq!(keys, ["inputs.zone", "params.to", "params.rewrite"]);
    req.params = json!({"to": to, "rewrite": {"10.0.0.5": "192.0.2.10", "fd00::5": "2001:db8::5", "app": "app2"}});
    req.inputs
        .insert("zone".into(), input(ArtifactKind::ConfigFile, &zone));
    assert!(m.validate(&req).is_empty());
    assert_eq!(m.plan(&req).await.unwrap().bytes_read, ZONE.len() as u64);
    let rec = Recorder::default();
    let ctx = ExecContext {
        progress: Arc::new(rec.clone()),
        cancel: CancelFlag::new(),
    };
    let out = m.execute(&req, &ctx).await.unwrap();
    let new = std::fs::read_to_string(&to).unwrap();
    assert!(
        new.contains("www IN A   192.0.2.10   ; the web VM"),
        "{new}"
    );
    assert!(new.contains("v6  IN AAAA 2001:db8::5"), "{new}");
    assert!(new.contains("db  IN CNAME app2"), "{new}");
    assert!(new.contains("2026112202 ; serial"), "{new}");
    assert!(new.contains("app IN A   10.0.0.6"), "{new}");
    assert!(new.contains("\"10.0.0.5 stays in text\""), "{new}");
    assert_eq!(out.artifacts["zone"].locator, to.display().to_string());
    assert!(
        rec.events()
            .contains(&Event::Message("3 records rewritten".into()))
    );
    m.rollback(&req, Some(&out), &ExecContext::quiet())
        .await
        .unwrap();
    assert!(!to.exists());
    assert_eq!(
        std::fs::read_to_string(&zone).unwrap(),
        ZONE,
        "source untouched"
    );

    std::fs::remove_file(&zone).unwrap();
    let e = m.execute(&req, &ExecContext::quiet()).await.unwrap_err();
    assert!(
        matches!(&e, Error::Plugin { message, .. } if message.contains("shop.zone")),
        "{e}"
    );
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

/// A SQLite database with two tables and `rows` rows in one of them.
fn make_db(path: &Path, rows: u32) {
    python(&format!(
        "import sqlite3\nc = sqlite3.connect({path:?})\n\
         c.execute('CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)')\n\
         c.execute('CREATE TABLE users (name TEXT)')\n\
         c.executemany('INSERT INTO orders (item) VALUES (?)', [('item %d' % i,) for i in range({rows})])\n\
         c.execute(\"INSERT INTO users VALUES ('ada')\")\nc.commit()\n",
        path = path.display().to_string()
    ));
}

fn count(path: &Path, table: &str) -> u64 {
    python(&format!(
        "import sqlite3\nprint(sqlite3.connect({:?}).execute('SELECT count(*) FROM {table}').fetchone()[0])",
        path.display().to_string()
    ))
    .trim()
    .parse()
    .unwrap()
}

#[tokio::test]
async fn the_python_example_dumps_and_restores_a_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("shop.db");
    make_db(&src, 250);
    let to = dir.path().join("restored.db");
    let m = PluginMigrator::spawn(PluginCommand::new(python_plugin()), cfg()).unwrap();
    assert_eq!(m.describe().name, "sqlite-dump");
    assert_eq!(m.hello().version.to_string(), "1.0.0");
    let mut req = StepRequest {
        step_id: "db".into(),
        params: json!({"to": to}),
        inputs: Default::default(),
    };
    assert_eq!(m.validate(&req)[0].key.as_deref(), Some("inputs.db"));
    let e = m.plan(&req).await.unwrap_err();
    assert!(
        matches!(&e, Error::Invalid(d) if d[0].key.as_deref() == Some("inputs.db")),
        "{e:?}"
    );
    req.inputs
        .insert("db".into(), input(ArtifactKind::Volume, &src));
    assert!(m.validate(&req).is_empty());
    let size = std::fs::metadata(&src).unwrap().len();
    assert_eq!(m.plan(&req).await.unwrap().bytes_read, size);
    let rec = Recorder::default();
    let ctx = ExecContext {
        progress: Arc::new(rec.clone()),
        cancel: CancelFlag::new(),
    };
    let out = m.execute(&req, &ctx).await.unwrap();
    assert_eq!(count(&to, "orders"), 250);
    assert_eq!(count(&to, "users"), 1);
    assert_eq!(out.artifacts["db"].kind, ArtifactKind::Volume);
    let events = rec.events();
    assert!(
        matches!(events.first(), Some(Event::Message(m)) if m.starts_with("dumped 2 tables")),
        "{events:?}"
    );
    assert!(matches!(events.last(), Some(Event::Progress { done, total: Some(t) }) if done == t));
    m.rollback(&req, Some(&out), &ExecContext::quiet())
        .await
        .unwrap();
    assert!(!to.exists());
    assert!(!dir.path().join("restored.db.sql").exists());
    assert_eq!(count(&src, "orders"), 250, "source untouched");
}
