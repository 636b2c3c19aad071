//! `--server URL`: the same commands against a remote `fluidcloud serve`.
//!
//! The service holds the sites file and the relocations; this side only
//! sends requests and prints answers the way the local commands do. Errors
//! are one line: an unreachable service names its URL, a 401 says whether
//! the token is missing or wrong, and a problem document shows its detail
//! and the offending fields.
//!
//! Every request carries the bearer token, so the transport must keep it
//! secret: `https://` is verified against the system's roots, a given CA
//! (`--server-ca`), or a pinned certificate fingerprint
//! (`--server-fingerprint`, for the self-signed certificate `serve`
//! generates; see `fluidcloud_broker::tls`). A refused certificate is exit
//! 10 with the fingerprint seen (and the one expected). Plain `http://` is
//! accepted only to a loopback address, where no network carries it.

use std::path::PathBuf;

use anyhow::{Context as _, Result, anyhow};
use fluidcloud_broker::rest::Problem;
use fluidcloud_broker::tls::{self, ClientTls, Fingerprint, Rejection};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ExitWith;

/// Environment variable holding the bearer token.
pub(crate) const TOKEN_ENV: &str = "FLUIDCLOUD_TOKEN";

/// Environment variable holding the pinned fingerprint of the service's
/// certificate (`--server-fingerprint`).
pub(crate) const FINGERPRINT_ENV: &str = "FLUIDCLOUD_SERVER_FINGERPRINT";

/// How to trust the service's certificate.
#[derive(Debug, Default, Clone)]
pub(crate) struct Trust {
    /// `--server-ca FILE`: a CA certificate instead of the system's roots.
    pub(crate) ca: Option<PathBuf>,
    /// `--server-fingerprint sha256:HEX`: only this certificate.
    pub(crate) fingerprint: Option<String>,
}

/// A remote service.
pub(crate) struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// `None` for plain HTTP.
    tls: Option<ClientTls>,
}

/// Whether `url`'s host is this machine's loopback interface.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>()
        .map_or(host.eq_ignore_ascii_case("localhost"), |ip| {
            ip.to_canonical().is_loopback()
        })
}

/// One server-sent event.
#[derive(Debug)]
pub(crate) struct SseEvent {
    pub(crate) name: String,
    pub(crate) data: serde_json::Value,
}

