//! The SDK side: `serve` spoken to by hand, line by line, as a plugin in
//! another language would be; and the in-process harness.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fluidcloud_plugins::harness::{Event, Harness};
use fluidcloud_plugins::host::{HostConfig, Secrets};
use fluidcloud_plugins::{
    Artifact, ArtifactKind, CancelFlag, Diagnostic, Error, Estimate, ExecContext, Migrator,
    MigratorDescriptor, Plugin, Result, Retry, Retryable, StepOutput, StepRequest, secret,
};
use serde_json::{Value, json};

/// Copies nothing, counts calls, and reads what its params ask.
#[derive(Default)]
struct Sample {
    rollbacks: AtomicU32,
}

#[async_trait]
impl Migrator for Sample {
    fn describe(&self) -> MigratorDescriptor {
        MigratorDescriptor {
            name: "sample".into(),
            version: "2.1.0".into(),
            summary: "a sample".into(),
            consumes: vec![ArtifactKind::Bucket],
            produces: vec![ArtifactKind::Bucket],
        }
    }

    fn validate(&self, r: &StepRequest) -> Vec<Diagnostic> {
        if r.params.get("to").is_none() {
            vec![Diagnostic::error("needs `to`").at_key("params.to")]
        } else {
            vec![]
        }
    }

    async fn plan(&self, r: &StepRequest) -> Result<Estimate> {
        if r.params.get("to").is_none() {
            return Err(Error::Invalid(self.validate(r)));
        }
        Ok(Estimate {
            bytes_sent: 99,
            ..Estimate::default()
        })
    }

