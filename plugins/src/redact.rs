//! Secrets out of everything that leaves the process.
//!
//! A relocation reads config files full of credentials (`DATABASE_URL=
//! postgres://u:PASSWORD@db`, `password: ...`) and carries cloud
//! credentials in environment variables. Whatever fluidcloud prints, logs,
//! journals, reports or sends (diffs, progress messages, errors, REST
//! responses, server-sent events) goes through [`text`] first, which puts
//! [`REDACTED`] in place of:
//!
//! - the password of a URL (`scheme://user:PASSWORD@host`);
//! - the value under a key that names a secret (see [`is_secret_key`]), in
//!   `key=value`, `key: value`, `key = "value"`, `"key": "value"` and
//!   `<key>value</key>` forms, quotes kept;
//! - any value [`register`]ed: the values of the environment variables a
//!   sites file names under `credentials`, and the service's own tokens.
//!
//! Redaction works line by line, so a diff still shows *that* a secret line
//! changed (`-password: «redacted»`, `+password: «redacted»`) without
//! showing either value.

use std::borrow::Cow;
use std::sync::{LazyLock, RwLock};

use regex::{Captures, Regex};

/// What a secret is replaced with.
pub const REDACTED: &str = "«redacted»";

/// Words that make a key secret wherever they appear in it, case and
/// separators ignored (`DB_PASSWORD`, `dbPassword`, `db-password`,
/// `DBPASSWORD`).
pub const SECRET_SUBSTRINGS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "credential",
    "apikey",
    "accesskey",
    "privatekey",
];

/// Words that make a key secret when they are a whole word of it (`api_key`,
/// `key`, `X-Auth`, `DB_PWD`), so that `keyboard` or `monkey` are not.
pub const SECRET_WORDS: &[&str] = &["key", "pwd", "pass", "auth", "authorization", "cookie"];

/// Last words that make a key name *where* a secret is, not the secret
/// (`PASSWORD_FILE=/run/secrets/db`, `secret_access_key_env`, `auth_url`):
/// such values are paths, variable names and endpoints, and stay readable.
pub const REFERENCE_SUFFIXES: &[&str] = &["file", "path", "dir", "env", "url", "endpoint"];

/// Values shorter than this are never registered: redacting every `a` or
/// `on` would make output unreadable and hide nothing.
pub const MIN_REGISTERED_LEN: usize = 4;

static REGISTERED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Adds a secret value that [`text`] redacts wherever it appears.
pub fn register(value: &str) {
    let v = value.trim();
    if v.chars().count() < MIN_REGISTERED_LEN {
        return;
    }
    if let Ok(mut list) = REGISTERED.write()
        && !list.iter().any(|s| s == v)
    {
        list.push(v.to_owned());
        // Longest first, so a secret that contains another goes whole.
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// Registers the value of each environment variable in `names` that is
/// set.
pub fn register_env<'a>(names: impl IntoIterator<Item = &'a str>) {
    for n in names {
        if let Ok(v) = std::env::var(n) {
            register(&v);
        }
    }
}

/// Whether `key` names a secret. See [`SECRET_SUBSTRINGS`] and
/// [`SECRET_WORDS`].
pub fn is_secret_key(key: &str) -> bool {
    if words(key)
        .last()
        .is_some_and(|w| REFERENCE_SUFFIXES.contains(&w.as_str()))
    {
        return false;
    }
    let squashed: String = key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if SECRET_SUBSTRINGS.iter().any(|w| squashed.contains(w)) {
        return true;
    }
    words(key).any(|w| SECRET_WORDS.contains(&w.as_str()))
}

/// The words of a key: split at non-alphanumerics and at lower→upper case
/// changes, lowercased.
fn words(key: &str) -> impl Iterator<Item = String> + '_ {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut prev_lower = false;
    for c in key.chars() {
        if !c.is_ascii_alphanumeric() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = false;
            continue;
        }
        if c.is_ascii_uppercase() && prev_lower && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        cur.push(c.to_ascii_lowercase());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out.into_iter()
}

static URL_PASSWORD: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@"'<>]*):([^\s@/"'<>]+)@"#)
        .unwrap_or_else(|_| unreachable!("a constant pattern"))
});
static QUOTED_PAIR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"("([A-Za-z0-9_.\- ]+)"\s*:\s*")((?:[^"\\]|\\.)*)(")"#)
        .unwrap_or_else(|_| unreachable!("a constant pattern"))
});
static LINE_PAIR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?m)^([ \t]*[-+ ]?[ \t]*(?:export[ \t]+|-[ \t]+)?)([A-Za-z0-9_.\-]+)([ \t]*[:=][ \t]*)([^\r\n]*?)([,;]?[ \t]*)$"#,
    )
    .unwrap_or_else(|_| unreachable!("a constant pattern"))
});
static INLINE_PAIR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"\b([A-Za-z0-9_.\-]+)=([^\s`'",;&<>()\[\]{}]+)"#)
        .unwrap_or_else(|_| unreachable!("a constant pattern"))
});
static XML_PAIR: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"<([A-Za-z0-9_.\-]+)>([^<]*)</([A-Za-z0-9_.\-]+)>"#)
        .unwrap_or_else(|_| unreachable!("a constant pattern"))
});

