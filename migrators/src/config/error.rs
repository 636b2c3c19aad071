//! Errors of configuration adaptation.
//!
//! Every variant names the file (as the caller named it) and, where there is
//! one, the line and key path, so the message alone tells a person where to
//! look. Only I/O errors of a passing kind are worth a retry: everything
//! else is about the content or the rules and fails the same way again.

use fluidcloud_plugins::{Diagnostic, Retry, Retryable};

use super::Format;

/// What went wrong while adapting a configuration file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input does not parse in its format.
    #[error("{file}{}: invalid {format}: {message}", at_line(*line))]
    Parse {
        /// The file, as the caller named it.
        file: String,
        /// Its format.
        format: Format,
        /// 1-based line of the problem, when known.
        line: Option<u32>,
        /// What the parser said.
        message: String,
    },
    /// An explicit rule names a key path the file does not have.
    #[error("{file}: key `{key}` not found (an explicit rule sets or replaces it)")]
    KeyNotFound {
        /// The file.
        file: String,
        /// The key path of the rule.
        key: String,
    },
    /// An explicit pattern rule matches no line of the file.
    #[error("{file}: pattern `{pattern}` matches no line (an explicit rule rewrites it)")]
    PatternNotFound {
        /// The file.
        file: String,
        /// The pattern of the rule.
        pattern: String,
    },
    /// A `replace` rule's `from` text is not in the key's value (and its
    /// `to` text is not either, so the rule was not applied before).
    #[error("{file}{}: key `{key}`: value `{value}` does not contain `{from}`", at_line(Some(*line)))]
    ReplaceNotFound {
        /// The file.
        file: String,
        /// The key path of the rule.
        key: String,
        /// 1-based line of the value.
        line: u32,
        /// The value found.
        value: String,
        /// The text the rule looks for.
        from: String,
    },
    /// A value needs a change this module cannot write without risking the
    /// rest of the file (a multi-line plain YAML scalar, an INI value with
    /// both quote characters, ...).
    #[error("{file}{}: key `{key}`: cannot rewrite this value: {reason}", at_line(Some(*line)))]
    NotEditable {
        /// The file.
        file: String,
        /// The key path.
        key: String,
        /// 1-based line of the value.
        line: u32,
        /// Why, and what to do instead.
        reason: String,
    },
    /// The adapted text would not parse, or would not read back the values
    /// written; nothing is written.
    #[error("{file}{}: the adapted file would be broken: {message}", at_line(*line))]
    Broken {
        /// The file.
        file: String,
        /// 1-based line of the problem, when known.
        line: Option<u32>,
        /// What failed.
        message: String,
    },
    /// An endpoint map or rule is malformed.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// What is invalid, e.g. `endpoint map entry 2` or `rule 1`.
        what: String,
        /// Why.
        message: String,
    },
    /// An I/O error on a named path.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn at_line(line: Option<u32>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

impl Error {
    /// An I/O error with a context naming what was being done to which path.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The error as a diagnostic pointing at the file, line and key.
    pub fn diagnostic(&self) -> Diagnostic {
        let d = Diagnostic::error(self.summary());
        match self {
            Self::Parse { file, line, .. } | Self::Broken { file, line, .. } => {
                let d = d.in_file(file);
                match line {
                    Some(l) => d.at_line(*l),
                    None => d,
                }
            }
            Self::KeyNotFound { file, key } => d.in_file(file).at_key(key.clone()),
            Self::PatternNotFound { file, .. } => d.in_file(file),
            Self::ReplaceNotFound {
                file, key, line, ..
            }
            | Self::NotEditable {
                file, key, line, ..
            } => d.in_file(file).at_line(*line).at_key(key.clone()),
            Self::Invalid { .. } | Self::Io { .. } => d,
        }
    }

    /// The message without the location the diagnostic carries separately.
    fn summary(&self) -> String {
        match self {
            Self::Parse {
                format, message, ..
            } => format!("invalid {format}: {message}"),
            Self::KeyNotFound { .. } => {
                "key not found (an explicit rule sets or replaces it)".to_owned()
            }
            Self::PatternNotFound { pattern, .. } => {
                format!("pattern `{pattern}` matches no line (an explicit rule rewrites it)")
            }
            Self::ReplaceNotFound { value, from, .. } => {
                format!("value `{value}` does not contain `{from}`")
            }
            Self::NotEditable { reason, .. } => format!("cannot rewrite this value: {reason}"),
            Self::Broken { message, .. } => format!("the adapted file would be broken: {message}"),
            Self::Invalid { .. } | Self::Io { .. } => self.to_string(),
        }
    }
}

impl Retryable for Error {
    fn retry(&self) -> Retry {
        match self {
            Self::Io { source, .. } => fluidcloud_plugins::error::io_retry(source.kind()),
            _ => Retry::Never,
        }
    }
}

impl From<Error> for fluidcloud_plugins::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { context, source } => Self::Io { context, source },
            other => Self::Invalid(vec![other.diagnostic()]),
        }
    }
}

/// Result alias of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;
