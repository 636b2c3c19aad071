//! `fluidcloud serve` as a real process on a real socket: HTTPS with its
//! generated certificate, authentication, the Host check, the limits.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::*;
use fluidcloud_broker::tls::{Fingerprint, pinned_client_config};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

struct Server {
    child: Child,
    addr: String,
    /// `None` with --plain-http.
    fingerprint: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `serve --json` on a free loopback port, with `extra` arguments and the
/// state (its generated certificate) in `state`, or next to the demo's
/// sites file.
fn start_in(state: Option<&Path>, token: Option<&str>, extra: &[&str]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluidcloud"));
    cmd.args([
        "--config",
        &demo_config(),
        "--json",
        "serve",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(extra)
    .env_remove("FLUIDCLOUD_TOKEN")
    .env_remove("FLUIDCLOUD_STATE_DIR")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(t) = token {
        cmd.env("FLUIDCLOUD_TOKEN", t);
    }
    if let Some(s) = state {
        cmd.env("FLUIDCLOUD_STATE_DIR", s);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let doc: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("unexpected first line: {line:?}"));
    let url = doc["listening"].as_str().unwrap();
    let addr = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap()
        .to_owned();
    let fingerprint = doc["fingerprint"].as_str().map(str::to_owned);
    assert_eq!(fingerprint.is_some(), url.starts_with("https://"), "{doc}");
    Server {
        child,
        addr,
        fingerprint,
    }
}

fn start(token: Option<&str>, extra: &[&str]) -> Server {
    start_in(None, token, extra)
}

/// A TCP connection to `addr` from the loopback address `from` (the
/// service counts clients by address; 127.0.0.0/8 is all loopback).
fn connect(addr: &str, from: IpAddr) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(from, 0)).unwrap();
            let stream = s.connect(addr).await.unwrap().into_std().unwrap();
            stream.set_nonblocking(false).unwrap();
            stream
        })
}

/// A connection to the server: TLS with its pinned certificate, or plain.
fn open(server: &Server, from: IpAddr) -> Box<dyn ReadWrite> {
    let tcp = connect(&server.addr, from);
    match &server.fingerprint {
        Some(f) => {
            let config = pinned_client_config(f.parse().unwrap()).unwrap().config;
            let conn =
                rustls::ClientConnection::new(Arc::new(config), ServerName::IpAddress(from.into()))
                    .unwrap();
            Box::new(rustls::StreamOwned::new(conn, tcp))
        }
        None => Box::new(tcp),
    }
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

struct Req<'a> {
    method: &'a str,
    path: &'a str,
    host: Option<&'a str>,
    authorization: Option<String>,
    body: Option<&'a str>,
    from: IpAddr,
}

impl<'a> Req<'a> {
    fn get(path: &'a str) -> Self {
        Self {
            method: "GET",
            path,
            host: None,
            authorization: None,
            body: None,
            from: [127, 0, 0, 1].into(),
        }
    }

    fn token(mut self, t: &str) -> Self {
        self.authorization = Some(format!("Bearer {t}"));
        self
    }

    fn head(&self, server: &Server, content_length: usize) -> String {
        let host = self.host.unwrap_or(&server.addr);
        let mut req = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n",
            self.method, self.path
        );
        if let Some(a) = &self.authorization {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        if self.body.is_some() {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {content_length}\r\n"
            ));
        }
        req.push_str("\r\n");
        req
    }

    /// The whole exchange: (status, headers lowercased, body).
    fn send(&self, server: &Server) -> (u16, String, String) {
        let mut s = open(server, self.from);
        let body = self.body.unwrap_or("");
        s.write_all(self.head(server, body.len()).as_bytes())
            .unwrap();
        s.write_all(body.as_bytes()).unwrap();
        s.flush().unwrap();
        let mut resp = Vec::new();
        // A TLS peer that closes without close_notify is an error to rustls;
        // the answer is complete by then (Connection: close).
        let _ = s.read_to_end(&mut resp);
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let (head, body) = resp
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP answer: {resp:?}"));
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, head.to_lowercase(), body.to_owned())
    }

    /// Sends the head and half the body, then waits: a request that stays
    /// in progress as long as the connection is held.
    fn hold(&self, server: &Server) -> Box<dyn ReadWrite> {
        let mut s = open(server, self.from);
        s.write_all(self.head(server, 1000).as_bytes()).unwrap();
        s.write_all(b"{\"topology\": ").unwrap();
        s.flush().unwrap();
        s
    }
}

