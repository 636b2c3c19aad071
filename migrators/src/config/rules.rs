//! Explicit rewrite rules: what the endpoint map cannot express.
//!
//! A rule names its file and either a key path (structured formats) or an
//! anchored line pattern (any format, meant for plain text). A rule that
//! finds nothing to act on is an error, never a silent no-op: a typo in a
//! key path must not let a relocation go ahead with the old value.

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// One explicit rule. JSON shapes:
///
/// - `{"file": "app.yaml", "key": "database.host", "set": "db.fra.internal"}`
///   (`set` may be a string, number or boolean and is written as that type)
/// - `{"file": "app.yaml", "key": "database.url", "replace": {"from": "paris", "to": "fra"}}`
/// - `{"file": "nginx.conf", "pattern": "\\s*listen 10\\.10\\.0\\.10:80;", "replacement": "    listen 10.30.0.10:80;"}`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RuleRepr", into = "RuleRepr")]
pub struct Rule {
    /// The file it applies to: a path equal to the adapted file's, a suffix
    /// of it after a `/` (`shop/app.yaml`, `app.yaml`), or `*` for every file.
    pub file: String,
    /// What it does.
    pub action: Action,
}

/// What a [`Rule`] does.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Action {
    /// Sets the scalar at a key path (`database.host`, `servers[1].url`,
    /// `[0].x` in a multi-document YAML file, `section.key` in INI, `NAME`
    /// in `.env`).
    Set {
        /// The key path.
        key: String,
        /// The new value: a JSON string, number or boolean.
        value: serde_json::Value,
    },
    /// Replaces every occurrence of `from` by `to` in the value at `key`.
    /// Not finding `from` is an error unless the value already holds `to`.
    Replace {
        /// The key path.
        key: String,
        /// Text to find.
        from: String,
        /// Its replacement.
        to: String,
    },
    /// Rewrites every line that `pattern` matches as a whole (the pattern
    /// is anchored at both ends of the line) by `replacement`, where `$1`
    /// or `${name}` insert capture groups.
    Pattern {
        /// A regular expression (Rust `regex` syntax).
        pattern: String,
        /// The new line.
        replacement: String,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleRepr {
    file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    set: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replace: Option<ReplaceRepr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replacement: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplaceRepr {
    from: String,
    to: String,
}

impl TryFrom<RuleRepr> for Rule {
    type Error = String;

    fn try_from(r: RuleRepr) -> std::result::Result<Self, String> {
        let action = match (r.key, r.set, r.replace, r.pattern, r.replacement) {
            (Some(key), Some(value), None, None, None) => {
                if !(value.is_string() || value.is_number() || value.is_boolean()) {
                    return Err("`set` must be a string, number or boolean".into());
                }
                Action::Set { key, value }
            }
            (Some(key), None, Some(ReplaceRepr { from, to }), None, None) => {
                Action::Replace { key, from, to }
            }
            (None, None, None, Some(pattern), Some(replacement)) => Action::Pattern {
                pattern,
                replacement,
            },
            _ => {
                return Err(
                    "a rule has `file` and either `key` with `set` or `replace` \
                     ({\"from\", \"to\"}), or `pattern` with `replacement`"
                        .into(),
                );
            }
        };
        let rule = Rule {
            file: r.file,
            action,
        };
        rule.check().map_err(|e| e.to_string())?;
        Ok(rule)
    }
}

impl From<Rule> for RuleRepr {
    fn from(r: Rule) -> Self {
        let mut repr = RuleRepr {
            file: r.file,
            key: None,
            set: None,
            replace: None,
            pattern: None,
            replacement: None,
        };
        match r.action {
            Action::Set { key, value } => {
                repr.key = Some(key);
                repr.set = Some(value);
            }
            Action::Replace { key, from, to } => {
                repr.key = Some(key);
                repr.replace = Some(ReplaceRepr { from, to });
            }
            Action::Pattern {
                pattern,
                replacement,
            } => {
                repr.pattern = Some(pattern);
                repr.replacement = Some(replacement);
            }
        }
        repr
    }
}

impl Rule {
    /// A `set` rule.
    pub fn set(
        file: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        Self {
            file: file.into(),
            action: Action::Set {
                key: key.into(),
                value: value.into(),
            },
        }
    }

    /// A `replace` rule.
    pub fn replace(
        file: impl Into<String>,
        key: impl Into<String>,
        from: impl Into<String>,
        to: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            action: Action::Replace {
                key: key.into(),
                from: from.into(),
                to: to.into(),
            },
        }
    }

    /// A `pattern` rule.
    pub fn pattern(
        file: impl Into<String>,
        pattern: impl Into<String>,
        replacement: impl Into<String>,
    ) -> Self {
        Self {
            file: file.into(),
            action: Action::Pattern {
                pattern: pattern.into(),
                replacement: replacement.into(),
            },
        }
    }

    /// Whether the rule applies to the file named `path`.
    pub fn applies_to(&self, path: &str) -> bool {
        let f = self.file.as_str();
        f == "*"
            || f == path
            || (path.len() > f.len()
                && path.ends_with(f)
                && path.as_bytes()[path.len() - f.len() - 1] == b'/')
    }

    /// The key path the rule acts on, if it is a key rule.
    pub fn key(&self) -> Option<&str> {
        match &self.action {
            Action::Set { key, .. } | Action::Replace { key, .. } => Some(key),
            Action::Pattern { .. } => None,
        }
    }

    /// Checks the rule without applying it: non-empty key, `from`,
    /// pattern that compiles, no line breaks in new text.
    ///
    /// # Errors
    /// [`Error::Invalid`] saying what is wrong.
    pub fn check(&self) -> Result<()> {
        let bad = |message: &str| Error::Invalid {
            what: format!("rule for `{}`", self.file),
            message: message.to_owned(),
        };
        if self.file.is_empty() {
            return Err(bad("`file` is empty"));
        }
        match &self.action {
            Action::Set { key, value } => {
                if key.is_empty() {
                    return Err(bad("`key` is empty"));
                }
                if value.as_str().is_some_and(|s| s.contains(['\n', '\r'])) {
                    return Err(bad("`set` contains a line break"));
                }
            }
            Action::Replace { key, from, to } => {
                if key.is_empty() || from.is_empty() {
                    return Err(bad("`key` and `replace.from` must not be empty"));
                }
                if to.contains(['\n', '\r']) {
                    return Err(bad("`replace.to` contains a line break"));
                }
            }
            Action::Pattern {
                pattern,
                replacement,
            } => {
                compile(pattern).map_err(|e| bad(&e))?;
                if replacement.contains(['\n', '\r']) {
                    return Err(bad("`replacement` contains a line break"));
                }
            }
        }
        Ok(())
    }
}

/// Compiles a pattern anchored to a whole line.
pub(crate) fn compile(pattern: &str) -> std::result::Result<regex::Regex, String> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("pattern `{pattern}` does not compile: {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_shapes() {
        let rules: Vec<Rule> = serde_json::from_value(serde_json::json!([
            {"file": "app.yaml", "key": "database.port", "set": 5433},
            {"file": "app.yaml", "key": "a.b", "replace": {"from": "x", "to": "y"}},
            {"file": "nginx.conf", "pattern": "\\s*listen (\\d+);", "replacement": "listen $1;"}
        ]))
        .unwrap();
        assert!(matches!(&rules[0].action, Action::Set { value, .. } if value == 5433));
        assert_eq!(rules[1].key(), Some("a.b"));
        let back = serde_json::to_value(&rules[2]).unwrap();
        assert_eq!(back["pattern"], "\\s*listen (\\d+);");
        let bad: std::result::Result<Rule, _> =
            serde_json::from_value(serde_json::json!({"file": "a", "key": "k"}));
        assert!(bad.unwrap_err().to_string().contains("either `key`"));
        let bad: std::result::Result<Rule, _> = serde_json::from_value(
            serde_json::json!({"file": "a", "pattern": "(", "replacement": ""}),
        );
        assert!(bad.unwrap_err().to_string().contains("does not compile"));
    }

    #[test]
    fn file_matching_is_by_path_suffix() {
        let r = Rule::set("shop/app.yaml", "k", "v");
        assert!(r.applies_to("/srv/config/shop/app.yaml"));
        assert!(r.applies_to("shop/app.yaml"));
        assert!(!r.applies_to("/srv/config/workshop/app.yaml"));
        assert!(Rule::set("*", "k", "v").applies_to("anything"));
    }
}
