//! Keystone v3: tokens and the service catalog.
//!
//! A token is asked for with the site's password or application
//! credential (`POST /v3/auth/tokens`) and kept until five minutes before
//! its `expires_at`; a call answered 401 (a token revoked or expired in
//! between) gets a new token and is sent once more. The catalog that
//! comes with the token says where each service is, for the site's
//! region and interface.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fluidcloud_plugins::{Error, Result};
use serde::Deserialize;
use serde_json::json;

/// How the site authenticates.
#[derive(Debug, Clone)]
pub(crate) enum Method {
    /// A user's password, scoped to a project.
    Password {
        user: String,
        user_domain: String,
        password: String,
        project: String,
        project_domain: String,
    },
    /// An application credential (always scoped to its project).
    AppCredential { id: String, secret: String },
}

/// A token and what came with it.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub value: String,
    pub expires: SystemTime,
    pub project_id: String,
    pub catalog: Vec<Service>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Service {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Endpoint {
    pub interface: String,
    #[serde(default)]
    pub region_id: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    pub url: String,
}

#[derive(Deserialize)]
struct TokenBody {
    token: TokenFields,
}

#[derive(Deserialize)]
struct TokenFields {
    expires_at: String,
    project: Option<IdOnly>,
    #[serde(default)]
    catalog: Vec<Service>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// Renew a token this long before it expires.
const EARLY: Duration = Duration::from_secs(300);

/// The identity of one site.
#[derive(Debug)]
pub(crate) struct Identity {
    site: String,
    /// `…/v3`.
    auth_url: String,
    method: Method,
    region: Option<String>,
    interface: String,
    current: tokio::sync::Mutex<Option<Token>>,
}

/// Seconds since the epoch of an ISO 8601 UTC time as Keystone writes it
/// (`2026-12-05T12:00:00.000000Z`).
pub(crate) fn parse_utc(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

impl Identity {
    pub(crate) fn new(
        site: &str,
        auth_url: &str,
        method: Method,
        region: Option<String>,
        interface: String,
    ) -> Self {
        let base = auth_url.trim_end_matches('/');
        let auth_url = if base.ends_with("/v3") {
            base.to_owned()
        } else {
            format!("{base}/v3")
        };
        Self {
            site: site.to_owned(),
            auth_url,
            method,
            region,
            interface,
            current: tokio::sync::Mutex::new(None),
        }
    }

    fn request_body(&self) -> serde_json::Value {
        match &self.method {
            Method::Password {
                user,
                user_domain,
                password,
                project,
                project_domain,
            } => json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": user, "domain": {"name": user_domain}, "password": password}}},
                "scope": {"project": {"name": project, "domain": {"name": project_domain}}}}}),
            Method::AppCredential { id, secret } => json!({"auth": {"identity": {
                "methods": ["application_credential"],
                "application_credential": {"id": id, "secret": secret}}}}),
        }
    }

    /// Asks Keystone for a new token.
    async fn issue(&self, http: &reqwest::Client) -> Result<Token> {
        let url = format!("{}/auth/tokens", self.auth_url);
        let resp = http
            .post(&url)
            .json(&self.request_body())
            .send()
            .await
            .map_err(|e| Error::Transient(format!("site {}: Keystone at {url}: {e}", self.site)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(Error::PermissionDenied {
                what: format!(
                    "Keystone at {} refused the site's {} (HTTP 401)",
                    self.auth_url,
                    match self.method {
                        Method::Password { .. } => "user name and password",
                        Method::AppCredential { .. } => "application credential",
                    }
                ),
                site: Some(self.site.clone()),
            });
        }
        let value = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(super::http_error(
                &self.site,
                &format!("Keystone POST {url}"),
                status,
                &text,
            ));
        }
        let value = value.ok_or_else(|| {
            Error::Transient(format!(
                "site {}: Keystone answered without X-Subject-Token",
                self.site
            ))
        })?;
        let body: TokenBody = serde_json::from_str(&text)
            .map_err(|e| Error::Transient(format!("site {}: Keystone's token: {e}", self.site)))?;
        let expires = parse_utc(&body.token.expires_at).ok_or_else(|| {
            Error::Transient(format!(
                "site {}: Keystone's token expires at `{}`, not a time",
                self.site, body.token.expires_at
            ))
        })?;
        let project_id = body.token.project.map(|p| p.id).ok_or_else(|| {
            Error::Precondition(format!(
                "site {}: the token Keystone gave is not scoped to a project",
                self.site
            ))
        })?;
        Ok(Token {
            value,
            expires,
            project_id,
            catalog: body.token.catalog,
        })
    }

    /// A token valid for at least five more minutes: the one held, or a
    /// new one. `stale`, when given, is a token a service refused: it is
    /// replaced even if it has not expired (revoked).
    pub(crate) async fn token(&self, http: &reqwest::Client, stale: Option<&str>) -> Result<Token> {
        let mut held = self.current.lock().await;
        let fresh =
            |t: &Token| SystemTime::now() + EARLY < t.expires && Some(t.value.as_str()) != stale;
        if let Some(t) = held.as_ref().filter(|t| fresh(t)) {
            return Ok(t.clone());
        }
        let t = self.issue(http).await?;
        *held = Some(t.clone());
        Ok(t)
    }

    /// The URL of service `kind` (`image`, `object-store`, …) in `token`'s
    /// catalog, for the site's region and interface.
    pub(crate) fn endpoint(&self, token: &Token, kind: &str) -> Result<String> {
        let missing = |why: String| Error::NotSupported {
            operation: format!("the {kind} service ({why})"),
            site: Some(self.site.clone()),
        };
        let service = token
            .catalog
            .iter()
            .find(|s| s.kind == kind)
            .ok_or_else(|| missing("Keystone's catalog has no such service".into()))?;
        let candidates: Vec<&Endpoint> = service
            .endpoints
            .iter()
            .filter(|e| e.interface == self.interface)
            .filter(|e| match &self.region {
                Some(r) => e.region_id.as_deref().or(e.region.as_deref()) == Some(r.as_str()),
                None => true,
            })
            .collect();
        match candidates.as_slice() {
            [one] => Ok(one.url.trim_end_matches('/').to_owned()),
            [] => Err(missing(format!(
                "no {} endpoint{} in Keystone's catalog",
                self.interface,
                self.region
                    .as_ref()
                    .map(|r| format!(" in region {r}"))
                    .unwrap_or_default()
            ))),
            _ => Err(Error::Precondition(format!(
                "site {}: the catalog has {} {} endpoints of {kind} in several regions; name one with `region`",
                self.site,
                candidates.len(),
                self.interface
            ))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keystone_times_are_read() {
        let t = parse_utc("2026-12-05T12:00:00.000000Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_796_472_000
        );
        assert_eq!(
            parse_utc("1970-01-01T00:00:01Z")
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            1
        );
        assert!(parse_utc("2026-13-05T12:00:00Z").is_none());
        assert!(parse_utc("yesterday").is_none());
    }
}
