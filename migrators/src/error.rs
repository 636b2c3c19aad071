//! The error type of this crate and its mapping into the SDK's error.
//!
//! Every variant names the file or field it concerns, so the message alone
//! tells a person where to look. Retry classification follows the variant:
//! only I/O errors of a passing kind are worth another attempt.

use std::path::PathBuf;

use fluidcloud_plugins::{Retry, Retryable};

/// Errors of the image tooling and migrators.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An image's on-disk data is malformed at a known place.
    #[error("corrupt {what} at offset {offset}")]
    Corrupt {
        /// What is corrupt, naming the file, e.g. `qcow2 header of web.qcow2`.
        what: String,
        /// Byte offset of the offending field (or the file length when the
        /// data ends too early).
        offset: u64,
    },
    /// The image uses a feature this crate does not handle (an encrypted
    /// qcow2, unknown incompatible feature bits, ...).
    #[error("{what} is not supported")]
    Unsupported {
        /// The feature, e.g. `encrypted qcow2 (crypt_method 2) in web.qcow2`.
        what: String,
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
    /// An image names a backing file or extent outside what it may read:
    /// an absolute path or a `..` escape out of its directory, a symlink
    /// leading out, or a device or other non-regular file. Guest-written
    /// bytes must never choose which host file is read.
    #[error("image {image} names {what} `{path}`: {why}")]
    Refused {
        /// The image whose header or descriptor names the path.
        image: PathBuf,
        /// `backing file` or `extent`.
        what: &'static str,
        /// The path as the image names it.
        path: String,
        /// Why it is refused, and how to allow it where that is meant.
        why: String,
    },
    /// The caller passed a value the operation cannot accept (a cluster size
    /// that is not a power of two, a write out of order or past the end...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A bucket location URL could not be understood.
    #[error("bad bucket location `{url}`: {reason}")]
    BadLocation {
        /// The URL as given (it carries no secrets by design).
        url: String,
        /// What is wrong with it and what the format is.
        reason: String,
    },
    /// A credential is named by an environment variable that is not set.
    #[error("environment variable {variable} is not set (it holds the {what} of {url})")]
    MissingCredential {
        /// The variable's name.
        variable: String,
        /// Which credential it was to hold, e.g. `secret access key`.
        what: String,
        /// The bucket location that names it.
        url: String,
    },
    /// An object store operation failed (through the `object_store` crate).
    #[error("{context}: {source}")]
    ObjectStore {
        /// What was being done, naming the bucket and object.
        context: String,
        /// The underlying error.
        #[source]
        source: object_store::Error,
    },
    /// An S3 request this crate signs itself (bucket creation, server-side
    /// copy, multipart clean-up) failed.
    #[error("S3 {operation} on {resource} failed: {}{message}", status.map(|s| format!("HTTP {s} ")).unwrap_or_default())]
    S3 {
        /// The operation, e.g. `CopyObject`.
        operation: String,
        /// The bucket or object, as `endpoint/bucket/key`.
        resource: String,
        /// The HTTP status, when a response arrived.
        status: Option<u16>,
        /// The S3 error code and message, or the transport error.
        message: String,
    },
    /// Some objects of a bucket copy failed; the others were copied.
    #[error("{failed} of {total} objects failed to copy: {first}")]
    ObjectsFailed {
        /// How many objects failed.
        failed: usize,
        /// How many objects the source listed.
        total: usize,
        /// The first few failures as `key: reason`, `; `-separated.
        first: String,
        /// Whether every failure was of a passing kind.
        transient: bool,
    },
}

impl Error {
    /// An I/O error with a context naming what was being done to which path.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Whether an `object_store` error may pass: connection failures, timeouts
/// and 5xx/429 answers (after the store's own retries) are transient.
pub fn object_store_retry(e: &object_store::Error) -> Retry {
    use object_store::Error as E;
    match e {
        E::NotFound { .. }
        | E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::AlreadyExists { .. }
        | E::Precondition { .. }
        | E::NotModified { .. }
        | E::NotImplemented { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::UnknownConfigurationKey { .. } => Retry::Never,
        E::JoinError { .. } => Retry::Transient,
        other => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(other);
            while let Some(c) = cause {
                if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
                    use object_store::client::HttpErrorKind as K;
                    if matches!(
                        h.kind(),
                        K::Connect | K::Request | K::Timeout | K::Interrupted
                    ) {
                        return Retry::Transient;
                    }
                }
                if let Some(io) = c.downcast_ref::<std::io::Error>()
                    && fluidcloud_plugins::error::io_retry(io.kind()) == Retry::Transient
                {
                    return Retry::Transient;
                }
                cause = c.source();
            }
            // The store's retry error carries the status only in its text.
            let text = other.to_string();
            if text.contains("status code: 5") || text.contains("status code: 429") {
                Retry::Transient
            } else {
                Retry::Never
            }
        }
    }
}

