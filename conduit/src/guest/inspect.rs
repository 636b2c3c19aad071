//! Finding a guest's root filesystem and reading its files.
//!
//! The root is the filesystem with `/etc/fstab`; the other filesystems its
//! fstab names (by `UUID=`, `LABEL=` or device name) are mounted under it.
//! Files come out as one `tar-out` archive per directory, read in memory:
//! nothing of the guest is ever unpacked on the host, so no name or link
//! inside it can point at a host file.

use std::collections::BTreeMap;
use std::io::Read as _;

use fluidcloud_plugins::{Error, Result};

use super::appliance::Appliance;

/// Filesystem types a root can be.
pub const ROOT_TYPES: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs",
];
/// Files larger than this are not read (config files are small).
pub const MAX_FILE: u64 = 1 << 20;

/// A guest's mounted filesystems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// The root filesystem's device in the appliance.
    pub root: String,
    /// Every filesystem the appliance found on the disk: (device, type).
    pub filesystems: Vec<(String, String)>,
    /// The fstab's mounts done: (mountpoint, device).
    pub mounts: Vec<(String, String)>,
    /// fstab entries naming a device rather than `UUID=`/`LABEL=`:
    /// (line, device), which a change of disk bus breaks.
    pub by_device: Vec<(u32, String)>,
}

/// The appliance device of disk `index` (`/dev/sda` for 0).
///
/// # Errors
/// `Precondition` when the appliance has fewer disks.
pub async fn device_of(app: &Appliance, index: usize) -> Result<String> {
    let devices = app.lines(&["list-devices"]).await?;
    devices.get(index).cloned().ok_or_else(|| {
        Error::Precondition(format!(
            "the libguestfs appliance lists {} disk(s), not disk {index} ({})",
            devices.len(),
            app.log_tail()
        ))
    })
}

/// Why a guest cannot be read: its content, not the appliance.
pub const NO_ROOT: &str = "no guest root filesystem found";
/// Why a guest cannot be read: an encrypted root.
pub const ENCRYPTED: &str = "is encrypted (LUKS)";

/// Whether error text `e` is about the guest's content ([`NO_ROOT`],
/// [`ENCRYPTED`]), which no retry changes.
pub fn is_content_problem(e: &str) -> bool {
    e.contains(NO_ROOT) || e.contains(ENCRYPTED)
}

