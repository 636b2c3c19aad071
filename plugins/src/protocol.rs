//! The plugin protocol, version 1: message types only, no I/O.
//!
//! A plugin is an executable that speaks newline-delimited JSON: one
//! [`Request`] per line on its stdin, one [`Reply`] per line on its stdout,
//! free-form logs on its stderr. `plugins/PROTOCOL.md` is the normative
//! description with examples; this module is its Rust form, shared by the
//! host ([`crate::host`]) and the SDK's [`serve`](crate::serve::serve).
//!
//! Why this shape (after nushell's `nu-plugin-protocol` and go-plugin):
//!
//! - **Types only.** Nothing here reads or writes; the host and the SDK do,
//!   so a plugin in another language needs only this document and a JSON
//!   library.
//! - **`hello` first**, carrying the protocol name, a semver version and a
//!   list of optional features; versions are compatible by the caret rule
//!   ([`Version::is_compatible`]), so additions go in minor versions and
//!   features, and only a major bump breaks.
//! - **Every request has an id**; replies and progress notifications carry
//!   the id of the request they belong to, so calls may overlap and a
//!   `cancel` names the call it stops.
//! - **Errors are structured**: a kind, a message, the [`Retry`]
//!   classification, and [`Diagnostic`]s pointing at the manifest key
//!   concerned.
//! - **Bounded**: a message larger than [`MAX_MESSAGE_BYTES`] is a protocol
//!   violation, so a broken plugin cannot make the host buffer without end.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::diagnostic::{Diagnostic, Severity};
use crate::error::{Error, Retry, Retryable};
use crate::migrator::{MigratorDescriptor, StepOutput, StepRequest};

/// The protocol's name, sent in `hello` by both sides.
pub const PROTOCOL_NAME: &str = "fluidcloud-migrator";

/// The version this crate speaks. Version 1 is frozen: later versions may
/// only add optional fields, methods behind features, and error kinds.
pub const PROTOCOL_VERSION: Version = Version {
    major: 1,
    minor: 0,
    patch: 0,
};

/// Largest message, in bytes, either side accepts (the newline excluded).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Optional feature: the plugin sends `progress` and `message`
/// notifications during `execute` and `rollback`.
pub const FEATURE_PROGRESS: &str = "progress";
/// Optional feature: the plugin honours `cancel`.
pub const FEATURE_CANCEL: &str = "cancel";
/// Optional feature: the plugin understands `secrets` in step calls.
pub const FEATURE_SECRETS: &str = "secrets";

/// Method names.
pub mod method {
    /// The handshake; always the first request.
    pub const HELLO: &str = "hello";
    /// What the migrator is: a [`PluginDescriptor`](super::PluginDescriptor).
    pub const DESCRIBE: &str = "describe";
    /// Pure checks of a step request: a list of diagnostics.
    pub const VALIDATE: &str = "validate";
    /// Cost estimate of a step.
    pub const PLAN: &str = "plan";
    /// Do the step.
    pub const EXECUTE: &str = "execute";
    /// Undo the step at the target.
    pub const ROLLBACK: &str = "rollback";
    /// Ask a running call to stop at a safe point.
    pub const CANCEL: &str = "cancel";
}

/// A semantic version `MAJOR.MINOR.PATCH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Incompatible changes.
    pub major: u64,
    /// Compatible additions.
    pub minor: u64,
    /// Fixes.
    pub patch: u64,
}

