//! The host against a real plugin process (`fluidcloud-plugin-testkit`)
//! over real pipes: handshake, every call, progress, cancel, timeouts, and
//! each way a plugin can misbehave.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use fluidcloud_plugins::harness::{Event, Recorder};
use fluidcloud_plugins::host::{HostConfig, PluginCommand, PluginMigrator, Secrets};
use fluidcloud_plugins::{
    CancelFlag, Error, ExecContext, Migrator, Retry, Retryable, StepOutput, StepRequest,
};
use serde_json::json;

fn kit() -> PluginCommand {
    PluginCommand::new(env!("CARGO_BIN_EXE_fluidcloud-plugin-testkit"))
}

fn fast() -> HostConfig {
    HostConfig {
        call_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        cancel_grace: Duration::from_secs(2),
        ..HostConfig::default()
    }
}

fn spawn() -> PluginMigrator {
    PluginMigrator::spawn(kit(), fast()).unwrap()
}

fn req(params: serde_json::Value) -> StepRequest {
    StepRequest {
        step_id: "s1".into(),
        params,
        inputs: Default::default(),
    }
}

async fn execute(
    m: &PluginMigrator,
    params: serde_json::Value,
) -> (fluidcloud_plugins::Result<StepOutput>, Vec<Event>) {
    let rec = Recorder::default();
    let ctx = ExecContext {
        progress: Arc::new(rec.clone()),
        cancel: CancelFlag::new(),
    };
    let out = m.execute(&req(params), &ctx).await;
    (out, rec.events())
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

fn plugin_error(e: &Error) -> (&str, Retry) {
    match e {
        Error::Plugin {
            plugin,
            message,
            retry,
            ..
        } => {
            assert_eq!(plugin, "testkit", "{e}");
            (message.as_str(), *retry)
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }
}

/// The host is healthy after a failure: the next call works (on a fresh
/// process when the old one was killed).
async fn still_works(m: &PluginMigrator) {
    let (out, _) = execute(m, json!({"progress": 1})).await;
    assert_eq!(out.unwrap().artifacts["out"].locator, "s1:no-token");
}

#[test]
fn the_handshake_reports_name_version_and_features() {
    let m = spawn();
    let d = m.plugin_descriptor();
    assert_eq!(d.migrator.name, "testkit");
    assert_eq!(d.migrator.version, "0.3.0");
    assert_eq!(m.hello().version.to_string(), "1.0.0");
    assert!(m.hello().has("progress") && m.hello().has("cancel"));
    assert!(alive(m.pid().unwrap()));
}

#[test]
fn a_newer_minor_version_is_accepted_and_a_new_major_refused() {
    let ok = PluginMigrator::spawn(kit().arg("--protocol").arg("1.7.0"), fast()).unwrap();
    assert_eq!(ok.hello().version.to_string(), "1.7.0");
    let e = PluginMigrator::spawn(kit().arg("--protocol").arg("2.0.0"), fast()).unwrap_err();
    let (msg, retry) = plugin_error_any(&e);
    assert!(
        msg.contains("incompatible") && msg.contains("2.0.0") && msg.contains("1.0.0"),
        "{msg}"
    );
    assert_eq!(retry, Retry::Never);
}

fn plugin_error_any(e: &Error) -> (String, Retry) {
    match e {
        Error::Plugin { message, retry, .. } => (message.clone(), *retry),
        other => panic!("expected a plugin error, got {other:?}"),
    }
}

#[test]
fn a_garbage_hello_a_silent_plugin_and_a_missing_one_fail_fast_and_clearly() {
    let t = Instant::now();
    let e = PluginMigrator::spawn(kit().arg("--garbage-hello"), fast()).unwrap_err();
    let (msg, retry) = plugin_error_any(&e);
    assert!(
        msg.contains("malformed") && msg.contains("Welcome to my plugin"),
        "{msg}"
    );
    assert_eq!(retry, Retry::Never);
    assert!(t.elapsed() < Duration::from_secs(3));

    let cfg = HostConfig {
        handshake_timeout: Duration::from_millis(300),
        ..fast()
    };
    let e = PluginMigrator::spawn(kit().arg("--silent"), cfg).unwrap_err();
    let (msg, retry) = plugin_error_any(&e);
    assert!(msg.contains("did not answer `hello` within 300ms"), "{msg}");
    assert_eq!(retry, Retry::Transient);

    let e = PluginMigrator::spawn(
        PluginCommand::new("/nonexistent/fluidcloud-migrator-x"),
        fast(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot start /nonexistent/fluidcloud-migrator-x"),
        "{e}"
    );
}

#[tokio::test]
async fn every_call_round_trips_with_progress_and_diagnostics() {
    let m = spawn();
    assert!(m.validate(&req(json!({}))).is_empty());
    let d = m.validate(&req(json!({"bad": 1})));
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].key.as_deref(), Some("params.bad"));
    assert_eq!(
        d[0].file.as_deref(),
        Some(std::path::Path::new("services/shop.toml"))
    );
    assert_eq!(
        m.plan(&req(json!({"size": 4242})))
            .await
            .unwrap()
            .bytes_read,
        4242
    );
    let (out, events) = execute(&m, json!({"progress": 3})).await;
    let out = out.unwrap();
    assert_eq!(out.artifacts["out"].size, Some(3));
    assert_eq!(
        events,
        [
            Event::Progress {
                done: 1,
                total: Some(3)
            },
            Event::Progress {
                done: 2,
                total: Some(3)
            },
            Event::Progress {
                done: 3,
                total: Some(3)
            },
            Event::Message("done".into()),
        ]
    );
    m.rollback(&req(json!({})), Some(&out), &ExecContext::quiet())
        .await
        .unwrap();
    // Overlapping calls on one process.
    let (a, b) = tokio::join!(
        execute(&m, json!({"progress": 5, "sleep_ms": 10})),
        execute(&m, json!({"progress": 2, "sleep_ms": 10}))
    );
    assert_eq!(a.0.unwrap().artifacts["out"].size, Some(5));
    assert_eq!(b.0.unwrap().artifacts["out"].size, Some(2));
}

#[tokio::test]
async fn plugin_errors_keep_their_class_and_a_panic_fails_only_its_call() {
    let m = spawn();
    let pid = m.pid().unwrap();
    let (out, _) = execute(&m, json!({"fail": "transient"})).await;
    let e = out.unwrap_err();
    assert_eq!(e.retry(), Retry::Transient);
    assert!(
        e.to_string().contains("plugin testkit: the disk is busy"),
        "{e}"
    );
    let (out, _) = execute(&m, json!({"fail": "precondition"})).await;
    assert!(
        matches!(out.unwrap_err(), Error::Precondition(m) if m == "plugin testkit: the target exists")
    );
    let (out, _) = execute(&m, json!({"panic": true})).await;
    let e = out.unwrap_err();
    assert!(e.to_string().contains("panicked: scripted panic"), "{e}");
    assert_eq!(e.retry(), Retry::Never);
    still_works(&m).await;
    assert_eq!(m.pid(), Some(pid), "no restart was needed");
}

#[tokio::test]
async fn cancel_stops_a_running_execute_at_a_safe_point() {
    let m = spawn();
    let pid = m.pid().unwrap();
    let cancel = CancelFlag::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.cancel();
    });
    let rec = Recorder::default();
    let ctx = ExecContext {
        progress: Arc::new(rec.clone()),
        cancel,
    };
    let t = Instant::now();
    let e = m
        .execute(&req(json!({"progress": 1000, "sleep_ms": 10})), &ctx)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cancelled: after"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(rec.events().len() < 1000);
    assert_eq!(m.pid(), Some(pid), "a cooperative cancel keeps the process");
    still_works(&m).await;
}

