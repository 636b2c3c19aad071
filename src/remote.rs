//! `--server URL`: the same commands against a remote `fluidcloud serve`.
//!
//! The service holds the sites file and the relocations; this side only
//! sends requests and prints answers the way the local commands do. Errors
//! are one line: an unreachable service names its URL, a 401 says whether
//! the token is missing or wrong, and a problem document shows its detail
//! and the offending fields.

use anyhow::{Context as _, Result, anyhow, bail};
use fluidcloud_broker::rest::Problem;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ExitWith;

/// Environment variable holding the bearer token.
pub(crate) const TOKEN_ENV: &str = "FLUIDCLOUD_TOKEN";

/// A remote service.
pub(crate) struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// One server-sent event.
#[derive(Debug)]
pub(crate) struct SseEvent {
    pub(crate) name: String,
    pub(crate) data: serde_json::Value,
}

impl Remote {
    /// The service at `url`, with the token of `$FLUIDCLOUD_TOKEN`.
    ///
    /// # Errors
    /// A URL that is not `http://` or `https://`.
    pub(crate) fn new(url: &str) -> Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!(ExitWith(
                2,
                format!("--server `{url}` is not an http:// or https:// URL")
            ));
        }
        if base.starts_with("https://") {
            bail!(ExitWith(
                2,
                format!(
                    "--server `{url}`: this build speaks plain HTTP only; put the service behind a local tunnel or use http://"
                )
            ));
        }
        let token = std::env::var(TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty());
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { base, token, http })
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
        let why = if e.is_connect() {
            "cannot connect (is `fluidcloud serve` running there?)"
        } else if e.is_timeout() {
            "timed out"
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
