//! Relocations through `fluidcloud serve`: the real binary on a real socket,
//! each test on a fresh demo environment of its own; data checked on disk.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{
    chunks_written, fails, instance_state, ok, random_file, run, same_bytes, spawn_serve, stderr,
    stdout,
};
use serde_json::{Value, json};

const TOKEN: &str = "relocation-test-token";
const MIB: u64 = 1 << 20;

/// A fresh demo environment of its own for one test.
fn fresh(name: &str) -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    fluidcloud_testkit::scratch(&dir);
    ok(&run(&["demo", "init", dir.to_str().unwrap()]));
    let config = dir.join("fluidcloud.toml").to_str().unwrap().to_owned();
    (dir, config)
}

struct Server {
    child: Child,
    url: String,
    fingerprint: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// SIGKILL, as a crash or a power cut would stop it.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// The fingerprint each service printed, by URL: what clients pin.
fn pins() -> &'static Mutex<HashMap<String, String>> {
    static PINS: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    PINS.get_or_init(Default::default)
}

/// A client of the service at `url` (pinning its certificate), from the
/// loopback address `from`.
fn client_from(url: &str, from: IpAddr) -> reqwest::Client {
    let pin = pins().lock().unwrap()[url].parse().unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(
            fluidcloud_broker::tls::pinned_client_config(pin)
                .unwrap()
                .config,
        )
        .local_address(from)
        .build()
        .unwrap()
}

fn client(url: &str) -> reqwest::Client {
    client_from(url, [127, 0, 0, 1].into())
}

fn serve(config: &str) -> Server {
    serve_with(config, &[])
}

/// `serve` over HTTPS with its generated certificate, and `extra` arguments.
fn serve_with(config: &str, extra: &[&str]) -> Server {
    serve_logged(config, extra, &[], None)
}