impl Version {
    /// Parses `MAJOR.MINOR.PATCH` (a `-pre` or `+build` suffix is ignored).
    ///
    /// # Errors
    /// When `s` is not three dot-separated numbers.
    pub fn parse(s: &str) -> Result<Self, String> {
        let core = s.split(['-', '+']).next().unwrap_or_default();
        let mut it = core.split('.').map(str::parse::<u64>);
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch)), None) => Ok(Self {
                major,
                minor,
                patch,
            }),
            _ => Err(format!("`{s}` is not a MAJOR.MINOR.PATCH version")),
        }
    }

    /// Whether two sides speaking `self` and `other` understand each other:
    /// the caret rule applied from the older to the newer. Same major
    /// version when it is not 0; for 0.x the same minor; for 0.0.x equal.
    pub fn is_compatible(&self, other: &Version) -> bool {
        let (lo, hi) = if self <= other {
            (self, other)
        } else {
            (other, self)
        };
        match (lo.major, lo.minor) {
            (0, 0) => lo == hi,
            (0, m) => hi.major == 0 && hi.minor == m,
            (maj, _) => hi.major == maj,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Version::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One line from the host to a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Unique per connection, chosen by the host; replies carry it back.
    pub id: u64,
    /// One of [`method`]'s names.
    pub method: String,
    /// The method's parameters ([`Hello`], [`StepCall`], [`RollbackCall`],
    /// [`CancelCall`]); absent for `describe`.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub params: serde_json::Value,
}

/// `hello` parameters, and the plugin's answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`PROTOCOL_NAME`].
    pub protocol: String,
    /// The protocol version the sender speaks.
    pub version: Version,
    /// Optional features the sender supports.
    #[serde(default)]
    pub features: Vec<String>,
}

impl Hello {
    /// This crate's hello, offering `features`.
    pub fn current(features: &[&str]) -> Self {
        Self {
            protocol: PROTOCOL_NAME.to_owned(),
            version: PROTOCOL_VERSION,
            features: features.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    /// Checks that `other` (the peer's hello) speaks a compatible protocol.
    ///
    /// # Errors
    /// A sentence naming both versions when the protocol name differs or the
    /// versions are not caret-compatible.
    pub fn check_peer(&self, other: &Hello) -> Result<(), String> {
        if other.protocol != self.protocol {
            return Err(format!(
                "speaks protocol `{}`, expected `{}`",
                other.protocol, self.protocol
            ));
        }
        if !self.version.is_compatible(&other.version) {
            return Err(format!(
                "speaks {} version {}, which is not compatible with version {} (caret rule: same major version)",
                other.protocol, other.version, self.version
            ));
        }
        Ok(())
    }

    /// Whether the sender offered `feature`.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// The answer to `describe`: the migrator's descriptor plus what the
/// plugin needs from the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginDescriptor {
    /// Name, version, summary, consumed and produced artifact kinds.
    #[serde(flatten)]
    pub migrator: MigratorDescriptor,
    /// Names of the secrets the plugin needs; the host passes these, and
    /// only these, in step calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

/// Parameters of `validate`, `plan` and `execute`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct StepCall {
    /// The step.
    pub request: StepRequest,
    /// The secrets the plugin declared, by name; absent when it declared
    /// none. Never sent with `validate`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

impl fmt::Debug for StepCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepCall")
            .field("request", &self.request)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Parameters of `rollback`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct RollbackCall {
    /// The step.
    pub request: StepRequest,
    /// What the step produced, or null when it was interrupted.
    #[serde(default)]
    pub output: Option<StepOutput>,
    /// As in [`StepCall::secrets`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
}

impl fmt::Debug for RollbackCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RollbackCall")
            .field("request", &self.request)
            .field("output", &self.output)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Parameters of `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelCall {
    /// The id of the running call to stop.
    pub target: u64,
}

/// A progress notification during `execute` or `rollback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes (or items) done.
    pub done: u64,
    /// The total, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// What kind of failure an [`ErrorBody`] reports; maps onto [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Something asked for does not exist.
    NotFound,
    /// The operation or method is not offered.
    NotSupported,
    /// Access was refused.
    PermissionDenied,
    /// A condition the step needs does not hold.
    Precondition,
    /// Data is malformed.
    Corrupt,
    /// The request failed validation (see the diagnostics).
    Invalid,
    /// A passing fault.
    Transient,
    /// The call stopped because it was cancelled.
    Cancelled,
    /// The peer speaks an incompatible protocol version.
    Incompatible,
    /// The request line could not be understood.
    Protocol,
    /// Anything else (an I/O error, a bug, a panic).
    #[serde(other)]
    Internal,
}

/// A failed call, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// One line for a person.
    pub message: String,
    /// Whether the host may retry the step.
    #[serde(default = "never")]
    pub retry: Retry,
    /// Findings pointing at what to fix (severity, summary, detail, file,
    /// line, key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diagnostics: Vec<Diagnostic>,
}

fn never() -> Retry {
    Retry::Never
}

impl ErrorBody {
    /// An error of `kind` that retrying cannot fix.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry: Retry::Never,
            diagnostics: Vec::new(),
        }
    }

    /// The wire form of an SDK error, keeping its retry classification.
    pub fn from_error(e: &Error) -> Self {
        let kind = match e {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::NotSupported { .. } => ErrorKind::NotSupported,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::Precondition(_) => ErrorKind::Precondition,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Invalid(_) => ErrorKind::Invalid,
            Error::Transient(_) => ErrorKind::Transient,
            _ => ErrorKind::Internal,
        };
        let diagnostics = match e {
            Error::Invalid(d) => d.clone(),
            Error::Plugin { diagnostics, .. } => diagnostics.clone(),
            _ => Vec::new(),
        };
        let message = match e {
            Error::Precondition(m) | Error::Transient(m) => m.clone(),
            other => other.to_string(),
        };
        Self {
            kind,
            message,
            retry: e.retry(),
            diagnostics,
        }
    }

    /// The SDK error for this wire error reported by `plugin`. Kinds with a
    /// matching [`Error`] variant map onto it (so exit codes stay right);
    /// the others, and any retry class the variant would not keep, become
    /// [`Error::Plugin`].
    pub fn into_error(self, plugin: &str) -> Error {
        let msg = format!("plugin {plugin}: {}", self.message);
        match (self.kind, self.retry) {
            (ErrorKind::NotFound, Retry::Never) => Error::NotFound {
                what: msg,
                site: None,
            },
            (ErrorKind::NotSupported, Retry::Never) => Error::NotSupported {
                operation: msg,
                site: None,
            },
            (ErrorKind::PermissionDenied, Retry::Never) => Error::PermissionDenied {
                what: msg,
                site: None,
            },
            (ErrorKind::Precondition, Retry::Never) => Error::Precondition(msg),
            (ErrorKind::Corrupt, Retry::Never) => Error::Corrupt {
                what: msg,
                offset: 0,
            },
            (ErrorKind::Invalid, Retry::Never) if !self.diagnostics.is_empty() => {
                Error::Invalid(self.diagnostics)
            }
            (ErrorKind::Transient, Retry::Transient) => Error::Transient(msg),
            (_, retry) => Error::Plugin {
                plugin: plugin.to_owned(),
                message: self.message,
                retry,
                diagnostics: self.diagnostics,
            },
        }
    }

    /// The error as one diagnostic (for `validate`, which returns
    /// diagnostics, not errors).
    pub fn to_diagnostic(&self, plugin: &str) -> Diagnostic {
        Diagnostic::new(
            Severity::Error,
            format!("plugin {plugin}: {}", self.message),
        )
    }
}

