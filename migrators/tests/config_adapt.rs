//! Configuration adaptation on real files: every format with exact expected
//! output, the rules' failure modes, atomic writes, and the `config-adapt`
//! migrator end to end on the demo shop's configuration.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fluidcloud_migrators::ConfigAdapt;
use fluidcloud_migrators::config::{
    self, EndpointMap, EntryKind, Error, Format, Rule, adapt, leftovers, unified_diff,
};
use fluidcloud_plugins::{
    Artifact, ArtifactKind, CancelFlag, ExecContext, Migrator, ProgressSink, StepRequest,
};

/// The relocation of the demo shop from dc-paris to cloud-frankfurt.
fn shop_map() -> EndpointMap {
    EndpointMap::new()
        .with(
            EntryKind::Host,
            "db.shop.paris.internal",
            "db.shop.fra.internal",
        )
        .with(
            EntryKind::Host,
            "app.shop.paris.internal",
            "app.shop.fra.internal",
        )
        .with(EntryKind::Ip, "10.10.0.11", "10.30.0.11")
        .with(EntryKind::Ip, "10.10.0.12", "10.30.0.12")
        .with(EntryKind::Ip, "10.10.0.13", "10.30.0.13")
        .with(
            EntryKind::Url,
            "https://s3.dc-paris.example.net",
            "https://s3.eu-central.cloud.example.com",
        )
        .with(
            EntryKind::Path,
            "/run/secrets/paris-key",
            "/run/secrets/frankfurt-key",
        )
        .with(EntryKind::Bucket, "shop-media", "shop-media-fra")
}

fn run(file: &str, text: &str, format: Format, rules: &[Rule]) -> String {
    let out = adapt(file, text, format, &shop_map(), rules).unwrap();
    // The result parses and adapting it again changes nothing.
    let again = adapt(file, &out.content, format, &shop_map(), &[]).unwrap();
    assert_eq!(again.content, out.content, "not idempotent: {file}");
    out.content
}

#[test]
fn yaml_values_change_keys_comments_and_formatting_do_not() {
    let src = "\
# primary: db.shop.paris.internal (moved at cut-over)
service: shop-api   # the API
database:
  host: db.shop.paris.internal
  db.shop.paris.internal: keep-this-key
  url: \"postgres://shop@db.shop.paris.internal:5432/shop\"
  replicas: ['10.10.0.13:5432', xdb.shop.paris.internal.evil]
  port: 5432
media:
  endpoint:   https://s3.dc-paris.example.net/eu   # spacing kept
  bucket: shop-media
script: |
  pg_dump -h db.shop.paris.internal shop
    | gzip
public_url: https://shop.example.com
";
    let want = "\
# primary: db.shop.paris.internal (moved at cut-over)
service: shop-api   # the API
database:
  host: db.shop.fra.internal
  db.shop.paris.internal: keep-this-key
  url: \"postgres://shop@db.shop.fra.internal:5432/shop\"
  replicas: ['10.30.0.13:5432', xdb.shop.paris.internal.evil]
  port: 5432
media:
  endpoint:   https://s3.eu-central.cloud.example.com/eu   # spacing kept
  bucket: shop-media-fra
script: |
  pg_dump -h db.shop.fra.internal shop
    | gzip
public_url: https://shop.example.com
";
    assert_eq!(run("app.yaml", src, Format::Yaml, &[]), want);
    let changes = adapt("app.yaml", src, Format::Yaml, &shop_map(), &[])
        .unwrap()
        .changes;
    let locations: Vec<_> = changes.iter().map(|c| c.location.as_str()).collect();
    assert_eq!(
        locations,
        [
            "database.host",
            "database.url",
            "database.replicas[0]",
            "media.endpoint",
            "media.bucket",
            "script"
        ]
    );
    assert_eq!(changes[0].line, 4);
    assert_eq!(changes[0].old, "db.shop.paris.internal");
    assert_eq!(changes[0].new, "db.shop.fra.internal");
}

