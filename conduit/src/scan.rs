//! Finding endpoint references inside configuration files.
//!
//! Structured files (YAML, JSON, TOML, INI, `.env`) are parsed and every
//! string leaf is examined with its key path (`database.host`,
//! `servers[1].url`, `DATABASE_URL`); plain text is scanned line by line.
//! A value becomes a [`Reference`] when it is a URL with a host, an IP
//! address (optionally with a port), a `host:port`, a dotted host name, or a
//! bucket name under a key that says `bucket`.
//!
//! References are *strong* when their shape leaves no doubt (a URL, an IP, a
//! `host:port`, a host name under a key such as `host` or `endpoint`) and
//! *weak* otherwise (a dotted word in prose, which may be a file name).
//! Introspection keeps weak references only when they resolve to something
//! of the site or look internal; this keeps `index.html` out of the topology
//! while still catching `db.shop.internal` written in a comment-free text file.

use std::net::IpAddr;

use fluidcloud_plugins::{ConfigFormat, Diagnostic, EndpointKind};
use regex::Regex;

/// How sure the scanner is that a value is an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strength {
    /// Might be an endpoint (a dotted word).
    Weak,
    /// Certainly an endpoint.
    Strong,
}

/// An endpoint found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Key path, or `line N` in plain text.
    pub key: String,
    /// 1-based line of the value, when known.
    pub line: Option<u32>,
    /// The endpoint as written (URL, `host:port`, host, IP, bucket).
    pub value: String,
    /// What it is.
    pub endpoint: EndpointKind,
    /// Host part (for URLs, `host:port` and hosts) or address (for IPs).
    pub host: Option<String>,
    /// How sure the scanner is.
    pub strength: Strength,
}

const HOST_KEYS: &[&str] = &[
    "host", "hostname", "server", "addr", "address", "endpoint", "url", "uri", "domain",
    "upstream", "listen", "dsn", "proxy", "backend",
];

/// Scans one config file.
///
/// # Errors
/// A diagnostic naming `file` and the line when a structured file does not
/// parse in its format.
pub fn scan(
    file: &str,
    format: ConfigFormat,
    content: &[u8],
) -> Result<Vec<Reference>, Diagnostic> {
    let text = std::str::from_utf8(content).map_err(|e| {
        Diagnostic::error(format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        ))
        .in_file(file)
    })?;
    let mut leaves = Vec::new();
    match format {
        ConfigFormat::Json => {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
                Diagnostic::error(format!("invalid JSON: {e}"))
                    .in_file(file)
                    .at_line(u32::try_from(e.line()).unwrap_or(0))
            })?;
            walk_json(&v, String::new(), &mut leaves);
        }
        ConfigFormat::Toml => {
            let v: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                let mut d =
                    Diagnostic::error(format!("invalid TOML: {}", e.message())).in_file(file);
                if let Some(s) = e.span() {
                    d = d.at_line(crate::tomlfile::line_of(text, s.start));
                }
                d
            })?;
            walk_toml(&toml::Value::Table(v), String::new(), &mut leaves);
        }
        ConfigFormat::Yaml => {
            let docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| {
                Diagnostic::error(format!("invalid YAML: {}", e.info()))
                    .in_file(file)
                    .at_line(u32::try_from(e.marker().line()).unwrap_or(0))
            })?;
            for (i, doc) in docs.iter().enumerate() {
                let prefix = if docs.len() > 1 {
                    format!("[{i}]")
                } else {
                    String::new()
                };
                walk_yaml(doc, prefix, &mut leaves);
            }
        }
        ConfigFormat::Ini => leaves = parse_ini(file, text)?,
        ConfigFormat::Env => leaves = parse_env(file, text)?,
        ConfigFormat::Text => return Ok(scan_text(text)),
    }
    let mut out = Vec::new();
    for (key, value, line) in leaves {
        let line = line.or_else(|| line_hint(text, &value));
        for mut r in classify(&key, &value) {
            r.line = line;
            out.push(r);
        }
    }
    Ok(out)
}

type Leaf = (String, String, Option<u32>);

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