/// One line from a plugin to the host: a result, an error, or a
/// notification about a running call. Exactly one of `result`, `error`,
/// `progress` and `message` is present ([`Reply::body`] checks it).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Reply {
    /// The id of the request this line is about.
    pub id: u64,
    /// The call succeeded with this value (may be `null`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub result: Option<serde_json::Value>,
    /// The call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Progress of the running call (a notification, not an answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// A human-readable message about the running call (a notification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

/// What a [`Reply`] says, once checked.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplyBody {
    /// The call succeeded.
    Result(serde_json::Value),
    /// The call failed.
    Error(ErrorBody),
    /// Progress of a running call.
    Progress(Progress),
    /// A message about a running call.
    Message(String),
}

impl ReplyBody {
    /// Whether this ends the call it belongs to.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Result(_) | Self::Error(_))
    }
}

impl Reply {
    /// A successful answer.
    pub fn ok(id: u64, value: serde_json::Value) -> Self {
        Self {
            id,
            result: Some(value),
            ..Self::default()
        }
    }

    /// A failed answer.
    pub fn err(id: u64, error: ErrorBody) -> Self {
        Self {
            id,
            error: Some(error),
            ..Self::default()
        }
    }

    /// A progress notification.
    pub fn progress(id: u64, done: u64, total: Option<u64>) -> Self {
        Self {
            id,
            progress: Some(Progress { done, total }),
            ..Self::default()
        }
    }