#[test]
fn json_strings_change_keys_numbers_and_layout_do_not() {
    let src = r#"{
  "db.shop.paris.internal": "key stays",
  "search": { "host": "10.10.0.12", "port": 9200 },
  "media":  {"base": "https://s3.dc-paris.example.net/shop-media/x",
             "escaped": "db.shop.paris.internal\tq"},
  "callback": "https://shop.example.com/pay/callback"
}
"#;
    let want = r#"{
  "db.shop.paris.internal": "key stays",
  "search": { "host": "10.30.0.12", "port": 9200 },
  "media":  {"base": "https://s3.eu-central.cloud.example.com/shop-media-fra/x",
             "escaped": "db.shop.fra.internal\tq"},
  "callback": "https://shop.example.com/pay/callback"
}
"#;
    assert_eq!(run("features.json", src, Format::Json, &[]), want);
}

#[test]
fn toml_values_change_comments_and_quoting_kept() {
    let src = r#"# archive on db.shop.paris.internal's bucket
[backup]
schedule = "0 3 * * *"
archive_url = "https://s3.dc-paris.example.net/shop-media/db-archive/"   # nightly

[source]
host = 'db.shop.paris.internal'
ports = [5432, 5433]
mirror = { host = "10.10.0.13", note = """
multi db.shop.paris.internal""" }
"#;
    let want = r#"# archive on db.shop.paris.internal's bucket
[backup]
schedule = "0 3 * * *"
archive_url = "https://s3.eu-central.cloud.example.com/shop-media-fra/db-archive/"   # nightly

[source]
host = 'db.shop.fra.internal'
ports = [5432, 5433]
mirror = { host = "10.30.0.13", note = """
multi db.shop.fra.internal""" }
"#;
    assert_eq!(run("backup.toml", src, Format::Toml, &[]), want);
}

#[test]
fn ini_and_postgresql_conf_values_change_comments_do_not() {
    let src = "\
# PostgreSQL on 10.10.0.13
listen_addresses = '10.10.0.13'		# what IP address(es) to listen on
port = 5432
[replication]
primary: db.shop.paris.internal:5432 ; main
10.10.0.13 = key-is-not-a-value
";
    let want = "\
# PostgreSQL on 10.10.0.13
listen_addresses = '10.30.0.13'		# what IP address(es) to listen on
port = 5432
[replication]
primary: db.shop.fra.internal:5432 ; main
10.10.0.13 = key-is-not-a-value
";
    assert_eq!(
        Format::detect(Path::new("/x/postgresql.conf"), src),
        Format::Ini
    );
    assert_eq!(run("postgresql.conf", src, Format::Ini, &[]), want);
}

#[test]
fn env_values_change_with_their_quoting() {
    let src = "\
# secrets come from files; db.shop.paris.internal is the primary
DATABASE_URL=postgres://shop@db.shop.paris.internal:5432/shop
export S3_ENDPOINT=\"https://s3.dc-paris.example.net\"  # endpoint
S3_BUCKET='shop-media'
AWS_ACCESS_KEY_ID_FILE=/run/secrets/paris-key
OTHER_KEY_FILE=/run/secrets/paris-key.old
";
    let want = "\
# secrets come from files; db.shop.paris.internal is the primary
DATABASE_URL=postgres://shop@db.shop.fra.internal:5432/shop
export S3_ENDPOINT=\"https://s3.eu-central.cloud.example.com\"  # endpoint
S3_BUCKET='shop-media-fra'
AWS_ACCESS_KEY_ID_FILE=/run/secrets/frankfurt-key
OTHER_KEY_FILE=/run/secrets/paris-key.old
";
    assert_eq!(run(".env", src, Format::Env, &[]), want);
}

#[test]
fn plain_text_respects_token_boundaries() {
    let src = "\
# upstream app.shop.paris.internal
upstream a { server app.shop.paris.internal:8080; }
upstream b { server xapp.shop.paris.internal:8080; server app.shop.paris.internal.evil:1; }
listen 10.10.0.11:80; allow 10.10.0.110; allow 210.10.0.11;
proxy_pass https://s3.dc-paris.example.net/shop-media/;
proxy_pass https://s3.dc-paris.example.network/;
server_name shop.example.com;
";
    let want = "\
# upstream app.shop.fra.internal
upstream a { server app.shop.fra.internal:8080; }
upstream b { server xapp.shop.paris.internal:8080; server app.shop.paris.internal.evil:1; }
listen 10.30.0.11:80; allow 10.10.0.110; allow 210.10.0.11;
proxy_pass https://s3.eu-central.cloud.example.com/shop-media-fra/;
proxy_pass https://s3.dc-paris.example.network/;
server_name shop.example.com;
";
    assert_eq!(run("nginx.conf", src, Format::Text, &[]), want);
}

