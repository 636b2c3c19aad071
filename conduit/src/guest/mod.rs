//! Inside guests: reading a guest's files from its disks, and adapting
//! them when it moves (`docs/guest-adaptation.md`).
//!
//! Everything inside a disk goes through a libguestfs appliance
//! ([`appliance`]): the guest's partitions, LVM and filesystems are parsed
//! by a throw-away VM's kernel, never by this process or the host. Source
//! disks are only ever opened read-only, through copy-on-write overlays;
//! only a relocation's own target disks are written.
//!
//! - Introspection ([`inspect_disks`]) reads `/etc` and the declared app
//!   directories of each guest; its config files then give topology edges
//!   exactly as a `local` site's config files do.
//! - A relocation adapts the target disk after the final delta, before the
//!   target boots ([`adapt::apply`]). The appliance boots before the
//!   source stops (`guest-prepare`), so the downtime holds only the edits.

pub mod adapt;
pub mod appliance;
pub mod inspect;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};

use fluidcloud_plugins::{GuestFacts, Result};

pub use adapt::{Applied, FileEdit, GuestPlan};
pub use appliance::{Accel, Appliance, ApplianceDisk};

/// How many first bytes of a disk [`has_signature`] looks at.
pub const HEAD: usize = 68 * 1024;

/// Whether the first bytes of a disk (as its guest sees them) hold a
/// partition table or a filesystem, volume or encryption header: worth an
/// appliance. A disk of other bytes (a database's raw device, a test's
/// random data) is not looked into.
pub fn has_signature(head: &[u8]) -> bool {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    at(510, &[0x55, 0xAA]) // MBR (and GPT's protective MBR)
        || at(512, b"EFI PART") // GPT
        || at(1080, &[0x53, 0xEF]) // ext2/3/4
        || at(0, b"XFSB") // XFS
        || at(0x10040, b"_BHRfS_M") // btrfs
        || at(512 + 24, b"LVM2 001") // LVM physical volume
        || at(0, b"LUKS\xba\xbe") // LUKS
}

/// What [`inspect_disks`] found in one guest.
#[derive(Debug, Clone)]
pub struct GuestView {
    /// Facts for the topology.
    pub facts: GuestFacts,
    /// Its files: all of `/etc` and the directories asked for, by path.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Looks inside several guests with one read-only appliance: guest `i`
/// boots from `disks[i]`. Per guest, its view, or facts naming why it
/// could not be read (an encrypted or unrecognised filesystem).
///
/// # Errors
/// The appliance does not start (libguestfs missing or broken).
pub async fn inspect_disks(
    disks: &[ApplianceDisk],
    names: &[String],
    dirs: &[String],
    accel: Accel,
) -> Result<Vec<GuestView>> {
    if disks.is_empty() {
        return Ok(Vec::new());
    }
    let app = Appliance::launch(disks, true, accel).await?;
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        out.push(inspect_one(&app, i, name, dirs).await?);
    }
    app.shutdown().await?;
    Ok(out)
}

/// One guest's view; a guest whose content cannot be read (encrypted,
/// unrecognised) is a view naming the problem. An appliance that fails
/// is an error: it says nothing of the guest.
async fn inspect_one(
    app: &Appliance,
    index: usize,
    name: &str,
    dirs: &[String],
) -> Result<GuestView> {
    let mounted = match inspect::mount_root(app, index, false, &format!("instance {name}")).await {
        Ok(m) => m,
        Err(e) if inspect::is_content_problem(&e.to_string()) => {
            return Ok(GuestView {
                facts: GuestFacts {
                    os: String::new(),
                    root: None,
                    problem: Some(strip_precondition(&e.to_string())),
                },
                files: BTreeMap::new(),
            });
        }
        Err(e) => return Err(e),
    };
    let device = inspect::device_of(app, index).await.unwrap_or_default();
    let root_type = mounted
        .filesystems
        .iter()
        .find(|(d, _)| *d == mounted.root)
        .map(|(_, t)| t.clone())
        .unwrap_or_default();
    let root_name = match mounted.root.strip_prefix(&device) {
        Some("") => "the whole disk".to_owned(),
        Some(n) => format!("partition {n}"),
        None => mounted.root.clone(),
    };
    let mut files = BTreeMap::new();
    let other = dirs
        .iter()
        .map(String::as_str)
        .filter(|d| !d.starts_with("/etc"));
    for d in std::iter::once("/etc").chain(other) {
        files.extend(inspect::read_tree(app, d).await?);
    }
    app.call(&["umount-all"]).await?;
    Ok(GuestView {
        facts: GuestFacts {
            os: "linux".into(),
            root: Some(format!("{root_name} ({root_type})")),
            problem: None,
        },
        files,
    })
}

fn strip_precondition(s: &str) -> String {
    s.strip_prefix("precondition failed: ")
        .unwrap_or(s)
        .to_owned()
}

/// Appliances started by `guest-prepare`, waiting for their `guest-adapt`
/// in this process, by key (`RELOCATION/INSTANCE`).
static WAITING: LazyLock<Mutex<BTreeMap<String, Arc<Appliance>>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

/// Where the PID of the appliance waiting for `key` is written: a later
/// process (a resume after `kill -9`) stops it before it boots its own,
/// which could not open the same disks.
fn pid_file(key: &str) -> std::path::PathBuf {
    let safe: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '+'
            }
        })
        .collect();
    std::env::temp_dir()
        .join("fluidcloud-guests")
        .join(format!("{safe}.pid"))
}

/// Keeps `app` for the `guest-adapt` of `key`; an appliance kept earlier
/// under the same key is stopped.
///
/// # Errors
/// Its PID file cannot be written.
pub fn keep(key: &str, mut app: Appliance) -> Result<()> {
    app.record_pid(pid_file(key))?;
    let old = WAITING
        .lock()
        .map(|mut w| w.insert(key.to_owned(), Arc::new(app)))
        .ok()
        .flatten();
    drop(old);
    Ok(())
}

/// Stops an appliance a dead process left waiting for `key`, if any.
pub fn stop_stale(key: &str) {
    let file = pid_file(key);
    if let Some(pid) = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    {
        tracing::info!("stopping the guest appliance (pid {pid}) an earlier run left for {key}");
        appliance::stop_server(pid);
    }
    let _ = std::fs::remove_file(file);
}

/// The appliance kept for `key`, taken.
pub fn take(key: &str) -> Option<Arc<Appliance>> {
    WAITING.lock().ok().and_then(|mut w| w.remove(key))
}

/// Stops every appliance still waiting for relocation `id`'s
/// `guest-adapt` (a run that failed or stopped between the two steps):
/// called when a run ends, so none outlives the process.
pub fn release(id: &str) {
    let prefix = format!("{id}/");
    let gone: Vec<Arc<Appliance>> = WAITING
        .lock()
        .map(|mut w| {
            let keys: Vec<String> = w
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            keys.iter().filter_map(|k| w.remove(k)).collect()
        })
        .unwrap_or_default();
    drop(gone);
}
