//! Plugin migrators inside a real relocation: the shop's service manifest
//! declares two extra steps, run by the example plugins (the Python
//! `sqlite-dump` during the downtime, the Rust `dns-zone` after cut-over),
//! discovered through `$FLUIDCLOUD_PLUGIN_PATH`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    dns_zone_plugin, fails, fresh_demo, ok, relocate_shop, relocation_id, run_with_plugins,
    sqlite_plugin, stdout, tree_digest,
};

const ZONE: &str = "\
$ORIGIN shop.example.com.
$TTL 300
@    IN SOA ns1.example.com. admin.example.com. ( 2026112201 3600 600 86400 300 )
db   IN A     10.10.0.13
app  IN A     10.10.0.12   ; the application servers
web  IN CNAME web.shop.paris.internal.
www  IN A     192.0.2.80
";

const ZONE_AFTER: &str = "\
$ORIGIN shop.example.com.
$TTL 300
@    IN SOA ns1.example.com. admin.example.com. ( 2026112202 3600 600 86400 300 )
db   IN A     10.30.0.13
app  IN A     10.30.0.12   ; the application servers
web  IN CNAME web.shop.fra.internal.
www  IN A     192.0.2.80
";

const STEPS: &str = r#"
[[steps]]
name = "orders-db"
migrator = "sqlite-dump"
phase = "downtime"
instance = "db"
[steps.inputs.db]
kind = "volume"
locator = "${source_root}/data/orders.sqlite"
[steps.params]
to = "${target_root}/data/orders.sqlite"

[[steps]]
name = "dns"
migrator = "dns-zone"
phase = "after-cutover"
[steps.inputs.zone]
kind = "config-file"
locator = "${source_root}/dns/shop.zone"
[steps.params]
to = "${target_root}/dns/shop.zone"
"#;

/// Runs the CLI with both example plugins discoverable.
fn run_plugins(args: &[&str]) -> Output {
    run_with_plugins(&[dns_zone_plugin(), &sqlite_plugin()], args)
}

fn python(script: &str, args: &[&Path]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every row of every table, in order: what "the same database" means.
fn db_rows(db: &Path) -> String {
    python(
        "import sqlite3,sys\n\
         c=sqlite3.connect(sys.argv[1])\n\
         for (t,) in c.execute(\"select name from sqlite_master where type='table' order by name\"):\n\
         \x20   for r in c.execute(f'select * from \"{t}\" order by rowid'): print(t, r)\n",
        &[db],
    )
}

/// A demo environment whose shop has an orders database, a zone file and
/// the two manifest steps.
fn with_plugin_steps(name: &str) -> (PathBuf, String) {
    let (dir, config) = fresh_demo(name);
    let paris = dir.join("sites/dc-paris");
    std::fs::create_dir_all(paris.join("data")).unwrap();
    std::fs::create_dir_all(paris.join("dns")).unwrap();
    python(
        "import sqlite3,sys\n\
         c=sqlite3.connect(sys.argv[1])\n\
         c.execute('create table orders(id integer primary key, item text, cents integer)')\n\
         c.execute('create table customers(id integer primary key, name text)')\n\
         c.executemany('insert into orders(item,cents) values(?,?)', [(f'item {i}', i*7) for i in range(1500)])\n\
         c.executemany('insert into customers(name) values(?)', [(f'c{i}',) for i in range(40)])\n\
         c.commit()\n",
        &[&paris.join("data/orders.sqlite")],
    );
    std::fs::write(paris.join("dns/shop.zone"), ZONE).unwrap();
    let mut manifest = std::fs::OpenOptions::new()
        .append(true)
        .open(paris.join("services/shop.toml"))
        .unwrap();
    manifest.write_all(STEPS.as_bytes()).unwrap();
    (dir, config)
}

#[test]
fn both_example_plugins_run_inside_a_relocation_and_roll_back() {
    let (dir, config) = with_plugin_steps("plugins");
    let paris = dir.join("sites/dc-paris");
    let fra = dir.join("sites/cloud-frankfurt");
    let source_db = db_rows(&paris.join("data/orders.sqlite"));
    assert_eq!(source_db.lines().count(), 1540);
    let source_before = tree_digest(&paris.join("data"));

    // The plan shows the plugin steps where their phases put them.
    let mut args = relocate_shop(&config, "dc-paris", "cloud-frankfurt");
    args.extend(["--dry-run", "--json"]);
    let plan = ok(&run_plugins(&args));
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let steps = plan["relocation"]["workflow"]["steps"].as_array().unwrap();
    let step = |id: &str| steps.iter().find(|s| s["id"] == id).unwrap().clone();
    let db = step("step:orders-db");
    assert_eq!(db["migrator"], "sqlite-dump");
    assert_eq!(db["site"], "cloud-frankfurt");
    assert_eq!(db["after"], serde_json::json!(["stop-source"]));
    let fra_abs = fra.canonicalize().unwrap();
    assert_eq!(
        db["params"]["to"],
        fra_abs.join("data/orders.sqlite").display().to_string()
    );
    assert_eq!(db["params"]["site"], "cloud-frankfurt");
    assert!(db["params"]["endpoint_map"].as_array().unwrap().len() >= 6);
    assert!(
        step("cutover")["after"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("step:orders-db"))
    );
    assert_eq!(step("step:dns")["after"], serde_json::json!(["cutover"]));

    let out = ok(&run_plugins(&relocate_shop(
        &config,
        "dc-paris",
        "cloud-frankfurt",
    )));
    let id = relocation_id(&out);
    assert!(out.contains("step:orders-db"), "{out}");
    assert!(out.contains("step:dns"), "{out}");

    // The database arrived whole, the zone points at the new site, the
    // source is as it was.
    assert_eq!(db_rows(&fra.join("data/orders.sqlite")), source_db);
    assert!(fra.join("data/orders.sqlite.sql").is_file());
    assert_eq!(
        std::fs::read_to_string(fra.join("dns/shop.zone")).unwrap(),
        ZONE_AFTER
    );
    assert_eq!(tree_digest(&paris.join("data")), source_before);
    assert_eq!(
        std::fs::read_to_string(paris.join("dns/shop.zone")).unwrap(),
        ZONE
    );

    let report = ok(&run_plugins(&[
        "--config", &config, "--json", "report", &id,
    ]));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let rstep = |sid: &str| {
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == sid)
            .unwrap_or_else(|| panic!("no {sid} in the report"))
            .clone()
    };
    for sid in ["step:orders-db", "step:dns"] {
        assert_eq!(rstep(sid)["state"], "succeeded", "{sid}");
    }
    assert_eq!(rstep("step:orders-db")["migrator"], "sqlite-dump");
    assert!(rstep("step:orders-db")["bytes_written"].as_u64().unwrap() > 4096);
    assert_eq!(
        rstep("step:dns")["outputs"][0]["locator"],
        fra_abs.join("dns/shop.zone").display().to_string()
    );

    // Rollback asks each plugin to undo its step.
    ok(&run_plugins(&[
        "--config", &config, "rollback", &id, "--force",
    ]));
    assert!(!fra.join("data/orders.sqlite").exists());
    assert!(!fra.join("data/orders.sqlite.sql").exists());
    assert!(!fra.join("dns/shop.zone").exists());
    assert!(
        !fra.join("dns").exists(),
        "the directory dns-zone made stays"
    );
    assert!(
        !fra.join("data").exists(),
        "the directory sqlite-dump made stays"
    );
    assert_eq!(tree_digest(&paris.join("data")), source_before);
}

