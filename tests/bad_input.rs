//! Bad input: one clear error line naming the file, line and key, a
//! documented exit code, and nothing on disk modified.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;

const SITES: &str = r#"[sites.s]
kind = "local"
path = "site"
jurisdiction = "EU/FR"
location = { region = "r", latitude = 1.0, longitude = 2.0 }
"#;

const WEB: &str = r#"name = "web"
service = "svc"
state = "running"
vcpus = 1
memory_mib = 256
hostname = "web.svc.internal"
addresses = ["10.0.0.1"]
boot_image = "boot.raw"
config_files = ["app.yaml"]
"#;

const APP_YAML: &str = "listen: 10.0.0.1:80\npublic: https://svc.example.com\n";

/// A small valid site: one instance, a raw boot image, one config file.
fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let root = dir.path();
    common::local_site(&root.join("site"));
    std::fs::write(root.join("fluidcloud.toml"), SITES).unwrap();
    std::fs::write(root.join("site/instances/web.toml"), WEB).unwrap();
    std::fs::write(root.join("site/images/boot.raw"), vec![1u8; 65536]).unwrap();
    std::fs::write(root.join("site/config/app.yaml"), APP_YAML).unwrap();
    let cfg = root.join("fluidcloud.toml");
    (dir, cfg)
}

/// Runs `args` (after `--config CFG`), expects exit `code`, checks that the
/// fixture is unchanged, and returns stderr.
fn refused(root: &Path, cfg: &Path, args: &[&str], code: i32) -> String {
    let before = tree_digest(root);
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    let err = fails(&run(&all), code);
    assert_eq!(
        tree_digest(root),
        before,
        "a failing command modified the site"
    );
    assert!(err.starts_with("error: "), "{err}");
    err
}

fn introspect(root: &Path, cfg: &Path, code: i32) -> String {
    refused(root, cfg, &["introspect", "s", "--service", "svc"], code)
}

#[test]
fn the_fixture_itself_is_valid() {
    let (_d, cfg) = fixture();
    let out = ok(&run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "introspect",
        "s",
        "--service",
        "svc",
    ]));
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["resources"].as_array().unwrap().len(), 5, "{t}");
}

#[test]
fn unknown_key_in_the_sites_file_names_file_line_and_key() {
    let (d, cfg) = fixture();
    std::fs::write(
        &cfg,
        SITES.replace("path = \"site\"", "path = \"site\"\ncolour = \"blue\""),
    )
    .unwrap();
    let err = refused(d.path(), &cfg, &["sites", "list"], 3);
    let first = err.lines().next().unwrap();
    assert!(
        first.contains(&format!("{}:4: key `sites.s.colour`", cfg.display())),
        "{err}"
    );
    assert!(first.contains("unknown field `colour`"), "{err}");
}

#[test]
fn sites_file_syntax_errors_and_invalid_values_are_located() {
    let (d, cfg) = fixture();
    std::fs::write(&cfg, SITES.replace("kind = \"local\"", "kind = ")).unwrap();
    let err = refused(d.path(), &cfg, &["sites", "list"], 3);
    assert!(err.contains(&format!("{}:2:", cfg.display())), "{err}");

    std::fs::write(
        &cfg,
        SITES
            .replace("latitude = 1.0", "latitude = 91.0")
            .replace("\"local\"", "\"cloudy\""),
    )
    .unwrap();
    let err = refused(d.path(), &cfg, &["sites", "list"], 3);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "every problem, one line each: {err}");
    assert!(
        lines[0].contains(":2: key `sites.s.kind`: unknown site kind `cloudy`"),
        "{err}"
    );
    assert!(lines[0].contains("known kinds: local"), "{err}");
    assert!(
        lines[1].contains("key `sites.s.location.latitude`"),
        "{err}"
    );
}

#[test]
fn missing_sites_file_says_how_to_get_one() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let err = fails(&run_in(dir.path(), &["sites", "list"]), 3);
    assert!(
        err.contains("--config") && err.contains("demo init"),
        "{err}"
    );
    let (d, cfg) = fixture();
    let missing = d.path().join("nope.toml");
    let err = refused(d.path(), &missing, &["sites", "list"], 3);
    assert!(
        err.contains("nope.toml") && err.contains("cannot read"),
        "{err}"
    );
    let _ = cfg;
}

