//! Where relocations keep their state: one directory per relocation.
//!
//! ```text
//! STATE/relocations/ID/relocation.json   the plan (Relocation), written once, atomically
//! STATE/relocations/ID/journal.sqlite    the viaduct journal (steps, outputs, times)
//! STATE/relocations/ID/report.json       the last report written
//! ```
//!
//! `STATE` is `$FLUIDCLOUD_STATE_DIR`, or `.fluidcloud/` next to the sites
//! file, so a demo directory carries its own history.
//!
//! With a database (`fluidcloud serve --database`, `FLUIDCLOUD_DATABASE`),
//! the plan, the journal and the report are rows of PostgreSQL instead
//! ([`super::queue`]), shared by every worker; the directory keeps only
//! what steps write next to the process (their rollback records).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fluidcloud_viaduct::JournalLocation;
use fluidcloud_viaduct::journal::Entry;

use fluidcloud_plugins::{Diagnostic, Error as SdkError};

use super::Relocation;
use super::queue::Database;
use crate::error::{Error, Result};

/// Environment variable overriding the state directory.
pub const STATE_ENV: &str = "FLUIDCLOUD_STATE_DIR";

/// Environment variable naming the database (`postgres://…`) relocations
/// are kept in, instead of the state directory.
pub const DATABASE_ENV: &str = "FLUIDCLOUD_DATABASE";

/// Where the relocations of a sites file are kept: its state directory,
/// or a database.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    db: Option<Arc<Database>>,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Site {
        site: "local state".into(),
        source: SdkError::io(format!("{what} {}", path.display()), e),
    }
}

/// The state directory of `sites_file`: `$FLUIDCLOUD_STATE_DIR`, or
/// `.fluidcloud/` next to it. Relocations live in its `relocations/`, the
/// service's generated TLS identity in its `tls/`.
pub fn state_dir(sites_file: &Path) -> PathBuf {
    std::env::var_os(STATE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            sites_file
                .parent()
                .unwrap_or(Path::new("."))
                .join(".fluidcloud")
        })
}

impl Store {
    /// The store for `sites_file`.
    pub fn for_sites_file(sites_file: &Path) -> Self {
        Self {
            root: state_dir(sites_file).join("relocations"),
            db: None,
        }
    }

    /// The same store, keeping relocations in `db`.
    #[must_use]
    pub fn with_database(mut self, db: Arc<Database>) -> Self {
        self.db = Some(db);
        self
    }

    /// The database relocations are kept in, if any.
    pub fn database(&self) -> Option<&Arc<Database>> {
        self.db.as_ref()
    }

    /// The state directory (`STATE`): relocations, service locks.
    pub fn state_dir(&self) -> &Path {
        self.root.parent().unwrap_or(&self.root)
    }

    /// The directory of relocation `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// The journal of relocation `id`.
    pub fn journal(&self, id: &str) -> JournalLocation {
        match &self.db {
            Some(db) => JournalLocation::Postgres {
                url: db.url().to_owned(),
                name: id.to_owned(),
            },
            None => JournalLocation::Sqlite(self.dir(id).join("journal.sqlite")),
        }
    }

    /// The journal entries of relocation `id`, in order (none before its
    /// first run).
    ///
    /// # Errors
    /// A journal that cannot be read, or is corrupt.
    pub fn entries(&self, id: &str) -> Result<Vec<Entry>> {
        match &self.db {
            Some(db) => db.entries(id),
            None => super::report::entries(&self.dir(id).join("journal.sqlite")),
        }
    }

    /// Whether relocation `id` exists.
    ///
    /// # Errors
    /// Database errors.
    pub fn exists(&self, id: &str) -> Result<bool> {
        match &self.db {
            Some(db) => db.exists(id),
            None => Ok(self.dir(id).exists()),
        }
    }

