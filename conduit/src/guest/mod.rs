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
pub mod site;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use fluidcloud_plugins::{GuestFacts, Result};
use serde::{Deserialize, Serialize};

pub use adapt::{Applied, FileEdit, GuestPlan};
pub use appliance::{Accel, Appliance, ApplianceDisk};
pub use site::{Adapted, BootDisk, FileGuests, GuestJob, Prepared};

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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestView {
    /// Facts for the topology.
    pub facts: GuestFacts,
    /// Its files: all of `/etc` and the directories asked for, by path
    /// (base64 in JSON: an agent sends them).
    #[serde(with = "base64_files")]
    pub files: BTreeMap<String, Vec<u8>>,
}

/// File contents as base64 strings.
mod base64_files {
    use std::collections::BTreeMap;

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(
        files: &BTreeMap<String, Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(files.iter().map(|(k, v)| (k, STANDARD.encode(v))))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<u8>>, D::Error> {
        BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                STANDARD
                    .decode(v)
                    .map(|b| (k.clone(), b))
                    .map_err(|e| serde::de::Error::custom(format!("file {k}: {e}")))
            })
            .collect()
    }
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
static WAITING: LazyLock<Mutex<BTreeMap<String, Waiting>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

/// A waiting appliance and when it began to wait.
type Waiting = (Arc<Appliance>, Instant);

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
        .map(|mut w| w.insert(key.to_owned(), (Arc::new(app), Instant::now())))
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
    WAITING
        .lock()
        .ok()
        .and_then(|mut w| w.remove(key))
        .map(|(a, _)| a)
}

/// Stops every appliance still waiting for relocation `id`'s
/// `guest-adapt` (a run that failed or stopped between the two steps):
/// called when a run ends, so none outlives the process.
pub fn release(id: &str) {
    let prefix = format!("{id}/");
    remove_waiting(|k, _| k.starts_with(&prefix));
}

/// Stops every waiting appliance: a site agent that exits.
pub fn release_all() {
    remove_waiting(|_, _| true);
}

/// Stops every appliance that has waited longer than `limit`: a site
/// agent's, whose orchestrator died or went away between the two steps.
pub fn expire(limit: Duration) {
    remove_waiting(|_, since| since.elapsed() > limit);
}

fn remove_waiting(gone: impl Fn(&str, Instant) -> bool) {
    let removed: Vec<Arc<Appliance>> = WAITING
        .lock()
        .map(|mut w| {
            let keys: Vec<String> = w
                .iter()
                .filter(|(k, (_, since))| gone(k, *since))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter()
                .filter_map(|k| w.remove(k).map(|(a, _)| a))
                .collect()
        })
        .unwrap_or_default();
    drop(removed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_view_crosses_json_with_its_bytes_and_bad_base64_names_the_file() {
        let view = GuestView {
            facts: GuestFacts {
                os: "linux".into(),
                root: Some("partition 1 (ext4)".into()),
                problem: None,
            },
            files: BTreeMap::from([
                ("/etc/hosts".to_owned(), b"127.0.0.1 localhost\n".to_vec()),
                ("/etc/bin.dat".to_owned(), vec![0, 0xff, 0x80, b'\n']),
            ]),
        };
        let text = serde_json::to_string(&view).unwrap();
        assert!(text.contains("\"/etc/bin.dat\":\"AP+ACg==\""), "{text}");
        let back: GuestView = serde_json::from_str(&text).unwrap();
        assert_eq!(back.files, view.files);
        assert_eq!(back.facts, view.facts);

        let bad = text.replace("AP+ACg==", "not base64!");
        let e = serde_json::from_str::<GuestView>(&bad).unwrap_err();
        assert!(e.to_string().contains("file /etc/bin.dat"), "{e}");
    }
}