    /// A message notification.
    pub fn message(id: u64, text: impl Into<String>) -> Self {
        Self {
            id,
            message: Some(text.into()),
            ..Self::default()
        }
    }

    /// The one thing this reply carries.
    ///
    /// # Errors
    /// When it carries none or several of `result`, `error`, `progress`,
    /// `message`.
    pub fn body(self) -> Result<ReplyBody, String> {
        match (self.result, self.error, self.progress, self.message) {
            (Some(v), None, None, None) => Ok(ReplyBody::Result(v)),
            (None, Some(e), None, None) => Ok(ReplyBody::Error(e)),
            (None, None, Some(p), None) => Ok(ReplyBody::Progress(p)),
            (None, None, None, Some(m)) => Ok(ReplyBody::Message(m)),
            _ => Err(format!(
                "reply to request {} must have exactly one of `result`, `error`, `progress`, `message`",
                self.id
            )),
        }
    }
}

/// Decodes one line a plugin sent (the host's side of the wire): the id of
/// the request it is about and the one thing it carries. Pure: the host
/// reads the line with bounded framing ([`crate::wire::read_frame`]) and
/// routes the result.
///
/// # Errors
/// A sentence saying what is wrong: not JSON, not a [`Reply`], or not
/// exactly one of `result`, `error`, `progress`, `message`.
pub fn decode_reply(line: &[u8]) -> Result<(u64, ReplyBody), String> {
    let reply = serde_json::from_slice::<Reply>(line).map_err(|e| e.to_string())?;
    let id = reply.id;
    reply.body().map(|b| (id, b))
}

