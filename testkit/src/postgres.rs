//! Throw-away PostgreSQL clusters started by `scripts/postgres`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::{tmp_root, workspace};

/// The variable scripts/test sets to the run's shared cluster.
const SHARED_DIR_ENV: &str = "FLUIDCLOUD_POSTGRES_DIR";

/// A PostgreSQL cluster on loopback.
pub struct Postgres {
    dir: PathBuf,
    owned: bool,
}

/// Runs `scripts/postgres ARGS` ([`crate::script`]).
pub(crate) fn script(args: &[&str]) -> Output {
    crate::script("postgres", args)
}

impl Postgres {
    /// The test run's cluster: `$FLUIDCLOUD_POSTGRES_DIR` (scripts/test
    /// starts it once per run), else `target/tmp/postgres-shared`, started
    /// here if it is not running. Tests never stop it: each takes a
    /// database of its own ([`Postgres::database`]).
    pub fn shared() -> &'static Postgres {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        SHARED.get_or_init(|| {
            let dir = std::env::var_os(SHARED_DIR_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| tmp_root().join("postgres-shared"));
            Self::start_in(dir, false)
        })
    }

    /// A cluster of this test's own, for tests that stop or restart it;
    /// stopped and removed when dropped.
    pub fn private(name: &str) -> Postgres {
        let dir = tmp_root().join(format!("postgres-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self::start_in(dir, true)
    }

    fn start_in(dir: PathBuf, owned: bool) -> Postgres {
        script(&["start", dir.to_str().unwrap()]);
        Postgres { dir, owned }
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// A fresh, empty database of the cluster (dropped first when a
    /// database of that name is left over): its URL, with the password.
    pub fn database(&self, name: &str) -> String {
        let out = script(&["createdb", self.dir_str(), name]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops and starts the server on the same port and data (a
    /// [`Postgres::private`] cluster only).
    pub fn restart(&self) {
        assert!(self.owned, "only a private cluster is restarted by a test");
        script(&["restart", self.dir_str()]);
    }

    /// Stops the server (a [`Postgres::private`] cluster only).
    pub fn stop(&self) {
        assert!(self.owned, "only a private cluster is stopped by a test");
        script(&["stop", self.dir_str()]);
    }

    /// Starts it again after [`Postgres::stop`].
    pub fn start(&self) {
        script(&["start", self.dir_str()]);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new(workspace().join("scripts/postgres"))
                .args(["stop", self.dir_str()])
                .output();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