#[test]
fn unknown_site_lists_the_known_ones() {
    let (d, cfg) = fixture();
    let err = refused(d.path(), &cfg, &["introspect", "paris"], 4);
    assert!(
        err.contains("unknown site `paris`") && err.contains("known: s"),
        "{err}"
    );
    let err = refused(d.path(), &cfg, &["sites", "show", "paris"], 4);
    assert!(err.contains("unknown site `paris`"), "{err}");
}

#[test]
fn missing_site_directory_is_not_found() {
    let (d, cfg) = fixture();
    std::fs::rename(d.path().join("site"), d.path().join("elsewhere")).unwrap();
    let err = introspect(d.path(), &cfg, 4);
    assert!(
        err.contains("site directory") && err.contains("not found"),
        "{err}"
    );
    // `sites list` still works and shows the problem as the site's status.
    let out = ok(&run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "sites",
        "list",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v[0]["status"].as_str().unwrap().contains("not found"),
        "{v}"
    );
}

#[test]
fn unknown_service_lists_the_services_of_the_site() {
    let (d, cfg) = fixture();
    let err = refused(d.path(), &cfg, &["introspect", "s", "--service", "blog"], 4);
    assert!(
        err.contains("service `blog`") && err.contains("services on this site: svc"),
        "{err}"
    );
}

#[test]
fn malformed_instance_manifest_names_file_line_and_key() {
    let (d, cfg) = fixture();
    let manifest = d.path().join("site/instances/web.toml");
    std::fs::write(&manifest, WEB.replace("vcpus = 1", "vcpus = \"one\"")).unwrap();
    let err = introspect(d.path(), &cfg, 3);
    assert!(
        err.contains(&format!("{}:4: key `vcpus`", manifest.display())),
        "{err}"
    );

    std::fs::write(&manifest, WEB.replace("name = \"web\"", "name = \"www\"")).unwrap();
    let err = introspect(d.path(), &cfg, 3);
    assert!(
        err.contains("`www` does not match its file name `web.toml`"),
        "{err}"
    );
}

#[test]
fn corrupt_or_missing_disk_image_is_named() {
    let (d, cfg) = fixture();
    // A qcow2 header cut short: the magic is there, the rest is not.
    let image = d.path().join("site/images/boot.raw");
    std::fs::write(&image, b"QFI\xfb\x00\x00\x00\x03\x00").unwrap();
    let err = introspect(d.path(), &cfg, 8);
    assert!(err.contains("corrupt") && err.contains("offset"), "{err}");
    assert!(err.contains("boot.raw"), "the image must be named: {err}");

    std::fs::remove_file(&image).unwrap();
    let err = introspect(d.path(), &cfg, 4);
    assert!(err.contains("images/boot.raw not found on site s"), "{err}");
}

#[test]
fn config_file_referencing_an_unknown_internal_host_names_file_and_key() {
    let (d, cfg) = fixture();
    std::fs::write(
        d.path().join("site/config/app.yaml"),
        format!("{APP_YAML}database:\n  host: db.svc.internal\n"),
    )
    .unwrap();
    let err = introspect(d.path(), &cfg, 5);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("config/app.yaml: key `database.host (line 4)`: `db.svc.internal` looks internal to site s"),
        "{err}"
    );
    // A private address is internal too; declaring it external is the way out.
    std::fs::write(
        d.path().join("site/config/app.yaml"),
        format!("{APP_YAML}cache: 10.0.0.99:6379\n"),
    )
    .unwrap();
    let err = introspect(d.path(), &cfg, 5);
    assert!(err.contains("`10.0.0.99:6379`"), "{err}");
    std::fs::write(
        d.path().join("site/services/svc.toml"),
        "name = \"svc\"\nexternal = [\"10.0.0.99\"]\n",
    )
    .unwrap();
    ok(&run(&[
        "--config",
        cfg.to_str().unwrap(),
        "introspect",
        "s",
        "--service",
        "svc",
    ]));
}

