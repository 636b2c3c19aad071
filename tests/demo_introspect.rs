//! The demo environment, introspected through the real binary.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::Value;

/// The resource `id` of an introspection's JSON; panics if it is absent.
fn resource(topology: &Value, id: &str) -> Value {
    topology["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no resource {id}"))
        .clone()
}

/// The demo shop's topology as `introspect --format json` prints it, with
/// `extra` arguments (e.g. `--manifest FILE`).
fn topology_with(extra: &[&str]) -> Value {
    let cfg = demo_config();
    let mut args = vec![
        "--config",
        &cfg,
        "introspect",
        "dc-paris",
        "--service",
        "shop",
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&run(&args))).unwrap()
}

fn topology() -> Value {
    topology_with(&[])
}

#[test]
fn introspection_finds_every_resource_of_the_shop() {
    let t = topology();
    assert_eq!(t["service"], "shop");
    assert_eq!(t["site"], "dc-paris");
    let ids: BTreeSet<String> = t["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = [
        "instance:web",
        "instance:app",
        "instance:db",
        "image:shop-web.qcow2",
        "image:shop-app.qcow2",
        "image:shop-db.qcow2",
        "volume:db-data.raw",
        "bucket:shop-media",
        "config:shop/web/nginx.conf",
        "config:shop/web/site.env",
        "config:shop/app/app.yaml",
        "config:shop/app/.env",
        "config:shop/app/features.json",
        "config:shop/db/postgresql.conf",
        "config:shop/db/backup.toml",
        "endpoint:bucket:shop-media",
        "endpoint:host:db.shop.paris.internal",
        "endpoint:host:shop.example.com",
        "endpoint:host:www.shop.example.com",
        "endpoint:ip:10.10.0.11:80",
        "endpoint:ip:10.10.0.12",
        "endpoint:ip:10.10.0.13",
        "endpoint:url:http://app.shop.paris.internal:8080",
        "endpoint:url:https://cdn.shop.example.com/",
        "endpoint:url:https://pay.example.org/v2",
        "endpoint:url:https://s3.dc-paris.example.net",
        "endpoint:url:https://s3.dc-paris.example.net/shop-media/",
        "endpoint:url:https://s3.dc-paris.example.net/shop-media/db-archive/",
        "endpoint:url:https://shop.example.com",
        "endpoint:url:https://shop.example.com/pay/callback",
        "endpoint:url:postgres://shop@db.shop.paris.internal:5432/shop",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(
        ids, expected,
        "the other service (intranet) and its bucket must be left out"
    );
    assert!(t["notes"].as_array().unwrap().is_empty(), "{}", t["notes"]);

    let get = |id: &str| resource(&t, id);
    let web = get("image:shop-web.qcow2");
    assert_eq!(web["spec"]["format"], "qcow2");
    assert_eq!(web["spec"]["virtual_size"], 1u64 << 30);
    let allocated = web["spec"]["allocated"].as_u64().unwrap();
    assert!(
        (280 << 20..340 << 20).contains(&allocated),
        "web image allocates {allocated}"
    );
    let vol = get("volume:db-data.raw");
    assert_eq!(vol["spec"]["format"], "raw");
    assert_eq!(vol["spec"]["virtual_size"], 2u64 << 30);
    let va = vol["spec"]["allocated"].as_u64().unwrap();
    assert!(
        (192 << 20..256 << 20).contains(&va),
        "volume must stay sparse: {va}"
    );
    let media = get("bucket:shop-media");
    assert_eq!(media["spec"]["objects"], 521);
    assert_eq!(
        media["origin"], "both",
        "declared in services/shop.toml and discovered"
    );
    let db = get("instance:db");
    assert_eq!(db["spec"]["hostname"], "db.shop.paris.internal");
    assert_eq!(db["spec"]["state"], "running");
    for ext in [
        "endpoint:url:https://pay.example.org/v2",
        "endpoint:host:shop.example.com",
    ] {
        assert_eq!(get(ext)["spec"]["external"], true, "{ext}");
    }
    assert_eq!(
        get("endpoint:host:db.shop.paris.internal")["spec"]["external"],
        false
    );
}

#[test]
fn introspection_finds_every_dependency_edge() {
    let t = topology();
    let edges: BTreeSet<(String, String, String, String)> = t["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["from"].as_str().unwrap().to_owned(),
                e["relation"].as_str().unwrap().to_owned(),
                e["to"].as_str().unwrap().to_owned(),
                e["key"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let e = |from: &str, rel: &str, to: &str, key: &str| {
        (
            from.to_owned(),
            rel.to_owned(),
            to.to_owned(),
            key.to_owned(),
        )
    };
    let r = |cfg: &str, key: &str, ep: &str| {
        e(
            &format!("config:{cfg}"),
            "references-endpoint",
            &format!("endpoint:{ep}"),
            key,
        )
    };
    let res = |ep: &str, to: &str| e(&format!("endpoint:{ep}"), "resolves-to", to, "");
    let expected: BTreeSet<_> = [
        // Disks.
        e("instance:web", "boots-from", "image:shop-web.qcow2", ""),
        e("instance:app", "boots-from", "image:shop-app.qcow2", ""),
        e("instance:db", "boots-from", "image:shop-db.qcow2", ""),
        e("instance:db", "attaches", "volume:db-data.raw", ""),
        // Config files read by each instance.
        e("instance:web", "reads", "config:shop/web/nginx.conf", ""),
        e("instance:web", "reads", "config:shop/web/site.env", ""),
        e("instance:app", "reads", "config:shop/app/app.yaml", ""),
        e("instance:app", "reads", "config:shop/app/.env", ""),
        e("instance:app", "reads", "config:shop/app/features.json", ""),
        e("instance:db", "reads", "config:shop/db/postgresql.conf", ""),
        e("instance:db", "reads", "config:shop/db/backup.toml", ""),
        // The bucket, read by every instance whose config points at it.
        e("instance:web", "reads", "bucket:shop-media", ""),
        e("instance:app", "reads", "bucket:shop-media", ""),
        e("instance:db", "reads", "bucket:shop-media", ""),
        // Config -> endpoint, with the key (or line) where each is written.
        r("shop/web/nginx.conf", "line 3", "ip:10.10.0.11:80"),
        r("shop/web/nginx.conf", "line 4", "host:shop.example.com"),
        r("shop/web/nginx.conf", "line 4", "host:www.shop.example.com"),
        r(
            "shop/web/nginx.conf",
            "line 7",
            "url:http://app.shop.paris.internal:8080",
        ),
        r(
            "shop/web/nginx.conf",
            "line 10",
            "url:https://s3.dc-paris.example.net/shop-media/",
        ),
        r(
            "shop/web/site.env",
            "PUBLIC_URL",
            "url:https://shop.example.com",
        ),
        r(
            "shop/web/site.env",
            "API_UPSTREAM",
            "url:http://app.shop.paris.internal:8080",
        ),
        r(
            "shop/app/app.yaml",
            "public_url",
            "url:https://shop.example.com",
        ),
        r(
            "shop/app/app.yaml",
            "database.host",
            "host:db.shop.paris.internal",
        ),
        r(
            "shop/app/app.yaml",
            "media.endpoint",
            "url:https://s3.dc-paris.example.net",
        ),
        r("shop/app/app.yaml", "media.bucket", "bucket:shop-media"),
        r(
            "shop/app/app.yaml",
            "cdn.url",
            "url:https://cdn.shop.example.com/",
        ),
        r(
            "shop/app/.env",
            "DATABASE_URL",
            "url:postgres://shop@db.shop.paris.internal:5432/shop",
        ),
        r(
            "shop/app/.env",
            "S3_ENDPOINT",
            "url:https://s3.dc-paris.example.net",
        ),
        r("shop/app/.env", "S3_BUCKET", "bucket:shop-media"),
        r(
            "shop/app/features.json",
            "payments.provider_url",
            "url:https://pay.example.org/v2",
        ),
        r(
            "shop/app/features.json",
            "payments.callback",
            "url:https://shop.example.com/pay/callback",
        ),
        r("shop/app/features.json", "search.host", "ip:10.10.0.12"),
        r(
            "shop/db/postgresql.conf",
            "listen_addresses",
            "ip:10.10.0.13",
        ),
        r(
            "shop/db/backup.toml",
            "backup.archive_url",
            "url:https://s3.dc-paris.example.net/shop-media/db-archive/",
        ),
        r(
            "shop/db/backup.toml",
            "source.host",
            "host:db.shop.paris.internal",
        ),
        // Endpoint -> what it designates (external endpoints designate nothing here).
        res("ip:10.10.0.11:80", "instance:web"),
        res("ip:10.10.0.12", "instance:app"),
        res("ip:10.10.0.13", "instance:db"),
        res("host:db.shop.paris.internal", "instance:db"),
        res(
            "url:postgres://shop@db.shop.paris.internal:5432/shop",
            "instance:db",
        ),
        res("url:http://app.shop.paris.internal:8080", "instance:app"),
        res("url:https://s3.dc-paris.example.net", "bucket:shop-media"),
        res(
            "url:https://s3.dc-paris.example.net/shop-media/",
            "bucket:shop-media",
        ),
        res(
            "url:https://s3.dc-paris.example.net/shop-media/db-archive/",
            "bucket:shop-media",
        ),
        res("bucket:shop-media", "bucket:shop-media"),
    ]
    .into_iter()
    .collect();
    let missing: Vec<_> = expected.difference(&edges).collect();
    let extra: Vec<_> = edges.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing: {missing:#?}\nextra: {extra:#?}"
    );
}

#[test]
fn dot_and_text_show_the_same_graph() {
    let cfg = demo_config();
    let t = topology();
    let dot = ok(&run(&[
        "--config",
        &cfg,
        "introspect",
        "dc-paris",
        "--service",
        "shop",
        "--format",
        "dot",
    ]));
    assert!(dot.starts_with("digraph \"shop\""), "{dot}");
    let arrows = dot.lines().filter(|l| l.contains(" -> ")).count();
    assert_eq!(arrows, t["edges"].as_array().unwrap().len());
    assert!(
        dot.contains("\"instance:db\" -> \"volume:db-data.raw\" [label=\"attaches\"]"),
        "{dot}"
    );

    let text = ok(&run(&[
        "--config",
        &cfg,
        "introspect",
        "dc-paris",
        "--service",
        "shop",
    ]));
    assert!(
        text.starts_with("service shop on site dc-paris\n"),
        "{text}"
    );
    assert!(
        text.contains("3 instances, 3 images, 1 volume, 1 bucket, 7 config files, 16 endpoints"),
        "{text}"
    );
    assert!(
        text.contains("attaches    volume db-data.raw  (raw, 2.00 GiB virtual"),
        "{text}"
    );
    assert!(text.contains("database.host"), "{text}");
    assert!(
        text.contains("db.shop.paris.internal  -> instance db"),
        "{text}"
    );
    assert!(
        text.contains("https://pay.example.org/v2  -> external"),
        "{text}"
    );
    // --json is the same as --format json.
    let json = ok(&run(&[
        "--config",
        &cfg,
        "--json",
        "introspect",
        "dc-paris",
        "--service",
        "shop",
    ]));
    assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), t);
}

#[test]
fn without_a_service_every_instance_of_the_site_is_listed() {
    let cfg = demo_config();
    let out = ok(&run(&[
        "--config",
        &cfg,
        "--json",
        "introspect",
        "dc-paris",
    ]));
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["service"], "*");
    let ids: Vec<&str> = t["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"instance:wiki") && ids.contains(&"bucket:paris-backups"),
        "{ids:?}"
    );
    assert!(ids.contains(&"instance:web"));
}

