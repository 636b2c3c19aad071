//! `fluidcloud-plugin-testkit`: a plugin whose behaviour the tests script.
//!
//! Without arguments it serves the `testkit` migrator, whose `execute` does
//! what its params say: `progress` (count) with `sleep_ms` between steps,
//! `crash_after` (exit 3 after that many progress steps), `garbage` (print
//! a non-JSON line), `huge_mb` (print one line of that many MiB), `hang`
//! (never answer), `fail` (`transient`/`precondition`), `panic`,
//! `log_secret`, `env_to` (write the process's environment there, as
//! JSON). Arguments select raw modes that break the handshake:
//! `--protocol VERSION`, `--silent`, `--garbage-hello`; `--secret NAME`
//! declares a secret.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use async_trait::async_trait;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Diagnostic, Error, Estimate, ExecContext, Migrator, MigratorDescriptor,
    Plugin, Result, StepOutput, StepRequest, secret,
};

struct Testkit;

fn num(r: &StepRequest, k: &str) -> u64 {
    r.params
        .get(k)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
}

fn flag(r: &StepRequest, k: &str) -> bool {
    r.params
        .get(k)
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

#[async_trait]
impl Migrator for Testkit {
    fn describe(&self) -> MigratorDescriptor {
        MigratorDescriptor {
            name: "testkit".into(),
            version: "0.3.0".into(),
            summary: "scripted behaviour for host tests".into(),
            consumes: vec![ArtifactKind::Volume],
            produces: vec![ArtifactKind::Volume],
        }
    }

    fn validate(&self, request: &StepRequest) -> Vec<Diagnostic> {
        if request.params.get("bad").is_some() {
            vec![
                Diagnostic::error("`bad` is not allowed")
                    .in_file("services/shop.toml")
                    .at_key("params.bad"),
            ]
        } else {
            vec![]
        }
    }

    async fn plan(&self, request: &StepRequest) -> Result<Estimate> {
        if flag(request, "hang") {
            std::future::pending::<()>().await;
        }
        Ok(Estimate {
            bytes_read: num(request, "size"),
            ..Estimate::default()
        })
    }

    async fn execute(&self, request: &StepRequest, ctx: &ExecContext) -> Result<StepOutput> {
        if let Some(path) = request.params.get("env_to").and_then(|v| v.as_str()) {
            // What the host let this process see.
            let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
            std::fs::write(path, serde_json::to_vec(&env).unwrap()).unwrap();
        }
        if flag(request, "garbage") {
            {
                let mut out = std::io::stdout().lock();
                out.write_all(b"this is not json\n").unwrap();
                out.flush().unwrap();
            }
            std::future::pending::<()>().await;
        }
        let mb = num(request, "huge_mb");
        if mb > 0 {
            {
                let chunk = vec![b'x'; 1 << 20];
                let mut out = std::io::stdout().lock();
                for _ in 0..mb {
                    if out.write_all(&chunk).is_err() {
                        std::process::exit(4);
                    }
                }
                let _ = out.write_all(b"\n");
                let _ = out.flush();
            }
            std::future::pending::<()>().await;
        }
        if flag(request, "hang") {
            std::future::pending::<()>().await;
        }
        if flag(request, "panic") {
            panic!("scripted panic");
        }
        if flag(request, "log_secret") {
            eprintln!(
                "token is {}",
                secret("TOKEN").unwrap_or_else(|| "<none>".into())
            );
        }
        let n = num(request, "progress");
        let sleep = Duration::from_millis(num(request, "sleep_ms"));
        for i in 1..=n {
            if ctx.cancel.is_cancelled() {
                return Err(fluidcloud_plugins::serve::cancelled(format!(
                    "after {}",
                    i - 1
                )));
            }
            ctx.progress.progress(i, Some(n));
            if num(request, "crash_after") == i {
                eprintln!("testkit: crashing on purpose after {i}");
                ctx.progress.flush();
                std::process::exit(3);
            }
            tokio::time::sleep(sleep).await;
        }
        match request
            .params
            .get("fail")
            .and_then(serde_json::Value::as_str)
        {
            Some("transient") => return Err(Error::Transient("the disk is busy".into())),
            Some("precondition") => {
                return Err(Error::Precondition("the target exists".into()));
            }
            _ => {}
        }
        ctx.progress.message("done");
        let token = if secret("TOKEN").is_some() {
            "with-token"
        } else {
            "no-token"
        };
        let mut out = StepOutput::default();
        out.artifacts.insert(
            "out".into(),
            Artifact {
                kind: ArtifactKind::Volume,
                site: "target".into(),
                locator: format!("{}:{token}", request.step_id),
                size: Some(n),
                checksum: None,
            },
        );
        Ok(out)
    }

    async fn rollback(
        &self,
        _request: &StepRequest,
        _output: Option<&StepOutput>,
        _ctx: &ExecContext,
    ) -> Result<()> {
        Ok(())
    }
}

/// Answers `hello` with another version, then `describe`, by hand.
fn raw(version: &str) {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        let id = v["id"].as_u64().unwrap();
        let result = if v["method"] == "describe" {
            serde_json::to_value(Testkit.describe()).unwrap()
        } else {
            serde_json::json!({"protocol": "fluidcloud-migrator", "version": version})
        };
        let reply = serde_json::json!({"id": id, "result": result});
        writeln!(out, "{reply}").unwrap();
        out.flush().unwrap();
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--protocol") => raw(&args[1]),
        Some("--silent") => for _ in std::io::stdin().lock().lines() {},
        Some("--garbage-hello") => {
            println!("Welcome to my plugin!");
            std::thread::sleep(Duration::from_secs(60));
        }
        Some("--secret") => return Plugin::new(Testkit).needs_secret(&args[1]).serve(),
        _ => return fluidcloud_plugins::serve(Testkit),
    }
    ExitCode::SUCCESS
}
