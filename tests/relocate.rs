//! `fluidcloud relocate` and friends, end to end on fresh demo environments,
//! checked independently: qemu-img for images, byte comparison for volumes
//! and objects, exact text for the rewritten config files.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    fails, fresh_demo as fresh, instance_state, ok, qemu_img, relocate_shop, relocation_id, run,
    same_bytes, stdout, tree_digest,
};

fn site(dir: &Path, name: &str) -> PathBuf {
    dir.join("sites").join(name)
}

/// Files under `dir` whose path contains none of `skip`, with contents.
fn data_digest(dir: &Path, skip: &[&str]) -> Vec<(PathBuf, u64, u64)> {
    tree_digest(dir)
        .into_iter()
        .filter(|(p, ..)| !skip.iter().any(|s| p.to_string_lossy().contains(s)))
        .map(|(p, size, _, _, h)| (p, size, h))
        .collect()
}

#[test]
fn the_demo_relocation_moves_every_byte_rewrites_config_and_leaves_the_source_untouched() {
    let (dir, config) = fresh("e2e");
    let paris = site(&dir, "dc-paris");
    let fra = site(&dir, "cloud-frankfurt");
    let before = data_digest(&paris, &["/instances/"]);
    let paths = |d: &Path| -> Vec<PathBuf> { tree_digest(d).into_iter().map(|e| e.0).collect() };
    let fra_before = paths(&fra);

    let out = ok(&run(&[
        "--config",
        &config,
        "relocate",
        "--from",
        "dc-paris",
        "--service",
        "shop",
        "--yes",
    ]));
    let id = relocation_id(&out);
    assert!(id.starts_with("shop-"), "{id}");
    assert!(out.contains("succeeded"), "{out}");
    assert!(out.contains("downtime"), "{out}");

    // Images: guest content identical (qemu-img is the oracle), in a
    // format Frankfurt boots (vmdk or raw).
    for name in ["shop-web", "shop-app", "shop-db"] {
        let src = paris.join(format!("images/{name}.qcow2"));
        let dst = fra.join(format!("images/{name}.raw"));
        let cmp = Command::new(qemu_img())
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&src)
            .arg(&dst)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
    assert!(
        !fra.join("images/intranet-wiki.raw").exists(),
        "the wiki stays"
    );
    // The volume: byte-identical and still sparse.
    let vsrc = paris.join("volumes/db-data.raw");
    let vdst = fra.join("volumes/db-data.raw");
    same_bytes(&vsrc, &vdst);
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&vdst).unwrap();
        assert!(
            m.blocks() * 512 < m.len() / 4,
            "target volume is not sparse"
        );
    }
    // The bucket: every object equal.
    let b_src = data_digest(&paris.join("buckets/shop-media"), &[]);
    let b_dst = data_digest(&fra.join("buckets/shop-media"), &[]);
    let strip = |v: Vec<(PathBuf, u64, u64)>, root: &Path| -> Vec<(PathBuf, u64, u64)> {
        v.into_iter()
            .map(|(p, s, h)| (p.strip_prefix(root).unwrap().to_owned(), s, h))
            .collect()
    };
    assert_eq!(
        strip(b_src, &paris.join("buckets/shop-media")),
        strip(b_dst, &fra.join("buckets/shop-media"))
    );
    assert!(!fra.join("buckets/paris-backups").exists());

    // Config: rewritten with the endpoint map, exactly.
    let env = std::fs::read_to_string(fra.join("config/shop/app/.env")).unwrap();
    assert_eq!(
        env,
        "# secrets come from files, never from here\n\
         DATABASE_URL=postgres://shop@db.shop.fra.internal:5432/shop\n\
         S3_ENDPOINT=https://s3.eu-central.cloud.example.com\n\
         S3_BUCKET=shop-media\n\
         AWS_ACCESS_KEY_ID_FILE=/run/secrets/paris-key\n"
    );
    let yaml = std::fs::read_to_string(fra.join("config/shop/app/app.yaml")).unwrap();
    assert!(yaml.contains("  host: db.shop.fra.internal\n"), "{yaml}");
    assert!(
        yaml.contains("  endpoint: https://s3.eu-central.cloud.example.com\n"),
        "{yaml}"
    );
    assert!(
        yaml.contains("public_url: https://shop.example.com\n"),
        "{yaml}"
    );
    let pg = std::fs::read_to_string(fra.join("config/shop/db/postgresql.conf")).unwrap();
    assert!(pg.contains("listen_addresses = '10.30.0.13'"), "{pg}");
    let json = std::fs::read_to_string(fra.join("config/shop/app/features.json")).unwrap();
    assert!(json.contains(r#""host": "10.30.0.12""#), "{json}");
    let nginx = std::fs::read_to_string(fra.join("config/shop/web/nginx.conf")).unwrap();
    assert!(nginx.contains("listen 10.30.0.11:80;"), "{nginx}");
    assert!(
        nginx.contains("proxy_pass http://app.shop.fra.internal:8080;"),
        "{nginx}"
    );
    assert!(
        nginx.contains("proxy_pass https://s3.eu-central.cloud.example.com/shop-media/;"),
        "{nginx}"
    );
    assert!(nginx.contains("server_name shop.example.com www.shop.example.com;"));

    // Source: data untouched, instances stopped (not deleted); target runs.
    assert_eq!(before, data_digest(&paris, &["/instances/"]));
    for i in ["web", "app", "db"] {
        assert_eq!(instance_state(&dir, "dc-paris", i), "stopped", "{i}");
        assert_eq!(instance_state(&dir, "cloud-frankfurt", i), "running", "{i}");
    }
    assert_eq!(instance_state(&dir, "dc-paris", "wiki"), "running");
    let db = std::fs::read_to_string(fra.join("instances/db.toml")).unwrap();
    assert!(db.contains(r#"hostname = "db.shop.fra.internal""#), "{db}");
    assert!(db.contains(r#"boot_image = "shop-db.raw""#), "{db}");

    // The report, as JSON: every step succeeded, checksums, downtime.
    let rep: serde_json::Value =
        serde_json::from_str(&ok(&run(&["--config", &config, "--json", "report", &id]))).unwrap();
    assert_eq!(rep["status"], "succeeded", "{rep:#}");
    let steps = rep["steps"].as_array().unwrap();
    assert!(steps.iter().all(|s| s["state"] == "succeeded"), "{rep:#}");
    let down = rep["downtime_seconds"].as_f64().unwrap();
    assert!(down > 0.0 && down < 30.0, "{down}");
    let sums: Vec<&str> = steps
        .iter()
        .flat_map(|s| s["outputs"].as_array().unwrap())
        .filter_map(|o| o["checksum"].as_str())
        .collect();
    assert!(
        sums.iter().any(|c| c.starts_with("blake3-merkle:")),
        "{sums:?}"
    );
    assert!(rep["config"].as_array().unwrap().iter().any(|c| {
        c["diff"]
            .as_str()
            .unwrap()
            .contains("+DATABASE_URL=postgres://shop@db.shop.fra.internal:5432/shop")
    }));

    // status lists it; a second relocation of the moved service is refused
    // cleanly because the source is stopped... and rollback restores it.
    let status = ok(&run(&["--config", &config, "status"]));
    assert!(
        status.contains(&id) && status.contains("succeeded"),
        "{status}"
    );

    // A succeeded relocation is rolled back only when asked twice: it
    // discards what the target wrote since cut-over.
    let err = fails(&run(&["--config", &config, "rollback", &id]), 7);
    assert!(
        err.contains("relocate it back") && err.contains("--force"),
        "{err}"
    );
    let rb = ok(&run(&["--config", &config, "rollback", &id, "--force"]));
    assert!(rb.contains("rolled back"), "{rb}");
    for i in ["web", "app", "db"] {
        assert_eq!(instance_state(&dir, "dc-paris", i), "running", "{i}");
        assert!(!fra.join(format!("instances/{i}.toml")).exists(), "{i}");
    }
    for d in ["images", "volumes", "instances"] {
        let left: Vec<_> = std::fs::read_dir(fra.join(d)).unwrap().collect();
        assert!(left.is_empty(), "{d} still has {left:?}");
    }
    assert!(!fra.join("config/shop/app/.env").exists());
    // Not even an empty directory or a dot-file is left behind.
    assert_eq!(paths(&fra), fra_before);
    assert_eq!(before, data_digest(&paris, &["/instances/"]));
}

#[test]
fn a_dry_run_shows_the_plan_and_changes_nothing() {
    let (dir, config) = fresh("dry");
    let before = tree_digest(&dir);
    let out = ok(&run(&[
        "--config",
        &config,
        "plan",
        "--from",
        "dc-paris",
        "--service",
        "shop",
        "--to",
        "edge-nantes",
    ]));
    for want in [
        "service shop from dc-paris to edge-nantes",
        "image:shop-web.qcow2",
        "precopy:db-data.raw",
        "sync:db-data.raw",
        "bucket:shop-media",
        "verify",
        "cutover",
        "db.shop.paris.internal -> db.shop.nantes.internal",
        "10.10.0.13 -> 10.25.0.13",
        "dry run: nothing was changed",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(before, tree_digest(&dir));

    let json: serde_json::Value = serde_json::from_str(&ok(&run(&[
        "--config",
        &config,
        "--json",
        "relocate",
        "--dry-run",
        "--from",
        "dc-paris",
        "--service",
        "shop",
    ])))
    .unwrap();
    assert_eq!(json["relocation"]["service"], "shop");
    assert!(json["plan"]["steps"].as_array().unwrap().len() >= 10);
    assert_eq!(before, tree_digest(&dir));
}

#[test]
fn bad_input_fails_clearly_and_changes_nothing() {
    let (dir, config) = fresh("bad");
    let before = tree_digest(&dir);
    let base = ["--config", config.as_str(), "relocate", "--yes"];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        run(&v)
    };
    let e = fails(&with(&["--from", "dc-nowhere", "--service", "shop"]), 4);
    assert!(e.contains("dc-nowhere"), "{e}");
    let e = fails(
        &with(&["--from", "dc-paris", "--service", "shop", "--to", "mars"]),
        4,
    );
    assert!(e.contains("mars"), "{e}");
    let e = fails(&with(&["--from", "dc-paris", "--service", "nope"]), 4);
    assert!(e.contains("nope"), "{e}");
    let e = fails(
        &with(&[
            "--from",
            "dc-paris",
            "--service",
            "shop",
            "-c",
            "jurisdiction(*; US)",
            "-c",
            "ban(web; cloud-virginia)",
        ]),
        9,
    );
    assert!(e.contains("jurisdiction") && e.contains("ban"), "{e}");
    // Without --yes and without a terminal: refuse, change nothing.
    let o = run(&["--config", &config, "relocate", "--from", "dc-paris"]);
    let e = fails(&o, 2);
    assert!(e.contains("--yes"), "{e}");
    assert_eq!(before, tree_digest(&dir));

    // A target that takes no disk image (image-convert writes every
    // format there is, so no list of formats is unwritable).
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("image_formats = [\"raw\"]\n", "image_formats = []\n");
    std::fs::write(&config, text).unwrap();
    let e = fails(
        &with(&[
            "--from",
            "dc-paris",
            "--service",
            "shop",
            "--to",
            "edge-rennes",
        ]),
        6,
    );
    assert!(
        e.contains("accepts no disk image format") && e.contains("shop-"),
        "{e}"
    );
    let e = fails(
        &run(&["--config", &config, "resume", "shop-19990101-000000"]),
        4,
    );
    assert!(e.contains("shop-19990101-000000"), "{e}");
    assert!(stdout(&run(&["--config", &config, "status"])).contains("no relocations yet"));
}

#[test]
fn a_failed_relocation_names_the_step_and_rollback_cleans_the_target() {
    let (dir, config) = fresh("failed");
    let paris = site(&dir, "dc-paris");
    let nantes = site(&dir, "edge-nantes");
    let before = data_digest(&paris, &[]);
    // Someone else's instance `db` at the target: provisioning must refuse.
    let foreign = "name = \"db\"\nstate = \"stopped\"\nvcpus = 1\nmemory_mib = 512\n";
    std::fs::write(nantes.join("instances/db.toml"), foreign).unwrap();

    let o = run(&relocate_shop(&config, "dc-paris", "edge-nantes"));
    let err = fails(&o, 1);
    assert!(err.contains("step provision:db failed"), "{err}");
    assert!(err.contains("fluidcloud rollback"), "{err}");
    let id = relocation_id(&stdout(&o));
    // Nothing at the source was touched: the failure came before verify.
    assert_eq!(before, data_digest(&paris, &[]));

    let rb = ok(&run(&["--config", &config, "rollback", &id]));
    assert!(rb.contains("rolled back"), "{rb}");
    for d in ["images", "volumes"] {
        let left: Vec<_> = std::fs::read_dir(nantes.join(d)).unwrap().collect();
        assert!(left.is_empty(), "{d} still has {left:?}");
    }
    assert!(!nantes.join("config/shop/app/app.yaml").exists());
    assert!(!nantes.join("instances/web.toml").exists());
    assert_eq!(
        std::fs::read_to_string(nantes.join("instances/db.toml")).unwrap(),
        foreign,
        "the instance that was not ours is left alone"
    );
    assert_eq!(before, data_digest(&paris, &[]));
    let status = ok(&run(&["--config", &config, "status"]));
    assert!(status.contains("rolled-back"), "{status}");
}