/// `serve_with`, with `env` added to its environment and its stderr (the
/// log) written to `log`.
fn serve_logged(config: &str, extra: &[&str], env: &[(&str, &str)], log: Option<&Path>) -> Server {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
        None => Stdio::null(),
    };
    let (child, doc) = spawn_serve(config, |cmd| {
        cmd.args(extra)
            .env("FLUIDCLOUD_TOKEN", TOKEN)
            .env_remove("FLUIDCLOUD_SERVER")
            .envs(env.iter().copied())
            .stderr(stderr);
    });
    let url = doc["listening"].as_str().unwrap().to_owned();
    assert!(url.starts_with("https://"), "{doc}");
    let fingerprint = doc["fingerprint"].as_str().unwrap().to_owned();
    pins()
        .lock()
        .unwrap()
        .insert(url.clone(), fingerprint.clone());
    Server {
        child,
        url,
        fingerprint,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// (status, headers, body as JSON or a string).
async fn call(
    url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let c = client(url);
    let mut r = c.request(method.parse().unwrap(), format!("{url}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, v)
}

/// Every server-sent event of `/relocations/{id}/events`, to the stream's
/// end: (name, data).
async fn events(url: &str, id: &str) -> Vec<(String, Value)> {
    let mut resp = client(url)
        .get(format!("{url}/relocations/{id}/events"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), resp.chunk())
        .await
        .expect("the event stream did not end in 5 minutes")
        .unwrap()
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for l in block.lines() {
                if let Some(v) = l.strip_prefix("event: ") {
                    name = v.to_owned();
                } else if let Some(v) = l.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if !data.is_empty() {
                out.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    out
}

fn names(ev: &[(String, Value)]) -> Vec<&str> {
    ev.iter().map(|(n, _)| n.as_str()).collect()
}

fn site(dir: &Path, name: &str) -> PathBuf {
    dir.join("sites").join(name)
}

/// Waits until the volume's transfer to `target_site` has written `n`
/// chunks; panics if the relocation ends first.
async fn wait_for_chunks(url: &str, id: &str, dir: &Path, target_site: &str, n: u64) {
    let part = site(dir, target_site).join("volumes/.db-data.raw.fcpart");
    let start = Instant::now();
    while chunks_written(&part) < n {
        let (_, _, v) = call(url, "GET", &format!("/relocations/{id}"), Some(TOKEN), None).await;
        assert_eq!(
            v["status"], "running",
            "finished before the test could act: {v:#}"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn start(url: &str, body: Value) -> String {
    let (status, headers, v) = call(url, "POST", "/relocations", Some(TOKEN), Some(body)).await;
    assert_eq!(status, 202, "{v:#}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(headers["location"], format!("/relocations/{id}").as_str());
    assert_eq!(v["status"], "running", "{v:#}");
    id
}

#[test]
fn a_relocation_started_over_http_streams_its_progress_moves_the_data_and_rolls_back() {
    let (dir, config) = fresh("e2e");
    let server = serve(&config);
    let url = server.url.clone();
    rt().block_on(async {
        let id = start(
            &url,
            json!({ "from": "dc-paris", "service": "shop", "to": "cloud-frankfurt" }),
        )
        .await;
        assert!(id.starts_with("shop-"), "{id}");

        let ev = events(&url, &id).await;
        let n = names(&ev);
        assert_eq!(n.first(), Some(&"state"), "{n:?}");
        assert_eq!(n.last(), Some(&"end"), "{n:?}");
        assert!(n.contains(&"step-finished"), "{n:?}");
        // Progress carries bytes: the volume's precopy reports what it wrote.
        let vol_bytes = std::fs::metadata(site(&dir, "dc-paris").join("volumes/db-data.raw"))
            .unwrap()
            .len();
        assert!(
            ev.iter().any(|(name, d)| name == "step-progress"
                && d["step"] == "precopy:db-data.raw"
                && d["done"].as_u64().unwrap() > 0
                && d["done"].as_u64().unwrap() <= vol_bytes),
            "{ev:#?}"
        );
        let finished: Vec<&str> = ev
            .iter()
            .filter(|(name, _)| name == "step-finished")
            .map(|(_, d)| d["step"].as_str().unwrap())
            .collect();
        assert!(finished.contains(&"cutover"), "{finished:?}");
        let end = &ev.last().unwrap().1;
        assert_eq!(end["status"], "succeeded", "{end:#}");

        // The data is at the target: the volume byte for byte, the config
        // rewritten, the instances running there and stopped at the source.
        same_bytes(
            &site(&dir, "dc-paris").join("volumes/db-data.raw"),
            &site(&dir, "cloud-frankfurt").join("volumes/db-data.raw"),
        );
        let env =
            std::fs::read_to_string(site(&dir, "cloud-frankfurt").join("config/shop/app/.env"))
                .unwrap();
        assert!(
            env.contains("DATABASE_URL=postgres://shop@db.shop.fra.internal:5432/shop"),
            "{env}"
        );
        for i in ["web", "app", "db"] {
            assert_eq!(instance_state(&dir, "cloud-frankfurt", i), "running");
            assert_eq!(instance_state(&dir, "dc-paris", i), "stopped");
        }

        // Listed, and shown with its report.
        let (status, _, list) = call(&url, "GET", "/relocations", Some(TOKEN), None).await;
        assert_eq!(status, 200);
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0]["id"].as_str(), list[0]["status"].as_str()),
            (Some(id.as_str()), Some("succeeded"))
        );
        let (status, _, one) = call(
            &url,
            "GET",
            &format!("/relocations/{id}"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(one["report"]["status"], "succeeded");
        assert!(one["report"]["downtime_seconds"].as_f64().unwrap() > 0.0);
        assert!(
            one["steps"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["state"] == "succeeded")
        );
        // The CLI on the same sites file sees it too: one store.
        let st = ok(&run(&["--config", &config, "status"]));
        assert!(st.contains(&id) && st.contains("succeeded"), "{st}");

        // A client connecting late gets the state, then the end at once.
        let late = events(&url, &id).await;
        assert_eq!(names(&late), ["state", "end"]);
        assert_eq!(late[0].1["status"], "succeeded");

        // Cancelling a finished relocation is a conflict.
        let (status, _, p) = call(
            &url,
            "POST",
            &format!("/relocations/{id}/cancel"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 409, "{p:#}");

        // Roll back through the API: refused for a succeeded relocation
        // unless forced; then the target holds nothing, the source runs.
        let (status, _, v) = call(
            &url,
            "POST",
            &format!("/relocations/{id}/rollback"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 409, "{v:#}");
        assert!(v["detail"].as_str().unwrap().contains("force"), "{v:#}");
        let (status, headers, v) = call(
            &url,
            "POST",
            &format!("/relocations/{id}/rollback?force=true"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 202, "{v:#}");
        assert_eq!(headers["location"], format!("/relocations/{id}").as_str());
        let ev = events(&url, &id).await;
        assert!(names(&ev).contains(&"step-rolled-back"), "{:?}", names(&ev));
        assert_eq!(ev.last().unwrap().1["status"], "rolled-back");
        let fra = site(&dir, "cloud-frankfurt");
        for d in ["images", "volumes", "instances"] {
            let left: Vec<_> = std::fs::read_dir(fra.join(d)).unwrap().collect();
            assert!(left.is_empty(), "{d} still has {left:?}");
        }
        assert!(!fra.join("config/shop/app/.env").exists());
        for i in ["web", "app", "db"] {
            assert_eq!(instance_state(&dir, "dc-paris", i), "running");
        }
    });
}

#[test]
fn a_relocation_survives_a_killed_service_and_resumes_through_the_api() {
    let (dir, config) = fresh("restart");
    let src = site(&dir, "dc-paris").join("volumes/db-data.raw");
    random_file(&src, 512 * MIB);
    let server = serve(&config);
    let rt = rt();
    let id = rt.block_on(async {
        let id = start(
            &server.url,
            json!({ "from": "dc-paris", "service": "shop", "to": "edge-nantes" }),
        )
        .await;
        wait_for_chunks(&server.url, &id, &dir, "edge-nantes", 16).await;
        id
    });
    server.kill();

    let server = serve(&config);
    rt.block_on(async {
        let url = &server.url;
        let (status, _, list) = call(url, "GET", "/relocations", Some(TOKEN), None).await;
        assert_eq!(status, 200);
        assert_eq!(list[0]["id"], id.as_str());
        assert_eq!(list[0]["status"], "interrupted", "{list:#}");
        let (_, _, one) = call(url, "GET", &format!("/relocations/{id}"), Some(TOKEN), None).await;
        assert_eq!(one["status"], "interrupted");
        let done_before: Vec<&str> = one["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "succeeded")
            .map(|s| s["id"].as_str().unwrap())
            .collect();
        assert!(!done_before.contains(&"cutover"), "{one:#}");
        // Nothing runs it now: cancel has nothing to stop.
        let (status, _, _) = call(
            url,
            "POST",
            &format!("/relocations/{id}/cancel"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 409);

        let (status, _, v) = call(
            url,
            "POST",
            &format!("/relocations/{id}/resume"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 202, "{v:#}");
        assert_eq!(v["status"], "running");
        // A second resume while it runs is refused.
        let (status, _, _) = call(
            url,
            "POST",
            &format!("/relocations/{id}/resume"),
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 409);
        let ev = events(url, &id).await;
        assert_eq!(ev.last().unwrap().1["status"], "succeeded", "{ev:#?}");
    });
    same_bytes(&src, &site(&dir, "edge-nantes").join("volumes/db-data.raw"));
    assert_eq!(instance_state(&dir, "edge-nantes", "db"), "running");
}

#[test]
fn a_cancelled_relocation_ends_cancelled_and_rolls_back_clean() {
    let (dir, config) = fresh("cancel");
    random_file(
        &site(&dir, "dc-paris").join("volumes/db-data.raw"),
        512 * MIB,
    );
    let server = serve(&config);
    rt().block_on(async {
        let url = &server.url;
        let id = start(
            url,
            json!({ "from": "dc-paris", "service": "shop", "to": "edge-nantes", "buckets": "repoint" }),
        )
        .await;
        wait_for_chunks(url, &id, &dir, "edge-nantes", 8).await;
        let (status, _, v) =
            call(url, "POST", &format!("/relocations/{id}/cancel"), Some(TOKEN), None).await;
        assert_eq!(status, 200, "{v:#}");
        let ev = events(url, &id).await;
        let end = &ev.last().unwrap().1;
        assert_eq!(end["status"], "cancelled", "{end:#}");
        assert!(
            end["steps"].as_array().unwrap().iter().all(|s| s["id"] != "cutover" || s["state"] != "succeeded"),
            "{end:#}"
        );
        // The source never stopped.
        assert_eq!(instance_state(&dir, "dc-paris", "db"), "running");

        let (status, _, _) =
            call(url, "POST", &format!("/relocations/{id}/rollback"), Some(TOKEN), None).await;
        assert_eq!(status, 202);
        let ev = events(url, &id).await;
        assert_eq!(ev.last().unwrap().1["status"], "rolled-back", "{ev:#?}");
        let nantes = site(&dir, "edge-nantes");
        for d in ["images", "instances"] {
            let left: Vec<_> = std::fs::read_dir(nantes.join(d)).unwrap().collect();
            assert!(left.is_empty(), "{d} still has {left:?}");
        }
        assert!(!nantes.join("volumes/db-data.raw").exists());
    });
}

#[test]
fn relocation_routes_need_the_token_and_name_the_offending_field() {
    // Nothing here may start a relocation: the shared demo will do.
    let server = serve(&common::demo_config());
    rt().block_on(async {
        let url = &server.url;
        for (method, path) in [
            ("GET", "/relocations"),
            ("POST", "/relocations"),
            ("GET", "/relocations/x"),
            ("GET", "/relocations/x/events"),
            ("POST", "/relocations/x/cancel"),
            ("POST", "/relocations/x/rollback"),
            ("POST", "/relocations/x/resume"),
            ("POST", "/plan"),
        ] {
            let (status, h, _) = call(url, method, path, None, None).await;
            assert_eq!(status, 401, "{method} {path}");
            assert_eq!(h["content-type"], "application/problem+json");
            let (status, _, _) = call(url, method, path, Some("wrong"), None).await;
            assert_eq!(status, 401, "{method} {path}");
        }
        let cases = [
            (json!({ "from": 5 }), "/from"),
            (json!({ "service": "shop" }), ""),
            (json!({ "from": "nowhere", "service": "shop" }), "/from"),
            (
                json!({ "from": "dc-paris", "service": "shop", "to": "mars" }),
                "/to",
            ),
            (json!({ "from": "dc-paris", "service": "nope" }), "/service"),
            (
                json!({ "from": "dc-paris", "service": "shop", "constraints": ["bogus"] }),
                "/constraints/0",
            ),
            (
                json!({ "from": "dc-paris", "service": "shop", "buckets": "teleport" }),
                "/buckets",
            ),
            (
                json!({ "from": "dc-paris", "service": "shop", "colour": "red" }),
                "/colour",
            ),
            (
                json!({ "from": "dc-paris", "service": "shop", "retry_budget_secs": -1 }),
                "/retry_budget_secs",
            ),
        ];
        // `/plan` checks a request as `/relocations` does.
        for (path, (body, pointer)) in cases
            .iter()
            .flat_map(|c| [("/relocations", c.clone()), ("/plan", c.clone())])
        {
            let (status, _, p) = call(url, "POST", path, Some(TOKEN), Some(body.clone())).await;
            assert_eq!(status, 422, "{path} {body} -> {p:#}");
            let got = p["errors"][0]["pointer"].as_str().unwrap();
            // A missing field is a fault of the whole body: the empty pointer.
            assert_eq!(got, pointer, "{body} -> {p:#}");
            if pointer.is_empty() {
                assert!(p["detail"].as_str().unwrap().contains("`from`"), "{p:#}");
            }
        }
        let (status, _, p) = call(
            url,
            "GET",
            "/relocations/shop-19700101-000000",
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 404, "{p:#}");
        // Ids that cannot name a relocation: not found, whatever the route.
        for (method, path) in [
            ("GET", "/relocations/..%2F..%2Fetc/events"),
            ("GET", "/relocations/a%20b"),
            ("GET", "/relocations/%C2%94%0D/events"),
            ("POST", "/relocations/x%09y/cancel"),
            ("POST", "/relocations/%C2%B7/resume"),
            ("POST", "/relocations/X2%14/rollback"),
        ] {
            let (status, _, p) = call(url, method, path, Some(TOKEN), None).await;
            assert_eq!(status, 404, "{method} {path}: {p:#}");
        }
        // A plan: the steps and estimates, nothing recorded.
        let body = json!({ "from": "dc-paris", "service": "shop", "to": "edge-nantes" });
        let (status, _, plan) = call(url, "POST", "/plan", Some(TOKEN), Some(body)).await;
        assert_eq!(status, 200, "{plan:#}");
        let steps = plan["plan"]["steps"].as_array().unwrap();
        assert!(steps.iter().any(|s| s["id"] == "cutover"), "{plan:#}");
        assert!(plan["relocation"]["bytes_to_move"].as_u64().unwrap() > 0);
        assert_eq!(
            plan["plan"]["steps"].as_array().unwrap().len(),
            plan["relocation"]["workflow"]["steps"]
                .as_array()
                .unwrap()
                .len()
        );
        // Nothing was started by any of these.
        let (_, _, list) = call(url, "GET", "/relocations", Some(TOKEN), None).await;
        assert_eq!(list, json!([]));
    });
}

/// The CLI with `--server URL` pinning the certificate the service printed.
fn remote(url: &str, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let pin = pins().lock().unwrap()[url].clone();
    remote_pinned(url, token, Some(&pin), args)
}

fn remote_pinned(
    url: &str,
    token: Option<&str>,
    pin: Option<&str>,
    args: &[&str],
) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluidcloud"));
    cmd.args(args)
        .current_dir(env!("CARGO_TARGET_TMPDIR"))
        .env("FLUIDCLOUD_SERVER", url)
        .env_remove("FLUIDCLOUD_CONFIG")
        .env_remove("FLUIDCLOUD_TOKEN")
        .env_remove("FLUIDCLOUD_SERVER_FINGERPRINT");
    if let Some(t) = token {
        cmd.env("FLUIDCLOUD_TOKEN", t);
    }
    if let Some(p) = pin {
        cmd.env("FLUIDCLOUD_SERVER_FINGERPRINT", p);
    }
    cmd.output().unwrap()
}

#[test]
fn the_cli_with_server_lists_matches_relocates_and_reports_through_the_service() {
    let (dir, config) = fresh("cli");
    let server = serve(&config);
    let url = server.url.clone();
    let url = url.as_str();
    let t = Some(TOKEN);

    let sites = ok(&remote(url, t, &["sites", "list"]));
    for s in ["dc-paris", "cloud-frankfurt", "edge-nantes"] {
        assert!(sites.contains(s), "{sites}");
    }
    assert!(sites.contains("CAPABILITIES"), "{sites}");
    let json: Value =
        serde_json::from_str(&ok(&remote(url, t, &["--json", "sites", "list"]))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 5);
    let migrators = ok(&remote(url, t, &["migrators", "list"]));
    assert!(migrators.contains("disk-transfer"), "{migrators}");

    // The service introspects and places; same text as the local command.
    let m = ok(&remote(
        url,
        t,
        &["match", "--from", "dc-paris", "--service", "shop"],
    ));
    let local = ok(&run(&[
        "--config",
        &config,
        "match",
        "--from",
        "dc-paris",
        "--service",
        "shop",
    ]));
    assert_eq!(m, local);
    assert!(m.contains("placement of shop from dc-paris"), "{m}");

    let out = remote(
        url,
        t,
        &[
            "relocate",
            "--from",
            "dc-paris",
            "--service",
            "shop",
            "--to",
            "edge-nantes",
            "--yes",
        ],
    );
    let text = ok(&out);
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("relocation "))
        .and_then(|l| l.split(':').next())
        .unwrap()
        .to_owned();
    assert!(text.contains("succeeded"), "{text}");
    assert!(stderr(&out).contains("cutover"), "{}", stderr(&out));
    same_bytes(
        &site(&dir, "dc-paris").join("volumes/db-data.raw"),
        &site(&dir, "edge-nantes").join("volumes/db-data.raw"),
    );

    let st = ok(&remote(url, t, &["status"]));
    assert!(st.contains(&id) && st.contains("succeeded"), "{st}");
    let one = ok(&remote(url, t, &["status", &id]));
    assert!(
        one.contains("cutover") && one.contains("succeeded"),
        "{one}"
    );
    let rep: Value =
        serde_json::from_str(&ok(&remote(url, t, &["--json", "report", &id]))).unwrap();
    assert_eq!(rep["status"], "succeeded");
    let local: Value =
        serde_json::from_str(&ok(&run(&["--config", &config, "--json", "report", &id]))).unwrap();
    assert_eq!(rep, local);

    // Rollback through the service, followed to its end.
    let rb = ok(&remote(url, t, &["rollback", &id, "--force"]));
    assert!(
        rb.contains(&format!("rolling back relocation {id}")),
        "{rb}"
    );
    assert!(
        rb.contains("rolled back") && rb.contains("the source runs it"),
        "{rb}"
    );
    assert_eq!(instance_state(&dir, "dc-paris", "db"), "running");
    assert!(
        !site(&dir, "edge-nantes")
            .join("volumes/db-data.raw")
            .exists()
    );

    // Errors: one line each, naming what to do.
    let err = fails(&remote(url, None, &["status"]), 1);
    assert!(
        err.contains("needs a token") && err.contains("FLUIDCLOUD_TOKEN"),
        "{err}"
    );
    let err = fails(&remote(url, Some("wrong"), &["status"]), 1);
    assert!(err.contains("refused the token"), "{err}");
    let err = fails(&remote(url, t, &["status", "nope-1"]), 4);
    assert!(err.contains("nope-1"), "{err}");
    let err = fails(
        &remote(
            url,
            t,
            &[
                "relocate",
                "--from",
                "atlantis",
                "--service",
                "shop",
                "--yes",
            ],
        ),
        3,
    );
    assert!(err.contains("/from") && err.contains("atlantis"), "{err}");
    let err = fails(&remote(url, t, &["introspect", "dc-paris"]), 2);
    assert!(err.contains("--server"), "{err}");
    drop(server);
    let err = fails(&remote(url, t, &["sites", "list"]), 1);
    assert!(err.contains(url) && err.contains("cannot connect"), "{err}");
    assert_eq!(stdout(&remote(url, t, &["sites", "list"])), "");
}

/// `fingerprint` with its last hex digit changed.
fn other_fingerprint(fingerprint: &str) -> String {
    let (head, last) = fingerprint.split_at(fingerprint.len() - 1);
    format!("{head}{}", if last == "0" { "1" } else { "0" })
}

#[test]
fn the_cli_trusts_the_service_by_pin_or_ca_and_refuses_any_other_certificate() {
    // Nothing here may start a relocation: the shared demo will do.
    let server = serve(&common::demo_config());
    let url = server.url.as_str();
    let t = Some(TOKEN);
    let sites = ok(&remote(url, t, &["sites", "list"]));
    assert!(sites.contains("dc-paris"), "{sites}");

    // A pin that is not the certificate's: one line naming both and the URL.
    let wrong = other_fingerprint(&server.fingerprint);
    let out = remote_pinned(url, t, Some(&wrong), &["sites", "list"]);
    let err = fails(&out, 10);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&wrong) && err.contains(&server.fingerprint) && err.contains(url),
        "{err}"
    );
    assert_eq!(stdout(&out), "");

    // No pin: the system's roots do not know a self-signed certificate,
    // with the CA bundle variables of this machine or without them.
    for keep_ca_env in [true, false] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluidcloud"));
        cmd.args(["--server", url, "sites", "list"])
            .env("FLUIDCLOUD_TOKEN", TOKEN)
            .env_remove("FLUIDCLOUD_SERVER_FINGERPRINT");
        if !keep_ca_env {
            cmd.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
        }
        let err = fails(&cmd.output().unwrap(), 10);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("not trusted")
                && err.contains(&server.fingerprint)
                && err.contains(url)
                && err.contains("--server-fingerprint"),
            "{err}"
        );
    }

    // The generated certificate as the CA: names checked, and they fit.
    let cert = common::demo().join(".fluidcloud/tls/cert.pem");
    let cert = cert.to_str().unwrap();
    let sites = ok(&remote_pinned(
        url,
        t,
        None,
        &["--server-ca", cert, "sites", "list"],
    ));
    assert!(sites.contains("dc-paris"), "{sites}");
    // ... and as the system's roots, through $SSL_CERT_FILE.
    let out = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(["--server", url, "sites", "list"])
        .env("FLUIDCLOUD_TOKEN", TOKEN)
        .env("SSL_CERT_FILE", cert)
        .env_remove("SSL_CERT_DIR")
        .env_remove("FLUIDCLOUD_SERVER_FINGERPRINT")
        .output()
        .unwrap();
    assert!(ok(&out).contains("dc-paris"));

    // Options that cannot work are refused before any request.
    let pin = server.fingerprint.as_str();
    let err = fails(
        &remote_pinned(url, t, Some(pin), &["--server-ca", cert, "sites", "list"]),
        2,
    );
    assert!(err.contains("not both"), "{err}");
    let err = fails(
        &remote_pinned(url, t, Some("sha256:abc"), &["sites", "list"]),
        2,
    );
    assert!(
        err.contains("sha256:abc") && err.contains("64 hex digits"),
        "{err}"
    );
}

#[test]
fn plain_http_reaches_only_a_service_on_loopback() {
    for url in ["http://fluidcloud.invalid:8640", "http://0.0.0.0:8640"] {
        let out = remote_pinned(url, Some(TOKEN), None, &["sites", "list"]);
        let err = fails(&out, 2);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(url) && err.contains("loopback") && err.contains("https://"),
            "{err}"
        );
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args([
            "--config",
            &common::demo_config(),
            "serve",
            "--plain-http",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("FLUIDCLOUD_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    let out = remote_pinned(&url, Some(TOKEN), None, &["sites", "list"]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok(&out).contains("dc-paris"));
    let localhost = url.replace("127.0.0.1", "localhost");
    let pin = format!("sha256:{}", "ab".repeat(32));
    let err = fails(
        &remote_pinned(&localhost, Some(TOKEN), Some(&pin), &["sites", "list"]),
        2,
    );
    assert!(err.contains("apply to https:// only"), "{err}");
}

#[test]
fn event_streams_over_the_limits_get_429_with_retry_after() {
    let (dir, config) = fresh("streams");
    random_file(
        &site(&dir, "dc-paris").join("volumes/db-data.raw"),
        512 * MIB,
    );
    let server = serve_with(
        &config,
        &["--max-streams-per-client", "1", "--max-streams", "2"],
    );
    rt().block_on(async {
        let url = server.url.as_str();
        let id = start(
            url,
            json!({ "from": "dc-paris", "service": "shop", "to": "edge-nantes" }),
        )
        .await;
        wait_for_chunks(url, &id, &dir, "edge-nantes", 8).await;
        let path = format!("{url}/relocations/{id}/events");
        let open = |from: [u8; 4]| {
            let c = client_from(url, from.into());
            let path = path.clone();
            async move { c.get(path).bearer_auth(TOKEN).send().await.unwrap() }
        };
        let first = open([127, 0, 0, 1]).await;
        assert_eq!(first.status(), 200);
        // The same client again: over its limit.
        let again = open([127, 0, 0, 1]).await;
        assert_eq!(again.status(), 429);
        assert_eq!(again.headers()["retry-after"], "5");
        assert_eq!(again.headers()["content-type"], "application/problem+json");
        let p: Value = again.json().await.unwrap();
        assert!(
            p["detail"].as_str().unwrap().contains("from 127.0.0.1"),
            "{p:#}"
        );
        // Another client: served, up to the service's total.
        let second = open([127, 0, 0, 2]).await;
        assert_eq!(second.status(), 200);
        let third = open([127, 0, 0, 3]).await;
        assert_eq!(third.status(), 429);
        let p: Value = third.json().await.unwrap();
        assert!(
            p["detail"].as_str().unwrap().contains("on this service"),
            "{p:#}"
        );
        // A stream given up frees its place (the service notices at its
        // next event; the copy sends progress often).
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = open([127, 0, 0, 1]).await;
            if r.status() == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "still {}", r.status());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(second);
        // Done with it (409 if it finished meanwhile).
        let (status, _, _) = call(
            url,
            "POST",
            &format!("/relocations/{id}/cancel"),
            Some(TOKEN),
            None,
        )
        .await;
        assert!(status == 200 || status == 409, "{status}");
    });
}

/// Values that must leave the service in no event, answer or log line.
const URL_PASSWORD: &str = "UrlPassw0rd-5c1e";
const YAML_PASSWORD: &str = "YamlPassw0rd-0b7a";
const CREDENTIAL_VALUE: &str = "CredentialValue-77d3";

#[test]
fn a_relocation_through_the_service_shows_no_password_in_events_answers_or_its_log() {
    let (dir, config) = fresh("secrets");
    let app = site(&dir, "dc-paris").join("config/shop/app");
    // A URL password, a password key, and (under an innocent key) the
    // value of a variable the sites file names as a credential: all in
    // lines the relocation rewrites or shows around a rewrite.
    let env = std::fs::read_to_string(app.join(".env")).unwrap().replace(
        "postgres://shop@db",
        &format!("postgres://shop:{URL_PASSWORD}@db"),
    ) + &format!("MEDIA_ID={CREDENTIAL_VALUE}\n");
    assert!(env.contains(URL_PASSWORD), "{env}");
    std::fs::write(app.join(".env"), env).unwrap();
    let yaml = std::fs::read_to_string(app.join("app.yaml"))
        .unwrap()
        .replace(
            "  name: shop\n",
            &format!("  name: shop\n  password: {YAML_PASSWORD}\n"),
        );
    assert!(yaml.contains(YAML_PASSWORD), "{yaml}");
    std::fs::write(app.join("app.yaml"), yaml).unwrap();
    let sites = std::fs::read_to_string(&config).unwrap().replace(
        "[sites.edge-nantes]\n",
        "[sites.edge-nantes]\ncredentials = { token_env = \"NANTES_TOKEN\" }\n",
    );
    std::fs::write(&config, sites).unwrap();

    let log = dir.join("serve.log");
    let server = serve_logged(
        &config,
        &[],
        &[("NANTES_TOKEN", CREDENTIAL_VALUE), ("RUST_LOG", "debug")],
        Some(&log),
    );
    let secrets = [URL_PASSWORD, YAML_PASSWORD, CREDENTIAL_VALUE, TOKEN];
    let mut seen: Vec<(String, String)> = Vec::new();
    let id = rt().block_on(async {
        let url = server.url.as_str();
        // Answers that quote what they were given: a problem document.
        let bogus = format!("postgres://shop:{URL_PASSWORD}@db");
        for body in [
            json!({ "from": bogus, "service": "shop" }),
            json!({ "from": "dc-paris", "service": "shop", "to": bogus }),
        ] {
            let (status, _, p) = call(url, "POST", "/relocations", Some(TOKEN), Some(body)).await;
            assert_eq!(status, 422, "{p:#}");
            seen.push(("problem document".into(), p.to_string()));
        }
        let path = format!("/sites/{}", bogus.replace('/', "%2F"));
        let (status, _, p) = call(url, "GET", &path, Some(TOKEN), None).await;
        assert_eq!(status, 404, "{p:#}");
        seen.push(("problem document".into(), p.to_string()));

        let id = start(
            url,
            json!({ "from": "dc-paris", "service": "shop", "to": "edge-nantes" }),
        )
        .await;
        let ev = events(url, &id).await;
        assert_eq!(names(&ev).last(), Some(&"end"), "{:?}", names(&ev));
        assert_eq!(ev.last().unwrap().1["status"], "succeeded", "{ev:?}");
        for (name, data) in &ev {
            seen.push((format!("event {name}"), data.to_string()));
        }
        for path in [format!("/relocations/{id}"), "/relocations".to_owned()] {
            let (status, _, v) = call(url, "GET", &path, Some(TOKEN), None).await;
            assert_eq!(status, 200, "{v:#}");
            seen.push((format!("GET {path}"), v.to_string()));
        }
        id
    });
    // The CLI through the service: what a person sees of the relocation.
    for args in [
        vec!["report", id.as_str()],
        vec!["--json", "report", id.as_str()],
        vec!["status", id.as_str()],
    ] {
        let out = remote(&server.url, Some(TOKEN), &args);
        seen.push((format!("--server {args:?}"), ok(&out) + &stderr(&out)));
    }
    drop(server);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("DEBUG"),
        "the log is not at debug level:\n{log_text}"
    );
    seen.push(("server log".into(), log_text));

    for (what, text) in &seen {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows {s}:\n{text}");
        }
    }
    // The relocation did rewrite the secret lines, and the report says so
    // with the secret replaced: the test looked where secrets would be.
    let report = &seen
        .iter()
        .find(|(w, _)| w.contains("\"report\""))
        .unwrap()
        .1;
    assert!(
        report.contains("-DATABASE_URL=postgres://shop:«redacted»@db.shop.paris.internal"),
        "{report}"
    );
    let moved =
        std::fs::read_to_string(site(&dir, "edge-nantes").join("config/shop/app/.env")).unwrap();
    assert!(moved.contains(URL_PASSWORD), "{moved}");
}
