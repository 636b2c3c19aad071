//! `fluidcloud relocate` between sites whose buckets live on real Garage S3
//! servers (`buckets_url`), started by `scripts/garage`: local → Garage,
//! Garage → Garage, a target server that is down, and a missing credential.
//! Objects are checked independently by reading both sides back
//! (`objects::manifest`: key, size and BLAKE3 of every object).
//!
//! Garage must be installed (`scripts/setup`); without it these tests fail,
//! they never skip.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fails, ok, relocate_shop, relocation_id, stdout};
use fluidcloud_migrators::objects::{self, BucketLocation, Manifest};
use fluidcloud_testkit::{Garage, Lock};

/// A Garage pair as these tests use it: its variables exported into this
/// process under `prefix` (`{prefix}_A_ACCESS_KEY_ID`, ...).
struct Pair<'a> {
    g: &'a Garage,
    prefix: &'static str,
}

impl<'a> Pair<'a> {
    fn new(g: &'a Garage, prefix: &'static str) -> Self {
        g.export(prefix);
        Self { g, prefix }
    }

    fn endpoint(&self, inst: &str) -> &str {
        self.g.endpoint(inst)
    }

    /// The variables the binary gets: `GA_KEY`, `GA_SECRET`, `GB_KEY`,
    /// `GB_SECRET`.
    fn credentials(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for inst in ["A", "B"] {
            v.push((
                format!("G{inst}_KEY"),
                self.g.access_key_id(inst).to_owned(),
            ));
            v.push((
                format!("G{inst}_SECRET"),
                self.g.secret_access_key(inst).to_owned(),
            ));
        }
        v
    }

    /// Bucket `bucket` of instance `inst` as this process reads it.
    fn location(&self, inst: &str, bucket: &str) -> BucketLocation {
        BucketLocation::parse(&self.g.url(self.prefix, inst, bucket)).unwrap()
    }
}