fn http(
    server: &Server,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    Req {
        method,
        path,
        authorization: token.map(|t| format!("Bearer {t}")),
        body,
        ..Req::get("")
    }
    .send(server)
}

#[test]
fn serve_answers_with_the_sites_of_the_sites_file_behind_a_token() {
    let server = start(Some("t0ken"), &[]);
    let (status, _, body) = http(&server, "GET", "/health", None, None);
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, head, _) = http(&server, "GET", "/sites", None, None);
    assert_eq!(status, 401);
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    let (status, _, body) = http(&server, "GET", "/sites", Some("t0ken"), None);
    assert_eq!(status, 200);
    let sites: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sites.as_array().unwrap().len(), 5);
    assert!(
        sites
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["capabilities"].as_array().unwrap().len() == 5)
    );

    // The topology introspect prints can be posted to /match as is.
    let topo = ok(&run(&[
        "--config",
        &demo_config(),
        "--json",
        "introspect",
        "dc-paris",
        "--service",
        "shop",
    ]));
    let mut topo: serde_json::Value = serde_json::from_str(&topo).unwrap();
    topo.as_object_mut().unwrap().remove("notes");
    let body =
        serde_json::json!({ "topology": topo, "request": { "source": "dc-paris" } }).to_string();
    let (status, _, resp) = http(&server, "POST", "/match", Some("t0ken"), Some(&body));
    assert_eq!(status, 200, "{resp}");
    let p: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(p["assignments"].as_array().unwrap().len(), 4);
    assert_eq!(p["assignments"][0]["site"], "cloud-frankfurt");
}

#[test]
fn the_bearer_scheme_is_accepted_in_any_case() {
    let server = start(Some("t0ken"), &[]);
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let req = Req {
            authorization: Some(format!("{scheme} t0ken")),
            ..Req::get("/sites")
        };
        let (status, _, body) = req.send(&server);
        assert_eq!(status, 200, "{scheme}: {body}");
    }
    for wrong in ["Basic t0ken", "Bearer", "Bearert0ken", "Bearer wrong"] {
        let req = Req {
            authorization: Some(wrong.to_owned()),
            ..Req::get("/sites")
        };
        assert_eq!(req.send(&server).0, 401, "{wrong}");
    }
}

#[test]
fn serve_refuses_to_start_without_a_token_unless_told() {
    let out = run(&[
        "--config",
        &demo_config(),
        "serve",
        "--listen",
        "127.0.0.1:0",
    ]);
    let err = fails(&out, 3);
    assert!(
        err.contains("$FLUIDCLOUD_TOKEN") && err.contains("--no-auth"),
        "{err}"
    );
    let out = run(&[
        "--config",
        &demo_config(),
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--no-auth",
    ]);
    let err = fails(&out, 2);
    assert!(err.contains("loopback"), "{err}");
    let server = start(None, &["--no-auth"]);
    let (status, _, _) = http(&server, "GET", "/sites", None, None);
    assert_eq!(status, 200);
}

fn der_of(cert_pem: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(cert_pem).unwrap()
}

