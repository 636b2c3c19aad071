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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

use common::{fails, ok, relocate_shop, relocation_id, stdout};
use fluidcloud_migrators::objects::{self, BucketLocation, Manifest};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script(args: &[&str]) -> Output {
    let out = Command::new(workspace().join("scripts/garage"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/garage {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The Garage pair of this test binary.
struct Garage {
    dir: PathBuf,
    env: BTreeMap<String, String>,
}

impl Garage {
    fn dir(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn endpoint(&self, inst: &str) -> &str {
        &self.env[&format!("GARAGE_{inst}_ENDPOINT")]
    }

    /// The variables the binary gets: `GA_KEY`, `GA_SECRET`, `GB_KEY`,
    /// `GB_SECRET`.
    fn credentials(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for inst in ["A", "B"] {
            v.push((
                format!("G{inst}_KEY"),
                self.env[&format!("GARAGE_{inst}_ACCESS_KEY_ID")].clone(),
            ));
            v.push((
                format!("G{inst}_SECRET"),
                self.env[&format!("GARAGE_{inst}_SECRET_ACCESS_KEY")].clone(),
            ));
        }
        v
    }

    /// Bucket `bucket` of instance `inst` as this process reads it (its
    /// variables are exported by [`garage`]).
    fn location(&self, inst: &str, bucket: &str) -> BucketLocation {
        BucketLocation::parse(&format!(
            "s3://{bucket}?endpoint={}&region=garage&access_key_id_env=GARAGE_{inst}_ACCESS_KEY_ID&secret_access_key_env=GARAGE_{inst}_SECRET_ACCESS_KEY",
            self.endpoint(inst)
        ))
        .unwrap()
    }
}

static PAIR: OnceLock<Garage> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

unsafe extern "C" {
    fn atexit(callback: extern "C" fn()) -> std::os::raw::c_int;
}

extern "C" fn stop_pair() {
    if let Some(g) = PAIR.get() {
        let _ = Command::new(workspace().join("scripts/garage"))
            .args(["stop", g.dir()])
            .output();
        // Its buckets hold copies of the demo's objects: do not pile them up.
        let _ = std::fs::remove_dir_all(&g.dir);
    }
}

/// The pair, started on first use and stopped when the test binary exits.
fn garage() -> &'static Garage {
    PAIR.get_or_init(|| {
        let dir = workspace()
            .join("target/tmp")
            .join(format!("garage-relocate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        script(&["start", dir.to_str().unwrap()]);
        let text = std::fs::read_to_string(dir.join("env")).unwrap();
        let mut env = BTreeMap::new();
        for line in text.lines() {
            let (k, v) = line.trim_start_matches("export ").split_once('=').unwrap();
            // SAFETY: set once, before any test reads these variables.
            unsafe { std::env::set_var(k, v) };
            env.insert(k.to_owned(), v.to_owned());
        }
        // SAFETY: registers a plain function taking no arguments.
        unsafe { atexit(stop_pair) };
        Garage { dir, env }
    })
}

/// One test at a time owns the pair (they share bucket names and stop B).
/// The pair is started again if an earlier test left B stopped.
fn exclusive() -> (MutexGuard<'static, ()>, &'static Garage) {
    let lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let g = garage();
    script(&["start", g.dir()]);
    (lock, g)
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

fn buckets(g: &Garage, inst: &str) -> Vec<String> {
    let BucketLocation::S3(l) = g.location(inst, "probe") else {
        unreachable!()
    };
    block_on(objects::list_buckets(&l)).unwrap()
}

/// Removes bucket `bucket` and its objects from instance `inst`.
fn wipe(g: &Garage, inst: &str, bucket: &str) {
    if !buckets(g, inst).contains(&bucket.to_owned()) {
        return;
    }
    let loc = g.location(inst, bucket);
    let keys: Vec<String> = manifest(&loc).entries.into_iter().map(|e| e.key).collect();
    block_on(objects::delete_objects(&loc, &keys, true)).unwrap();
    assert!(!buckets(g, inst).contains(&bucket.to_owned()));
}

/// A fresh demo environment plus sites `garage-a` and `garage-b`.
fn fresh(g: &Garage, name: &str) -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("relocate-garage-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    ok(&common::run(&["demo", "init", dir.to_str().unwrap()]));
    let config = dir.join("fluidcloud.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    for (site, inst, net) in [("garage-a", "A", 50), ("garage-b", "B", 60)] {
        for sub in [
            "instances",
            "images",
            "volumes",
            "buckets",
            "config",
            "services",
        ] {
            std::fs::create_dir_all(dir.join("sites").join(site).join(sub)).unwrap();
        }
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
fn run_with(g: &Garage, args: &[&str], without: &[&str]) -> Output {
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
    let (_lock, g) = exclusive();
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
    let (_lock, g) = exclusive();
    wipe(g, "B", "shop-media");
    let (dir, config) = fresh(g, "down");
    script(&["stop-one", g.dir(), "B"]);

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

    script(&["start-one", g.dir(), "B"]);
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
    let (_lock, g) = exclusive();
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
