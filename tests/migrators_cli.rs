//! `fluidcloud migrators list|show` with the example plugins discovered
//! through `$FLUIDCLOUD_PLUGIN_PATH`.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{dns_zone_plugin, fails, ok, run_with_plugins, sqlite_plugin, stderr, stdout};

#[test]
fn list_shows_built_ins_and_both_example_plugins_with_origin_and_kinds() {
    let o = run_with_plugins(
        &[dns_zone_plugin(), &sqlite_plugin()],
        &["migrators", "list"],
    );
    let out = ok(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("CONSUMES"),
        "{out}"
    );
    let row = |name: &str| {
        *lines
            .iter()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{out}"))
    };
    assert!(row("image-convert ").contains("built-in"));
    let dns = row("dns-zone ");
    assert!(
        dns.contains("plugin-path") && dns.contains("config-file"),
        "{dns}"
    );
    let sql = row("sqlite-dump ");
    assert!(
        sql.contains("plugin-path") && sql.contains("1.0.0") && sql.contains("volume"),
        "{sql}"
    );
    assert_eq!(stderr(&o), "");

    let o = run_with_plugins(
        &[dns_zone_plugin(), &sqlite_plugin()],
        &["migrators", "list", "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "bucket-transfer",
            "change-tracking",
            "config-adapt",
            "config-transfer",
            "cutover",
            "disk-transfer",
            "guest-adapt",
            "guest-prepare",
            "image-convert",
            "instance-provision",
            "object-copy",
            "service-verify",
            "source-stop",
            "volume-copy",
            "dns-zone",
            "sqlite-dump"
        ]
    );
    assert_eq!(v[15]["consumes"], serde_json::json!([{"type": "volume"}]));
    assert_eq!(v[15]["protocol"], "fluidcloud-migrator 1.0.0");
    assert_eq!(v[14]["path"], dns_zone_plugin().display().to_string());
}

#[test]
fn show_describes_one_migrator_and_an_unknown_name_exits_4() {
    let o = run_with_plugins(&[&sqlite_plugin()], &["migrators", "show", "sqlite-dump"]);
    let out = ok(&o);
    assert!(out.contains("name:     sqlite-dump"), "{out}");
    assert!(out.contains("origin:   plugin-path ("), "{out}");
    assert!(
        out.contains("protocol: fluidcloud-migrator 1.0.0 (features: progress, cancel)"),
        "{out}"
    );
    assert!(out.contains("consumes: volume"), "{out}");
    let o = run_with_plugins(&[], &["migrators", "show", "image-convert", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["origin"], "built-in");
    let err = fails(&run_with_plugins(&[], &["migrators", "show", "nope"]), 4);
    assert!(err.contains("migrator `nope` not found"), "{err}");
}

#[test]
fn a_broken_plugin_is_a_warning_and_never_hides_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("fluidcloud-migrator-broken");
    std::fs::write(&broken, "#!/bin/sh\necho 'I am not a plugin'\nexit 1\n").unwrap();
    std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = run_with_plugins(&[&broken, &sqlite_plugin()], &["migrators", "list"]);
    let out = ok(&o);
    assert!(out.contains("sqlite-dump"), "{out}");
    assert!(!out.contains("broken"), "{out}");
    let err = stderr(&o);
    assert!(
        err.contains("warning: plugin") && err.contains("fluidcloud-migrator-broken"),
        "{err}"
    );
    assert!(err.contains("I am not a plugin"), "{err}");
    // The header, the fourteen built-ins and the one working plugin.
    assert_eq!(stdout(&o).lines().count(), 16);
}

/// A describe-only plugin converting qcow2 to raw, named to sort before
/// `image-convert`, so the broker's tie-break picks it.
const TO_RAW: &str = r#"#!/usr/bin/env python3
import json, sys
for line in sys.stdin:
    req = json.loads(line)
    m = req["method"]
    if m == "hello":
        res = {"protocol": "fluidcloud-migrator", "version": "1.0.0", "features": []}
    elif m == "describe":
        res = {"name": "a-to-raw", "version": "0.1.0", "summary": "qcow2 to raw",
               "consumes": [{"type": "disk-image", "format": "qcow2"}],
               "produces": [{"type": "disk-image", "format": "raw"}]}
    else:
        res = []
    print(json.dumps({"id": req["id"], "result": res}), flush=True)
"#;

#[test]
fn match_chains_plugin_migrators_like_built_ins() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("fluidcloud-migrator-a-to-raw");
    std::fs::write(&exe, TO_RAW).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = common::demo_config();
    let args = [
        "--config",
        &config,
        "match",
        "--from",
        "dc-paris",
        "--service",
        "shop",
    ];
    let without = ok(&run_with_plugins(&[], &args));
    assert!(without.contains("with image-convert"), "{without}");
    assert!(!without.contains("a-to-raw"), "{without}");
    let with = ok(&run_with_plugins(&[&exe], &args));
    assert!(
        with.contains("convert disk-image(qcow2) -> disk-image(raw) with a-to-raw"),
        "{with}"
    );
}