/// `value` redacted, its quotes kept.
fn redact_value(value: &str) -> String {
    let v = value.trim();
    if v.is_empty() || v.contains(REDACTED) {
        return value.to_owned();
    }
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return format!("{q}{REDACTED}{q}");
        }
    }
    REDACTED.to_owned()
}

/// `s` with every secret replaced by [`REDACTED`]. See the module docs.
pub fn text(s: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(s);
    if let Ok(list) = REGISTERED.read() {
        for secret in list.iter() {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
            }
        }
    }
    let out = step(out, &URL_PASSWORD, &|c| format!("{}:{REDACTED}@", &c[1]));
    let out = step(out, &QUOTED_PAIR, &|c| {
        // A bare `"key"` in JSON is a structural field (an object's key, a
        // diagnostic's config key), not a secret; `"api_key"` still is.
        if c[2] != *"key" && is_secret_key(&c[2]) && !c[3].is_empty() {
            format!("{}{REDACTED}{}", &c[1], &c[4])
        } else {
            c[0].to_owned()
        }
    });
    let out = step(out, &LINE_PAIR, &|c| {
        if is_secret_key(&c[2]) && !c[4].trim().is_empty() {
            format!(
                "{}{}{}{}{}",
                &c[1],
                &c[2],
                &c[3],
                redact_value(&c[4]),
                &c[5]
            )
        } else {
            c[0].to_owned()
        }
    });
    // `key=value` inside a sentence or a query string: a constraint in an
    // error message, `?token=…&page=2`.
    let out = step(out, &INLINE_PAIR, &|c| {
        if is_secret_key(&c[1]) && !c[2].contains(REDACTED) {
            format!("{}={REDACTED}", &c[1])
        } else {
            c[0].to_owned()
        }
    });
    step(out, &XML_PAIR, &|c| {
        if c[1] == c[3] && is_secret_key(&c[1]) && !c[2].is_empty() {
            format!("<{}>{REDACTED}</{}>", &c[1], &c[3])
        } else {
            c[0].to_owned()
        }
    })
}

/// `out` with `re`'s matches replaced by `f`, borrowed when none matched.
fn step<'a>(out: Cow<'a, str>, re: &Regex, f: &dyn Fn(&Captures<'_>) -> String) -> Cow<'a, str> {
    if re.is_match(&out) {
        Cow::Owned(re.replace_all(&out, |c: &Captures<'_>| f(c)).into_owned())
    } else {
        out
    }
}

/// [`text`], owned.
pub fn string(s: &str) -> String {
    text(s).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_name_secrets() {
        for k in [
            "password",
            "DB_PASSWORD",
            "dbPassword",
            "db-password",
            "DBPASSWORD",
            "api_key",
            "apiKey",
            "X-Auth-Token",
            "aws_secret_access_key",
            "AWS_ACCESS_KEY_ID",
            "credentials",
            "key",
            "DB_PWD",
            "Authorization",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "AWS_ACCESS_KEY_ID_FILE",
            "secret_access_key_env",
            "auth_url",
            "keyboard",
            "monkey",
            "host",
            "user",
            "url",
            "passenger_count",
            "path",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn every_config_form_keeps_its_shape_and_loses_its_secret() {
        let cases = [
            ("password: hunter22", "password: «redacted»"),
            (
                "  db_password = \"hunter22\"",
                "  db_password = \"«redacted»\"",
            ),
            ("export API_TOKEN=abc123xyz", "export API_TOKEN=«redacted»"),
            (
                "{\"user\":\"u\",\"password\":\"p4ss\"}",
                "{\"user\":\"u\",\"password\":\"«redacted»\"}",
            ),
            ("  \"secret\": \"s3\",", "  \"secret\": \"«redacted»\","),
            (
                "<password>hunter22</password>",
                "<password>«redacted»</password>",
            ),
            (
                r#"{"key":"sites.s.colour","api_key":"k9"}"#,
                r#"{"key":"sites.s.colour","api_key":"«redacted»"}"#,
            ),
            (
                "DATABASE_URL=postgres://shop:S3cr3t@db.internal:5432/shop",
                "DATABASE_URL=postgres://shop:«redacted»@db.internal:5432/shop",
            ),
            ("host: db.internal", "host: db.internal"),
            ("-password: old1", "-password: «redacted»"),
            ("+password: new2", "+password: «redacted»"),
        ];
        for (input, want) in cases {
            assert_eq!(text(input), want, "{input}");
        }
    }

    #[test]
    fn pairs_inside_sentences_and_query_strings_lose_their_secret() {
        assert_eq!(
            text("unknown constraint `password=hunter2` (try cost<=3)"),
            format!("unknown constraint `password={REDACTED}` (try cost<=3)")
        );
        assert_eq!(
            text("GET https://x/api?api_token=abc123&page=2 failed"),
            format!("GET https://x/api?api_token={REDACTED}&page=2 failed")
        );
        assert_eq!(text("retries=3 site=paris"), "retries=3 site=paris");
    }

    #[test]
    fn registered_values_go_anywhere_they_appear() {
        register("GKa1b2c3-registered-secret");
        register("ab");
        assert_eq!(
            text("error: key GKa1b2c3-registered-secret was refused; ab"),
            "error: key «redacted» was refused; ab"
        );
    }
}
