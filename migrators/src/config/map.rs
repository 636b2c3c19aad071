//! The endpoint map (old → new) and how its entries find their matches.
//!
//! Matching is by token, never by bare substring: an entry matches only
//! where the characters around it cannot continue the same host name, IP
//! address, URL, bucket name or path. So `db.shop.paris.internal` matches in
//! `postgres://shop@db.shop.paris.internal:5432/shop` and at the end of a
//! sentence (`... internal.`) but not in `xdb.shop.paris.internal.evil`,
//! and `10.10.0.13` does not match in `10.10.0.130`.
//!
//! All entries are applied in one left-to-right pass, the longest match at
//! a position winning (a URL entry beats a host entry inside it), and
//! replaced text is never matched again, so entries do not chain
//! (`a → b`, `b → c` does not turn `a` into `c`). A match that already sits
//! inside the entry's own replacement is skipped, which keeps a rule like
//! `shop-media → shop-media-fra` idempotent even for kinds whose token
//! characters would allow the old name to match inside the new one.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// What an endpoint map entry names; it decides the token boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A DNS host name; matched case-insensitively, also inside URLs and
    /// `host:port`.
    Host,
    /// An IPv4 or IPv6 address; also inside URLs and `ip:port`.
    Ip,
    /// A URL prefix (`https://s3.dc-paris.example.net`); matches when the
    /// text goes on with a path, query, port or ends. Scheme and host are
    /// matched case-insensitively.
    Url,
    /// A bucket name, alone or in an `s3://bucket/...` URL.
    Bucket,
    /// A file path or credential reference (`/run/secrets/paris-key`); also
    /// matches as a directory prefix (`/run/secrets/paris-key/cert.pem`).
    Path,
    /// Any other string, matched at word boundaries (the default).
    #[default]
    String,
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Host => "host",
            Self::Ip => "ip",
            Self::Url => "url",
            Self::Bucket => "bucket",
            Self::Path => "path",
            Self::String => "string",
        })
    }
}

/// One `old → new` pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// What the value is.
    #[serde(default)]
    pub kind: EntryKind,
    /// The old value, as written at the source site.
    pub from: String,
    /// The new value at the target site.
    pub to: String,
}

impl Entry {
    /// An entry of the given kind.
    pub fn new(kind: EntryKind, from: impl Into<String>, to: impl Into<String>) -> Self {
        Self {
            kind,
            from: from.into(),
            to: to.into(),
        }
    }
}

/// The ordered map of old endpoints to new ones that placement produces.
///
/// Its JSON is `{"entries": [{"kind": "host", "from": "...", "to": "..."}]}`;
/// a bare array of entries is accepted too.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct EndpointMap {
    /// The entries; at one position the longest match wins, then the first.
    /// An entry whose `to` equals its `from` says the endpoint stays: it
    /// changes nothing and is never a leftover, but as a match it keeps
    /// shorter entries off that text.
    pub entries: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MapRepr {
    Object(MapObject),
    Array(Vec<Entry>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MapObject {
    entries: Vec<Entry>,
}

impl<'de> Deserialize<'de> for EndpointMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let entries = match MapRepr::deserialize(d)? {
            MapRepr::Object(o) => o.entries,
            MapRepr::Array(a) => a,
        };
        Ok(Self { entries })
    }
}