#[test]
fn explicit_rules_set_and_replace_by_key_path() {
    let src = "database:\n  host: db.shop.paris.internal  # primary\n  port: 5432\n  pool: 'small'\nlist:\n  - a.paris.example\n";
    let rules = [
        Rule::set("shop/app.yaml", "database.host", "primary.db.fra.internal"),
        Rule::set("app.yaml", "database.port", 6432),
        Rule::set("*", "database.pool", "it's big"),
        Rule::replace("app.yaml", "list[0]", "paris", "fra"),
        Rule::set("other.yaml", "nowhere", "ignored: names another file"),
    ];
    let out = adapt("/etc/shop/app.yaml", src, Format::Yaml, &shop_map(), &rules).unwrap();
    assert_eq!(
        out.content,
        "database:\n  host: primary.db.fra.internal  # primary\n  port: 6432\n  pool: 'it''s big'\nlist:\n  - a.fra.example\n"
    );
    // A string that would read as a number is quoted to stay a string.
    let toml = "[db]\nport = 5432\nname = \"shop\"\n";
    let rules = [
        Rule::set("db.toml", "db.port", "5433"),
        Rule::set("db.toml", "db.name", 7),
    ];
    let out = adapt("db.toml", toml, Format::Toml, &EndpointMap::new(), &rules).unwrap();
    assert_eq!(out.content, "[db]\nport = \"5433\"\nname = 7\n");
    // Replace of a text already replaced is a no-op, not an error.
    let done = "list:\n  - a.fra.example\n";
    let rules = [Rule::replace("app.yaml", "list[0]", "paris", "fra")];
    let out = adapt("app.yaml", done, Format::Yaml, &EndpointMap::new(), &rules).unwrap();
    assert_eq!(out.content, done);
    assert!(out.changes.is_empty());
}

#[test]
fn a_rule_for_an_absent_key_fails_naming_file_and_key() {
    for (file, text, format) in [
        ("app.yaml", "database:\n  host: x\n", Format::Yaml),
        ("f.json", "{\"database\": {\"host\": \"x\"}}", Format::Json),
        ("b.toml", "[database]\nhost = \"x\"\n", Format::Toml),
        ("w.ini", "[database]\nhost = x\n", Format::Ini),
    ] {
        let rules = [Rule::set(file, "database.hots", "y")];
        let e = adapt(file, text, format, &EndpointMap::new(), &rules).unwrap_err();
        assert!(
            matches!(&e, Error::KeyNotFound { file: f, key } if f == file && key == "database.hots"),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(file) && msg.contains("`database.hots`"),
            "{msg}"
        );
    }
    let e = adapt(
        "app.yaml",
        "a: b\n",
        Format::Yaml,
        &EndpointMap::new(),
        &[Rule::replace("app.yaml", "a", "zzz", "y")],
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "app.yaml:1: key `a`: value `b` does not contain `zzz`"
    );
}

#[test]
fn pattern_rules_rewrite_whole_lines_or_fail_naming_the_pattern() {
    let src = "server {\n    listen 10.10.0.11:80;\n    client_max_body_size 10m;\n}\n";
    let rules = [Rule::pattern(
        "nginx.conf",
        r"(\s*)client_max_body_size \d+m;",
        "${1}client_max_body_size 50m;",
    )];
    let out = adapt("nginx.conf", src, Format::Text, &shop_map(), &rules).unwrap();
    assert_eq!(
        out.content,
        "server {\n    listen 10.30.0.11:80;\n    client_max_body_size 50m;\n}\n"
    );
    assert_eq!(out.changes.len(), 2);
    assert_eq!(out.changes[1].location, "line 3");
    // Anchored: a pattern matching only part of a line matches nothing.
    let rules = [Rule::pattern("nginx.conf", "client_max_body_size", "x")];
    let e = adapt("nginx.conf", src, Format::Text, &shop_map(), &rules).unwrap_err();
    assert_eq!(
        e.to_string(),
        "nginx.conf: pattern `client_max_body_size` matches no line (an explicit rule rewrites it)"
    );
    // Key rules make no sense in plain text.
    let e = adapt(
        "nginx.conf",
        src,
        Format::Text,
        &shop_map(),
        &[Rule::set("nginx.conf", "server.listen", "x")],
    )
    .unwrap_err();
    assert!(e.to_string().contains("use a pattern rule"), "{e}");
}