/// The run's shared pair, for one test at a time: these tests use the
/// demo's bucket name (`shop-media`) on both servers.
fn exclusive() -> (Lock, Pair<'static>) {
    let lock = Lock::take("relocate-garage-shop-media");
    (lock, Pair::new(Garage::shared(), "GARAGE"))
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn manifest(loc: &BucketLocation) -> Manifest {
    block_on(objects::manifest(loc)).unwrap_or_else(|e| panic!("manifest of {loc}: {e}"))
}

fn buckets(g: &Pair<'_>, inst: &str) -> Vec<String> {
    let BucketLocation::S3(l) = g.location(inst, "probe") else {
        unreachable!()
    };
    block_on(objects::list_buckets(&l)).unwrap()
}

/// Removes bucket `bucket` and its objects from instance `inst`.
fn wipe(g: &Pair<'_>, inst: &str, bucket: &str) {
    if !buckets(g, inst).contains(&bucket.to_owned()) {
        return;
    }
    let loc = g.location(inst, bucket);
    let keys: Vec<String> = manifest(&loc).entries.into_iter().map(|e| e.key).collect();
    block_on(objects::delete_objects(&loc, &keys, true)).unwrap();
    assert!(!buckets(g, inst).contains(&bucket.to_owned()));
}

/// A fresh demo environment plus sites `garage-a` and `garage-b`.
fn fresh(g: &Pair<'_>, name: &str) -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("relocate-garage-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    fluidcloud_testkit::scratch(&dir);
    ok(&common::run(&["demo", "init", dir.to_str().unwrap()]));
    let config = dir.join("fluidcloud.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    for (site, inst, net) in [("garage-a", "A", 50), ("garage-b", "B", 60)] {
        common::local_site(&dir.join("sites").join(site));
        let endpoint = g.endpoint(inst);
        let short = &site["garage-".len()..];
        text.push_str(&format!(
            r#"
[sites.{site}]
kind = "local"
description = "a directory site whose buckets live on Garage {inst}"
path = "sites/{site}"
jurisdiction = "EU/FR"
image_formats = ["raw"]
internal_domains = ["{short}.internal"]
subnet = "10.{net}.0.0/24"
object_endpoint = "{endpoint}"
buckets_url = "s3://?endpoint={endpoint}&region=garage"
location = {{ region = "fr-idf", latitude = 48.85, longitude = 2.35 }}
credentials = {{ access_key_id_env = "G{inst}_KEY", secret_access_key_env = "G{inst}_SECRET" }}
"#
        ));
    }
    std::fs::write(&config, text).unwrap();
    (dir, config.to_str().unwrap().to_owned())
}

/// Runs the binary with the Garage credentials in its environment, except
/// the variables named in `without`.
fn run_with(g: &Pair<'_>, args: &[&str], without: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluidcloud"));
    cmd.args(args)
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env_remove("FLUIDCLOUD_CONFIG")
        .env_remove("RUST_LOG");
    for (k, v) in g.credentials() {
        if !without.contains(&k.as_str()) {
            cmd.env(k, v);
        }
    }
    for k in without {
        cmd.env_remove(k);
    }
    cmd.output().unwrap()
}

fn paris_media(dir: &Path) -> Manifest {
    let path = std::fs::canonicalize(dir.join("sites/dc-paris/buckets/shop-media")).unwrap();
    manifest(&BucketLocation::parse(&format!("file://{}", path.display())).unwrap())
}

#[test]
fn the_shop_moves_from_a_directory_to_garage_then_between_garages() {
    let (_lock, g) = &exclusive();
    wipe(g, "A", "shop-media");
    wipe(g, "B", "shop-media");
    let (dir, config) = fresh(g, "chain");
    let paris = paris_media(&dir);
    assert!(paris.entries.len() > 3, "{paris:?}");

    // dc-paris (directory) → garage-a (Garage A).
    let out = ok(&run_with(
        g,
        &relocate_shop(&config, "dc-paris", "garage-a"),
        &[],
    ));
    assert!(out.contains("succeeded"), "{out}");
    let on_a = manifest(&g.location("A", "shop-media"));
    assert_eq!(on_a, paris, "Garage A holds other objects than dc-paris");
    assert!(
        !dir.join("sites/garage-a/buckets/shop-media").exists(),
        "the bucket went to the directory, not to Garage"
    );
    let env_a = std::fs::read_to_string(dir.join("sites/garage-a/config/shop/app/.env")).unwrap();
    assert!(
        env_a.contains(&format!("S3_ENDPOINT={}", g.endpoint("A"))),
        "{env_a}"
    );

    // introspection at garage-a sees the bucket on Garage A.
    let intro = ok(&run_with(
        g,
        &["--config", &config, "introspect", "garage-a"],
        &[],
    ));
    assert!(intro.contains("shop-media"), "{intro}");

    // garage-a → garage-b: Garage A to Garage B.
    let out = ok(&run_with(
        g,
        &relocate_shop(&config, "garage-a", "garage-b"),
        &[],
    ));
    assert!(out.contains("succeeded"), "{out}");
    let on_b = manifest(&g.location("B", "shop-media"));
    assert_eq!(on_b, on_a, "Garage B holds other objects than Garage A");
    let env_b = std::fs::read_to_string(dir.join("sites/garage-b/config/shop/app/.env")).unwrap();
    assert!(
        env_b.contains(&format!("S3_ENDPOINT={}", g.endpoint("B"))),
        "{env_b}"
    );
    for f in ["shop/app/.env", "shop/app/app.yaml", "shop/web/nginx.conf"] {
        let text = std::fs::read_to_string(dir.join("sites/garage-b/config").join(f)).unwrap();
        assert!(
            !text.contains(g.endpoint("A")),
            "{f} still names A:\n{text}"
        );
        assert!(
            !text.contains("s3.dc-paris"),
            "{f} still names Paris:\n{text}"
        );
    }
}

#[test]
fn a_stopped_target_fails_the_bucket_step_and_resume_completes_it() {
    // A pair of its own: it stops B.
    let pair = Garage::private("relocate-down");
    let g = &Pair::new(&pair, "DOWNGARAGE");
    let (dir, config) = fresh(g, "down");
    pair.stop_one("B");

    let started = std::time::Instant::now();
    let o = run_with(
        g,
        &[
            "--config",
            &config,
            "relocate",
            "--from",
            "dc-paris",
            "--service",
            "shop",
            "--to",
            "garage-b",
            "--retry-budget",
            "1",
            "--yes",
        ],
        &[],
    );
    let took = started.elapsed();
    let err = fails(&o, 1);
    let out = stdout(&o);
    assert!(
        err.contains("step bucket:shop-media failed") && err.contains("resume"),
        "{err}"
    );
    assert!(took.as_secs() < 45, "took {took:?}");
    let id = relocation_id(&out);
    // The step was retried before the run gave up (the report counts the
    // attempts; retry lines are only drawn on a terminal).
    let report = out
        .lines()
        .find_map(|l| l.strip_prefix("report saved to "))
        .unwrap_or_else(|| panic!("no report in:\n{out}"));
    let rep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.trim()).unwrap()).unwrap();
    let step = rep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "bucket:shop-media")
        .unwrap();
    assert_eq!(step["state"], "failed", "{step:#}");
    assert!(step["attempts"].as_u64().unwrap() > 1, "{step:#}");

    pair.start_one("B");
    let out = ok(&run_with(g, &["--config", &config, "resume", &id], &[]));
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(
        manifest(&g.location("B", "shop-media")),
        paris_media(&dir),
        "Garage B holds other objects than dc-paris"
    );
}

#[test]
fn a_missing_credential_variable_stops_the_relocation_before_it_writes() {
    let (_lock, g) = &exclusive();
    let (dir, config) = fresh(g, "nocreds");
    let site = dir.join("sites/garage-a");
    let before_dir = common::tree_digest(&site);
    let before_buckets = buckets(g, "A");
    let before_media = before_buckets
        .contains(&"shop-media".to_owned())
        .then(|| manifest(&g.location("A", "shop-media")));

    let o = run_with(
        g,
        &relocate_shop(&config, "dc-paris", "garage-a"),
        &["GA_SECRET"],
    );
    let err = fails(&o, 3);
    assert!(err.contains("GA_SECRET"), "{err}");
    assert!(!stdout(&o).contains("succeeded"), "{}", stdout(&o));

    assert_eq!(common::tree_digest(&site), before_dir);
    assert_eq!(buckets(g, "A"), before_buckets);
    let after_media = before_buckets
        .contains(&"shop-media".to_owned())
        .then(|| manifest(&g.location("A", "shop-media")));
    assert_eq!(after_media, before_media);
}