impl EndpointMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an entry.
    #[must_use]
    pub fn with(mut self, kind: EntryKind, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.entries.push(Entry::new(kind, from, to));
        self
    }

    /// Parses the map from JSON and checks it.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the JSON does not have the documented shape
    /// or an entry is malformed (see [`EndpointMap::check`]).
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let map = Self::deserialize(value).map_err(|e| Error::Invalid {
            what: "endpoint map".into(),
            message: format!(
                "{e} (expected {{\"entries\": [{{\"kind\": \"host\", \"from\": \"...\", \"to\": \"...\"}}]}})"
            ),
        })?;
        map.check()?;
        Ok(map)
    }

    /// Checks every entry: `from` non-empty, no
    /// line breaks, no `from` twice, and a shape fitting the kind.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the entry by its 0-based index.
    pub fn check(&self) -> Result<()> {
        for (i, e) in self.entries.iter().enumerate() {
            let bad = |message: String| Error::Invalid {
                what: format!("endpoint map entry {i} (`{}`)", e.from),
                message,
            };
            if e.from.is_empty() {
                return Err(bad("`from` is empty".into()));
            }
            if [&e.from, &e.to].iter().any(|s| s.contains(['\n', '\r'])) {
                return Err(bad("contains a line break".into()));
            }
            if self.entries[..i].iter().any(|p| p.from == e.from) {
                return Err(bad("`from` appears twice".into()));
            }
            let shape_ok = match e.kind {
                EntryKind::Host | EntryKind::Bucket => e
                    .from
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                EntryKind::Ip => e.from.parse::<std::net::IpAddr>().is_ok(),
                EntryKind::Url => e.from.contains("://"),
                EntryKind::Path | EntryKind::String => !e.from.contains(char::is_whitespace),
            };
            if !shape_ok {
                return Err(bad(format!("`{}` is not a {} value", e.from, e.kind)));
            }
        }
        Ok(())
    }

    /// Rewrites every match in `text`; returns the new text and, for each
    /// replacement, the old and new token.
    pub fn apply(&self, text: &str) -> (String, Vec<(String, String)>) {
        let mut out = String::with_capacity(text.len());
        let mut done = Vec::new();
        let mut last = 0;
        for (at, entry) in self.matches(text) {
            out.push_str(&text[last..at]);
            out.push_str(&entry.to);
            let end = at + entry.from.len();
            if text[at..end] != entry.to {
                done.push((text[at..end].to_owned(), entry.to.clone()));
            }
            last = end;
        }
        out.push_str(&text[last..]);
        (out, done)
    }

    /// Non-overlapping matches in `text`, left to right: byte offset and
    /// the entry matching there.
    pub(crate) fn matches<'a>(&'a self, text: &str) -> Vec<(usize, &'a Entry)> {
        let mut found = Vec::new();
        if self.entries.is_empty() {
            return found;
        }
        let mut i = 0;
        while i < text.len() {
            let best = self
                .entries
                .iter()
                .filter(|e| matches_at(text, i, e))
                .max_by_key(|e| (e.from.len(), std::cmp::Reverse(self.index_of(e))));
            match best {
                Some(e) => {
                    found.push((i, e));
                    i += e.from.len();
                }
                None => {
                    i += text[i..].chars().next().map_or(1, char::len_utf8);
                }
            }
        }
        found
    }

    fn index_of(&self, e: &Entry) -> usize {
        self.entries
            .iter()
            .position(|x| std::ptr::eq(x, e))
            .unwrap_or(usize::MAX)
    }
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_~".contains(c)
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Whether `entry` matches `text` at byte `at`, boundaries included.
fn matches_at(text: &str, at: usize, entry: &Entry) -> bool {
    let from = entry.from.as_str();
    let end = at + from.len();
    let Some(candidate) = text.get(at..end) else {
        return false;
    };
    let same = match entry.kind {
        EntryKind::Host | EntryKind::Url => candidate.eq_ignore_ascii_case(from),
        _ => candidate == from,
    };
    if !same {
        return false;
    }
    let before = text[..at].chars().next_back();
    let mut after_chars = text[end..].chars();
    let after = after_chars.next();
    let after2 = after_chars.next();
    // `x.` continues a dotted name only when something name-like follows
    // the dot; at the end of a sentence it does not.
    let dotted_continues = |cont: fn(char) -> bool| after == Some('.') && after2.is_some_and(cont);
    let ok = match entry.kind {
        EntryKind::Host | EntryKind::Ip | EntryKind::Bucket => {
            !before.is_some_and(|c| is_host_char(c) || c == '.')
                && !after.is_some_and(is_host_char)
                && !dotted_continues(is_host_char)
        }
        EntryKind::Url => {
            let scheme_char = |c: char| c.is_ascii_alphanumeric() || "+-.".contains(c);
            !before.is_some_and(scheme_char)
                && (from.ends_with('/')
                    || (!after.is_some_and(|c| is_path_char(c) || c == '%')
                        && !dotted_continues(is_path_char)))
        }
        EntryKind::Path => {
            !before.is_some_and(|c| is_path_char(c) || c == '.' || c == '/')
                && !after.is_some_and(is_path_char)
                && !dotted_continues(is_path_char)
        }
        EntryKind::String => {
            let first = from.chars().next().is_some_and(is_word_char);
            let last = from.chars().next_back().is_some_and(is_word_char);
            !((first && before.is_some_and(is_word_char))
                || (last && after.is_some_and(is_word_char)))
        }
    };
    ok && !inside_own_replacement(text, at, entry)
}

