//! One relocation per service at a time.
//!
//! Two relocations of one service would stop each other's source, write
//! each other's targets and roll back each other's work. So a relocation
//! runs only while it holds the lock of its service at its source site:
//! an exclusive `flock` on `STATE/locks/SITE/SERVICE.lock`, shared by every
//! process using that state directory (the CLI and `fluidcloud serve`
//! alike), released by the kernel when the holder dies. The file names the
//! holder, so a refusal says which relocation runs.
//!
//! Before a *new* relocation starts, earlier ones of the same service from
//! the same site are looked at too: one that is unfinished (interrupted,
//! failed, cancelled) or that succeeded (its source is stopped) refuses the
//! new one unless `force`: resume it, roll it back, or relocate back from
//! its target instead.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;

use fluidcloud_plugins::Error as SdkError;

use super::Relocation;
use super::store::Store;
use crate::error::{Error, Result};

/// A held service lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct ServiceLock {
    _file: File,
    path: PathBuf,
}

fn precondition(msg: String) -> Error {
    Error::Site {
        site: "local state".into(),
        source: SdkError::Precondition(msg),
    }
}

/// Whether `name` is 1 to 128 ASCII letters, digits, `.`, `_` or `-`, not
/// starting with `.`: safe in a file name, a tag, a URL path.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks that `name` (a service, site or relocation id) can be part of a
/// file name: ASCII letters, digits, `.`, `_`, `-`, not starting with `.`.
///
/// # Errors
/// `Precondition` naming what `name` is and why it is refused.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(precondition(format!(
            "{what} `{name}` is not a valid name (letters, digits, `.`, `_`, `-`; no path separators, no leading `.`)"
        )))
    }
}

impl ServiceLock {
    /// Takes the lock of relocation `r`'s service at its source site,
    /// without waiting.
    ///
    /// # Errors
    /// `Precondition` naming the relocation that holds it; I/O errors.
    pub fn acquire(store: &Store, r: &Relocation) -> Result<Self> {
        let (from, service, id) = (r.from.as_str(), r.service.as_str(), r.id.as_str());
        check_name("site", from)?;
        check_name("service", service)?;
        check_name("relocation id", id)?;
        let dir = store.state_dir().join("locks").join(from);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let path = dir.join(format!("{service}.lock"));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        // SAFETY: flock on a descriptor `file` owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            if holder == id {
                return Err(precondition(format!(
                    "relocation {id} is running already (in another process)"
                )));
            }
            return Err(precondition(format!(
                "service {service} on site {from} is being relocated by {} right now; wait for it to end, or cancel it",
                if holder.is_empty() {
                    "another relocation"
                } else {
                    holder
                }
            )));
        }
        file.set_len(0).map_err(|e| io(&path, e))?;
        file.rewind().map_err(|e| io(&path, e))?;
        file.write_all(format!("{id}\n").as_bytes())
            .map_err(|e| io(&path, e))?;
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

fn io(path: &std::path::Path, e: std::io::Error) -> Error {
    Error::Site {
        site: "local state".into(),
        source: SdkError::io(format!("service lock {}", path.display()), e),
    }
}

/// What an earlier relocation of the same service left: refuses a new one
/// unless `force`.
///
/// # Errors
/// `Precondition` naming the earlier relocation, its status and what to do.
pub fn check_earlier(store: &Store, from: &str, service: &str, force: bool) -> Result<()> {
    for r in store.of_service(from, service)? {
        let id = &r.id;
        let status = super::report::status(&store.entries(id)?);
        let why = match status.as_str() {
            "rolled-back" | "planned" => continue,
            "succeeded" => format!(
                "relocation {id} already moved {service} from {from} to {} and stopped its source; relocate it back from there, or pass --force to relocate the stopped source again",
                r.targets().join(", ")
            ),
            other => format!(
                "relocation {id} of {service} from {from} is unfinished ({other}); resume it (fluidcloud resume {id}) or roll it back (fluidcloud rollback {id}), or pass --force"
            ),
        };
        if !force {
            return Err(precondition(why));
        }
    }
    Ok(())
}

/// Refuses to start when a disk the relocation would write already exists
/// at its target and was not made by this relocation (another relocation's
/// live target, or a disk no relocation made): nothing is written then.
/// Each target site is asked through its disks, in this process or at its
/// agent.
///
/// # Errors
/// `Precondition` naming the disk and its owner; a site that cannot be
/// opened or asked.
pub async fn check_outputs(r: &super::Relocation) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Target {
        site: String,
        into: crate::transfer::DiskRef,
    }
    let file = crate::config::SitesFile::load(&r.sites_file, &crate::drivers::kinds())?;
    // One driver per site, however many of its disks the relocation writes.
    let mut drivers: std::collections::BTreeMap<
        String,
        std::sync::Arc<dyn crate::driver::SiteDriver>,
    > = std::collections::BTreeMap::new();
    for step in r
        .workflow
        .steps
        .iter()
        .filter(|s| s.migrator == "disk-transfer")
    {
        let Ok(t) = serde_json::from_value::<Target>(step.params.clone()) else {
            continue;
        };
        let site_err = |source: SdkError| Error::Site {
            site: t.site.clone(),
            source,
        };
        let driver = match drivers.get(&t.site) {
            Some(d) => d.clone(),
            None => {
                let d: std::sync::Arc<dyn crate::driver::SiteDriver> =
                    crate::drivers::open(&t.site, file.site(&t.site)?)?.into();
                drivers.insert(t.site.clone(), d.clone());
                d
            }
        };
        let holder = match driver.agent() {
            Some(agent) => agent
                .post::<_, Option<Option<String>>>("/v1/disks/holder", &t.into)
                .await
                .map_err(site_err)?,
            None => {
                let into = t.into.clone();
                tokio::task::spawn_blocking(move || {
                    crate::driver::require_disks(driver.as_ref())?.holder(into.store, &into.name)
                })
                .await
                .map_err(|e| SdkError::Transient(format!("a check task failed: {e}")))
                .and_then(|r| r)
                .map_err(site_err)?
            }
        };
        let Some(owner) = holder else { continue };
        let ours = owner
            .as_deref()
            .is_some_and(|o| fluidcloud_migrators::owner::relocation_of(o) == r.id);
        if !ours {
            return Err(precondition(format!(
                "site {} already holds {} {}, {}; relocate to another site, or roll that relocation back first",
                t.site,
                t.into.store.as_str(),
                t.into.name,
                fluidcloud_migrators::owner::describe(owner.as_deref())
            )));
        }
    }
    Ok(())
}
