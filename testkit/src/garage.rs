//! Garage S3 server pairs (A and B) started by `scripts/garage`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::{tmp_root, workspace};

/// The variable scripts/test sets to the run's shared pair.
pub(crate) const SHARED_DIR_ENV: &str = "FLUIDCLOUD_GARAGE_DIR";

/// A pair of Garage servers, A and B, on loopback.
pub struct Garage {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    owned: bool,
}

/// Runs `scripts/garage ARGS` ([`crate::script`]).
pub(crate) fn script(args: &[&str]) -> Output {
    crate::script("garage", args)
}

impl Garage {
    /// The test run's pair: `$FLUIDCLOUD_GARAGE_DIR` (scripts/test starts it
    /// once per run), else `target/tmp/garage-shared`, started here if it
    /// is not running. Tests never stop it: they use their own bucket
    /// names ([`crate::unique`]) or take a [`crate::Lock`].
    pub fn shared() -> &'static Garage {
        static SHARED: OnceLock<Garage> = OnceLock::new();
        SHARED.get_or_init(|| {
            let dir = std::env::var_os(SHARED_DIR_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| tmp_root().join("garage-shared"));
            Self::start_in(dir, false)
        })
    }

    /// A pair of this test's own, for tests that stop a server; stopped and
    /// removed when dropped.
    pub fn private(name: &str) -> Garage {
        let dir = tmp_root().join(format!("garage-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self::start_in(dir, true)
    }

    fn start_in(dir: PathBuf, owned: bool) -> Garage {
        script(&["start", dir.to_str().unwrap()]);
        let mut g = Garage {
            dir,
            env: BTreeMap::new(),
            owned,
        };
        g.reload();
        g
    }

    fn reload(&mut self) {
        let text = std::fs::read_to_string(self.dir.join("env")).unwrap();
        self.env = text
            .lines()
            .filter_map(|l| l.trim_start_matches("export ").split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    }

    /// The pair's directory (scripts/garage's DIR).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// `GARAGE_{inst}_{what}` of the pair's env file.
    pub fn var(&self, inst: &str, what: &str) -> &str {
        let key = format!("GARAGE_{inst}_{what}");
        self.env
            .get(&key)
            .unwrap_or_else(|| panic!("{key} is not in {}/env", self.dir.display()))
    }

    /// The S3 endpoint of instance `inst` (`A` or `B`).
    pub fn endpoint(&self, inst: &str) -> &str {
        self.var(inst, "ENDPOINT")
    }

    /// The access key id of instance `inst`.
    pub fn access_key_id(&self, inst: &str) -> &str {
        self.var(inst, "ACCESS_KEY_ID")
    }

    /// The secret access key of instance `inst`.
    pub fn secret_access_key(&self, inst: &str) -> &str {
        self.var(inst, "SECRET_ACCESS_KEY")
    }

    /// Exports `{prefix}_{A,B}_{ENDPOINT,ACCESS_KEY_ID,SECRET_ACCESS_KEY,...}`
    /// into this process, for locations that name their credentials by
    /// variable. Call it before the test starts threads that read the
    /// environment.
    pub fn export(&self, prefix: &str) {
        for (k, v) in &self.env {
            let k = k.replacen("GARAGE", prefix, 1);
            // SAFETY: tests export before they start threads of their own;
            // nothing else in the process writes these names.
            unsafe { std::env::set_var(k, v) };
        }
    }

    /// The object-copy location of `bucket` on `inst`, its credentials
    /// named by the variables [`Garage::export`] set with `prefix`.
    pub fn url(&self, prefix: &str, inst: &str, bucket: &str) -> String {
        format!(
            "s3://{bucket}?endpoint={}&region=garage&access_key_id_env={prefix}_{inst}_ACCESS_KEY_ID&secret_access_key_env={prefix}_{inst}_SECRET_ACCESS_KEY",
            self.endpoint(inst)
        )
    }

    /// Creates bucket `name` on `inst` (if missing) and grants the pair's key.
    pub fn bucket(&self, inst: &str, name: &str) {
        script(&["bucket", self.dir_str(), inst, name]);
    }

    /// Stops server `inst` (fault tests; only on a [`Garage::private`] pair).
    pub fn stop_one(&self, inst: &str) {
        assert!(
            self.owned,
            "a test must not stop a server of the shared pair"
        );
        script(&["stop-one", self.dir_str(), inst]);
    }

    /// Starts server `inst` again, on the same ports and data.
    pub fn start_one(&self, inst: &str) {
        script(&["start-one", self.dir_str(), inst]);
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if self.owned {
            let _ = Command::new(workspace().join("scripts/garage"))
                .args(["stop", self.dir_str()])
                .output();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