/// Decodes one line the host sent (a plugin's side of the wire).
///
/// # Errors
/// When the line is not a [`Request`]: the id it carries, if one can be
/// found (so that the answer reaches the waiting call; 0 otherwise), and a
/// sentence saying what is wrong.
pub fn decode_request(line: &[u8]) -> Result<Request, (u64, String)> {
    serde_json::from_slice::<Request>(line).map_err(|e| {
        let id = serde_json::from_slice::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
            .unwrap_or(0);
        (id, format!("malformed request: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn versions_follow_the_caret_rule_both_ways() {
        assert!(v("1.0.0").is_compatible(&v("1.4.2")));
        assert!(v("1.4.2").is_compatible(&v("1.0.0")));
        assert!(!v("1.9.9").is_compatible(&v("2.0.0")));
        assert!(v("0.3.1").is_compatible(&v("0.3.0")));
        assert!(!v("0.3.1").is_compatible(&v("0.4.0")));
        assert!(!v("0.0.1").is_compatible(&v("0.0.2")));
        assert!(v("0.0.1").is_compatible(&v("0.0.1")));
        assert_eq!(v("1.2.3-rc.1+x").to_string(), "1.2.3");
        assert!(Version::parse("1.2").is_err());
        assert!(Version::parse("one.2.3").is_err());
    }

    #[test]
    fn hello_checks_name_and_version() {
        let host = Hello::current(&[FEATURE_PROGRESS]);
        assert!(host.check_peer(&Hello::current(&[])).is_ok());
        let mut other = Hello::current(&[]);
        other.version = v("2.0.0");
        let e = host.check_peer(&other).unwrap_err();
        assert!(e.contains("2.0.0") && e.contains("1.0.0"), "{e}");
        other.protocol = "something-else".into();
        assert!(
            host.check_peer(&other)
                .unwrap_err()
                .contains("something-else")
        );
        assert!(host.has("progress") && !host.has("cancel"));
    }

    #[test]
    fn wire_forms_match_the_protocol_document() {
        let r = Request {
            id: 1,
            method: method::HELLO.into(),
            params: serde_json::to_value(Hello::current(&["progress", "cancel"])).unwrap(),
        };
        // Key order is free in JSON (and `params` is a map, so sorted).
        let doc: serde_json::Value = serde_json::from_str(
            r#"{"id":1,"method":"hello","params":{"protocol":"fluidcloud-migrator","version":"1.0.0","features":["progress","cancel"]}}"#,
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&r).unwrap(), doc);
        assert_eq!(serde_json::from_value::<Request>(doc).unwrap(), r);
        let d: Request = serde_json::from_str(r#"{"id":2,"method":"describe"}"#).unwrap();
        assert!(d.params.is_null());
        assert_eq!(
            serde_json::to_string(&Reply::progress(4, 10, Some(100))).unwrap(),
            r#"{"id":4,"progress":{"done":10,"total":100}}"#
        );
        let null: Reply = serde_json::from_str(r#"{"id":5,"result":null}"#).unwrap();
        assert_eq!(
            null.body().unwrap(),
            ReplyBody::Result(serde_json::Value::Null)
        );
        let two: Reply = serde_json::from_str(r#"{"id":5,"result":1,"message":"x"}"#).unwrap();
        assert!(two.body().unwrap_err().contains("exactly one"));
        let none: Reply = serde_json::from_str(r#"{"id":5}"#).unwrap();
        assert!(none.body().is_err());
    }

    #[test]
    fn errors_keep_kind_retry_and_diagnostics_across_the_wire() {
        let e = Error::Invalid(vec![
            Diagnostic::error("needs `to`")
                .in_file("services/shop.toml")
                .at_key("params.to"),
        ]);
        let body = ErrorBody::from_error(&e);
        let line = serde_json::to_string(&body).unwrap();
        assert_eq!(
            line,
            r#"{"kind":"invalid","message":"services/shop.toml: key `params.to`: needs `to`","retry":{"class":"never"},"diagnostics":[{"severity":"error","summary":"needs `to`","file":"services/shop.toml","key":"params.to"}]}"#
        );
        let back: ErrorBody = serde_json::from_str(&line).unwrap();
        assert!(matches!(back.into_error("p"), Error::Invalid(d) if d.len() == 1));

        let t = ErrorBody::from_error(&Error::Transient("busy".into()));
        let e = t.into_error("dns");
        assert_eq!(e.retry(), Retry::Transient);
        assert_eq!(e.to_string(), "transient failure: plugin dns: busy");

        let after: ErrorBody = serde_json::from_str(
            r#"{"kind":"transient","message":"rate limited","retry":{"class":"after","after_ms":2000}}"#,
        )
        .unwrap();
        let e = after.into_error("dns");
        assert_eq!(
            e.retry(),
            Retry::After(std::time::Duration::from_millis(2000))
        );
        let unknown: ErrorBody =
            serde_json::from_str(r#"{"kind":"brand-new-kind","message":"m"}"#).unwrap();
        assert_eq!(unknown.kind, ErrorKind::Internal);
        assert_eq!(unknown.retry, Retry::Never);
        assert!(matches!(
            ErrorBody::new(ErrorKind::Precondition, "exists").into_error("x"),
            Error::Precondition(m) if m == "plugin x: exists"
        ));
    }

    #[test]
    fn descriptors_flatten_and_secrets_stay_out_of_debug() {
        let d: PluginDescriptor = serde_json::from_str(
            r#"{"name":"n","version":"1.0.0","summary":"s","consumes":[{"type":"volume"}],"produces":[],"secrets":["DB_PASSWORD"]}"#,
        )
        .unwrap();
        assert_eq!(d.migrator.name, "n");
        assert_eq!(d.secrets, ["DB_PASSWORD"]);
        let call = StepCall {
            request: StepRequest {
                step_id: "s".into(),
                params: serde_json::Value::Null,
                inputs: BTreeMap::new(),
            },
            secrets: [("DB_PASSWORD".to_owned(), "hunter2".to_owned())].into(),
        };
        let dbg = format!("{call:?}");
        assert!(
            dbg.contains("DB_PASSWORD") && !dbg.contains("hunter2"),
            "{dbg}"
        );
    }
}
