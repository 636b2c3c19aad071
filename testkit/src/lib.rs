//! Test support shared by fluidcloud's test trees.
//!
//! cargo-nextest (scripts/test) runs every test in its own process, and
//! several processes at once. Whatever a test binary used to set up once per
//! process (a Garage pair, a demo environment) would then be set up once per
//! *test*, and two processes would tear down each other's copy. This crate
//! gives the two shapes that work across processes:
//!
//! - [`Garage::shared`]: the run's one Garage pair, started by scripts/test
//!   (or by the first test that asks), never stopped by a test; tests keep
//!   apart by bucket name ([`unique`]) or by [`Lock`].
//! - [`once_per_run`]: a directory made once per test run, under a lock,
//!   and reused read-only by every test process of that run.
//!
//! Servers are never optional: a missing one fails the test with the
//! command to run, it never skips.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

mod garage;
mod moto;
mod postgres;

pub use garage::Garage;
pub use moto::Moto;
pub use postgres::Postgres;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `scripts/NAME ARGS`, panicking with its output on failure (a
/// missing server says to run scripts/setup).
pub(crate) fn script(name: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(workspace().join("scripts").join(name))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `target/tmp` of the workspace: scratch space that outlives a test.
pub fn tmp_root() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("tmp");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What identifies this test run: nextest's run id (the same in every
/// process of one `cargo nextest run`), else this process (`cargo test`
/// runs a binary's tests in one process).
pub fn run_id() -> String {
    std::env::var("NEXTEST_RUN_ID").unwrap_or_else(|_| format!("pid-{}", std::process::id()))
}

/// A name no other test of this run uses: `prefix-PID-N`, lowercase
/// (valid as an S3 bucket name for short prefixes).
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An exclusive `flock` on a file, held until dropped: keeps tests of
/// different processes apart where they share a name (a bucket, a
/// libvirt domain).
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Waits for the lock named `name` (a file under `target/tmp/locks`).
    pub fn take(name: &str) -> Self {
        let dir = tmp_root().join("locks");
        std::fs::create_dir_all(&dir).unwrap();
        Self::on(&dir.join(name))
    }

    fn on(path: &Path) -> Self {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("lock file {}: {e}", path.display()));
        // SAFETY: flock on a descriptor this File owns; no memory involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", path.display());
        Self { _file: file }
    }
}

/// The directory `target/tmp/NAME`, made by `init` once per test run (see
/// [`run_id`]) and shared by every test process of the run. A directory
/// left by an earlier run, or by an `init` that failed, is made again.
/// Tests must only read it.
pub fn once_per_run(name: &str, init: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp_root().join(name);
    let _lock = Lock::on(&tmp_root().join(format!(".{name}.lock")));
    let marker = tmp_root().join(format!(".{name}.run"));
    let id = run_id();
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == id) && dir.is_dir() {
        return dir;
    }
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_dir_all(&dir);
    init(&dir);
    std::fs::write(&marker, &id).unwrap();
    dir
}

/// Directories [`scratch`] registered, removed when the process exits.
static SCRATCH: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
/// Whether any test of this process panicked (failed).
static PANICKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn remove_scratch() {
    if PANICKED.load(Ordering::SeqCst) {
        return;
    }
    if let Ok(dirs) = SCRATCH.lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Registers `dir` (a test's work directory, say a demo environment of
/// 650 MiB) for removal when the test process exits, unless a test of the
/// process failed: then it stays for the post-mortem. A full run would
/// otherwise leave tens of GiB behind.
pub fn scratch(dir: &Path) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
        // SAFETY: registers a plain function taking no arguments.
        unsafe { libc::atexit(remove_scratch) };
    });
    if let Ok(mut dirs) = SCRATCH.lock() {
        dirs.push(dir.to_owned());
    }
}
