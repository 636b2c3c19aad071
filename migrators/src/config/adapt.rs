//! Applying the endpoint map and the explicit rules to one file's text.
//!
//! The order is: parse the original (so a broken input is reported as
//! such); apply pattern rules line by line; parse again and find every
//! scalar's span; for each scalar decide its new value (a key rule wins
//! over the map, and the map leaves lines rewritten by a pattern alone);
//! splice the new tokens into the text from the end backwards; then parse
//! the result and check that every scalar reads back as intended — the
//! edited ones with their new value, all others unchanged. Only then is
//! the result returned.

use std::collections::BTreeSet;

use super::error::{Error, Result};
use super::leaf::{Leaf, Style, lines_with_offsets};
use super::rules::{Action, Rule, compile};
use super::{EndpointMap, Format, json, lines, toml, yaml};

/// The result of [`adapt`](super::adapt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapted {
    /// The new text of the file.
    pub content: String,
    /// What changed, in file order.
    pub changes: Vec<Change>,
}

/// One changed value or line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    /// Key path (`database.host`) or, in plain text and for pattern rules,
    /// `line N`.
    pub location: String,
    /// 1-based line.
    pub line: u32,
    /// The old value (or line).
    pub old: String,
    /// The new value (or line).
    pub new: String,
}

/// A reference to an old endpoint still present in a file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Leftover {
    /// Key path, or `line N` in plain text.
    pub location: String,
    /// 1-based line.
    pub line: u32,
    /// The old endpoint found (the map entry's `from`, as written).
    pub found: String,
    /// The whole value (or line) it was found in.
    pub value: String,
}

/// What a scalar's new value is.
enum NewValue {
    /// Substitute inside the token: `(old, new)` text pairs applied by
    /// `subst`, keeping the quoting.
    Substitute {
        expected: String,
        inserts: Vec<String>,
        subst: Box<dyn Fn(&str) -> String>,
    },
    /// Write this JSON string, number or boolean.
    Set(serde_json::Value),
}

pub(super) fn leaves(file: &str, text: &str, format: Format) -> Result<Vec<Leaf>> {
    match format {
        Format::Yaml => yaml::leaves(file, text),
        Format::Json => json::leaves(file, text),
        Format::Toml => toml::leaves(file, text),
        Format::Ini => lines::ini_leaves(file, text),
        Format::Env => lines::env_leaves(file, text),
        Format::Text => Ok(Vec::new()),
    }
}

fn broken(file: &str, e: Error) -> Error {
    match e {
        Error::Parse { line, message, .. } => Error::Broken {
            file: file.to_owned(),
            line,
            message,
        },
        other => other,
    }
}