#[test]
fn unified_diff_is_exact() {
    let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\n";
    let new = "a\nb\nc\nd\nE\nf\ng\nh\ni\n";
    assert_eq!(
        unified_diff("/etc/x.conf", old, new),
        "--- a/etc/x.conf\n+++ b/etc/x.conf\n@@ -2,7 +2,7 @@\n b\n c\n d\n-e\n+E\n f\n g\n h\n"
    );
    assert_eq!(unified_diff("x", old, old), "");
}

#[test]
fn atomic_write_keeps_mode_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, "old\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    config::write_atomic(&path, b"new\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["app.yaml"]);
    // A new file gets the mode asked for.
    let fresh = dir.path().join("fresh.env");
    config::write_atomic_mode(&fresh, b"A=1\n", 0o600).unwrap();
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    // A missing directory is an error naming the path.
    let e = config::write_atomic(&dir.path().join("no/such.yaml"), b"x").unwrap_err();
    assert!(e.to_string().contains("no/such.yaml"), "{e}");
}

#[test]
fn malformed_input_names_file_and_line() {
    for (file, text, format, line) in [
        ("bad.yaml", "a: 1\nb: [1, 2\nc: d\n", Format::Yaml, None),
        (
            "bad.json",
            "{\n  \"a\": 1,\n  \"b\": }\n",
            Format::Json,
            Some(3),
        ),
        ("bad.toml", "a = 1\nb = \n", Format::Toml, Some(2)),
        ("bad.ini", "a = 1\n[sec\n", Format::Ini, Some(2)),
        (".env", "A=1\nnot a pair\n", Format::Env, Some(2)),
    ] {
        let e = adapt(file, text, format, &shop_map(), &[]).unwrap_err();
        let Error::Parse {
            file: f, line: l, ..
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!(f, file);
        assert!(l.is_some(), "{e}");
        if let Some(want) = line {
            assert_eq!(*l, Some(want), "{e}");
        }
        assert!(e.to_string().starts_with(&format!("{file}:")), "{e}");
        assert!(config::leftovers(file, text, format, &shop_map()).is_err());
    }
}

#[test]
fn a_value_that_cannot_be_written_safely_is_refused() {
    // A plain scalar folded over two lines has no certain span.
    let src = "k: db.shop.paris.internal\n  continued\n";
    let e = adapt("f.yaml", src, Format::Yaml, &shop_map(), &[]).unwrap_err();
    assert!(
        matches!(e, Error::NotEditable { ref key, line: 1, .. } if key == "k"),
        "{e:?}"
    );
    // A new value needing quotes in a bare YAML scalar gets them.
    let map = EndpointMap::new().with(EntryKind::String, "old-name", "new: name");
    let out = adapt("f.yaml", "k: old-name\n", Format::Yaml, &map, &[]).unwrap();
    assert_eq!(out.content, "k: \"new: name\"\n");
}

#[test]
fn leftovers_list_remaining_old_references() {
    let src =
        "a: db.shop.paris.internal\n# db.shop.paris.internal in a comment is no reference\nb: ok\n";
    let found = leftovers("f.yaml", src, Format::Yaml, &shop_map()).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (
            found[0].location.as_str(),
            found[0].line,
            found[0].found.as_str()
        ),
        ("a", 1, "db.shop.paris.internal")
    );
    let t = "x 10.10.0.11\ny\n";
    let found = leftovers("n.conf", t, Format::Text, &shop_map()).unwrap();
    assert_eq!(found[0].location, "line 1");
}

// ---------------------------------------------------------------- migrator