/// True when the match at `at` is part of an occurrence of `entry.to`, i.e.
/// the text was already rewritten by this entry.
fn inside_own_replacement(text: &str, at: usize, entry: &Entry) -> bool {
    let (from, to) = (entry.from.as_str(), entry.to.as_str());
    if from == to {
        return false;
    }
    to.match_indices(from)
        .any(|(k, _)| at >= k && text.get(at - k..at - k + to.len()).is_some_and(|s| s == to))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map() -> EndpointMap {
        EndpointMap::new()
            .with(
                EntryKind::Host,
                "db.shop.paris.internal",
                "db.shop.fra.internal",
            )
            .with(EntryKind::Ip, "10.10.0.13", "10.30.0.13")
            .with(
                EntryKind::Url,
                "https://s3.dc-paris.example.net",
                "https://s3.eu-central.cloud.example.com",
            )
            .with(EntryKind::Bucket, "shop-media", "shop-media-fra")
            .with(
                EntryKind::Path,
                "/run/secrets/paris-key",
                "/run/secrets/frankfurt-key",
            )
    }

    #[test]
    fn tokens_match_only_at_boundaries() {
        let m = map();
        let cases = [
            ("db.shop.paris.internal", "db.shop.fra.internal"),
            (
                "xdb.shop.paris.internal.evil",
                "xdb.shop.paris.internal.evil",
            ),
            ("db.shop.paris.internal.evil", "db.shop.paris.internal.evil"),
            ("see db.shop.paris.internal.", "see db.shop.fra.internal."),
            (
                "postgres://shop@DB.shop.paris.internal:5432/shop",
                "postgres://shop@db.shop.fra.internal:5432/shop",
            ),
            (
                "10.10.0.13:80 10.10.0.130 110.10.0.13",
                "10.30.0.13:80 10.10.0.130 110.10.0.13",
            ),
            (
                "https://s3.dc-paris.example.net/b https://s3.dc-paris.example.network",
                "https://s3.eu-central.cloud.example.com/b https://s3.dc-paris.example.network",
            ),
            (
                "s3://shop-media/x shop-media-old",
                "s3://shop-media-fra/x shop-media-old",
            ),
            (
                "/run/secrets/paris-key /run/secrets/paris-key.pem /x/run/secrets/paris-key",
                "/run/secrets/frankfurt-key /run/secrets/paris-key.pem /x/run/secrets/paris-key",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(m.apply(input).0, want, "{input}");
            // Idempotent: the output does not change again.
            assert_eq!(m.apply(want).0, want, "{want}");
        }
    }

    #[test]
    fn strings_match_at_word_boundaries() {
        let m = EndpointMap::new().with(EntryKind::String, "paris", "frankfurt");
        let (out, _) = m.apply("paris parisian dc-paris x_paris");
        assert_eq!(out, "frankfurt parisian dc-frankfurt x_paris");
        let m = EndpointMap::new().with(EntryKind::String, "paris", "paris-2");
        assert_eq!(m.apply("paris-2 paris").0, "paris-2 paris-2");
    }

    #[test]
    fn entries_do_not_chain_and_longest_wins() {
        let m = EndpointMap::new()
            .with(EntryKind::Host, "a.example", "b.example")
            .with(EntryKind::Host, "b.example", "c.example")
            .with(
                EntryKind::Url,
                "http://a.example/api",
                "https://api.new.example",
            );
        let (out, done) = m.apply("a.example b.example http://a.example/api/v1");
        assert_eq!(out, "b.example c.example https://api.new.example/v1");
        assert_eq!(done.len(), 3);
    }

    #[test]
    fn json_shapes_and_checks() {
        let v =
            serde_json::json!({"entries": [{"kind": "ip", "from": "10.0.0.1", "to": "10.1.0.1"}]});
        let m = EndpointMap::from_json(&v).unwrap();
        assert_eq!(m.entries[0].kind, EntryKind::Ip);
        let v = serde_json::json!([{"from": "x", "to": "y"}]);
        assert_eq!(
            EndpointMap::from_json(&v).unwrap().entries[0].kind,
            EntryKind::String
        );
        let bad = serde_json::json!([{"kind": "ip", "from": "db.x", "to": "y"}]);
        let e = EndpointMap::from_json(&bad).unwrap_err().to_string();
        assert!(e.contains("entry 0") && e.contains("not a ip value"), "{e}");
        let stay = EndpointMap::new()
            .with(
                EntryKind::Host,
                "db.paris.example.com",
                "db.paris.example.com",
            )
            .with(EntryKind::String, "paris", "fra");
        let (out, done) = stay.apply("db.paris.example.com paris");
        assert_eq!(out, "db.paris.example.com fra");
        assert_eq!(done.len(), 1);
        let dup = serde_json::json!([{"from": "x", "to": "y"}, {"from": "x", "to": "z"}]);
        assert!(
            EndpointMap::from_json(&dup)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let unknown = serde_json::json!({"entries": [], "extra": 1});
        assert!(EndpointMap::from_json(&unknown).is_err());
    }
}
