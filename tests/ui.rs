//! The web dashboard in a real browser: Debian's Chromium driven by
//! playwright-core (`tests/ui/dashboard.mjs`, installed by `scripts/setup`)
//! against a real `fluidcloud serve` over HTTPS on the demo environment.
//!
//! The browser script asserts what the page shows; this test checks its
//! figures again against the service's API and the CLI, and keeps the
//! screenshots in `target/tmp/ui-artifacts/` for a reviewer.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::*;
use serde_json::Value;

const TOKEN: &str = "ui-test-token-6f1c2a";
/// A password the demo's config holds: redacted everywhere the UI shows it.
const PASSWORD: &str = "hunter2-in-the-ui-test";
const MIB: u64 = 1 << 20;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The directory holding playwright-core, or a failure that says how to
/// install it (the test never skips).
fn ui_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui");
    assert!(
        dir.join("node_modules/playwright-core/package.json")
            .exists(),
        "playwright-core is not installed in {}: run scripts/setup (it runs `npm ci` there)",
        dir.display()
    );
    for tool in ["node", "chromium"] {
        let found = Command::new(tool).arg("--version").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "`{tool}` does not run: run scripts/setup (Debian's chromium and nodejs)"
        );
    }
    dir
}

/// Runs the browser script in `mode` with `env`; its JSON summary.
fn browser(mode: &str, env: &[(&str, &str)]) -> Value {
    let out = Command::new("node")
        .arg("dashboard.mjs")
        .arg(mode)
        .current_dir(ui_dir())
        .env("FC_OUT", artifacts())
        .env("FC_SECRETS", format!("{TOKEN},{PASSWORD}"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser script failed ({mode}):\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no summary ({e}): {stdout}"))
}

/// The demo, with a password in the shop's config and a second service
/// whose 512 MiB disk takes long enough to copy that the browser cancels
/// it mid-run.
fn environment() -> (PathBuf, String) {
    let (dir, config) = fresh_demo("ui");
    let paris = dir.join("sites/dc-paris");
    let env_file = paris.join("config/shop/app/.env");
    let mut text = std::fs::read_to_string(&env_file).unwrap();
    text.push_str(&format!("DB_PASSWORD={PASSWORD}\n"));
    std::fs::write(&env_file, text).unwrap();
    random_file(&paris.join("images/svc1.raw"), 512 * MIB);
    std::fs::write(
        paris.join("instances/svc1.toml"),
        "name = \"svc1\"\nservice = \"svc1\"\nstate = \"running\"\nvcpus = 1\nmemory_mib = 256\n\
         hostname = \"svc1.paris.internal\"\naddresses = [\"10.10.0.101\"]\nboot_image = \"svc1.raw\"\n\n\
         [format]\n\"svc1.raw\" = \"raw\"\n",
    )
    .unwrap();
    (dir, config)
}

fn serve(config: &str) -> (Server, String) {
    let (child, doc) = spawn_serve(config, |cmd| {
        cmd.env("FLUIDCLOUD_TOKEN", TOKEN);
    });
    let url = doc["listening"].as_str().unwrap().to_owned();
    assert!(url.starts_with("https://"), "{doc}");
    (Server(child), url)
}

fn report_json(config: &str, id: &str) -> Value {
    serde_json::from_str(&ok(&run(&["--config", config, "--json", "report", id]))).unwrap()
}

#[test]
fn the_dashboard_logs_in_relocates_live_cancels_resumes_and_reports_in_chromium() {
    let (dir, config) = environment();
    let (server, url) = serve(&config);
    let seen = browser("dashboard", &[("FC_URL", &url), ("FC_TOKEN", TOKEN)]);
    drop(server);

    // The sites page drew every site of the sites file.
    let sites = ok(&run(&["--config", &config, "--json", "sites", "list"]));
    let sites: Value = serde_json::from_str(&sites).unwrap();
    assert_eq!(seen["sites"], sites.as_array().unwrap().len(), "{seen}");

    // Both relocations ran to the end, as the CLI reads their journals.
    let first = report_json(&config, seen["first"].as_str().unwrap());
    let second = report_json(&config, seen["second"].as_str().unwrap());
    assert_eq!(first["status"], "succeeded", "{first:#}");
    assert_eq!(second["status"], "succeeded", "{second:#}");
    assert_eq!(instance_state(&dir, "edge-nantes", "svc1"), "running");
    // The second was cancelled before it was resumed: some step ran twice.
    assert!(
        second["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["attempts"].as_u64().unwrap() >= 2),
        "the cancel never reached the run: {second:#}"
    );
    assert!(
        seen["cancel_question"]
            .as_str()
            .unwrap()
            .contains(seen["second"].as_str().unwrap())
    );

    // The Gantt chart has a bar per step, and its downtime is the report's.
    let steps = first["steps"].as_array().unwrap();
    assert_eq!(seen["gantt_bars"], steps.len());
    assert_eq!(seen["steps"], steps.len());
    let downtime = first["downtime_seconds"].as_f64().unwrap();
    let shown = format!("{downtime:.2} s");
    assert_eq!(seen["downtime_figure"], shown.as_str(), "{seen}");
    assert_eq!(seen["downtime_text"], format!("downtime {shown}"), "{seen}");
    assert!(first["downtime_start"].as_f64().unwrap() > 0.0);
    // The page had a secret to hide: the .env's diff names the password's
    // key (redacted) and never its value.
    let diffs = first["config"].as_array().unwrap();
    let env_diff = diffs
        .iter()
        .find(|d| {
            d["target"].as_str().unwrap().ends_with(".env")
                && !d["diff"].as_str().unwrap().is_empty()
        })
        .unwrap_or_else(|| panic!("no diff of the .env: {diffs:#?}"));
    let text = env_diff["diff"].as_str().unwrap();
    assert!(
        text.contains("DB_PASSWORD") && !text.contains(PASSWORD),
        "{text}"
    );
    eprintln!(
        "a 10,000-step plan showed in {} ms",
        seen["plan_10k_ms"].as_u64().unwrap()
    );

    // `report --html`: one file, opened offline, with every step.
    let html = dir.join("report.html");
    let id = seen["first"].as_str().unwrap();
    ok(&run(&[
        "--config",
        &config,
        "report",
        id,
        "--html",
        html.to_str().unwrap(),
    ]));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(!page.contains(PASSWORD));
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));
    let ids: Vec<&str> = steps.iter().map(|s| s["id"].as_str().unwrap()).collect();
    let offline = browser(
        "report",
        &[
            ("FC_REPORT", html.to_str().unwrap()),
            ("FC_STEPS", &serde_json::to_string(&ids).unwrap()),
        ],
    );
    assert_eq!(offline["report_steps"], ids.len());
    assert_eq!(offline["report_downtime"], format!("downtime {shown}"));
}

#[test]
fn report_html_refuses_an_unknown_relocation_and_an_unwritable_file() {
    let config = demo_config();
    let err = fails(
        &run(&[
            "--config",
            &config,
            "report",
            "nope-1",
            "--html",
            "/tmp/x.html",
        ]),
        4,
    );
    assert!(err.contains("nope-1"), "{err}");
    assert!(!Path::new("/tmp/x.html").exists());
    let (_, config) = fresh_demo("ui-html-dir");
    let id = relocation_id(&ok(&run(&relocate_shop(
        &config,
        "dc-paris",
        "edge-nantes",
    ))));
    let err = fails(
        &run(&[
            "--config",
            &config,
            "report",
            &id,
            "--html",
            "/nonexistent-dir/r.html",
        ]),
        1,
    );
    assert!(err.contains("/nonexistent-dir"), "{err}");
}