#[test]
fn demo_images_pass_qemu_img_check_and_match_the_topology() {
    let qemu = qemu_img();
    let t = topology();
    for r in t["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["spec"]["kind"] == "image")
    {
        let path = r["spec"]["locator"].as_str().unwrap();
        let check = std::process::Command::new(qemu)
            .args(["check", path])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success() && out.contains("No errors were found"),
            "{path}: {out}"
        );
        let info = std::process::Command::new(qemu)
            .args(["info", "--output=json", path])
            .output()
            .unwrap();
        let info: Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], r["spec"]["virtual_size"], "{path}");
        assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "qcow2 v3");
    }
}

#[test]
fn sites_list_and_show_report_detected_capabilities() {
    let cfg = demo_config();
    let list: Value =
        serde_json::from_str(&ok(&run(&["--config", &cfg, "--json", "sites", "list"]))).unwrap();
    let list = list.as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "cloud-frankfurt",
            "cloud-virginia",
            "dc-paris",
            "edge-nantes",
            "edge-rennes"
        ]
    );
    for s in list {
        assert_eq!(s["status"], "ok", "{s}");
        assert_eq!(s["capabilities"].as_array().unwrap().len(), 5, "{s}");
    }
    let formats: BTreeSet<String> = list
        .iter()
        .map(|s| s["image_formats"].to_string())
        .collect();
    assert!(
        formats.len() >= 4,
        "targets differ in accepted formats: {formats:?}"
    );

    let text = ok(&run(&["--config", &cfg, "sites", "list"]));
    assert!(text.starts_with("SITE "), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("edge-rennes") && l.contains(" raw ") && l.ends_with("ok")),
        "{text}"
    );

    let show: Value = serde_json::from_str(&ok(&run(&[
        "--config", &cfg, "--json", "sites", "show", "dc-paris",
    ])))
    .unwrap();
    assert_eq!(
        show["contents"]["instances"],
        serde_json::json!(["app", "db", "web", "wiki"])
    );
    assert_eq!(
        show["contents"]["buckets"],
        serde_json::json!(["paris-backups", "shop-media"])
    );
    assert_eq!(
        show["contents"]["volumes"],
        serde_json::json!(["db-data.raw"])
    );
    assert_eq!(show["contents"]["config_files"], 8);
    // A local site's disks are files here: they move as extents, and its
    // guests are looked into.
    assert_eq!(show["features"]["disk_transfers"], true, "{show}");
    assert_eq!(show["features"]["guests"], true, "{show}");
    let fra: Value = serde_json::from_str(&ok(&run(&[
        "--config",
        &cfg,
        "--json",
        "sites",
        "show",
        "cloud-frankfurt",
    ])))
    .unwrap();
    assert_eq!(fra["jurisdiction"], "EU/DE");
    assert_eq!(fra["credentials"][0]["variable"], "FRANKFURT_ACCESS_KEY_ID");
    let text = ok(&run(&[
        "--config",
        &cfg,
        "sites",
        "show",
        "cloud-frankfurt",
    ]));
    assert!(
        text.contains("credential:    access_key_id_env from $FRANKFURT_ACCESS_KEY_ID"),
        "{text}"
    );
    assert!(text.contains("compute         yes"), "{text}");
    assert!(text.contains("guest-files     yes"), "{text}");
}