impl Remote {
    /// The service at `url`, with the token of `$FLUIDCLOUD_TOKEN`,
    /// trusting its certificate as `trust` says.
    ///
    /// # Errors
    /// Exit 2 for a URL that is not `https://`, or `http://` to a loopback
    /// address, for an invalid fingerprint, and for trust options that do
    /// not apply; the CA file's errors.
    pub(crate) fn new(url: &str, trust: &Trust) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let usage = |msg: String| anyhow!(ExitWith(2, msg));
        let parsed = reqwest::Url::parse(&base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                usage(format!(
                    "--server `{url}` is not an https:// or http:// URL"
                ))
            })?;
        let pin = trust
            .fingerprint
            .as_deref()
            .filter(|f| !f.trim().is_empty())
            .map(|f| {
                f.parse::<Fingerprint>().map_err(|e| {
                    usage(format!("--server-fingerprint (or ${FINGERPRINT_ENV}): {e}"))
                })
            })
            .transpose()?;
        let tls = if parsed.scheme() == "https" {
            Some(match (pin, &trust.ca) {
                (Some(_), Some(_)) => {
                    return Err(usage(format!(
                        "--server `{url}`: give --server-ca or --server-fingerprint (${FINGERPRINT_ENV}), not both"
                    )));
                }
                (Some(pin), None) => tls::pinned_client_config(pin)?,
                (None, ca) => tls::client_config(ca.as_deref())?,
            })
        } else {
            if !is_loopback(&parsed) {
                return Err(usage(format!(
                    "--server `{url}`: plain http:// is only allowed to a loopback address, since the token would cross the network in clear; use https://"
                )));
            }
            if pin.is_some() || trust.ca.is_some() {
                return Err(usage(format!(
                    "--server `{url}`: --server-ca and --server-fingerprint (${FINGERPRINT_ENV}) apply to https:// only"
                )));
            }
            None
        };
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            // The service never redirects; following one could carry the
            // token somewhere else.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(t) = &tls {
            builder = builder.use_preconfigured_tls(t.config.clone());
        }
        let http = builder.build().context("cannot build the HTTP client")?;
        Ok(Self {
            base,
            token,
            http,
            tls,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.transport(e, what))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.problem(resp, what).await)
    }

    fn transport(&self, e: reqwest::Error, what: &str) -> anyhow::Error {
        match self.tls.as_ref().and_then(ClientTls::rejection) {
            Some(r @ Rejection::Mismatch { .. }) => {
                return anyhow!(ExitWith(
                    10,
                    format!(
                        "{what}: {}: {r} (--server-fingerprint); if the service's certificate was replaced on purpose, pin the fingerprint it prints now",
                        self.base
                    )
                ));
            }
            Some(r) => {
                return anyhow!(ExitWith(
                    10,
                    format!(
                        "{what}: {}: {r}; pass --server-ca FILE, or check the fingerprint against the one `fluidcloud serve` printed and pin it with --server-fingerprint",
                        self.base
                    )
                ));
            }
            None => {}
        }
        let why = if e.is_connect() {
            "cannot connect (is `fluidcloud serve` running there?)"
        } else if e.is_timeout() {
            "timed out"
        } else if self.tls.is_none() {
            // A plain request to an HTTPS port gets a TLS record back.
            "the request failed (`fluidcloud serve` speaks HTTPS unless started with --plain-http: try https://)"
        } else {
            "the request failed"
        };
        anyhow!(e).context(format!("{what}: {} {why}", self.base))
    }

    async fn problem(&self, resp: reqwest::Response, what: &str) -> anyhow::Error {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            let msg = if self.token.is_some() {
                format!("{what}: {} refused the token in ${TOKEN_ENV}", self.base)
            } else {
                format!(
                    "{what}: {} needs a token: set ${TOKEN_ENV} to the service's token",
                    self.base
                )
            };
            return anyhow!(ExitWith(1, msg));
        }
        let (detail, fields) = match serde_json::from_str::<Problem>(&text) {
            Ok(p) => {
                let pointers: Vec<&str> = p.errors.iter().map(|f| f.pointer.as_str()).collect();
                let fields = if pointers.is_empty() {
                    String::new()
                } else {
                    format!(" (field {})", pointers.join(", "))
                };
                (p.detail, fields)
            }
            Err(_) => (text.trim().to_owned(), String::new()),
        };
        // The same exit codes as the local commands.
        let code = match status.as_u16() {
            404 => 4,
            409 if detail.contains("no placement") => 9,
            409 => 7,
            422 | 400 => 3,
            _ => 1,
        };
        anyhow!(ExitWith(
            code,
            format!("{what}: the service answered {status}: {detail}{fields}")
        ))
    }

    /// `GET path` as JSON.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str, what: &str) -> Result<T> {
        let resp = self
            .send(self.request(reqwest::Method::GET, path), what)
            .await?;
        resp.json()
            .await
            .with_context(|| format!("{what}: unexpected answer from {}", self.base))
    }

    /// `POST path` with a JSON body, answer as JSON.
    pub(crate) async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &str,
    ) -> Result<T> {
        let resp = self
            .send(self.request(reqwest::Method::POST, path).json(body), what)
            .await?;
        resp.json()
            .await
            .with_context(|| format!("{what}: unexpected answer from {}", self.base))
    }

    /// Follows `GET path` as server-sent events, calling `on` for each,
    /// until the stream ends; returns the last event.
    pub(crate) async fn events(
        &self,
        path: &str,
        what: &str,
        mut on: impl FnMut(&SseEvent),
    ) -> Result<Option<SseEvent>> {
        let mut resp = self
            .send(
                self.request(reqwest::Method::GET, path)
                    .header(reqwest::header::ACCEPT, "text/event-stream"),
                what,
            )
            .await?;
        let mut buf = String::new();
        let mut last = None;
        loop {
            let chunk = resp.chunk().await.map_err(|e| self.transport(e, what))?;
            let Some(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                if let Some(ev) = parse_event(&block) {
                    on(&ev);
                    let done = ev.name == "end";
                    last = Some(ev);
                    if done {
                        return Ok(last);
                    }
                }
            }
        }
        Ok(last)
    }
}

/// One `event:`/`data:` block; comments (keep-alives) give `None`.
fn parse_event(block: &str) -> Option<SseEvent> {
    let mut name = String::from("message");
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    if data.is_empty() {
        return None;
    }
    Some(SseEvent {
        name,
        data: serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_parsed_and_keep_alives_skipped() {
        let e = parse_event("event: step-finished\ndata: {\"step\":\"verify\"}\n\n").unwrap();
        assert_eq!(e.name, "step-finished");
        assert_eq!(e.data["step"], "verify");
        assert!(parse_event(":\n\n").is_none());
        let e = parse_event("data: plain\n\n").unwrap();
        assert_eq!(
            (e.name.as_str(), e.data.as_str()),
            ("message", Some("plain"))
        );
    }
}