pub(super) fn adapt(
    file: &str,
    content: &str,
    format: Format,
    map: &EndpointMap,
    rules: &[Rule],
) -> Result<Adapted> {
    map.check()?;
    let rules: Vec<&Rule> = rules.iter().filter(|r| r.applies_to(file)).collect();
    for r in &rules {
        r.check()?;
        if format == Format::Text
            && let Some(key) = r.key()
        {
            return Err(Error::Invalid {
                what: format!("rule for `{}`", r.file),
                message: format!(
                    "key `{key}` given for a plain text file; use a pattern rule there"
                ),
            });
        }
    }
    let original_leaves = leaves(file, content, format)?;
    let mut changes = Vec::new();

    // 1. Pattern rules, line by line.
    let (text, pattern_lines) = apply_patterns(file, content, &rules, &mut changes)?;
    let found = if text == content {
        original_leaves
    } else {
        leaves(file, &text, format).map_err(|e| broken(file, e))?
    };

    // 2. Values.
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let mut expected: Vec<Option<String>> = vec![None; found.len()];
    let mut keys_hit: BTreeSet<&str> = BTreeSet::new();
    for (i, leaf) in found.iter().enumerate() {
        let rule = rules
            .iter()
            .rev()
            .find(|r| r.key() == Some(leaf.path.as_str()));
        let new = match rule.map(|r| &r.action) {
            Some(Action::Set { key, value }) => {
                keys_hit.insert(key);
                NewValue::Set(value.clone())
            }
            Some(Action::Replace { key, from, to }) => {
                keys_hit.insert(key);
                if !leaf.value.contains(from.as_str()) {
                    if leaf.value.contains(to.as_str()) {
                        continue;
                    }
                    return Err(Error::ReplaceNotFound {
                        file: file.to_owned(),
                        key: key.clone(),
                        line: leaf.line,
                        value: leaf.value.clone(),
                        from: from.clone(),
                    });
                }
                let (f, t) = (from.clone(), to.clone());
                NewValue::Substitute {
                    expected: leaf.value.replace(from.as_str(), to),
                    inserts: vec![to.clone()],
                    subst: Box::new(move |s: &str| s.replace(&f, &t)),
                }
            }
            _ => {
                if !leaf.style.is_string() || pattern_lines.contains(&leaf.line) {
                    continue;
                }
                let (new, done) = map.apply(&leaf.value);
                if done.is_empty() {
                    continue;
                }
                let m = map.clone();
                NewValue::Substitute {
                    expected: new,
                    inserts: done.into_iter().map(|(_, to)| to).collect(),
                    subst: Box::new(move |s: &str| m.apply(s).0),
                }
            }
        };
        let (token, value) = rewrite(file, &text, format, leaf, &new)?;
        if value == leaf.value && text.get(leaf.span.clone()) == Some(token.as_str()) {
            continue;
        }
        changes.push(Change {
            location: leaf.path.clone(),
            line: leaf.line,
            old: leaf.value.clone(),
            new: value.clone(),
        });
        expected[i] = Some(value);
        edits.push((leaf.span.clone(), token));
    }
    for r in &rules {
        if let Some(key) = r.key()
            && !keys_hit.contains(key)
        {
            return Err(Error::KeyNotFound {
                file: file.to_owned(),
                key: key.to_owned(),
            });
        }
    }

    // 3. Plain text: the map on every line a pattern did not rewrite.
    let mut out = String::with_capacity(text.len());
    if format == Format::Text {
        for (i, (offset, line)) in lines_with_offsets(&text).enumerate() {
            let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
            if pattern_lines.contains(&n) {
                continue;
            }
            let (new, done) = map.apply(line);
            if !done.is_empty() {
                changes.push(Change {
                    location: format!("line {n}"),
                    line: n,
                    old: line.to_owned(),
                    new: new.clone(),
                });
                edits.push((offset..offset + line.len(), new));
            }
        }
    }

    // 4. Splice, back to front.
    edits.sort_by_key(|(span, _)| span.start);
    let mut pos = 0;
    for (span, token) in &edits {
        if span.start < pos {
            return Err(Error::Broken {
                file: file.to_owned(),
                line: Some(super::leaf::line_of(&text, span.start)),
                message: "two edits overlap".into(),
            });
        }
        out.push_str(&text[pos..span.start]);
        out.push_str(token);
        pos = span.end;
    }
    out.push_str(&text[pos..]);
    changes.sort_by_key(|c| c.line);

    // 5. Read back.
    if format != Format::Text && !edits.is_empty() {
        let after = leaves(file, &out, format).map_err(|e| broken(file, e))?;
        let same_shape =
            after.len() == found.len() && after.iter().zip(&found).all(|(a, b)| a.path == b.path);
        if !same_shape {
            return Err(Error::Broken {
                file: file.to_owned(),
                line: None,
                message: "the keys of the file changed".into(),
            });
        }
        for ((a, b), want) in after.iter().zip(&found).zip(&expected) {
            let want = want.as_deref().unwrap_or(&b.value);
            if a.value != want {
                return Err(Error::Broken {
                    file: file.to_owned(),
                    line: Some(a.line),
                    message: format!(
                        "key `{}` would read `{}` instead of `{want}`",
                        a.path, a.value
                    ),
                });
            }
        }
    }
    Ok(Adapted {
        content: out,
        changes,
    })
}

fn apply_patterns(
    file: &str,
    content: &str,
    rules: &[&Rule],
    changes: &mut Vec<Change>,
) -> Result<(String, BTreeSet<u32>)> {
    let mut text = content.to_owned();
    let mut touched = BTreeSet::new();
    for r in rules {
        let Action::Pattern {
            pattern,
            replacement,
        } = &r.action
        else {
            continue;
        };
        let re = compile(pattern).map_err(|message| Error::Invalid {
            what: format!("rule for `{}`", r.file),
            message,
        })?;
        let mut next = String::with_capacity(text.len());
        let mut matched = false;
        let mut last = 0;
        for (i, (offset, line)) in lines_with_offsets(&text).enumerate() {
            if let Some(caps) = re.captures(line) {
                matched = true;
                let mut new = String::new();
                caps.expand(replacement, &mut new);
                let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
                touched.insert(n);
                next.push_str(&text[last..offset]);
                next.push_str(&new);
                last = offset + line.len();
                if new != line {
                    changes.push(Change {
                        location: format!("line {n}"),
                        line: n,
                        old: line.to_owned(),
                        new,
                    });
                }
            }
        }
        if !matched {
            return Err(Error::PatternNotFound {
                file: file.to_owned(),
                pattern: pattern.clone(),
            });
        }
        next.push_str(&text[last..]);
        text = next;
    }
    Ok((text, touched))
}

