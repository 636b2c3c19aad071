//! `fluidcloud agent`: one site's driver served over HTTPS, so that an
//! orchestrator on another machine drives the site, and so that disks move
//! from agent to agent without passing through the orchestrator.
//!
//! - **Identity.** Each agent has a certificate (given, or self-signed and
//!   kept in its state directory); orchestrators pin its fingerprint
//!   (`agent_fingerprint`). Agents present the same certificate to each
//!   other as clients.
//! - **Orchestrator → agent**: a bearer token (`FLUIDCLOUD_AGENT_TOKEN` at
//!   the agent, the variable `agent_token_env` names at the orchestrator)
//!   on every `/v1` call: the site's capabilities (inventory, image and
//!   block stores, compute, change tracking) and transfers.
//! - **Agent → agent**: never a long-lived secret. The orchestrator asks
//!   the source agent for a ticket bound to the target agent's fingerprint
//!   and gives it to the target agent with the source's fingerprint; the
//!   source serves the disk to whoever presents the ticket *and* that
//!   certificate ([`crate::transfer`]).
//!
//! [`server`] is the agent, [`client`] the orchestrator's side of it.

pub mod client;
pub mod embedded;
pub mod server;

use fluidcloud_plugins::{Diagnostic, Error};
use serde::{Deserialize, Serialize};

/// Environment variable holding an agent's bearer token.
pub const TOKEN_ENV: &str = "FLUIDCLOUD_AGENT_TOKEN";

/// An error as an agent answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Problem {
    /// `not-found`, `not-supported`, `permission`, `precondition`,
    /// `corrupt`, `invalid`, `transient`, `io`, `unauthorized`.
    pub kind: String,
    /// The whole message, with its causes.
    pub detail: String,
    /// The object of a not-found, not-supported or permission error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
}

/// Every cause of `e`, in one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

impl Problem {
    /// The problem of `e` and its HTTP status.
    pub fn of(e: &Error) -> (u16, Self) {
        let (status, kind, what) = match e {
            Error::NotFound { what, .. } => (404, "not-found", Some(what.clone())),
            Error::NotSupported { operation, .. } => {
                (501, "not-supported", Some(operation.clone()))
            }
            Error::PermissionDenied { what, .. } => (403, "permission", Some(what.clone())),
            Error::Precondition(_) => (409, "precondition", None),
            Error::Corrupt { .. } => (422, "corrupt", None),
            Error::Invalid(_) => (400, "invalid", None),
            Error::Transient(_) => (503, "transient", None),
            _ => (500, "io", None),
        };
        (
            status,
            Self {
                kind: kind.to_owned(),
                detail: chain(e),
                what,
            },
        )
    }

    /// The SDK error this problem stands for, at site `site`.
    pub fn into_error(self, site: &str) -> Error {
        let site_s = Some(site.to_owned());
        let what = self.what.unwrap_or_else(|| self.detail.clone());
        match self.kind.as_str() {
            "not-found" => Error::NotFound { what, site: site_s },
            "not-supported" => Error::NotSupported {
                operation: what,
                site: site_s,
            },
            "permission" | "unauthorized" => Error::PermissionDenied { what, site: site_s },
            "corrupt" => Error::Corrupt {
                what: format!("site {site}: {}", self.detail),
                offset: 0,
            },
            "invalid" => Error::Invalid(vec![Diagnostic::error(format!(
                "site {site}: {}",
                self.detail
            ))]),
            "transient" => Error::Transient(format!("site {site}: {}", self.detail)),
            _ => Error::Precondition(format!("site {site}: {}", self.detail)),
        }
    }
}