/// The demo shop's configuration at dc-paris, as `fluidcloud demo init`
/// writes it (conduit/src/demo.rs).
const DEMO: &[(&str, &str)] = &[
    (
        "shop/web/nginx.conf",
        "# nginx front end of the shop\nserver {\n    listen 10.10.0.11:80;\n    server_name shop.example.com www.shop.example.com;\n\n    location /api/ {\n        proxy_pass http://app.shop.paris.internal:8080;\n    }\n    location /media/ {\n        proxy_pass https://s3.dc-paris.example.net/shop-media/;\n    }\n    location / {\n        root /srv/shop/public;\n        index index.html;\n    }\n}\n",
    ),
    (
        "shop/web/site.env",
        "PUBLIC_URL=https://shop.example.com\nAPI_UPSTREAM=http://app.shop.paris.internal:8080\nWORKERS=4\n",
    ),
    (
        "shop/app/app.yaml",
        "service: shop-api\nlisten: 0.0.0.0:8080\npublic_url: https://shop.example.com\ndatabase:\n  host: db.shop.paris.internal\n  port: 5432\n  name: shop\nmedia:\n  endpoint: https://s3.dc-paris.example.net\n  bucket: shop-media\n  region: fr-par\ncdn:\n  url: https://cdn.shop.example.com/\n",
    ),
    (
        "shop/app/.env",
        "# secrets come from files, never from here\nDATABASE_URL=postgres://shop@db.shop.paris.internal:5432/shop\nS3_ENDPOINT=https://s3.dc-paris.example.net\nS3_BUCKET=shop-media\nAWS_ACCESS_KEY_ID_FILE=/run/secrets/paris-key\n",
    ),
    (
        "shop/app/features.json",
        "{\n  \"payments\": {\n    \"provider_url\": \"https://pay.example.org/v2\",\n    \"callback\": \"https://shop.example.com/pay/callback\"\n  },\n  \"search\": { \"host\": \"10.10.0.12\", \"port\": 9200 }\n}\n",
    ),
    (
        "shop/db/postgresql.conf",
        "# PostgreSQL\nlisten_addresses = '10.10.0.13'\nport = 5432\nmax_connections = 200\nshared_buffers = 2GB\n",
    ),
    (
        "shop/db/backup.toml",
        "[backup]\nschedule = \"0 3 * * *\"\narchive_url = \"https://s3.dc-paris.example.net/shop-media/db-archive/\"\n\n[source]\nhost = \"db.shop.paris.internal\"\n",
    ),
];

#[derive(Default)]
struct Messages(Mutex<Vec<String>>);

impl ProgressSink for Messages {
    fn progress(&self, _done: u64, _total: Option<u64>) {}
    fn message(&self, text: &str) {
        self.0.lock().unwrap().push(text.to_owned());
    }
}

fn request(source: &Path, output: &Path, extra: serde_json::Value) -> StepRequest {
    let mut params = serde_json::json!({
        "output": output.to_str().unwrap(),
        "map": serde_json::to_value(shop_map()).unwrap(),
    });
    if let (Some(p), Some(e)) = (params.as_object_mut(), extra.as_object()) {
        p.extend(e.clone());
    }
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "config".to_owned(),
        Artifact {
            kind: ArtifactKind::ConfigFile,
            site: "dc-paris".into(),
            locator: source.to_str().unwrap().into(),
            size: None,
            checksum: None,
        },
    );
    StepRequest {
        step_id: "adapt-config".into(),
        params,
        inputs,
    }
}

fn write_demo(root: &Path) {
    for (rel, text) in DEMO {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    }
}

