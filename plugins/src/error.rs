//! The SDK's error type and the retry classification every crate shares.
//!
//! Retry decisions travel with the error: the engine never guesses from a
//! message whether a failure is worth retrying, it asks [`Retryable::retry`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::diagnostic::Diagnostic;

/// Whether an operation that failed with an error may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "class", content = "after_ms")]
pub enum Retry {
    /// A passing fault (network blip, busy server): retry with backoff.
    Transient,
    /// The remote side asked to wait at least this long before retrying.
    #[serde(with = "duration_ms")]
    After(Duration),
    /// Retrying cannot help (bad input, missing permission, corrupt data).
    Never,
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Implemented by every crate's error type so the viaduct can ask whether a
/// failed step is worth another attempt.
pub trait Retryable {
    /// The retry classification of this error.
    fn retry(&self) -> Retry;
}

/// Errors of the vocabulary and of migrators written against the SDK.
///
/// Every variant names what it concerns (a site, a resource, a manifest path)
/// so the message alone tells a person where to look.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A site, resource or file that was asked for does not exist.
    #[error("{what} not found{}", at_site(site))]
    NotFound {
        /// What was looked for, e.g. `instance "web"`.
        what: String,
        /// The site it was looked for on, when there is one.
        site: Option<String>,
    },
    /// The operation is not offered by this site or migrator.
    #[error("{operation} is not supported{}", at_site(site))]
    NotSupported {
        /// The operation, e.g. `compute`.
        operation: String,
        /// The site lacking it.
        site: Option<String>,
    },
    /// Access was refused.
    #[error("permission denied: {what}{}", at_site(site))]
    PermissionDenied {
        /// What could not be accessed.
        what: String,
        /// The site refusing it.
        site: Option<String>,
    },
    /// A condition the operation needs does not hold (the target already
    /// exists, the instance is still running, ...).
    #[error("precondition failed: {0}")]
    Precondition(String),
    /// Data is malformed at a known place.
    #[error("corrupt {what} at offset {offset}")]
    Corrupt {
        /// What is corrupt, e.g. `qcow2 L1 table of images/web.qcow2`.
        what: String,
        /// Byte offset of the problem.
        offset: u64,
    },
    /// Input failed validation; the diagnostics say where and why.
    #[error("{}", summarize(.0))]
    Invalid(Vec<Diagnostic>),
    /// A passing fault; retry may help.
    #[error("transient failure: {0}")]
    Transient(String),
    /// A plugin migrator failed, misbehaved (crashed, hung, sent a malformed
    /// or oversized message) or reported an error that has no closer variant.
    #[error("plugin {plugin}: {message}")]
    Plugin {
        /// The plugin's name (its migrator name, or its executable).
        plugin: String,
        /// What went wrong, for a person.
        message: String,
        /// Whether trying again may help.
        retry: Retry,
        /// Structured findings the plugin attached.
        diagnostics: Vec<Diagnostic>,
    },
    /// An I/O error on a named path.
    #[error("{context}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn at_site(site: &Option<String>) -> String {
    site.as_deref()
        .map(|s| format!(" on site {s}"))
        .unwrap_or_default()
}

fn summarize(diags: &[Diagnostic]) -> String {
    match diags {
        [] => "invalid input".to_owned(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    }
}

impl Error {
    /// An I/O error with a context naming what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Whether an I/O error kind is worth retrying.
pub fn io_retry(kind: std::io::ErrorKind) -> Retry {
    use std::io::ErrorKind as K;
    match kind {
        K::Interrupted
        | K::WouldBlock
        | K::TimedOut
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::ConnectionRefused
        | K::BrokenPipe
        | K::UnexpectedEof => Retry::Transient,
        _ => Retry::Never,
    }
}

impl Retryable for Error {
    fn retry(&self) -> Retry {
        match self {
            Self::Transient(_) => Retry::Transient,
            Self::Io { source, .. } => io_retry(source.kind()),
            Self::Plugin { retry, .. } => *retry,
            Self::NotFound { .. }
            | Self::NotSupported { .. }
            | Self::PermissionDenied { .. }
            | Self::Precondition(_)
            | Self::Corrupt { .. }
            | Self::Invalid(_) => Retry::Never,
        }
    }
}

/// Result alias of the SDK.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::Severity;

    #[test]
    fn classification_follows_the_variant() {
        assert_eq!(Error::Transient("x".into()).retry(), Retry::Transient);
        assert_eq!(Error::Precondition("x".into()).retry(), Retry::Never);
        let reset = Error::io("read", std::io::ErrorKind::ConnectionReset.into());
        assert_eq!(reset.retry(), Retry::Transient);
        let missing = Error::io("read", std::io::ErrorKind::NotFound.into());
        assert_eq!(missing.retry(), Retry::Never);
    }

    #[test]
    fn retry_round_trips_through_json() {
        let r = Retry::After(Duration::from_millis(1500));
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"class":"after","after_ms":1500}"#);
        assert_eq!(serde_json::from_str::<Retry>(&s).unwrap(), r);
        let t = serde_json::to_string(&Retry::Transient).unwrap();
        assert_eq!(t, r#"{"class":"transient"}"#);
    }

    #[test]
    fn messages_name_the_site_and_count_diagnostics() {
        let e = Error::NotSupported {
            operation: "compute".into(),
            site: Some("edge-rennes".into()),
        };
        assert_eq!(
            e.to_string(),
            "compute is not supported on site edge-rennes"
        );
        let d = |s: &str| Diagnostic::new(Severity::Error, s);
        let e = Error::Invalid(vec![d("first"), d("second"), d("third")]);
        assert_eq!(e.to_string(), "first (and 2 more)");
    }
}
