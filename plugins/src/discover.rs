//! Finding plugin executables.
//!
//! Three places, in this order (the first sighting of a file wins):
//!
//! 1. the **plugins directory**: `$FLUIDCLOUD_PLUGIN_DIR`, else
//!    `$XDG_DATA_HOME/fluidcloud/plugins`, else
//!    `~/.local/share/fluidcloud/plugins`: every executable file in it;
//! 2. **`$FLUIDCLOUD_PLUGIN_PATH`**: a `:`-separated list of executables, or
//!    of directories whose executables are all plugins;
//! 3. **`$PATH`**: executables named `fluidcloud-migrator-*`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Overrides the plugins directory.
pub const PLUGIN_DIR_ENV: &str = "FLUIDCLOUD_PLUGIN_DIR";
/// A `:`-separated list of plugin executables or directories.
pub const PLUGIN_PATH_ENV: &str = "FLUIDCLOUD_PLUGIN_PATH";
/// The name prefix of plugin executables found on `$PATH`.
pub const EXECUTABLE_PREFIX: &str = "fluidcloud-migrator-";

/// Where a plugin was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginOrigin {
    /// The plugins directory.
    PluginDir,
    /// `$FLUIDCLOUD_PLUGIN_PATH`.
    PluginPath,
    /// `$PATH`.
    SystemPath,
}

impl fmt::Display for PluginOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PluginDir => "plugin-dir",
            Self::PluginPath => "plugin-path",
            Self::SystemPath => "path",
        })
    }
}

/// A plugin executable that was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discovered {
    /// The executable.
    pub path: PathBuf,
    /// Where it was found.
    pub origin: PluginOrigin,
}

/// The places to look.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// The plugins directory.
    pub plugin_dir: Option<PathBuf>,
    /// Entries of `$FLUIDCLOUD_PLUGIN_PATH`.
    pub plugin_path: Vec<PathBuf>,
    /// Entries of `$PATH`.
    pub path: Vec<PathBuf>,
}

impl Sources {
    /// The places named by the environment (see the module docs).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let plugin_dir = var(PLUGIN_DIR_ENV).map(PathBuf::from).or_else(|| {
            var("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".local/share")))
                .map(|d| d.join("fluidcloud/plugins"))
        });
        let split = |k: &str| -> Vec<PathBuf> {
            var(k)
                .map(|v| std::env::split_paths(&v).collect())
                .unwrap_or_default()
        };
        Self {
            plugin_dir,
            plugin_path: split(PLUGIN_PATH_ENV),
            path: split("PATH"),
        }
    }

    /// Every plugin executable found, without duplicates.
    pub fn discover(&self) -> Vec<Discovered> {
        let mut out: Vec<Discovered> = Vec::new();
        let mut add = |path: PathBuf, origin| {
            let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            let seen = out
                .iter()
                .any(|d| std::fs::canonicalize(&d.path).unwrap_or_else(|_| d.path.clone()) == key);
            if !seen {
                out.push(Discovered { path, origin });
            }
        };
        if let Some(dir) = &self.plugin_dir {
            for p in executables_in(dir) {
                add(p, PluginOrigin::PluginDir);
            }
        }
        for entry in &self.plugin_path {
            if entry.is_dir() {
                for p in executables_in(entry) {
                    add(p, PluginOrigin::PluginPath);
                }
            } else if is_executable(entry) {
                add(entry.clone(), PluginOrigin::PluginPath);
            }
        }
        for dir in &self.path {
            for p in executables_in(dir) {
                let named = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(EXECUTABLE_PREFIX));
                if named {
                    add(p, PluginOrigin::SystemPath);
                }
            }
        }
        out
    }
}

/// Plugins found through the environment ([`Sources::from_env`]).
pub fn discover() -> Vec<Discovered> {
    Sources::from_env().discover()
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn executables_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_executable(p))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn finds_plugins_in_dir_env_list_and_path_once_each() {
        let t = tempfile::tempdir().unwrap();
        let (d, e, bin) = (t.path().join("d"), t.path().join("e"), t.path().join("bin"));
        for x in [&d, &e, &bin] {
            std::fs::create_dir(x).unwrap();
        }
        exe(&d, "anything");
        std::fs::write(d.join("not-executable"), "x").unwrap();
        let single = exe(&e, "single");
        exe(&bin, "fluidcloud-migrator-dns");
        exe(&bin, "ls-like-tool");
        let s = Sources {
            plugin_dir: Some(d.clone()),
            plugin_path: vec![single.clone(), d.clone(), t.path().join("missing")],
            path: vec![bin.clone()],
        };
        let found = s.discover();
        let names: Vec<(String, PluginOrigin)> = found
            .iter()
            .map(|f| {
                (
                    f.path.file_name().unwrap().to_string_lossy().into(),
                    f.origin,
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("anything".to_owned(), PluginOrigin::PluginDir),
                ("single".to_owned(), PluginOrigin::PluginPath),
                (
                    "fluidcloud-migrator-dns".to_owned(),
                    PluginOrigin::SystemPath
                ),
            ]
        );
    }
}