#[test]
fn the_config_file_can_come_from_the_environment_or_the_working_directory() {
    let cfg = demo_config();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(["--json", "sites", "list"])
        .env("FLUIDCLOUD_CONFIG", &cfg)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = run_in(demo(), &["--json", "sites", "list"]);
    assert_eq!(
        serde_json::from_str::<Value>(&ok(&out))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[test]
fn demo_init_refuses_to_overwrite_and_changes_nothing() {
    let dir = demo();
    let before = tree_digest(dir);
    let err = fails(&run(&["demo", "init", dir.to_str().unwrap()]), 7);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    assert_eq!(tree_digest(dir), before);
}

#[test]
fn bare_demo_command_creates_then_relocates_the_shop_and_resets_on_a_second_run() {
    // Its own environment: the relocation stops the Paris instances.
    let fresh = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .arg("demo")
        .env("XDG_DATA_HOME", fresh.path())
        .output()
        .unwrap();
    let out = ok(&out);
    let dir = fresh.path().join("fluidcloud/demo");
    assert!(
        out.starts_with(&format!(
            "creating the demo environment in {}\nrelocation shop-",
            dir.display()
        )),
        "{out}"
    );
    for want in [
        "service shop from dc-paris to cloud-frankfurt",
        "endpoint map",
        "db.shop.paris.internal -> db.shop.fra.internal",
        ": succeeded",
        "downtime",
        "report saved to",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let fra = dir.join("sites/cloud-frankfurt");
    assert!(fra.join("images/shop-web.raw").is_file());
    assert!(fra.join("instances/db.toml").is_file());

    // Again, as JSON: a fresh environment, one JSON document (the report).
    let json = ok(&run(&["--json", "demo", "--dir", dir.to_str().unwrap()]));
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["status"], "succeeded", "{v:#}");
    assert_eq!(v["service"], "shop");
    assert_eq!(v["targets"], serde_json::json!(["cloud-frankfurt"]));
    let list = ok(&run(&[
        "--config",
        dir.join("fluidcloud.toml").to_str().unwrap(),
        "--json",
        "status",
    ]));
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "the reset removed the first run's records: {list:#}"
    );
}

#[test]
fn demo_init_force_replaces_only_a_demo_and_the_demo_is_byte_identical_every_time() {
    let fresh = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = fresh.path();
    let foreign = "# somebody's sites file\n[sites\n";
    std::fs::write(dir.join("fluidcloud.toml"), foreign).unwrap();
    std::fs::write(dir.join("keep.txt"), "not ours").unwrap();
    // No demo made this directory: refused, with or without --force, and
    // nothing is touched.
    for force in [false, true] {
        let mut args = vec!["demo", "init"];
        if force {
            args.push("--force");
        }
        args.push(dir.to_str().unwrap());
        let err = fails(&run(&args), 7);
        assert!(err.contains("no demo made"), "{err}");
        assert_eq!(
            std::fs::read_to_string(dir.join("fluidcloud.toml")).unwrap(),
            foreign
        );
    }
    // A demo's own directory is replaced by --force; other files stay.
    std::fs::remove_file(dir.join("fluidcloud.toml")).unwrap();
    ok(&run(&["demo", "init", dir.to_str().unwrap()]));
    std::fs::write(dir.join("sites/dc-paris/images/extra.raw"), "stale").unwrap();
    let summary: Value = serde_json::from_str(&ok(&run(&[
        "--json",
        "demo",
        "init",
        "--force",
        dir.to_str().unwrap(),
    ])))
    .unwrap();
    assert_eq!(summary["media_objects"], 521);
    assert!(!dir.join("sites/dc-paris/images/extra.raw").exists());
    assert_eq!(
        std::fs::read_to_string(dir.join("keep.txt")).unwrap(),
        "not ours",
        "only the demo's own files are replaced"
    );
    assert!(!dir.join(".demo-staging").exists());
    // Same content (paths relative to each demo, sizes, bytes) as the shared demo.
    let strip = |root: &std::path::Path| {
        tree_digest(&root.join("sites"))
            .into_iter()
            .map(|(p, size, _, _, hash)| (p.strip_prefix(root).unwrap().to_path_buf(), size, hash))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(dir), strip(demo()));
    let cfg =
        |root: &std::path::Path| std::fs::read_to_string(root.join("fluidcloud.toml")).unwrap();
    assert_eq!(cfg(dir), cfg(demo()));
}

#[test]
fn sites_kinds_lists_the_local_driver_without_a_sites_file() {
    let out = ok(&run(&["sites", "kinds"]));
    assert!(
        out.starts_with("local: a directory on this machine"),
        "{out}"
    );
    let v: Value = serde_json::from_str(&ok(&run(&["--json", "sites", "kinds"]))).unwrap();
    assert_eq!(v[0]["kind"], "local");
    assert_eq!(v[0]["options"][0]["key"], "path");
}

#[test]
fn demo_targets_differ_in_capacity_location_jurisdiction_and_cost() {
    let cfg = demo_config();
    let list: Value =
        serde_json::from_str(&ok(&run(&["--config", &cfg, "--json", "sites", "list"]))).unwrap();
    let targets: Vec<&Value> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] != "dc-paris")
        .collect();
    assert_eq!(targets.len(), 4);
    let distinct = |f: &dyn Fn(&Value) -> String| -> BTreeSet<String> {
        targets.iter().map(|s| f(s)).collect()
    };

    // Capacity: every figure declared, and no two targets alike.
    for s in &targets {
        for key in ["vcpus", "memory_mib", "storage_gib"] {
            assert!(s["capacity"][key].as_u64().unwrap() > 0, "{key} of {s}");
        }
    }
    let capacities = distinct(&|s| s["capacity"].to_string());
    assert_eq!(capacities.len(), targets.len(), "{capacities:?}");
    let vcpus = distinct(&|s| s["capacity"]["vcpus"].to_string());
    assert!(vcpus.len() >= 3, "{vcpus:?}");
    let storage: Vec<u64> = targets
        .iter()
        .map(|s| s["capacity"]["storage_gib"].as_u64().unwrap())
        .collect();
    assert!(
        storage.iter().max().unwrap() / storage.iter().min().unwrap() >= 100,
        "small edges and large clouds: {storage:?}"
    );

    // Location: a distinct region and point for every site, Paris included.
    let all: Vec<&Value> = list.as_array().unwrap().iter().collect();
    let points: BTreeSet<String> = all
        .iter()
        .map(|s| {
            let (lat, lon) = (
                s["location"]["latitude"].as_f64().unwrap(),
                s["location"]["longitude"].as_f64().unwrap(),
            );
            assert!((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon));
            format!("{lat},{lon}")
        })
        .collect();
    assert_eq!(points.len(), all.len(), "{points:?}");
    let regions: BTreeSet<&str> = all
        .iter()
        .map(|s| s["location"]["region"].as_str().unwrap())
        .collect();
    assert_eq!(regions.len(), all.len(), "{regions:?}");

    // Jurisdiction: French edges, a German and a US cloud.
    let jurisdictions = distinct(&|s| s["jurisdiction"].as_str().unwrap().to_owned());
    assert!(jurisdictions.len() >= 3, "{jurisdictions:?}");
    assert!(
        jurisdictions.iter().any(|j| !j.starts_with("EU/")),
        "one target outside the EU: {jurisdictions:?}"
    );

    // Cost: every price declared, and each target priced differently.
    for s in &targets {
        for key in [
            "vcpu_hour",
            "memory_gib_hour",
            "storage_gib_month",
            "egress_gib",
        ] {
            assert!(s["cost"][key].as_f64().unwrap() > 0.0, "{key} of {s}");
        }
    }
    let vcpu_prices = distinct(&|s| s["cost"]["vcpu_hour"].to_string());
    assert_eq!(vcpu_prices.len(), targets.len(), "{vcpu_prices:?}");
    let storage_prices = distinct(&|s| s["cost"]["storage_gib_month"].to_string());
    assert!(storage_prices.len() >= 3, "{storage_prices:?}");
}

