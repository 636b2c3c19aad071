//! Atomic writes that keep a file's mode (and owner, where allowed), and
//! the unified diff shown by dry runs.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::{Error, Result};

/// Mode of a file created where none existed and no mode was given.
pub const DEFAULT_MODE: u32 = 0o644;

/// Replaces `path` with `content` atomically: a temporary file in the same
/// directory is written, synced, given the mode (and owner) of the file it
/// replaces, and renamed over it; the directory is synced after the
/// rename. A reader sees the old file or the new one, never a mix, and a
/// crash leaves at worst a stray `.NAME.fluidcloud-tmp-PID` file.
///
/// A new file gets mode [`DEFAULT_MODE`]; see [`write_atomic_mode`].
///
/// # Errors
/// [`Error::Io`] naming the path, when any step fails; the temporary file
/// is removed then.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<()> {
    write_atomic_mode(path, content, DEFAULT_MODE)
}

/// [`write_atomic`], giving a new file (one that does not exist yet) the
/// permission bits `mode_if_new`; an existing file keeps its own.
///
/// # Errors
/// As [`write_atomic`].
pub fn write_atomic_mode(path: &Path, content: &[u8], mode_if_new: u32) -> Result<()> {
    let existing = match fs::metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(format!("stat {}", path.display()), e)),
    };
    let mode = existing
        .as_ref()
        .map_or(mode_if_new, |m| m.permissions().mode())
        & 0o7777;
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| {
                Error::io(
                    format!("creating a temporary file next to {}", path.display()),
                    e,
                )
            })?;
        f.write_all(content)
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        if let Some(m) = &existing {
            let meta = f
                .metadata()
                .map_err(|e| Error::io(format!("stat {}", tmp.display()), e))?;
            if (meta.uid(), meta.gid()) != (m.uid(), m.gid()) {
                std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid())).map_err(|e| {
                    Error::io(
                        format!("giving {} the owner of {}", tmp.display(), path.display()),
                        e,
                    )
                })?;
            }
        }
        // After chown, which may clear set-id bits.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(format!("chmod {}", tmp.display()), e))?;
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing {}", tmp.display()), e))?;
        fs::rename(&tmp, path).map_err(|e| {
            Error::io(
                format!("renaming {} to {}", tmp.display(), path.display()),
                e,
            )
        })?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.fluidcloud-tmp-{}", std::process::id()))
}

/// Syncs the directory holding `path`, so a rename in it is durable.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// A unified diff of `old` and `new` as `diff -u` prints it for a file at
/// `path` (`--- a/PATH`, `+++ b/PATH`, `@@` hunks with 3 lines of
/// context); empty when the texts are equal.
pub fn unified_diff(path: &str, old: &str, new: &str) -> String {
    if old == new {
        return String::new();
    }
    let p = path.trim_start_matches('/');
    let diff = similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a/{p}"), &format!("b/{p}"))
        .to_string();
    // Config files hold credentials: a diff shows that a secret line
    // changed, never the secret (line by line, so -/+ lines both stay).
    fluidcloud_plugins::redact::string(&diff)
}