#[tokio::test]
async fn migrator_moves_every_demo_reference_to_frankfurt() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("paris"), dir.path().join("fra"));
    write_demo(&src);
    let m = ConfigAdapt;
    assert_eq!(m.describe().name, "config-adapt");
    for (rel, original) in DEMO {
        let (from, to) = (src.join(rel), dst.join(rel));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let req = request(&from, &to, serde_json::json!({"site": "cloud-frankfurt"}));
        assert!(m.validate(&req).is_empty(), "{rel}: {:?}", m.validate(&req));
        let out = m.execute(&req, &ExecContext::quiet()).await.unwrap();
        let text = std::fs::read_to_string(&to).unwrap();
        let art = &out.artifacts["config"];
        assert_eq!(art.locator, to.to_str().unwrap());
        assert_eq!(art.site, "cloud-frankfurt");
        assert_eq!(
            art.checksum.as_deref(),
            Some(config::checksum(text.as_bytes()).as_str())
        );
        assert_eq!(art.size, Some(text.len() as u64));
        let format = Format::detect(&to, &text);
        let left = leftovers(rel, &text, format, &shop_map()).unwrap();
        assert!(left.is_empty(), "{rel}: {left:?}");
        assert!(
            !text.contains("paris.internal") && !text.contains("10.10.0."),
            "{rel}:\n{text}"
        );
        // Public names stay.
        for public in [
            "shop.example.com",
            "pay.example.org",
            "cdn.shop.example.com",
        ] {
            assert_eq!(
                text.matches(public).count(),
                original.matches(public).count(),
                "{rel}: {public}"
            );
        }
        assert_eq!(
            std::fs::metadata(&to).unwrap().permissions().mode() & 0o7777,
            0o640,
            "{rel}"
        );
        // Re-running gives the same bytes and writes nothing.
        let again = m.execute(&req, &ExecContext::quiet()).await.unwrap();
        assert_eq!(again.artifacts["config"].checksum, art.checksum);
        assert_eq!(again.measured.bytes_written, 0);
        assert_eq!(
            std::fs::read_to_string(&from).unwrap(),
            *original,
            "source untouched"
        );
        // Rollback removes what it created and nothing else.
        m.rollback(&req, Some(&out), &ExecContext::quiet())
            .await
            .unwrap();
        assert!(!to.exists(), "{rel}");
        assert!(from.exists());
    }
    // Spot-check two files exactly.
    let env = src.join("shop/app/.env");
    let to = dst.join("shop/app/.env");
    m.execute(
        &request(&env, &to, serde_json::json!({})),
        &ExecContext::quiet(),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(&to).unwrap(),
        "# secrets come from files, never from here\nDATABASE_URL=postgres://shop@db.shop.fra.internal:5432/shop\nS3_ENDPOINT=https://s3.eu-central.cloud.example.com\nS3_BUCKET=shop-media-fra\nAWS_ACCESS_KEY_ID_FILE=/run/secrets/frankfurt-key\n"
    );
}

#[tokio::test]
async fn rollback_prunes_the_directories_it_left_empty_up_to_the_given_one() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src/app.env");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, "DB=db.shop.paris.internal\n").unwrap();
    let top = tmp.path().join("site/config");
    std::fs::create_dir_all(&top).unwrap();
    // A sibling that was there before keeps `shop/` alive; `app/` goes.
    std::fs::create_dir_all(top.join("shop/web")).unwrap();
    let out = top.join("shop/app/deep/app.env");
    let m = ConfigAdapt;
    let req = request(
        &src,
        &out,
        serde_json::json!({"prune_up_to": top.to_str().unwrap()}),
    );
    let done = m.execute(&req, &ExecContext::quiet()).await.unwrap();
    assert!(out.is_file());
    m.rollback(&req, Some(&done), &ExecContext::quiet())
        .await
        .unwrap();
    assert!(!top.join("shop/app").exists(), "empty directories stay");
    assert!(
        top.join("shop/web").is_dir(),
        "a directory it did not make went"
    );
    assert!(top.is_dir());
    // Without the param, directories stay, as before.
    let req = request(&src, &out, serde_json::json!({}));
    let done = m.execute(&req, &ExecContext::quiet()).await.unwrap();
    m.rollback(&req, Some(&done), &ExecContext::quiet())
        .await
        .unwrap();
    assert!(top.join("shop/app/deep").is_dir());
    // A directory not above the output is refused by name.
    let bad = request(&src, &out, serde_json::json!({"prune_up_to": "/elsewhere"}));
    let d = m.validate(&bad);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].key.as_deref(), Some("params.prune_up_to"));
}