    /// Saves a new relocation; fails if the id exists.
    ///
    /// # Errors
    /// I/O errors; `Precondition` when the id is taken.
    pub fn create(&self, r: &Relocation) -> Result<()> {
        if let Some(db) = &self.db {
            return db.insert(r, &r.service);
        }
        let dir = self.dir(&r.id);
        private_dirs(&self.root)?;
        private_dir(&dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Site {
                    site: "local state".into(),
                    source: SdkError::Precondition(format!(
                        "relocation {} exists already ({})",
                        r.id,
                        dir.display()
                    )),
                }
            } else {
                io(&dir, "creating", e)
            }
        })?;
        let json = serde_json::to_vec_pretty(r).map_err(|e| Error::Site {
            site: "local state".into(),
            source: SdkError::Precondition(format!("cannot encode relocation {}: {e}", r.id)),
        })?;
        write_atomic(&dir.join("relocation.json"), &json)
    }

    /// Loads relocation `id`.
    ///
    /// # Errors
    /// `NotFound` naming the id and the known ones; `Config` for a damaged
    /// record.
    pub fn load(&self, id: &str) -> Result<Relocation> {
        // Ids come from command lines and URLs: never a path.
        super::lock::check_name("relocation id", id)?;
        if let Some(db) = &self.db {
            return db.load(id);
        }
        let path = self.dir(id).join("relocation.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let known = self.list().unwrap_or_default();
                return Err(Error::Site {
                    site: "local state".into(),
                    source: SdkError::NotFound {
                        what: format!(
                            "relocation `{id}` (known: {})",
                            if known.is_empty() {
                                "none".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                        site: None,
                    },
                });
            }
            Err(e) => return Err(io(&path, "reading", e)),
        };
        serde_json::from_str(&text).map_err(|e| Error::Config {
            diagnostics: vec![
                Diagnostic::error(format!("damaged relocation record: {e}"))
                    .in_file(&path)
                    .at_line(u32::try_from(e.line()).unwrap_or(u32::MAX)),
            ],
        })
    }

    /// Ids of every relocation, oldest first (ids sort by time).
    ///
    /// # Errors
    /// I/O errors other than a missing directory.
    pub fn list(&self) -> Result<Vec<String>> {
        if let Some(db) = &self.db {
            return db.list();
        }
        let mut ids = Vec::new();
        match std::fs::read_dir(&self.root) {
            Ok(rd) => {
                for e in rd {
                    let e = e.map_err(|e| io(&self.root, "listing", e))?;
                    if e.path().join("relocation.json").is_file() {
                        ids.push(e.file_name().to_string_lossy().into_owned());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&self.root, "listing", e)),
        }
        ids.sort_by_key(|id| id_time(id));
        Ok(ids)
    }

    /// The relocations of `service` from site `from`, oldest first.
    ///
    /// # Errors
    /// As [`Store::list`] and [`Store::load`].
    pub fn of_service(&self, from: &str, service: &str) -> Result<Vec<Relocation>> {
        if let Some(db) = &self.db {
            return db.of_service(from, service);
        }
        let mut out = Vec::new();
        for id in self.list()? {
            let r = self.load(&id)?;
            if r.from == from && r.service == service {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Writes the report of relocation `id`; where it went.
    ///
    /// # Errors
    /// I/O or database errors.
    pub fn save_report(&self, id: &str, json: &[u8]) -> Result<String> {
        if let Some(db) = &self.db {
            db.save_report(id, json)?;
            return Ok(format!("{}#{id}", db.location()));
        }
        let path = self.dir(id).join("report.json");
        write_atomic(&path, json)?;
        Ok(path.display().to_string())
    }
}

/// The sortable time part of an id (`SERVICE-YYYYMMDD-HHMMSS[-N]`).
fn id_time(id: &str) -> String {
    let parts: Vec<&str> = id.rsplitn(3, '-').collect();
    match parts.as_slice() {
        [last, time, rest] if last.len() <= 3 && last.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{}{time}{last:0>3}", rest.rsplit('-').next().unwrap_or(""))
        }
        [time, date, _] => format!("{date}{time}000"),
        _ => id.to_owned(),
    }
}

/// Creates directory `dir`, readable by its owner only (0700).
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Creates `dir` (`STATE/relocations`) and its missing parents 0700, and
/// makes `dir` and the state directory above it 0700 if an older version
/// left them readable by others.
fn private_dirs(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, "creating", e))?;
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let m = std::fs::metadata(d).map_err(|e| io(d, "reading", e))?;
        if m.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| io(d, "restricting", e))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a fsynced temporary file and a rename;
/// the file is readable by its owner only (0600): relocation records and
/// reports name sites, hosts and what moved.
///
/// # Errors
/// I/O errors naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io(&tmp, "creating", e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, "writing", e))?;
    f.sync_all().map_err(|e| io(&tmp, "syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, "renaming into", e))
}

/// A new relocation id: `SERVICE-YYYYMMDD-HHMMSS` (UTC), with `-2`, `-3`…
/// appended when taken.
///
/// # Errors
/// Database errors.
pub fn new_id(store: &Store, service: &str, unix_secs: u64) -> Result<String> {
    let base = format!("{service}-{}", utc_stamp(unix_secs));
    let mut id = base.clone();
    let mut n = 2;
    while store.exists(&id)? {
        id = format!("{base}-{n}");
        n += 1;
    }
    Ok(id)
}

/// `YYYYMMDD-HHMMSS` of a Unix time, UTC.
pub fn utc_stamp(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(0);
    let secs = unix_secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_calendar_times() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
        assert_eq!(utc_stamp(1_795_350_896), "20261122-123456");
    }

    #[test]
    fn ids_sort_by_time_then_counter() {
        let mut ids = vec![
            "shop-20261122-101500-2",
            "web-api-20261122-090000",
            "shop-20261122-101500",
        ];
        ids.sort_by_key(|id| id_time(id));
        assert_eq!(
            ids,
            [
                "web-api-20261122-090000",
                "shop-20261122-101500",
                "shop-20261122-101500-2"
            ]
        );
    }
}