#[tokio::test]
async fn a_plugin_ignoring_cancel_is_killed_after_the_grace_period() {
    let cfg = HostConfig {
        cancel_grace: Duration::from_millis(300),
        ..fast()
    };
    let m = PluginMigrator::spawn(kit(), cfg).unwrap();
    let pid = m.pid().unwrap();
    let ctx = ExecContext::quiet();
    ctx.cancel.cancel();
    let t = Instant::now();
    let e = m
        .execute(&req(json!({"hang": true})), &ctx)
        .await
        .unwrap_err();
    let (msg, _) = plugin_error(&e);
    assert!(
        msg.contains("did not stop within 300ms after `cancel`; killed"),
        "{msg}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
    still_works(&m).await;
    assert_ne!(m.pid(), Some(pid));
    assert!(!alive(pid), "the old process is gone");
}

#[tokio::test]
async fn a_plugin_that_never_answers_times_out_and_is_killed() {
    let cfg = HostConfig {
        call_timeout: Duration::from_millis(300),
        ..fast()
    };
    let m = PluginMigrator::spawn(kit(), cfg).unwrap();
    let pid = m.pid().unwrap();
    let t = Instant::now();
    let (out, _) = execute(&m, json!({"hang": true})).await;
    let e = out.unwrap_err();
    let (msg, retry) = plugin_error(&e);
    assert!(
        msg.contains("did not answer `execute` within 300ms; killed"),
        "{msg}"
    );
    assert_eq!(retry, Retry::Transient);
    assert!(t.elapsed() < Duration::from_secs(2));
    let e = m.plan(&req(json!({"hang": true}))).await.unwrap_err();
    assert!(
        e.to_string().contains("did not answer `plan` within 300ms"),
        "{e}"
    );
    still_works(&m).await;
    assert!(!alive(pid));
}

#[tokio::test]
async fn progress_restarts_the_call_timeout() {
    let cfg = HostConfig {
        call_timeout: Duration::from_millis(400),
        ..fast()
    };
    let m = PluginMigrator::spawn(kit(), cfg).unwrap();
    let t = Instant::now();
    let (out, events) = execute(&m, json!({"progress": 8, "sleep_ms": 150})).await;
    assert!(t.elapsed() > Duration::from_millis(1000));
    assert_eq!(out.unwrap().artifacts["out"].size, Some(8));
    assert_eq!(events.len(), 9);
}

#[tokio::test]
async fn a_crash_mid_execute_fails_the_step_with_the_exit_status_and_stderr() {
    let m = spawn();
    let pid = m.pid().unwrap();
    let (out, events) = execute(&m, json!({"progress": 10, "crash_after": 3, "sleep_ms": 5})).await;
    let e = out.unwrap_err();
    let (msg, retry) = plugin_error(&e);
    assert!(msg.contains("exited (exit status: 3)"), "{msg}");
    assert!(msg.contains("crashing on purpose after 3"), "{msg}");
    assert!(msg.contains("during `execute`"), "{msg}");
    assert_eq!(retry, Retry::Transient);
    assert_eq!(events.len(), 3);
    still_works(&m).await;
    assert_ne!(m.pid(), Some(pid), "a fresh process serves the next call");
}

#[tokio::test]
async fn garbage_on_stdout_fails_the_step_as_a_protocol_violation() {
    let m = spawn();
    let pid = m.pid().unwrap();
    let (out, _) = execute(&m, json!({"garbage": true})).await;
    let e = out.unwrap_err();
    let (msg, retry) = plugin_error(&e);
    assert!(msg.contains("sent a malformed message"), "{msg}");
    assert!(msg.contains("this is not json"), "{msg}");
    assert_eq!(retry, Retry::Never);
    still_works(&m).await;
    assert!(!alive(pid));
}

#[tokio::test]
async fn a_100_mb_line_is_cut_at_the_limit_and_fails_the_step() {
    let m = spawn();
    let pid = m.pid().unwrap();
    let t = Instant::now();
    let (out, _) = execute(&m, json!({"huge_mb": 100})).await;
    let e = out.unwrap_err();
    let (msg, retry) = plugin_error(&e);
    assert!(
        msg.contains("larger than the 16777216-byte limit; killed"),
        "{msg}"
    );
    assert_eq!(retry, Retry::Never);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    still_works(&m).await;
    assert!(!alive(pid));
}

#[tokio::test]
async fn dropping_the_migrator_or_an_in_flight_call_kills_the_process() {
    let m = spawn();
    let pid = m.pid().unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        execute(&m, json!({"hang": true})),
    )
    .await;
    assert!(abandoned.is_err(), "the call was still running");
    still_works(&m).await;
    assert!(!alive(pid), "an abandoned call kills its process");
    let pid = m.pid().unwrap();
    assert!(alive(pid));
    drop(m);
    assert!(!alive(pid), "dropping the migrator kills its process");
}