#[tokio::test]
async fn in_place_adaptation_keeps_the_original_and_rollback_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    write_demo(dir.path());
    let path = dir.path().join("shop/app/app.yaml");
    let original = std::fs::read_to_string(&path).unwrap();
    let rules =
        serde_json::json!([{"file": "app/app.yaml", "key": "media.region", "set": "eu-central-1"}]);
    let req = request(&path, &path, serde_json::json!({ "rules": rules }));
    let m = ConfigAdapt;
    let sink = Arc::new(Messages::default());
    let ctx = ExecContext {
        progress: sink.clone(),
        cancel: CancelFlag::new(),
    };
    m.execute(&req, &ctx).await.unwrap();
    let adapted = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        adapted,
        "service: shop-api\nlisten: 0.0.0.0:8080\npublic_url: https://shop.example.com\ndatabase:\n  host: db.shop.fra.internal\n  port: 5432\n  name: shop\nmedia:\n  endpoint: https://s3.eu-central.cloud.example.com\n  bucket: shop-media-fra\n  region: eu-central-1\ncdn:\n  url: https://cdn.shop.example.com/\n"
    );
    let backup = dir.path().join("shop/app/app.yaml.fluidcloud-orig");
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), original);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    let said = sink.0.lock().unwrap().join("\n");
    assert!(
        said.contains("-  host: db.shop.paris.internal\n+  host: db.shop.fra.internal\n"),
        "{said}"
    );
    // Again in place: computed from the kept original, same bytes; the
    // explicit rule does not fail on the already-adapted file.
    let again = m.execute(&req, &ExecContext::quiet()).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), adapted);
    assert_eq!(again.measured.bytes_written, 0);
    m.rollback(&req, Some(&again), &ExecContext::quiet())
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
    assert!(!backup.exists());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o640
    );
}

#[tokio::test]
async fn dry_run_reports_the_diff_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_demo(dir.path());
    let path = dir.path().join("shop/db/postgresql.conf");
    let before = std::fs::read_to_string(&path).unwrap();
    let req = request(&path, &path, serde_json::json!({"dry_run": true}));
    let sink = Arc::new(Messages::default());
    let ctx = ExecContext {
        progress: sink.clone(),
        cancel: CancelFlag::new(),
    };
    let out = ConfigAdapt.execute(&req, &ctx).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    assert!(
        !dir.path()
            .join("shop/db/postgresql.conf.fluidcloud-orig")
            .exists()
    );
    assert_eq!(out.measured.bytes_written, 0);
    let said = sink.0.lock().unwrap().clone();
    let p = path.to_str().unwrap().trim_start_matches('/');
    assert_eq!(
        said,
        [format!(
            "dry run: would write {} (1 change(s))\n--- a/{p}\n+++ b/{p}\n@@ -1,5 +1,5 @@\n # PostgreSQL\n-listen_addresses = '10.10.0.13'\n+listen_addresses = '10.30.0.13'\n port = 5432\n max_connections = 200\n shared_buffers = 2GB\n",
            path.display()
        )]
    );
    ConfigAdapt
        .rollback(&req, Some(&out), &ExecContext::quiet())
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
}

#[tokio::test]
async fn validation_points_at_params_and_execution_errors_name_the_file() {
    let m = ConfigAdapt;
    let mut req = request(
        Path::new("/srv/a.yaml"),
        Path::new("relative.yaml"),
        serde_json::json!({
            "map": [{"kind": "ip", "from": "not-an-ip", "to": "x"}],
            "rules": [{"file": "other.yaml", "key": "a", "set": "b"}, {"file": "a.yaml"}],
            "format": "xml",
            "dry_run": "yes",
        }),
    );
    let keys: Vec<_> = m
        .validate(&req)
        .into_iter()
        .map(|d| d.key.unwrap_or_default())
        .collect();
    assert_eq!(
        keys,
        [
            "params.output",
            "params.map",
            "params.rules[0].file",
            "params.rules[1]",
            "params.format",
            "params.dry_run"
        ]
    );
    req.inputs.clear();
    assert!(
        m.validate(&req)
            .iter()
            .any(|d| d.key.as_deref() == Some("inputs.config"))
    );

    // A rule for an absent key fails the step with a diagnostic naming it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, "database:\n  host: x\n").unwrap();
    let out = dir.path().join("out.yaml");
    let req = request(
        &path,
        &out,
        serde_json::json!({"rules": [{"file": "app.yaml", "key": "database.hots", "set": "y"}]}),
    );
    let e = m.execute(&req, &ExecContext::quiet()).await.unwrap_err();
    let fluidcloud_plugins::Error::Invalid(d) = &e else {
        panic!("{e:?}");
    };
    assert_eq!(d[0].key.as_deref(), Some("database.hots"));
    assert_eq!(d[0].file.as_deref(), Some(path.as_path()));
    assert!(!out.exists());

    // The map may come from an endpoint-map artifact instead.
    let map_file = dir.path().join("map.json");
    std::fs::write(
        &map_file,
        r#"{"entries": [{"kind": "host", "from": "x", "to": "y"}]}"#,
    )
    .unwrap();
    let mut req = request(&path, &out, serde_json::json!({}));
    req.params.as_object_mut().unwrap().remove("map");
    req.inputs.insert(
        "map".into(),
        Artifact {
            kind: ArtifactKind::EndpointMap,
            site: "broker".into(),
            locator: map_file.to_str().unwrap().into(),
            size: None,
            checksum: None,
        },
    );
    assert!(m.validate(&req).is_empty());
    m.execute(&req, &ExecContext::quiet()).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "database:\n  host: y\n"
    );
}

