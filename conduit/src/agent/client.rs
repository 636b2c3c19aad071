//! The orchestrator's side of a site agent: HTTPS to a pinned certificate
//! with a bearer token, and the agent's problems turned back into the SDK's
//! errors, each naming the site and the agent.

use std::time::Duration;

use fluidcloud_broker::tls::{self, ClientTls, Fingerprint, Rejection};
use fluidcloud_plugins::{Error, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Problem;

/// A site agent, as the orchestrator reaches it.
#[derive(Debug, Clone)]
pub struct AgentClient {
    site: String,
    url: String,
    fingerprint: Fingerprint,
    token: Option<String>,
    token_env: Option<String>,
    http: reqwest::Client,
    tls: ClientTls,
}

/// The whole chain of a transport error, in one line.
pub fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut msg = if e.is_connect() {
        "cannot connect".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else {
        "the request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = source {
        let text = s.to_string();
        if !last.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        last = text;
        source = s.source();
    }
    msg
}

/// The detail of a problem response (or its status line).
pub async fn problem_detail(resp: reqwest::Response) -> String {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<Problem>(&text) {
        Ok(p) => p.detail,
        Err(_) => format!("HTTP {status}"),
    }
}

impl AgentClient {
    /// The agent of site `site` at `url`, whose certificate has
    /// `fingerprint`, with `token` (read from `token_env`, named in
    /// messages).
    ///
    /// # Errors
    /// `Invalid` for a URL that is not `https://HOST:PORT` or a malformed
    /// fingerprint.
    pub fn new(
        site: &str,
        url: &str,
        fingerprint: &str,
        token: Option<String>,
        token_env: Option<String>,
    ) -> Result<Self> {
        let url = url.trim_end_matches('/').to_owned();
        let bad = |detail: String| {
            Error::Invalid(vec![fluidcloud_plugins::Diagnostic::error(format!(
                "site {site}: {detail}"
            ))])
        };
        let parsed = reqwest::Url::parse(&url)
            .ok()
            .filter(|u| u.scheme() == "https" && u.host().is_some() && u.path() == "/")
            .ok_or_else(|| bad(format!("agent `{url}` is not an https://HOST:PORT URL")))?;
        let _ = parsed;
        let fingerprint: Fingerprint = fingerprint
            .parse()
            .map_err(|e: tls::TlsError| bad(format!("agent_fingerprint: {e}")))?;
        let tls =
            tls::pinned_client_config(fingerprint).map_err(|e| bad(format!("TLS set-up: {e}")))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.config.clone())
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad(format!("HTTP client: {e}")))?;
        Ok(Self {
            site: site.to_owned(),
            url,
            fingerprint,
            token,
            token_env,
            http,
            tls,
        })
    }

    /// The same agent with a client of its own (for another runtime).
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn fresh(&self) -> Result<Self> {
        Self::new(
            &self.site,
            &self.url,
            &self.fingerprint.to_string(),
            self.token.clone(),
            self.token_env.clone(),
        )
    }

    /// The agent's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The pinned fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The site's name.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// A request to `path` with the bearer token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends `req`; the response when 2xx, else the agent's problem as an
    /// SDK error.
    ///
    /// # Errors
    /// `Transient` when the agent does not answer, `PermissionDenied` for
    /// a refused certificate or token, and the agent's own errors.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| self.transport(&e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(self.problem(resp).await)
    }

    fn transport(&self, e: &reqwest::Error) -> Error {
        if let Some(r) = self.tls.rejection() {
            let hint = match r {
                Rejection::Mismatch { .. } => {
                    "; if the agent's certificate was replaced on purpose, pin the fingerprint it prints now (agent_fingerprint)"
                }
                _ => "",
            };
            return Error::PermissionDenied {
                what: format!("agent {}: {r}{hint}", self.url),
                site: Some(self.site.clone()),
            };
        }
        Error::Transient(format!(
            "site {}: agent {} does not answer: {} (is `fluidcloud agent` running there?)",
            self.site,
            self.url,
            describe_reqwest(e)
        ))
    }

    async fn problem(&self, resp: reqwest::Response) -> Error {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let p: Problem = serde_json::from_str(&text).unwrap_or_else(|_| Problem {
            kind: "http".into(),
            detail: format!(
                "HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            ),
            what: None,
        });
        if status == reqwest::StatusCode::UNAUTHORIZED {
            let how = match (&self.token, &self.token_env) {
                (Some(_), Some(var)) => format!("refused the token in ${var}"),
                (Some(_), None) => "refused the token".to_owned(),
                (None, Some(var)) => format!("wants a token: set ${var}"),
                (None, None) => "wants a token: set agent_token_env".to_owned(),
            };
            return Error::PermissionDenied {
                what: format!("agent {} {how}", self.url),
                site: Some(self.site.clone()),
            };
        }
        p.into_error(&self.site)
    }

    /// GETs `path` as JSON.
    ///
    /// # Errors
    /// As [`Self::send`]; an unreadable answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.send(self.request(reqwest::Method::GET, path)).await?;
        self.json(resp, path).await
    }

    /// POSTs `body` to `path`; the JSON answer.
    ///
    /// # Errors
    /// As [`Self::get`].
    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let resp = self
            .send(self.request(reqwest::Method::POST, path).json(body))
            .await?;
        self.json(resp, path).await
    }

    /// DELETEs `path`.
    ///
    /// # Errors
    /// As [`Self::send`].
    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.request(reqwest::Method::DELETE, path))
            .await
            .map(drop)
    }

    /// GETs `path` as bytes.
    ///
    /// # Errors
    /// As [`Self::send`].
    pub async fn get_bytes(&self, path: &str) -> Result<bytes::Bytes> {
        let resp = self.send(self.request(reqwest::Method::GET, path)).await?;
        resp.bytes().await.map_err(|e| self.transport(&e))
    }

    /// PUTs `body` to `path`.
    ///
    /// # Errors
    /// As [`Self::send`].
    pub async fn put_bytes(&self, path: &str, body: Vec<u8>) -> Result<()> {
        self.send(self.request(reqwest::Method::PUT, path).body(body))
            .await
            .map(drop)
    }

    async fn json<T: DeserializeOwned>(&self, resp: reqwest::Response, path: &str) -> Result<T> {
        let text = resp.text().await.map_err(|e| self.transport(&e))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::Precondition(format!(
                "site {}: agent {} answered {path} with something unreadable: {e}",
                self.site, self.url
            ))
        })
    }
}

/// A path segment, percent-encoded.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