#[test]
fn demo_media_objects_have_mixed_sizes() {
    let bucket = demo().join("sites/dc-paris/buckets/shop-media");
    let mut sizes = Vec::new();
    let mut stack = vec![bucket.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let body = std::fs::read(&p).unwrap();
                assert!(
                    body.iter().any(|&b| b != 0),
                    "{} holds only zeros",
                    p.display()
                );
                sizes.push(body.len() as u64);
            }
        }
    }
    assert_eq!(sizes.len(), 521, "objects in {}", bucket.display());
    let small = sizes.iter().filter(|&&s| s < 64 << 10).count();
    let medium = sizes
        .iter()
        .filter(|&&s| (64 << 10..=1 << 20).contains(&s))
        .count();
    let large = sizes.iter().filter(|&&s| s > 1 << 20).count();
    assert!(small >= 100, "{small} objects under 64 KiB");
    assert!(medium >= 100, "{medium} objects of 64 KiB..1 MiB");
    assert!(large >= 2, "{large} objects over 1 MiB");
    let distinct: BTreeSet<u64> = sizes.iter().copied().collect();
    assert!(
        distinct.len() >= 400,
        "only {} distinct sizes among {}",
        distinct.len(),
        sizes.len()
    );
}

#[test]
fn demo_web_image_holds_hundreds_of_mib_of_real_data_and_holes() {
    let qemu = qemu_img();
    let image = demo().join("sites/dc-paris/images/shop-web.qcow2");
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let raw = tmp.path().join("web.raw");
    let out = std::process::Command::new(qemu)
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 1 << 30);

    use std::hash::{DefaultHasher, Hash, Hasher};
    use std::io::Read as _;
    let mut f = std::fs::File::open(&raw).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let (mut data_blocks, mut zero_blocks) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    // 1 GiB is a whole number of 4 MiB reads.
    for _ in 0..(1u64 << 30) / buf.len() as u64 {
        f.read_exact(&mut buf).unwrap();
        for block in buf.chunks(4096) {
            if block.iter().all(|&b| b == 0) {
                zero_blocks += 1;
            } else {
                data_blocks += 1;
                let mut h = DefaultHasher::new();
                block.hash(&mut h);
                seen.insert(h.finish());
            }
        }
    }
    let mib = |blocks: u64| (blocks * 4096) >> 20;
    assert!(
        mib(data_blocks) >= 256,
        "{} MiB of non-zero 4 KiB blocks",
        mib(data_blocks)
    );
    assert!(mib(zero_blocks) >= 512, "{} MiB of holes", mib(zero_blocks));
    assert!(
        seen.len() as u64 * 10 >= data_blocks * 9,
        "real data, not a repeated pattern: {} distinct of {data_blocks} blocks",
        seen.len()
    );
}