fn walk_json(v: &serde_json::Value, path: String, out: &mut Vec<Leaf>) {
    match v {
        serde_json::Value::String(s) => out.push((path, s.clone(), None)),
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk_json(x, format!("{path}[{i}]"), out);
            }
        }
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                walk_json(x, join(&path, k), out);
            }
        }
        _ => {}
    }
}

fn walk_toml(v: &toml::Value, path: String, out: &mut Vec<Leaf>) {
    match v {
        toml::Value::String(s) => out.push((path, s.clone(), None)),
        toml::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk_toml(x, format!("{path}[{i}]"), out);
            }
        }
        toml::Value::Table(t) => {
            for (k, x) in t {
                walk_toml(x, join(&path, k), out);
            }
        }
        _ => {}
    }
}

fn walk_yaml(v: &yaml_rust2::Yaml, path: String, out: &mut Vec<Leaf>) {
    use yaml_rust2::Yaml;
    match v {
        Yaml::String(s) => out.push((path, s.clone(), None)),
        Yaml::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                walk_yaml(x, format!("{path}[{i}]"), out);
            }
        }
        Yaml::Hash(h) => {
            for (k, x) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    Yaml::Real(r) => r.clone(),
                    _ => continue,
                };
                walk_yaml(x, join(&path, &key), out);
            }
        }
        _ => {}
    }
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return &v[1..v.len() - 1];
        }
    }
    v
}

fn line_no(i: usize) -> u32 {
    u32::try_from(i + 1).unwrap_or(u32::MAX)
}

fn parse_ini(file: &str, text: &str) -> Result<Vec<Leaf>, Diagnostic> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.strip_suffix(']').ok_or_else(|| {
                Diagnostic::error("section header without closing `]`")
                    .in_file(file)
                    .at_line(line_no(i))
            })?;
            section = name.trim().to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .or_else(|| line.split_once(':'))
            .ok_or_else(|| {
                Diagnostic::error(format!("expected `key = value`, found `{line}`"))
                    .in_file(file)
                    .at_line(line_no(i))
            })?;
        // Trailing comments: `key = value  # note`.
        let v = v.split_once(" #").map_or(v, |(a, _)| a);
        out.push((
            join(&section, k.trim()),
            unquote(v).to_owned(),
            Some(line_no(i)),
        ));
    }
    Ok(out)
}

fn parse_env(file: &str, text: &str) -> Result<Vec<Leaf>, Diagnostic> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line.split_once('=').ok_or_else(|| {
            Diagnostic::error(format!("expected `NAME=value`, found `{line}`"))
                .in_file(file)
                .at_line(line_no(i))
        })?;
        let k = k.trim();
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(Diagnostic::error(format!("`{k}` is not a variable name"))
                .in_file(file)
                .at_line(line_no(i)));
        }
        out.push((k.to_owned(), unquote(v).to_owned(), Some(line_no(i))));
    }
    Ok(out)
}

fn line_hint(text: &str, value: &str) -> Option<u32> {
    if value.is_empty() {
        return None;
    }
    text.lines().position(|l| l.contains(value)).map(line_no)
}

fn is_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    let labels: Vec<&str> = s.split('.').collect();
    s.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_alphabetic()))
}

fn split_port(s: &str) -> Option<(&str, u16)> {
    let (h, p) = s.rsplit_once(':')?;
    let port = p.parse().ok()?;
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    Some((h, port))
}

fn key_says_host(key: &str) -> bool {
    let last = key
        .rsplit(['.', ']'])
        .next()
        .unwrap_or(key)
        .to_ascii_lowercase();
    HOST_KEYS.iter().any(|k| last.contains(k))
}

