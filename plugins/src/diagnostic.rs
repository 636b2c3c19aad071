//! Structured diagnostics: what is wrong, how badly, and where.
//!
//! A diagnostic points at the place a person must edit: a file, a line, and
//! a key path inside that file (`sites.dc-paris.kind`). Migrators return them
//! from `validate`, the plugin protocol carries them verbatim, and the CLI
//! prints them as `file:line: key: summary`.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How serious a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; nothing is wrong.
    Note,
    /// Works, but probably not what the user wants.
    Warning,
    /// Stops the operation.
    Error,
}

/// One finding about user input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Diagnostic {
    /// How serious it is.
    pub severity: Severity,
    /// One line saying what is wrong.
    pub summary: String,
    /// More explanation, or what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The file concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// 1-based line in `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// Key path inside the file or manifest, e.g. `sites.dc-paris.kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Diagnostic {
    /// A diagnostic with only a severity and a summary.
    pub fn new(severity: Severity, summary: impl Into<String>) -> Self {
        Self {
            severity,
            summary: summary.into(),
            detail: None,
            file: None,
            line: None,
            key: None,
        }
    }

    /// An error-severity diagnostic.
    pub fn error(summary: impl Into<String>) -> Self {
        Self::new(Severity::Error, summary)
    }

    /// Attaches the file concerned.
    #[must_use]
    pub fn in_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// Attaches a 1-based line number.
    #[must_use]
    pub fn at_line(mut self, line: u32) -> Self {
        self.line = Some(line);
        self
    }

    /// Attaches the key path.
    #[must_use]
    pub fn at_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Attaches an explanation.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// True for error severity.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            f.write_str(": ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.summary)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_puts_location_first() {
        let d = Diagnostic::error("unknown field `colour`")
            .in_file("fluidcloud.toml")
            .at_line(7)
            .at_key("sites.dc-paris.colour");
        assert_eq!(
            d.to_string(),
            "fluidcloud.toml:7: key `sites.dc-paris.colour`: unknown field `colour`"
        );
        assert!(d.is_error());
        assert!(Severity::Note < Severity::Error);
    }
}