    async fn execute(&self, r: &StepRequest, ctx: &ExecContext) -> Result<StepOutput> {
        if r.params.get("loop").is_some() {
            for i in 0.. {
                if ctx.cancel.is_cancelled() {
                    return Err(fluidcloud_plugins::serve::cancelled(format!("at {i}")));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if r.params.get("panic").is_some() {
            panic!("oops");
        }
        ctx.progress.message("starting");
        ctx.progress.progress(5, None);
        let mut out = StepOutput::default();
        let seen = format!(
            "token={:?} other={:?}",
            secret("TOKEN").is_some(),
            secret("OTHER").is_some()
        );
        out.artifacts.insert(
            "b".into(),
            Artifact {
                kind: ArtifactKind::Bucket,
                site: "t".into(),
                locator: seen,
                size: None,
                checksum: None,
            },
        );
        Ok(out)
    }

    async fn rollback(
        &self,
        _: &StepRequest,
        o: Option<&StepOutput>,
        _: &ExecContext,
    ) -> Result<()> {
        assert!(o.is_some());
        self.rollbacks.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A served plugin on pipes, spoken to in raw lines.
struct Raw {
    to: std::io::PipeWriter,
    from: BufReader<std::io::PipeReader>,
}

impl Raw {
    fn new(plugin: Plugin) -> Self {
        let (from_r, from_w) = std::io::pipe().unwrap();
        let (to_r, to_w) = std::io::pipe().unwrap();
        std::thread::spawn(move || plugin.serve_io(to_r, from_w));
        Self {
            to: to_w,
            from: BufReader::new(from_r),
        }
    }

    fn send(&mut self, line: &str) {
        writeln!(self.to, "{line}").unwrap();
    }

    fn recv(&mut self) -> Value {
        let mut s = String::new();
        self.from.read_line(&mut s).unwrap();
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("{e}: {s:?}"))
    }

    fn call(&mut self, line: &str) -> Value {
        self.send(line);
        self.recv()
    }
}

#[test]
fn serve_speaks_the_documented_wire_format() {
    let mut p = Raw::new(Plugin::new(Sample::default()).needs_secret("TOKEN"));
    let early = p.call(r#"{"id":1,"method":"describe"}"#);
    assert_eq!(early["error"]["kind"], "protocol");
    assert!(
        early["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hello")
    );
    let hello = p.call(
        r#"{"id":2,"method":"hello","params":{"protocol":"fluidcloud-migrator","version":"1.2.0","features":[]}}"#,
    );
    assert_eq!(
        hello,
        json!({"id":2,"result":{"protocol":"fluidcloud-migrator","version":"1.0.0","features":["progress","cancel","secrets"]}})
    );
    let d = p.call(r#"{"id":3,"method":"describe"}"#);
    assert_eq!(
        d,
        json!({"id":3,"result":{"name":"sample","version":"2.1.0","summary":"a sample",
            "consumes":[{"type":"bucket"}],"produces":[{"type":"bucket"}],"secrets":["TOKEN"]}})
    );
    let v =
        p.call(r#"{"id":4,"method":"validate","params":{"request":{"step_id":"s","params":{}}}}"#);
    assert_eq!(
        v,
        json!({"id":4,"result":[{"severity":"error","summary":"needs `to`","key":"params.to"}]})
    );
    let e = p.call(r#"{"id":5,"method":"plan","params":{"request":{"step_id":"s","params":{}}}}"#);
    assert_eq!(e["error"]["kind"], "invalid");
    assert_eq!(e["error"]["retry"], json!({"class":"never"}));
    assert_eq!(e["error"]["diagnostics"][0]["key"], "params.to");
    p.send(r#"{"id":6,"method":"execute","params":{"request":{"step_id":"s","params":{"to":"x"}},"secrets":{"TOKEN":"t","OTHER":"o"}}}"#);
    assert_eq!(p.recv(), json!({"id":6,"message":"starting"}));
    assert_eq!(p.recv(), json!({"id":6,"progress":{"done":5}}));
    let out = p.recv();
    assert_eq!(
        out["result"]["artifacts"]["b"]["locator"], "token=true other=false",
        "only declared secrets reach the migrator"
    );
    let u = p.call(r#"{"id":7,"method":"frobnicate"}"#);
    assert_eq!(u["error"]["kind"], "not-supported");
    let bad = p.call(r#"{"id":8,"method":"plan","params":{"request":42}}"#);
    assert_eq!(bad["id"], 8);
    assert_eq!(bad["error"]["kind"], "protocol");
    let garbage = p.call("{not json");
    assert_eq!(garbage["error"]["kind"], "protocol");
    let rb = p.call(
        r#"{"id":9,"method":"rollback","params":{"request":{"step_id":"s"},"output":{"artifacts":{},"measured":{"bytes_read":0,"bytes_sent":0,"bytes_written":0,"seconds":0}}}}"#,
    );
    assert_eq!(rb, json!({"id":9,"result":null}));
}

#[test]
fn serve_refuses_an_incompatible_host_and_exits() {
    let (from_r, from_w) = std::io::pipe().unwrap();
    let (to_r, mut to_w) = std::io::pipe().unwrap();
    let t = std::thread::spawn(move || Plugin::new(Sample::default()).serve_io(to_r, from_w));
    writeln!(
        to_w,
        r#"{{"id":1,"method":"hello","params":{{"protocol":"fluidcloud-migrator","version":"2.0.0"}}}}"#
    )
    .unwrap();
    let mut s = String::new();
    BufReader::new(from_r).read_line(&mut s).unwrap();
    let v: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(v["error"]["kind"], "incompatible");
    assert!(v["error"]["message"].as_str().unwrap().contains("2.0.0"));
    assert!(
        t.join().unwrap().is_err(),
        "serve stops after a refused hello"
    );
}

#[tokio::test]
async fn the_harness_runs_every_call_in_process() {
    let h = Harness::new(Sample::default()).unwrap();
    let m = h.migrator();
    assert_eq!(m.describe().name, "sample");
    assert_eq!(m.pid(), None, "no process");
    let req = Harness::request("s1", json!({"to": "x"}));
    assert!(m.validate(&req).is_empty());
    assert_eq!(
        m.validate(&Harness::request("s1", json!({})))[0].summary,
        "needs `to`"
    );
    assert_eq!(m.plan(&req).await.unwrap().bytes_sent, 99);
    let (out, events) = h.execute_recorded(&req).await;
    let out = out.unwrap();
    assert_eq!(
        events,
        [
            Event::Message("starting".into()),
            Event::Progress {
                done: 5,
                total: None
            }
        ]
    );
    assert_eq!(out.artifacts["b"].locator, "token=false other=false");
    m.rollback(&req, Some(&out), &ExecContext::quiet())
        .await
        .unwrap();
    let (panicked, _) = h
        .execute_recorded(&Harness::request("s", json!({"panic": 1})))
        .await;
    let e = panicked.unwrap_err();
    assert!(e.to_string().contains("the migrator panicked: oops"), "{e}");
    assert_eq!(e.retry(), Retry::Never);
}

#[tokio::test]
async fn the_harness_cancels_and_passes_declared_secrets() {
    let cfg = HostConfig {
        secrets: Secrets::new().with("TOKEN", "t").with("OTHER", "o"),
        ..HostConfig::default()
    };
    let h =
        Harness::with_plugin(Plugin::new(Sample::default()).needs_secret("TOKEN"), cfg).unwrap();
    let (out, _) = h.execute_recorded(&Harness::request("s", json!({}))).await;
    assert_eq!(
        out.unwrap().artifacts["b"].locator,
        "token=true other=false"
    );
    let flag = CancelFlag::new();
    let f = flag.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        f.cancel();
    });
    let (out, _) = h
        .execute_cancellable(&Harness::request("s", json!({"loop": 1})), &flag)
        .await;
    let e = out.unwrap_err();
    assert!(e.to_string().contains("cancelled: at"), "{e}");
    assert_eq!(e.retry(), Retry::Transient);
}
