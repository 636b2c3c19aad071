//! `fluidcloud serve` as a real process on a real socket.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use common::*;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(token: Option<&str>, extra: &[&str]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluidcloud"));
    cmd.args([
        "--config",
        &demo_config(),
        "serve",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(extra)
    .env_remove("FLUIDCLOUD_TOKEN")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Some(t) = token {
        cmd.env("FLUIDCLOUD_TOKEN", t);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    Server { child, addr }
}

/// A minimal HTTP/1.1 exchange: (status, headers, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), body.to_owned())
}

#[test]
fn serve_answers_with_the_sites_of_the_sites_file_behind_a_token() {
    let server = start(Some("t0ken"), &[]);
    let (status, _, body) = http(&server.addr, "GET", "/health", None, None);
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, head, _) = http(&server.addr, "GET", "/sites", None, None);
    assert_eq!(status, 401);
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    let (status, _, body) = http(&server.addr, "GET", "/sites", Some("t0ken"), None);
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
    let (status, _, resp) = http(&server.addr, "POST", "/match", Some("t0ken"), Some(&body));
    assert_eq!(status, 200, "{resp}");
    let p: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(p["assignments"].as_array().unwrap().len(), 4);
    assert_eq!(p["assignments"][0]["site"], "cloud-frankfurt");
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
    let err = fails(&out, 1);
    assert!(err.contains("loopback"), "{err}");
    let server = start(None, &["--no-auth"]);
    let (status, _, _) = http(&server.addr, "GET", "/sites", None, None);
    assert_eq!(status, 200);
}