/// A manifest for the shop declaring what discovery cannot see: a cache
/// instance that runs elsewhere, an edge from it to the media bucket, and a
/// logs bucket the site does not have; it also declares `web` (as the site
/// shows it), the media bucket and Paris's backup bucket, which the site has.
const DECLARED_SHOP: &str = r#"name = "shop"
external = ["shop.example.com", "www.shop.example.com", "cdn.shop.example.com", "pay.example.org"]
buckets = ["shop-media", "paris-backups", "shop-logs"]

[[instances]]
name = "cache"
service = "shop"
state = "running"
vcpus = 1
memory_mib = 512
hostname = "cache.shop.paris.internal"
addresses = ["10.10.0.14"]

[[instances]]
name = "web"
service = "shop"
state = "running"
vcpus = 2
memory_mib = 2048
hostname = "web.shop.paris.internal"
addresses = ["10.10.0.11"]

[[depends]]
from = "instance:cache"
to = "bucket:shop-media"
relation = "reads"

[[depends]]
from = "instance:web"
to = "bucket:shop-logs"
relation = "reads"
"#;

#[test]
fn a_manifest_given_on_the_command_line_merges_with_discovery() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let manifest = tmp.path().join("shop-declared.toml");
    std::fs::write(&manifest, DECLARED_SHOP).unwrap();
    let merged = topology_with(&["--manifest", manifest.to_str().unwrap()]);
    // The same introspection with the site's own manifest (shop-media only).
    let plain = topology();

    let origins = |t: &Value| -> std::collections::BTreeMap<String, String> {
        t["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_owned(),
                    r["origin"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let (mut got, before) = (origins(&merged), origins(&plain));
    // Declared only: nothing on the site shows them.
    assert_eq!(got.remove("instance:cache").as_deref(), Some("declared"));
    assert_eq!(got.remove("bucket:shop-logs").as_deref(), Some("declared"));
    // Declared, and the site has them.
    assert_eq!(got.remove("instance:web").as_deref(), Some("both"));
    assert_eq!(got.remove("bucket:shop-media").as_deref(), Some("both"));
    assert_eq!(got.remove("bucket:paris-backups").as_deref(), Some("both"));
    // Everything else is as discovered: web's image, the db, the configs...
    assert_eq!(got.get("image:shop-web.qcow2").unwrap(), "discovered");
    assert_eq!(got.get("instance:db").unwrap(), "discovered");
    let rest: std::collections::BTreeMap<String, String> = before
        .into_iter()
        .filter(|(id, _)| id != "instance:web" && id != "bucket:shop-media")
        .collect();
    assert_eq!(got, rest);

    let find = |id: &str| resource(&merged, id);
    let cache = find("instance:cache");
    assert_eq!(cache["spec"]["memory_mib"], 512);
    assert_eq!(cache["spec"]["hostname"], "cache.shop.paris.internal");
    assert_eq!(find("bucket:shop-media")["spec"]["objects"], 521);
    let backups = find("bucket:paris-backups")["spec"]["objects"]
        .as_u64()
        .unwrap();
    assert!(backups > 0, "the site's bucket is read: {backups} objects");
    assert_eq!(find("bucket:shop-logs")["spec"]["objects"], 0);

    // The declared edges are added to the discovered ones.
    let edges = |t: &Value| -> BTreeSet<String> {
        t["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.to_string())
            .collect()
    };
    let (got, before) = (edges(&merged), edges(&plain));
    let added: Vec<&String> = got.difference(&before).collect();
    let reads = |from: &str, to: &str| {
        serde_json::json!({"from": from, "to": to, "relation": "reads"}).to_string()
    };
    assert_eq!(
        added,
        [
            &reads("instance:cache", "bucket:shop-media"),
            &reads("instance:web", "bucket:shop-logs"),
        ],
        "declared edges"
    );
    assert!(before.is_subset(&got), "no discovered edge is lost");

    // The one thing declared that the site lacks is noted, with its place.
    let notes = merged["notes"].as_array().unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0]["severity"], "warning");
    assert_eq!(notes[0]["key"], "buckets[2]");
    assert_eq!(notes[0]["file"], manifest.to_str().unwrap());
    assert!(
        notes[0]["summary"]
            .as_str()
            .unwrap()
            .contains("declared bucket `shop-logs` does not exist on site dc-paris"),
        "{notes:?}"
    );
}