impl Retryable for Error {
    fn retry(&self) -> Retry {
        match self {
            Self::Io { source, .. } => fluidcloud_plugins::error::io_retry(source.kind()),
            Self::ObjectStore { source, .. } => object_store_retry(source),
            Self::S3 { status, .. } => match status {
                None => Retry::Transient,
                Some(s) if *s >= 500 || *s == 429 || *s == 408 => Retry::Transient,
                Some(_) => Retry::Never,
            },
            Self::ObjectsFailed { transient, .. } => {
                if *transient {
                    Retry::Transient
                } else {
                    Retry::Never
                }
            }
            Self::Corrupt { .. }
            | Self::Unsupported { .. }
            | Self::InvalidArgument(_)
            | Self::Refused { .. }
            | Self::BadLocation { .. }
            | Self::MissingCredential { .. } => Retry::Never,
        }
    }
}

impl From<Error> for fluidcloud_plugins::Error {
    fn from(e: Error) -> Self {
        let retry = e.retry();
        let text = e.to_string();
        match e {
            Error::BadLocation { .. } | Error::MissingCredential { .. } => Self::Precondition(text),
            Error::ObjectStore { context, source } => match source {
                object_store::Error::NotFound { .. } => Self::NotFound {
                    what: context,
                    site: None,
                },
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => Self::PermissionDenied {
                    what: text,
                    site: None,
                },
                _ if retry == Retry::Transient => Self::Transient(text),
                _ => Self::io(text, std::io::Error::other(source)),
            },
            Error::S3 { status, .. } => match status {
                Some(403) => Self::PermissionDenied {
                    what: text,
                    site: None,
                },
                Some(404) => Self::NotFound {
                    what: text,
                    site: None,
                },
                _ if retry == Retry::Transient => Self::Transient(text),
                _ => Self::io(text, std::io::Error::other("S3 request failed")),
            },
            Error::ObjectsFailed { transient, .. } => {
                if transient {
                    Self::Transient(text)
                } else {
                    Self::io(text, std::io::Error::other("some objects failed"))
                }
            }
            Error::Corrupt { what, offset } => Self::Corrupt { what, offset },
            Error::Io { context, source } => Self::Io { context, source },
            Error::Unsupported { what } => Self::NotSupported {
                operation: what,
                site: None,
            },
            Error::InvalidArgument(msg) => Self::Precondition(msg),
            Error::Refused { .. } => Self::PermissionDenied {
                what: text,
                site: None,
            },
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::error::Error as _;
    use std::io::ErrorKind;

    use super::*;

    #[test]
    fn messages_name_the_place() {
        let e = Error::Corrupt {
            what: "qcow2 header of a.qcow2".into(),
            offset: 20,
        };
        assert_eq!(
            e.to_string(),
            "corrupt qcow2 header of a.qcow2 at offset 20"
        );
        let e = Error::Unsupported {
            what: "encrypted qcow2".into(),
        };
        assert_eq!(e.to_string(), "encrypted qcow2 is not supported");
        let e = Error::InvalidArgument("cluster size 1000 is not a power of two".into());
        assert_eq!(
            e.to_string(),
            "invalid argument: cluster size 1000 is not a power of two"
        );
        let e = Error::io("reading /x.img", ErrorKind::NotFound.into());
        assert_eq!(e.to_string(), "reading /x.img");
        assert!(e.source().is_some());
    }

    #[test]
    fn only_passing_io_errors_are_retried() {
        let reset = Error::io("read", ErrorKind::ConnectionReset.into());
        assert_eq!(reset.retry(), Retry::Transient);
        let missing = Error::io("read", ErrorKind::NotFound.into());
        assert_eq!(missing.retry(), Retry::Never);
        let corrupt = Error::Corrupt {
            what: "x".into(),
            offset: 0,
        };
        assert_eq!(corrupt.retry(), Retry::Never);
        assert_eq!(
            Error::Unsupported { what: "x".into() }.retry(),
            Retry::Never
        );
        assert_eq!(Error::InvalidArgument("x".into()).retry(), Retry::Never);
    }

    #[test]
    fn converts_into_the_sdk_error() {
        use fluidcloud_plugins::Error as Sdk;
        let e: Sdk = Error::Corrupt {
            what: "w".into(),
            offset: 7,
        }
        .into();
        assert!(matches!(e, Sdk::Corrupt { ref what, offset: 7 } if what == "w"));
        let e: Sdk = Error::io("ctx", ErrorKind::TimedOut.into()).into();
        assert!(matches!(e, Sdk::Io { ref context, .. } if context == "ctx"));
        assert_eq!(e.retry(), Retry::Transient);
        let e: Sdk = Error::Unsupported {
            what: "encrypted qcow2".into(),
        }
        .into();
        assert!(matches!(
            e,
            Sdk::NotSupported { ref operation, site: None } if operation == "encrypted qcow2"
        ));
        let e: Sdk = Error::InvalidArgument("bad".into()).into();
        assert!(matches!(e, Sdk::Precondition(ref m) if m == "bad"));
    }
}