#[test]
fn a_step_whose_migrator_is_nowhere_fails_before_anything_is_written() {
    let (dir, config) = with_plugin_steps("plugins-missing");
    let before = tree_digest(&dir.join("sites"));
    // Without the plugins on the search path.
    let out = run_with_plugins(&[], &relocate_shop(&config, "dc-paris", "cloud-frankfurt"));
    let err = fails(&out, 3);
    assert!(
        err.contains("step step:orders-db uses migrator `sqlite-dump`"),
        "{err}"
    );
    assert!(
        err.contains("step step:dns uses migrator `dns-zone`"),
        "{err}"
    );
    assert!(stdout(&out).is_empty() || !stdout(&out).contains("succeeded"));
    assert_eq!(tree_digest(&dir.join("sites")), before);
    assert!(!dir.join(".fluidcloud/relocations").exists());
}

#[test]
fn a_bad_manifest_step_names_the_file_and_key() {
    let (dir, config) = with_plugin_steps("plugins-bad");
    let manifest = dir.join("sites/dc-paris/services/shop.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let cases = [
        (
            text.replace("${target_root}/data/orders", "${target_dir}/data/orders"),
            "steps[0].params.to",
            "unknown placeholder ${target_dir}",
        ),
        (
            text.replace("instance = \"db\"", "instance = \"dbx\""),
            "steps[0].instance",
            "no instance \"dbx\"",
        ),
        (
            text.replace("kind = \"volume\"", "kind = \"database\""),
            "steps[0].inputs.db.kind",
            "unknown artifact kind \"database\"",
        ),
        (
            text.replace("phase = \"downtime\"", "phase = \"later\""),
            "phase",
            "unknown variant",
        ),
    ];
    for (bad, key, msg) in cases {
        std::fs::write(&manifest, &bad).unwrap();
        let before = tree_digest(&dir.join("sites/cloud-frankfurt"));
        let out = run_plugins(&relocate_shop(&config, "dc-paris", "cloud-frankfurt"));
        let err = fails(&out, 3);
        assert!(err.contains("shop.toml"), "{key}: {err}");
        assert!(err.contains(key), "{key}: {err}");
        assert!(err.contains(msg), "{key}: {err}");
        assert_eq!(tree_digest(&dir.join("sites/cloud-frankfurt")), before);
    }
}

/// The first fenced block of `lang` after `heading` in plugins/README.md.
fn readme_block(heading: &str, lang: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/README.md"))
            .unwrap();
    let section = &readme[readme.find(heading).expect(heading)..];
    let fence = format!("```{lang}\n");
    let start = section.find(&fence).expect(&fence) + fence.len();
    let len = section[start..].find("```").unwrap();
    section[start..start + len].to_owned()
}

#[test]
fn the_readme_plugin_works_in_a_relocation_as_the_readme_says() {
    let (dir, config) = fresh_demo("plugins-readme");
    let plugin = dir.join("fluidcloud-migrator-hello-py");
    std::fs::write(&plugin, readme_block("## Option 2", "python")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut manifest = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("sites/dc-paris/services/shop.toml"))
        .unwrap();
    manifest
        .write_all(readme_block("## Use it in a relocation", "toml").as_bytes())
        .unwrap();
    let out = ok(&run_with_plugins(
        &[&plugin],
        &relocate_shop(&config, "dc-paris", "cloud-frankfurt"),
    ));
    assert!(out.contains("step:greet"), "{out}");
    let greeting = dir.join("sites/cloud-frankfurt/greeting.txt");
    assert_eq!(std::fs::read_to_string(&greeting).unwrap(), "hello\n");
    let id = relocation_id(&out);
    ok(&run_with_plugins(
        &[&plugin],
        &["--config", &config, "rollback", &id, "--force"],
    ));
    assert!(!greeting.exists());
}
