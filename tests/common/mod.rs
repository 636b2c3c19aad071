//! Helpers for tests that run the real `fluidcloud` binary.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

pub mod libvirt;
pub mod netns;

/// Runs the binary with `args`; no sites file from the environment leaks in.
pub fn run(args: &[&str]) -> Output {
    run_in(Path::new(env!("CARGO_TARGET_TMPDIR")), args)
}

/// Runs the binary in directory `cwd`.
pub fn run_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(args)
        .current_dir(cwd)
        .env_remove("FLUIDCLOUD_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Asserts failure with `code` and returns stderr.
pub fn fails(o: &Output, code: i32) -> String {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    stderr(o)
}

/// One demo environment per test binary and test run, created by the real
/// CLI and shared read-only by the binary's tests (each in its own process
/// under cargo-nextest).
pub fn demo() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let name = stem.split('-').next().unwrap_or("tests").to_owned();
        fluidcloud_testkit::once_per_run(&format!("demo-{name}"), |dir| {
            ok(&run(&["demo", "init", dir.to_str().unwrap()]));
        })
    })
}

pub fn demo_config() -> String {
    demo().join("fluidcloud.toml").to_str().unwrap().to_owned()
}

/// The path of `qemu-img`; tests that need it fail (never skip) without it.
pub fn qemu_img() -> &'static str {
    let found = Command::new("qemu-img").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "qemu-img is required (install Debian's qemu-utils: scripts/setup does)"
    );
    "qemu-img"
}

/// A digest of every file under `dir` (path, size, mode, mtime, content),
/// to prove a failing command changed nothing.
pub fn tree_digest(dir: &Path) -> Vec<(PathBuf, u64, u32, i64, u64)> {
    use std::hash::{DefaultHasher, Hasher};
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            let mut h = DefaultHasher::new();
            if m.is_file() {
                h.write(&std::fs::read(&p).unwrap());
            }
            out.push((
                p,
                m.len(),
                m.mode(),
                m.mtime_nsec() + m.mtime() * 1_000_000_000,
                h.finish(),
            ));
        }
    }
    out.sort();
    out
}

/// The relocation id from the first `relocation ID: …` line of `out`.
pub fn relocation_id(out: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.starts_with("relocation "))
        .unwrap_or_else(|| panic!("no relocation line in:\n{out}"));
    line["relocation ".len()..]
        .split(':')
        .next()
        .unwrap()
        .to_owned()
}

/// The Rust example plugin. `scripts/test` builds it (`cargo build
/// --workspace --bins`); this runs the same command, which is a no-op
/// then. (`cargo build -p fluidcloud-plugins` would not be: its features
/// differ from the workspace's, and it rebuilds the crate and its deps.)
pub fn dns_zone_plugin() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-q", "--workspace", "--bins"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cannot build the dns-zone example"
        );
        profile_dir.join("fluidcloud-migrator-dns-zone")
    })
}

/// The Python example plugin.
pub fn sqlite_plugin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("plugins/examples/sqlite-dump/fluidcloud-migrator-sqlite-dump")
}

/// A fresh demo environment of its own for one test (`name` keeps tests
/// apart): its directory and its sites file.
pub fn fresh_demo(name: &str) -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("relocate-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    fluidcloud_testkit::scratch(&dir);
    ok(&run(&["demo", "init", dir.to_str().unwrap()]));
    let config = dir.join("fluidcloud.toml").to_str().unwrap().to_owned();
    (dir, config)
}

/// `--config CONFIG relocate --from FROM --service shop --to TO --yes`.
pub fn relocate_shop<'a>(config: &'a str, from: &'a str, to: &'a str) -> Vec<&'a str> {
    vec![
        "--config",
        config,
        "relocate",
        "--from",
        from,
        "--service",
        "shop",
        "--to",
        to,
        "--yes",
    ]
}

/// Runs the binary with `plugins` (executables or directories) as
/// `$FLUIDCLOUD_PLUGIN_PATH` and an empty plugins directory, so only they
/// are discovered.
pub fn run_with_plugins(plugins: &[&Path], args: &[&str]) -> Output {
    let empty = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args(args)
        .env(
            "FLUIDCLOUD_PLUGIN_PATH",
            std::env::join_paths(plugins).unwrap(),
        )
        .env("FLUIDCLOUD_PLUGIN_DIR", empty.path())
        .env_remove("FLUIDCLOUD_CONFIG")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Asserts that two files hold the same bytes (`cmp`).
pub fn same_bytes(a: &Path, b: &Path) {
    let out = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "{} and {} differ: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The `state` of instance `instance` on local site `site_name` of the
/// demo environment in `dir`.
pub fn instance_state(dir: &Path, site_name: &str, instance: &str) -> String {
    let path = dir
        .join("sites")
        .join(site_name)
        .join(format!("instances/{instance}.toml"));
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("state = "))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap()
}

/// Fills `path` with `len` bytes of non-repeating data (xorshift), fast.
pub fn random_file(path: &Path, len: u64) {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..len / (1 << 20) {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

/// 4 MiB chunks of random data a transfer has written into `part` (the
/// file a new disk is written in, `.NAME.fcpart`), as the file system
/// counts its allocated blocks.
pub fn chunks_written(part: &Path) -> u64 {
    std::fs::metadata(part).map_or(0, |m| {
        std::os::unix::fs::MetadataExt::blocks(&m) * 512 / (4 << 20)
    })
}

/// Creates the directories of an empty `local` site at `root`.
pub fn local_site(root: &std::path::Path) {
    for d in [
        "instances",
        "images",
        "volumes",
        "buckets",
        "config",
        "services",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
}

/// Step `id` of a `report --json` answer.
pub fn report_step(report: &serde_json::Value, id: &str) -> serde_json::Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {report}"))
        .clone()
}

/// Starts `fluidcloud --config CONFIG --json serve --listen 127.0.0.1:0`
/// (no state directory, database or log level from the environment), with
/// `setup` adding arguments, variables and stderr; the child and the first
/// line it printed (`{"listening": URL, "fingerprint": …}`).
pub fn spawn_serve(config: &str, setup: impl FnOnce(&mut Command)) -> (Child, serde_json::Value) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fluidcloud"));
    cmd.args([
        "--config",
        config,
        "--json",
        "serve",
        "--listen",
        "127.0.0.1:0",
    ])
    .env_remove("FLUIDCLOUD_STATE_DIR")
    .env_remove("FLUIDCLOUD_DATABASE")
    .env_remove("RUST_LOG")
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    setup(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let doc =
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("unexpected first line: {line:?}"));
    (child, doc)
}