/// The new token for `leaf` and the value it reads as.
fn rewrite(
    file: &str,
    text: &str,
    format: Format,
    leaf: &Leaf,
    new: &NewValue,
) -> Result<(String, String)> {
    let raw = text.get(leaf.span.clone()).unwrap_or_default();
    let not_editable = |reason: &str| Error::NotEditable {
        file: file.to_owned(),
        key: leaf.path.clone(),
        line: leaf.line,
        reason: reason.to_owned(),
    };
    if leaf.style == Style::Opaque {
        return Err(not_editable(
            "its extent in the text is not certain (a plain YAML value over several lines?); \
             quote it in the source or use a pattern rule",
        ));
    }
    // Inside the token, leaving the quoting as it is.
    if let NewValue::Substitute {
        expected,
        inserts,
        subst,
    } = new
    {
        let q = leaf.style.quote_len();
        let (open, inner, close) = match leaf.style {
            Style::Block => {
                let nl = raw.find('\n').unwrap_or(raw.len());
                (&raw[..nl], &raw[nl..], "")
            }
            _ if raw.len() >= 2 * q => (&raw[..q], &raw[q..raw.len() - q], &raw[raw.len() - q..]),
            _ => ("", raw, ""),
        };
        let new_inner = subst(inner);
        let safe = match (format, leaf.style) {
            // A number stays a number; the read-back check guards the rest.
            (Format::Yaml, Style::Bare { string: false }) => !matches!(
                yaml_rust2::Yaml::from_str(&new_inner),
                yaml_rust2::Yaml::String(_)
            ),
            (_, Style::Bare { string: false }) => true,
            (Format::Yaml, Style::Bare { .. }) => yaml::plain_ok(&new_inner, false),
            (Format::Ini, Style::Bare { .. }) => lines::ini_bare_ok(&new_inner),
            (Format::Env, Style::Bare { .. }) => lines::env_bare_ok(&new_inner),
            _ => inserts
                .iter()
                .all(|s| !s.contains(|c: char| c.is_control() || "\"'\\`$".contains(c))),
        };
        if safe {
            return Ok((format!("{open}{new_inner}{close}"), expected.clone()));
        }
        return quote(format, leaf, expected)
            .map(|t| (t, expected.clone()))
            .ok_or_else(|| not_editable(&format!("`{expected}` cannot be written here safely")));
    }
    let NewValue::Set(v) = new else {
        return Err(not_editable("unknown edit"));
    };
    match v {
        serde_json::Value::String(s) => {
            // Keep the quoting when the new text fits it.
            let kept = match (format, leaf.style) {
                (Format::Yaml, Style::Bare { string: true }) => {
                    yaml::plain_ok(s, false).then(|| s.clone())
                }
                (Format::Ini, Style::Bare { .. }) => lines::ini_bare_ok(s).then(|| s.clone()),
                (Format::Env, Style::Bare { .. }) => lines::env_bare_ok(s).then(|| s.clone()),
                (Format::Yaml, Style::Single) => yaml::single_quote(s),
                (Format::Toml, Style::Single) => {
                    (!s.contains(|c: char| c == '\'' || c.is_control())).then(|| format!("'{s}'"))
                }
                (Format::Ini | Format::Env, Style::Single) => {
                    (!s.contains('\'')).then(|| format!("'{s}'"))
                }
                _ => None,
            };
            match kept {
                Some(t) => Ok((t, s.clone())),
                None => quote(format, leaf, s)
                    .map(|t| (t, s.clone()))
                    .ok_or_else(|| not_editable(&format!("`{s}` cannot be written here safely"))),
            }
        }
        other => {
            let lit = other.to_string();
            Ok((lit.clone(), lit))
        }
    }
}

/// `v` as a string token of the format, in its safest quoting.
fn quote(format: Format, leaf: &Leaf, v: &str) -> Option<String> {
    match format {
        // JSON escapes are valid in YAML double quotes.
        Format::Json | Format::Yaml => Some(json::quote(v)),
        Format::Toml => Some(toml::quote(v)),
        Format::Env => Some(lines::env_quote(v)),
        Format::Ini => {
            let q = if leaf.style == Style::Single {
                '\''
            } else {
                '"'
            };
            (!v.contains(q) && !v.contains(char::is_control)).then(|| format!("{q}{v}{q}"))
        }
        Format::Text => None,
    }
}

pub(super) fn leftovers(
    file: &str,
    content: &str,
    format: Format,
    map: &EndpointMap,
) -> Result<Vec<Leftover>> {
    let mut out = Vec::new();
    let mut push = |location: &str, line: u32, value: &str| {
        for (at, e) in map.matches(value) {
            if e.from == e.to {
                continue;
            }
            out.push(Leftover {
                location: location.to_owned(),
                line,
                found: value[at..at + e.from.len()].to_owned(),
                value: value.to_owned(),
            });
        }
    };
    if format == Format::Text {
        for (i, (_, line)) in lines_with_offsets(content).enumerate() {
            let n = u32::try_from(i + 1).unwrap_or(u32::MAX);
            push(&format!("line {n}"), n, line);
        }
    } else {
        for leaf in leaves(file, content, format)? {
            if leaf.style.is_string() {
                push(&leaf.path, leaf.line, &leaf.value);
            }
        }
    }
    Ok(out)
}