#[test]
fn hostile_input_gives_errors_not_panics() {
    let snippets = [
        "",
        "\n\n",
        "é: [é, db.shop.paris.internal]\n",
        "k: \"db.shop.paris.internal\\",
        "k: 'db.shop.paris.internal",
        "{\"a\": \"db.shop.paris.internal\\u00e9\", \"b\": [1, {\"c\": \"\\\"\"}]}",
        "[[[[[[[[",
        "a = \"\"\"db.shop.paris.internal",
        "k: |\n",
        "k: >-\n  db.shop.paris.internal\n\n  x\n",
        "- &a db.shop.paris.internal\n- *a\n- !!str 10.10.0.13\n",
        "? [complex, key]\n: db.shop.paris.internal\n",
        "A=\"unterminated db.shop.paris.internal\n",
        "x = 'a''b' 'c'\n",
        "\u{feff}db.shop.paris.internal\r\nk=10.10.0.13\r\n",
        "ü=é db.shop.paris.internalé\n",
    ];
    let formats = [
        Format::Yaml,
        Format::Json,
        Format::Toml,
        Format::Ini,
        Format::Env,
        Format::Text,
    ];
    for s in snippets {
        for f in formats {
            if let Ok(out) = adapt("h", s, f, &shop_map(), &[]) {
                // Whatever was accepted reads back and is stable.
                let again = adapt("h", &out.content, f, &shop_map(), &[]).unwrap();
                assert_eq!(again.content, out.content, "{f}: {s:?}");
            }
            let _ = leftovers("h", s, f, &shop_map());
        }
    }
    // Aliases and tags: the anchored value changes once, the alias follows.
    let out = adapt(
        "a.yaml",
        "- &a db.shop.paris.internal\n- *a\n- !!str 10.10.0.13\n",
        Format::Yaml,
        &shop_map(),
        &[],
    )
    .unwrap();
    assert_eq!(
        out.content,
        "- &a db.shop.fra.internal\n- *a\n- !!str 10.30.0.13\n"
    );
}

#[test]
fn nested_shapes_flow_collections_dotted_keys_and_folded_blocks() {
    let yaml = "a: {host: db.shop.paris.internal, port: 1}\nb: [10.10.0.13, \"x\"]\nc: >-\n  connect to\n  db.shop.paris.internal\n\nd: 1\n";
    assert_eq!(
        run("n.yaml", yaml, Format::Yaml, &[]),
        "a: {host: db.shop.fra.internal, port: 1}\nb: [10.30.0.13, \"x\"]\nc: >-\n  connect to\n  db.shop.fra.internal\n\nd: 1\n"
    );
    let toml = "db.host = \"db.shop.paris.internal\"\n[[mirror]]\nurl = \"https://s3.dc-paris.example.net/a\"\n[[mirror]]\nurl = \"http://10.10.0.13/\"\n";
    let out = adapt("n.toml", toml, Format::Toml, &shop_map(), &[]).unwrap();
    assert_eq!(
        out.content,
        "db.host = \"db.shop.fra.internal\"\n[[mirror]]\nurl = \"https://s3.eu-central.cloud.example.com/a\"\n[[mirror]]\nurl = \"http://10.30.0.13/\"\n"
    );
    let at: Vec<_> = out.changes.iter().map(|c| c.location.as_str()).collect();
    assert_eq!(at, ["db.host", "mirror[0].url", "mirror[1].url"]);
    let rules = [Rule::set("n.toml", "mirror[1].url", "http://10.30.0.99/")];
    let out = adapt("n.toml", toml, Format::Toml, &EndpointMap::new(), &rules).unwrap();
    assert!(
        out.content.ends_with("url = \"http://10.30.0.99/\"\n"),
        "{}",
        out.content
    );
}