/// Finds and mounts the root filesystem of disk `index` (read-only unless
/// `rw`), then the fstab's other filesystems. `what` names the disk in
/// errors.
///
/// # Errors
/// `Precondition` naming the disk when a filesystem is encrypted, when no
/// filesystem is recognised, or when none is a Linux root.
pub async fn mount_root(app: &Appliance, index: usize, rw: bool, what: &str) -> Result<Mounted> {
    let device = device_of(app, index).await?;
    let filesystems = filesystems_of(app, &device).await?;
    let listed = || {
        if filesystems.is_empty() {
            "none".to_owned()
        } else {
            filesystems
                .iter()
                .map(|(d, t)| format!("{} {t}", guest_name(d, &device)))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mount = if rw { "mount" } else { "mount-ro" };
    let mut root = None;
    for (dev, _) in filesystems
        .iter()
        .filter(|(_, t)| ROOT_TYPES.contains(&t.as_str()))
    {
        if app.call(&[mount, dev, "/"]).await.is_err() {
            continue;
        }
        if app.call(&["is-file", "/etc/fstab"]).await?.trim() == "true" {
            root = Some(dev.clone());
            break;
        }
        app.call(&["umount", "/"]).await?;
    }
    let Some(root) = root else {
        if let Some((dev, _)) = filesystems.iter().find(|(_, t)| t == "crypto_LUKS") {
            return Err(Error::Precondition(format!(
                "{what}: {} {ENCRYPTED} and no readable root is outside it; fluidcloud cannot look or adapt inside it without its key",
                guest_name(dev, &device)
            )));
        }
        let why = if filesystems
            .iter()
            .any(|(_, t)| ROOT_TYPES.contains(&t.as_str()))
        {
            "none of them is a Linux root (a filesystem with /etc/fstab)"
        } else {
            "none of them is a filesystem fluidcloud can read"
        };
        return Err(Error::Precondition(format!(
            "{what}: {NO_ROOT} (filesystems: {}); {why}",
            listed()
        )));
    };
    let fstab = app.call(&["cat", "/etc/fstab"]).await?;
    let (entries, by_device) = fstab_entries(&fstab);
    let mut mounts = vec![("/".to_owned(), root.clone())];
    for (mountpoint, spec) in entries {
        if mountpoint == "/" {
            continue;
        }
        let Some(dev) = resolve_spec(app, &spec, &device).await else {
            continue;
        };
        if app.call(&["is-dir", &mountpoint]).await?.trim() != "true" {
            continue;
        }
        app.call(&[mount, &dev, &mountpoint]).await.map_err(|e| {
            Error::Precondition(format!("{what}: mounting {spec} on {mountpoint}: {e}"))
        })?;
        mounts.push((mountpoint, dev));
    }
    Ok(Mounted {
        root,
        filesystems,
        mounts,
        by_device,
    })
}

/// The filesystems of `device` (its partitions, and logical volumes):
/// (device, type), `crypto_LUKS` for an encrypted partition, `unknown`
/// for one libguestfs cannot name.
///
/// # Errors
/// As [`Appliance::call`].
pub async fn filesystems_of(app: &Appliance, device: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for line in app.lines(&["list-filesystems"]).await? {
        let Some((dev, ty)) = line.split_once(": ") else {
            continue;
        };
        let on_disk = dev == device
            || dev
                .strip_prefix(device)
                .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
        let lv = !dev.starts_with("/dev/sd") && !dev.starts_with("/dev/vd");
        if on_disk || lv {
            out.push((dev.to_owned(), ty.to_owned()));
        }
    }
    // libguestfs leaves encrypted partitions out of its filesystems: ask
    // each partition it left out what it holds (`crypto_LUKS`, or nothing
    // it knows).
    for part in app.lines(&["list-partitions"]).await? {
        if !part.starts_with(device) || out.iter().any(|(d, _)| *d == part) {
            continue;
        }
        let ty = app
            .call(&["vfs-type", &part])
            .await
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
        out.push((part, if ty.is_empty() { "unknown".into() } else { ty }));
    }
    Ok(out)
}

/// `/dev/sda1` as the guest would name its partition: `partition 1`.
fn guest_name(dev: &str, device: &str) -> String {
    match dev.strip_prefix(device) {
        Some("") => "the whole disk".to_owned(),
        Some(n) => format!("partition {n}"),
        None => dev.to_owned(),
    }
}

/// (mountpoint, spec) of an fstab line.
type Mount = (String, String);

/// The fstab's local mounts (mountpoint, spec) and the lines naming
/// devices (line, device).
fn fstab_entries(text: &str) -> (Vec<Mount>, Vec<(u32, String)>) {
    let mut entries = Vec::new();
    let mut by_device = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[0].starts_with('#') {
            continue;
        }
        let (spec, mp, ty) = (f[0], f[1], f[2]);
        if spec.starts_with("/dev/")
            && !spec.starts_with("/dev/mapper/")
            && !spec.starts_with("/dev/disk/by-uuid/")
        {
            by_device.push((u32::try_from(i + 1).unwrap_or(u32::MAX), spec.to_owned()));
        }
        if ROOT_TYPES.contains(&ty) && mp.starts_with('/') {
            entries.push((mp.to_owned(), spec.to_owned()));
        }
    }
    entries.sort_by_key(|(mp, _)| mp.matches('/').count() + usize::from(mp != "/"));
    (entries, by_device)
}

/// The appliance device an fstab spec names.
async fn resolve_spec(app: &Appliance, spec: &str, device: &str) -> Option<String> {
    if let Some(uuid) = spec.strip_prefix("UUID=") {
        return app
            .call(&["findfs-uuid", uuid])
            .await
            .ok()
            .map(|s| s.trim().to_owned());
    }
    if let Some(label) = spec.strip_prefix("LABEL=") {
        return app
            .call(&["findfs-label", label])
            .await
            .ok()
            .map(|s| s.trim().to_owned());
    }
    // /dev/vda2, /dev/sda2, /dev/hda2, /dev/xvda2: partition 2 of the
    // first disk, whatever its bus.
    let name = spec.strip_prefix("/dev/")?;
    let rest = ["xvd", "vd", "sd", "hd"]
        .iter()
        .find_map(|p| name.strip_prefix(p))?;
    let part = rest.strip_prefix('a')?;
    part.chars()
        .all(|c| c.is_ascii_digit())
        .then(|| format!("{device}{part}"))
}

/// The regular files under guest directory `dir` (mounted), by absolute
/// guest path, each at most [`MAX_FILE`] bytes. Missing directories give
/// nothing.
///
/// # Errors
/// As [`Appliance::call`]; a malformed archive.
pub async fn read_tree(app: &Appliance, dir: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    if app.call(&["is-dir", dir]).await?.trim() != "true" {
        return Ok(BTreeMap::new());
    }
    let archive = app.tar_out(dir).await?;
    files_of_tar(dir, &archive)
}

/// The regular files of a tar archive of `dir`.
fn files_of_tar(dir: &str, archive: &[u8]) -> Result<BTreeMap<String, Vec<u8>>> {
    let bad = |e: std::io::Error| Error::Precondition(format!("the archive of {dir}: {e}"));
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(archive);
    for entry in ar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if entry.header().entry_type() != tar::EntryType::Regular || entry.size() > MAX_FILE {
            continue;
        }
        let name = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let rel = name.trim_start_matches("./").trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == "..") {
            continue;
        }
        let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
        entry.read_to_end(&mut data).map_err(bad)?;
        out.insert(format!("{}/{rel}", dir.trim_end_matches('/')), data);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_mounts_in_depth_order_and_device_names_are_found() {
        let (e, d) = fstab_entries(
            "# c\nUUID=1 / ext4 defaults 0 1\n/dev/vda3 /var/lib ext4 defaults 0 2\nLABEL=v /var xfs defaults 0 2\n/dev/vda2 none swap sw 0 0\nproc /proc proc defaults 0 0\n",
        );
        assert_eq!(
            e,
            vec![
                ("/".to_owned(), "UUID=1".to_owned()),
                ("/var".to_owned(), "LABEL=v".to_owned()),
                ("/var/lib".to_owned(), "/dev/vda3".to_owned())
            ]
        );
        assert_eq!(
            d,
            vec![(3, "/dev/vda3".to_owned()), (5, "/dev/vda2".to_owned())]
        );
    }

    #[test]
    fn tar_files_stay_names_never_host_paths() {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8], ty: tar::EntryType| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(ty);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        };
        add("./app/app.yaml", b"host: db\n", tar::EntryType::Regular);
        add("./shadow-link", b"", tar::EntryType::Symlink);
        add("./hosts", b"127.0.0.1 localhost\n", tar::EntryType::Regular);
        let ar = b.into_inner().unwrap();
        let files = files_of_tar("/etc", &ar).unwrap();
        assert_eq!(
            files.keys().cloned().collect::<Vec<_>>(),
            vec!["/etc/app/app.yaml".to_owned(), "/etc/hosts".to_owned()]
        );
        assert_eq!(files["/etc/app/app.yaml"], b"host: db\n");
        // An archive cut inside a file's data is an error, not a short file.
        let err = files_of_tar("/etc", &ar[..512 + 4])
            .unwrap_err()
            .to_string();
        assert!(err.contains("the archive of /etc"), "{err}");
    }
}