#[tokio::test]
async fn secrets_go_only_to_plugins_that_declare_them_and_never_to_logs() {
    let secrets = Secrets::new().with("TOKEN", "s3cr3t-value");
    let cfg = HostConfig {
        secrets: secrets.clone(),
        ..fast()
    };
    assert_eq!(format!("{secrets:?}"), r#"{"TOKEN"}"#);
    let undeclared = PluginMigrator::spawn(kit(), cfg.clone()).unwrap();
    let (out, _) = execute(&undeclared, json!({})).await;
    assert_eq!(out.unwrap().artifacts["out"].locator, "s1:no-token");

    let declared = PluginMigrator::spawn(kit().arg("--secret").arg("TOKEN"), cfg).unwrap();
    assert_eq!(declared.plugin_descriptor().secrets, ["TOKEN"]);
    let (out, _) = execute(&declared, json!({})).await;
    assert_eq!(out.unwrap().artifacts["out"].locator, "s1:with-token");
    // The plugin logs the secret, then crashes: the stderr in the error is
    // scrubbed.
    let (out, _) = execute(
        &declared,
        json!({"log_secret": true, "progress": 1, "crash_after": 1}),
    )
    .await;
    let msg = out.unwrap_err().to_string();
    assert!(msg.contains("token is ***"), "{msg}");
    assert!(!msg.contains("s3cr3t-value"), "{msg}");

    let no_value = PluginMigrator::spawn(kit().arg("--secret").arg("TOKEN"), fast()).unwrap();
    let (out, _) = execute(&no_value, json!({})).await;
    assert!(
        matches!(out.unwrap_err(), Error::Precondition(m) if m.contains("FLUIDCLOUD_SECRET_TOKEN"))
    );
}

#[tokio::test]
async fn a_plugin_sees_none_of_the_hosts_secrets_only_path_home_lang_and_what_its_entry_names() {
    // SAFETY: this test runs in a process of its own (cargo-nextest), and
    // sets these before it starts the plugin.
    unsafe {
        std::env::set_var("FLUIDCLOUD_TOKEN", "host-token-must-not-leak");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "aws-secret-must-not-leak");
        std::env::set_var("FLUIDCLOUD_SECRET_DB", "plugin-secret-by-protocol-only");
        std::env::set_var("PARIS_SECRET", "credential-by-variable-must-not-leak");
        std::env::set_var("TESTKIT_ENDPOINT", "https://named.example");
        std::env::set_var("LANG", "C.UTF-8");
    }
    let cfg = HostConfig {
        pass_env: [(
            "fluidcloud-plugin-testkit".to_owned(),
            vec!["TESTKIT_ENDPOINT".to_owned(), "NOT_SET_ANYWHERE".to_owned()],
        )]
        .into(),
        ..fast()
    };
    let m = PluginMigrator::spawn(kit(), cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("env.json");
    m.execute(
        &req(json!({ "env_to": dump.to_str().unwrap() })),
        &ExecContext::quiet(),
    )
    .await
    .unwrap();
    let env: std::collections::BTreeMap<String, String> =
        serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
    let names: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["HOME", "LANG", "PATH", "TESTKIT_ENDPOINT"],
        "{env:?}"
    );
    assert_eq!(env["TESTKIT_ENDPOINT"], "https://named.example");
    for v in env.values() {
        assert!(
            !v.contains("leak") && !v.contains("protocol-only"),
            "{env:?}"
        );
    }
}