fn is_bucket_name(s: &str) -> bool {
    (3..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Classifies one value found under `key`.
fn classify(key: &str, value: &str) -> Vec<Reference> {
    let v = value.trim();
    let make = |endpoint, host: Option<&str>, strength| Reference {
        key: key.to_owned(),
        line: None,
        value: v.to_owned(),
        endpoint,
        host: host.map(str::to_owned),
        strength,
    };
    if v.is_empty() || v.contains(char::is_whitespace) {
        // Several words: scan like text but keep the key.
        if v.contains(char::is_whitespace) {
            return scan_text(v)
                .into_iter()
                .map(|mut r| {
                    r.key = key.to_owned();
                    r
                })
                .collect();
        }
        return Vec::new();
    }
    if v.contains("://") {
        if let Ok(u) = url::Url::parse(v)
            && let Some(h) = u.host_str()
        {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            return vec![make(EndpointKind::Url, Some(h), Strength::Strong)];
        }
        return Vec::new();
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return vec![make(
            EndpointKind::Ip,
            Some(&ip.to_string()),
            Strength::Strong,
        )];
    }
    if let Some((h, _)) = split_port(v) {
        if let Ok(ip) = h.parse::<IpAddr>() {
            return vec![make(
                EndpointKind::Ip,
                Some(&ip.to_string()),
                Strength::Strong,
            )];
        }
        if is_hostname(h) || (key_says_host(key) && !h.is_empty() && !h.contains('/')) {
            return vec![make(EndpointKind::Host, Some(h), Strength::Strong)];
        }
    }
    let lower_key = key.to_ascii_lowercase();
    if lower_key.contains("bucket") && is_bucket_name(v) {
        return vec![make(EndpointKind::Bucket, None, Strength::Strong)];
    }
    if is_hostname(v) {
        let strength = if key_says_host(key) {
            Strength::Strong
        } else {
            Strength::Weak
        };
        return vec![make(EndpointKind::Host, Some(v), strength)];
    }
    Vec::new()
}

fn text_patterns() -> &'static [Regex; 3] {
    static P: std::sync::OnceLock<[Regex; 3]> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        #[allow(clippy::unwrap_used)] // constant patterns, checked by the tests
        let r = |s: &str| Regex::new(s).unwrap();
        [
            r(r#"[A-Za-z][A-Za-z0-9+.-]*://[^\s;'"<>(){}\[\],]+"#),
            r(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?\b"),
            r(r"\b[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+(?::\d{1,5})?\b"),
        ]
    })
}

/// Scans plain text line by line.
fn scan_text(text: &str) -> Vec<Reference> {
    let [url, ip, host] = text_patterns();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let key = format!("line {}", i + 1);
        let mut rest = line.to_owned();
        for m in url.find_iter(line) {
            out.extend(classify(&key, m.as_str()));
            rest = rest.replacen(m.as_str(), " ", 1);
        }
        let mut after_ip = rest.clone();
        for m in ip.find_iter(&rest) {
            let found = classify(&key, m.as_str());
            if !found.is_empty() {
                after_ip = after_ip.replacen(m.as_str(), " ", 1);
                out.extend(found);
            }
        }
        for m in host.find_iter(&after_ip) {
            let s = m.as_str();
            if split_port(s).is_some() {
                out.extend(classify(&key, s));
            } else if is_hostname(s) {
                out.push(Reference {
                    key: key.clone(),
                    line: None,
                    value: s.to_owned(),
                    endpoint: EndpointKind::Host,
                    host: Some(s.to_owned()),
                    strength: Strength::Weak,
                });
            }
        }
        for r in out.iter_mut().filter(|r| r.line.is_none()) {
            r.line = Some(line_no(i));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn values(refs: &[Reference]) -> Vec<(String, String, EndpointKind, Strength)> {
        refs.iter()
            .map(|r| (r.key.clone(), r.value.clone(), r.endpoint, r.strength))
            .collect()
    }

    #[test]
    fn yaml_keys_urls_hosts_and_buckets() {
        let y = "database:\n  host: db.shop.internal\n  port: 5432\nmedia:\n  endpoint: https://s3.paris.example:3900\n  bucket: shop-media\nlog_file: app.log\nreplicas: [10.0.0.5, 'cache.shop.internal:6379']\n";
        let refs = scan("app.yaml", ConfigFormat::Yaml, y.as_bytes()).unwrap();
        let v = values(&refs);
        use EndpointKind::*;
        use Strength::*;
        assert_eq!(
            v,
            vec![
                (
                    "database.host".into(),
                    "db.shop.internal".into(),
                    Host,
                    Strong
                ),
                (
                    "media.endpoint".into(),
                    "https://s3.paris.example:3900".into(),
                    Url,
                    Strong
                ),
                ("media.bucket".into(), "shop-media".into(), Bucket, Strong),
                ("log_file".into(), "app.log".into(), Host, Weak),
                ("replicas[0]".into(), "10.0.0.5".into(), Ip, Strong),
                (
                    "replicas[1]".into(),
                    "cache.shop.internal:6379".into(),
                    Host,
                    Strong
                ),
            ]
        );
        assert_eq!(refs[0].line, Some(2));
        assert_eq!(refs[1].host.as_deref(), Some("s3.paris.example"));
        assert_eq!(refs[5].host.as_deref(), Some("cache.shop.internal"));
    }

    #[test]
    fn env_ini_json_toml_give_key_paths_and_lines() {
        let env = "# comment\nexport DATABASE_URL=\"postgres://shop@db.shop.internal:5432/shop\"\nDEBUG=1\n";
        let r = scan(".env", ConfigFormat::Env, env.as_bytes()).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].key.as_str(), r[0].line), ("DATABASE_URL", Some(2)));
        assert_eq!(r[0].host.as_deref(), Some("db.shop.internal"));

        let ini = "listen_addresses = '10.1.0.30'\n[replication]\nprimary = db.shop.internal:5432 # main\n";
        let r = scan("pg.conf", ConfigFormat::Ini, ini.as_bytes()).unwrap();
        assert_eq!(values(&r)[0].0, "listen_addresses");
        assert_eq!(r[1].key, "replication.primary");
        assert_eq!(r[1].line, Some(3));

        let json = r#"{"api": {"servers": [{"url": "http://app.shop.internal:8080/v1"}]}}"#;
        let r = scan("s.json", ConfigFormat::Json, json.as_bytes()).unwrap();
        assert_eq!(r[0].key, "api.servers[0].url");

        let toml = "[cdn]\npublic_url = \"https://shop.example.com\"\n";
        let r = scan("s.toml", ConfigFormat::Toml, toml.as_bytes()).unwrap();
        assert_eq!((r[0].key.as_str(), r[0].line), ("cdn.public_url", Some(2)));
    }

    #[test]
    fn plain_text_finds_urls_ips_and_host_ports_by_line() {
        let t = "server {\n  listen 10.1.0.10:80;\n  server_name shop.example.com;\n  location / { proxy_pass http://app.shop.internal:8080; }\n  root /srv/www/index.html;\n}\n";
        let r = scan("nginx.conf", ConfigFormat::Text, t.as_bytes()).unwrap();
        let v = values(&r);
        assert!(
            v.contains(&(
                "line 2".into(),
                "10.1.0.10:80".into(),
                EndpointKind::Ip,
                Strength::Strong
            )),
            "{v:?}"
        );
        assert!(
            v.contains(&(
                "line 3".into(),
                "shop.example.com".into(),
                EndpointKind::Host,
                Strength::Weak
            )),
            "{v:?}"
        );
        assert!(
            v.contains(&(
                "line 4".into(),
                "http://app.shop.internal:8080".into(),
                EndpointKind::Url,
                Strength::Strong
            )),
            "{v:?}"
        );
        // The URL's host is not reported a second time as a bare host.
        assert_eq!(
            v.iter()
                .filter(|x| x.1.contains("app.shop.internal"))
                .count(),
            1,
            "{v:?}"
        );
        assert!(r.iter().all(|x| x.line.is_some()));
    }

    #[test]
    fn malformed_files_name_file_and_line() {
        let d = scan("a.yaml", ConfigFormat::Yaml, b"a: [1, 2\nb: c\n").unwrap_err();
        assert_eq!(d.file.as_deref(), Some(std::path::Path::new("a.yaml")));
        assert!(d.line.is_some(), "{d}");
        let d = scan("a.json", ConfigFormat::Json, b"{\n\"a\": }").unwrap_err();
        assert_eq!(d.line, Some(2));
        let d = scan(".env", ConfigFormat::Env, b"OK=1\nnot a pair\n").unwrap_err();
        assert_eq!(d.line, Some(2));
        let d = scan("x.ini", ConfigFormat::Ini, b"[sec\n").unwrap_err();
        assert_eq!(d.line, Some(1));
        let d = scan("x.toml", ConfigFormat::Toml, b"a = 1\nb = \n").unwrap_err();
        assert_eq!(d.line, Some(2), "{d}");
        let d = scan("bin", ConfigFormat::Text, &[b'a', 0xff]).unwrap_err();
        assert!(d.summary.contains("offset 1"), "{d}");
    }
}