#[test]
fn serve_speaks_https_with_a_certificate_generated_once_into_the_state_directory() {
    use std::os::unix::fs::PermissionsExt as _;
    let state = tempfile::tempdir().unwrap();
    let tls = state.path().join("tls");
    let server = start_in(Some(state.path()), Some("t0ken"), &[]);
    let fingerprint = server.fingerprint.clone().unwrap();
    assert!(
        regex::Regex::new("^sha256:[0-9a-f]{64}$")
            .unwrap()
            .is_match(&fingerprint),
        "{fingerprint}"
    );
    // What was printed is the certificate kept, and the one served.
    assert_eq!(
        Fingerprint::of(&der_of(&tls.join("cert.pem"))).to_string(),
        fingerprint
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&tls.join("key.pem")), 0o600);
    assert_eq!(mode(&tls), 0o700);
    let (status, _, body) = http(&server, "GET", "/health", None, None);
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    // Nothing is answered in clear on the HTTPS port.
    let mut plain = connect(&server.addr, [127, 0, 0, 1].into());
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    let addr = server.addr.clone();
    drop(server);

    // Restarted: the same certificate, and the text line shows it too.
    let mut again = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(["--config", &demo_config(), "serve", "--listen", &addr])
        .env("FLUIDCLOUD_TOKEN", "t0ken")
        .env("FLUIDCLOUD_STATE_DIR", state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(again.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = again.kill();
    let _ = again.wait();
    assert_eq!(
        line.trim(),
        format!("listening on https://{addr} (certificate {fingerprint})")
    );
    assert_eq!(
        Fingerprint::of(&der_of(&tls.join("cert.pem"))).to_string(),
        fingerprint
    );
}

#[test]
fn serve_refuses_plain_http_off_loopback() {
    let out = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args([
            "--config",
            &demo_config(),
            "serve",
            "--plain-http",
            "--listen",
            "0.0.0.0:0",
        ])
        .env("FLUIDCLOUD_TOKEN", "t0ken")
        .output()
        .unwrap();
    let err = fails(&out, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--plain-http") && err.contains("loopback") && err.contains("0.0.0.0:0"),
        "{err}"
    );
    // On loopback it is allowed, and says so in its URL.
    let server = start(Some("t0ken"), &["--plain-http"]);
    assert!(server.fingerprint.is_none());
    let (status, _, _) = http(&server, "GET", "/sites", Some("t0ken"), None);
    assert_eq!(status, 200);
}

// DNS rebinding: a page of evil.example resolves its name to 127.0.0.1 and
// calls the service; its requests carry `Host: evil.example:PORT`.
#[test]
fn serve_without_auth_answers_only_for_its_own_host_names() {
    let server = start(None, &["--no-auth", "--tls-name", "fluid.test"]);
    let port = server.addr.rsplit(':').next().unwrap().to_owned();
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        "localhost:1".to_owned(),
        format!("localhost.evil.example:{port}"),
    ] {
        let req = Req {
            host: Some(&host),
            ..Req::get("/sites")
        };
        let (status, head, body) = req.send(&server);
        assert_eq!(status, 421, "{host}: {body}");
        assert!(head.contains("application/problem+json"), "{head}");
        assert!(body.contains("without authentication"), "{body}");
    }
    for host in [
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("fluid.test:{port}"),
    ] {
        let req = Req {
            host: Some(&host),
            ..Req::get("/sites")
        };
        assert_eq!(req.send(&server).0, 200, "{host}");
    }
    // With a token, the token is the defence: any Host is answered.
    let server = start(Some("t0ken"), &[]);
    let req = Req {
        host: Some("evil.example"),
        ..Req::get("/sites")
    }
    .token("t0ken");
    assert_eq!(req.send(&server).0, 200);
}

#[test]
fn requests_over_the_per_client_limit_get_429_with_retry_after() {
    let server = start(Some("t0ken"), &["--max-requests-per-client", "2"]);
    let post = Req {
        method: "POST",
        body: Some(""),
        ..Req::get("/match")
    }
    .token("t0ken");
    let held: Vec<_> = (0..2).map(|_| post.hold(&server)).collect();
    // The service has read both heads once a third request gets its answer;
    // wait until both count.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (status, head, body) = loop {
        let r = Req::get("/sites").token("t0ken").send(&server);
        if r.0 == 429 || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status, 429, "{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(head.contains("application/problem+json"), "{head}");
    assert!(body.contains("127.0.0.1"), "{body}");
    // Another client is not held back by this one.
    let other = Req {
        from: [127, 0, 0, 2].into(),
        ..Req::get("/sites")
    }
    .token("t0ken");
    assert_eq!(other.send(&server).0, 200);
    // Its requests over, the client is served again.
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, _, _) = Req::get("/sites").token("t0ken").send(&server);
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {status}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_body_over_the_limit_gets_413_as_a_problem_document() {
    let server = start(Some("t0ken"), &["--body-limit-kib", "1"]);
    let big = format!("{{\"topology\": \"{}\"}}", "x".repeat(4096));
    let (status, head, body) = http(&server, "POST", "/match", Some("t0ken"), Some(&big));
    assert_eq!(status, 413, "{body}");
    assert!(head.contains("application/problem+json"), "{head}");
    let p: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["status"], 413, "{p:#}");
    // Under the limit, the same route reads the body (and finds it wrong).
    let (status, _, body) = http(&server, "POST", "/match", Some("t0ken"), Some("{}"));
    assert_eq!(status, 422, "{body}");
}