#[test]
fn malformed_config_file_names_file_and_line() {
    let (d, cfg) = fixture();
    std::fs::write(
        d.path().join("site/config/app.yaml"),
        "listen: [10.0.0.1\nother: x\n",
    )
    .unwrap();
    let err = introspect(d.path(), &cfg, 3);
    assert!(
        err.contains("config/app.yaml:") && err.contains("invalid YAML"),
        "{err}"
    );
}

#[test]
fn bad_service_manifest_is_located() {
    let (d, cfg) = fixture();
    let m = d.path().join("declared.toml");
    std::fs::write(&m, "name = \"svc\"\n\n[[depends]]\nfrom = \"instance:web\"\nto = \"bucket:ghost\"\nrelation = \"reads\"\n").unwrap();
    let err = refused(
        d.path(),
        &cfg,
        &[
            "introspect",
            "s",
            "--service",
            "svc",
            "--manifest",
            m.to_str().unwrap(),
        ],
        3,
    );
    assert!(
        err.contains(&format!("{}:3: key `depends[0].to`", m.display())),
        "{err}"
    );
    assert!(err.contains("`bucket:ghost` is not a resource"), "{err}");

    std::fs::write(&m, "name = \"svc\"\n[[depends]]\nfrom = \"instance:web\"\nto = \"instance:web\"\nrelation = \"eats\"\n").unwrap();
    let err = refused(
        d.path(),
        &cfg,
        &[
            "introspect",
            "s",
            "--service",
            "svc",
            "--manifest",
            m.to_str().unwrap(),
        ],
        3,
    );
    assert!(
        err.contains("depends[0].relation") && err.contains("eats"),
        "{err}"
    );

    std::fs::write(&m, "name = \"other\"\n").unwrap();
    let err = refused(
        d.path(),
        &cfg,
        &[
            "introspect",
            "s",
            "--service",
            "svc",
            "--manifest",
            m.to_str().unwrap(),
        ],
        3,
    );
    assert!(
        err.contains("manifest is for service `other`, not `svc`"),
        "{err}"
    );
}

#[test]
fn declared_manifest_merges_with_discovery() {
    let (d, cfg) = fixture();
    std::fs::create_dir_all(d.path().join("site/buckets/logs")).unwrap();
    std::fs::write(d.path().join("site/buckets/logs/a.log"), b"hello").unwrap();
    std::fs::write(
        d.path().join("site/services/svc.toml"),
        "name = \"svc\"\nbuckets = [\"logs\"]\n[[depends]]\nfrom = \"instance:web\"\nto = \"bucket:logs\"\nrelation = \"reads\"\n",
    )
    .unwrap();
    let out = ok(&run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "introspect",
        "s",
        "--service",
        "svc",
    ]));
    let t: serde_json::Value = serde_json::from_str(&out).unwrap();
    let logs = t["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "bucket:logs")
        .unwrap();
    assert_eq!(logs["spec"]["objects"], 1);
    assert_eq!(logs["spec"]["bytes"], 5);
    assert!(
        t["edges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["from"] == "instance:web"
                && e["to"] == "bucket:logs"
                && e["relation"] == "reads")
    );
}

#[test]
fn json_errors_carry_the_exit_code_and_diagnostics() {
    let (d, cfg) = fixture();
    std::fs::write(
        &cfg,
        SITES.replace("path = \"site\"", "path = \"site\"\ncolour = \"blue\""),
    )
    .unwrap();
    let out = run(&["--config", cfg.to_str().unwrap(), "--json", "sites", "list"]);
    let err = fails(&out, 3);
    assert!(out.stdout.is_empty());
    let v: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["error"]["exit_code"], 3);
    assert_eq!(v["error"]["diagnostics"][0]["key"], "sites.s.colour");
    assert_eq!(v["error"]["diagnostics"][0]["line"], 4);
    let _ = d;
}

#[test]
fn bad_command_lines_exit_2() {
    let out = run(&["introspect"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["introspect", "s", "--format", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("xml"));
}
