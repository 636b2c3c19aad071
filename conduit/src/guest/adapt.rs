//! What changes inside a guest that moves, and the writing of it.
//!
//! [`plan_edits`] is pure: given the guest's files, it computes every new
//! file content with the same format-aware rewriter as `config-transfer`
//! (`fluidcloud_migrators::config::adapt`), so comments, order and quoting
//! stay. The map it applies is the relocation's endpoint map, plus:
//!
//! - every IPv4 address of the network files (`/etc/network/interfaces`,
//!   systemd-networkd, netplan, ifcfg, NetworkManager, `/etc/hosts`,
//!   `/etc/resolv.conf`) that lies in one of the instance's old networks,
//!   moved into the target subnet with its host part kept (gateways, DNS
//!   servers, broadcast addresses);
//! - the instance's old MAC addresses to its new ones, wherever a network
//!   file binds a name or a configuration to them (systemd `.link` files,
//!   netplan `match: macaddress`, udev rules, ifcfg `HWADDR`).
//!
//! Afterwards every text file of `/etc` is searched for the instance's old
//! addresses and MACs: one left in a file no rule knows is reported, as a
//! warning naming the file and line, never left silently.
//!
//! [`apply`] does it on a target disk in an appliance: mounts the guest
//! read-write, reads `/etc` and the service's config files, writes what
//! changed, gives fstab entries naming a device a `UUID=` when the disk
//! bus changes, and resets cloud-init's instance state when asked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use fluidcloud_migrators::config::{self, EndpointMap, EntryKind, Format};
use fluidcloud_plugins::{Diagnostic, Error, Result, Severity};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::appliance::Appliance;
use super::inspect;

/// What to change inside one guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestPlan {
    /// The relocation's endpoint map (`config-adapt`'s shape).
    #[serde(default)]
    pub map: serde_json::Value,
    /// The instance's addresses: (old, new).
    #[serde(default)]
    pub addresses: Vec<(String, String)>,
    /// The target's subnet (`a.b.c.d/len`); without it addresses stay.
    #[serde(default)]
    pub subnet: Option<String>,
    /// The MACs of its interfaces: (old, new), in order.
    #[serde(default)]
    pub macs: Vec<(String, String)>,
    /// The service's config files inside the guest (absolute paths).
    #[serde(default)]
    pub files: Vec<String>,
    /// The bus its disks move to, when it changes (fstab entries by
    /// device name are rewritten; the initramfs is checked for its driver).
    #[serde(default)]
    pub new_bus: Option<String>,
    /// Remove cloud-init's instance state so that it runs again.
    #[serde(default)]
    pub reset_cloud_init: bool,
}

/// One file's new content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEdit {
    /// Its path in the guest.
    pub path: String,
    /// What it held.
    pub old: String,
    /// What it holds now.
    pub new: String,
    /// How many values or lines changed.
    pub changes: usize,
}

/// Everything [`plan_edits`] decided.
#[derive(Debug, Clone, Default)]
pub struct Edits {
    /// Files that change, by path.
    pub files: Vec<FileEdit>,
    /// Warnings (old addresses left in unknown formats).
    pub notes: Vec<Diagnostic>,
}

impl Edits {
    /// What file `path`, which held `old`, holds once the edits are made.
    fn after<'a>(&'a self, path: &str, old: &'a str) -> &'a str {
        self.files
            .iter()
            .find(|e| e.path == path)
            .map_or(old, |e| e.new.as_str())
    }
}

/// Whether `path` is a network configuration file whose format the
/// rewriter knows.
pub fn is_network_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or_default();
    path == "/etc/network/interfaces"
        || path.starts_with("/etc/network/interfaces.d/")
        || (path.starts_with("/etc/systemd/network/")
            && [".network", ".link", ".netdev"]
                .iter()
                .any(|e| name.ends_with(e)))
        || (path.starts_with("/etc/netplan/")
            && (name.ends_with(".yaml") || name.ends_with(".yml")))
        || (path.starts_with("/etc/sysconfig/network-scripts/") && name.starts_with("ifcfg-"))
        || path.starts_with("/etc/NetworkManager/system-connections/")
        || (path.starts_with("/etc/udev/rules.d/") && name.ends_with("-net.rules"))
        || path == "/etc/hosts"
        || path == "/etc/resolv.conf"
}

fn ipv4_regex() -> Regex {
    Regex::new(r"\b(?:\d{1,3}\.){3}\d{1,3}\b").unwrap_or_else(|_| unreachable!())
}

/// The map applied inside the guest: the relocation's, the moved network
/// addresses, the MACs.
fn guest_map(files: &BTreeMap<String, String>, plan: &GuestPlan) -> Result<EndpointMap> {
    let mut map = EndpointMap::from_json(&if plan.map.is_null() {
        serde_json::json!([])
    } else {
        plan.map.clone()
    })
    .map_err(|e| Error::Invalid(vec![e.diagnostic()]))?;
    let mut known: BTreeSet<String> = map.entries.iter().map(|e| e.from.clone()).collect();
    for (old, new) in &plan.addresses {
        if known.insert(old.clone()) {
            map = map.with(EntryKind::Ip, old, new);
        }
    }
    if let Some(subnet) = &plan.subnet
        && let Some((_, len)) = crate::config::parse_subnet(subnet)
    {
        let keep = usize::from(len / 8);
        let prefix = |a: &str| -> Option<Vec<String>> {
            let v: Vec<String> = a.split('.').map(str::to_owned).collect();
            (v.len() == 4).then(|| v[..keep].to_vec())
        };
        let old_nets: BTreeSet<Vec<String>> = plan
            .addresses
            .iter()
            .filter_map(|(a, _)| prefix(a))
            .collect();
        let re = ipv4_regex();
        for (path, text) in files {
            if !is_network_file(path) {
                continue;
            }
            for m in re.find_iter(text) {
                let a = m.as_str();
                if a.parse::<std::net::Ipv4Addr>().is_err() || known.contains(a) {
                    continue;
                }
                if prefix(a).is_some_and(|p| old_nets.contains(&p))
                    && let Some(moved) = crate::config::move_address(a, subnet)
                {
                    known.insert(a.to_owned());
                    map = map.with(EntryKind::Ip, a, moved);
                }
            }
        }
    }
    for (old, new) in &plan.macs {
        if old.eq_ignore_ascii_case(new) {
            continue;
        }
        map = map
            .with(
                EntryKind::String,
                old.to_ascii_lowercase(),
                new.to_ascii_lowercase(),
            )
            .with(
                EntryKind::String,
                old.to_ascii_uppercase(),
                new.to_ascii_uppercase(),
            );
    }
    map.check()
        .map_err(|e| Error::Invalid(vec![e.diagnostic()]))?;
    Ok(map)
}

/// The new content of every file that changes, and warnings for old
/// addresses left where no rule reaches. `files` are the guest's files
/// read (all of `/etc` and the service's config files); `instance` names
/// the guest in messages.
///
/// # Errors
/// `Invalid` naming the file for a network or config file the rewriter
/// cannot parse or edit safely.
pub fn plan_edits(
    files: &BTreeMap<String, Vec<u8>>,
    plan: &GuestPlan,
    instance: &str,
) -> Result<Edits> {
    let text: BTreeMap<String, String> = files
        .iter()
        .filter_map(|(p, b)| {
            std::str::from_utf8(b)
                .ok()
                .map(|t| (p.clone(), t.to_owned()))
        })
        .collect();
    let map = guest_map(&text, plan)?;
    let targets: BTreeSet<&str> = text
        .keys()
        .map(String::as_str)
        .filter(|p| is_network_file(p))
        .chain(plan.files.iter().map(String::as_str))
        .collect();
    let mut edits = Edits::default();
    for path in targets {
        let Some(old) = text.get(path) else {
            if files.contains_key(path) {
                return Err(Error::Invalid(vec![
                    Diagnostic::error(format!("{instance}: not UTF-8 text")).in_file(path),
                ]));
            }
            continue;
        };
        let format = Format::detect(Path::new(path), old);
        let adapted = config::adapt(&format!("{instance}:{path}"), old, format, &map, &[])
            .map_err(|e| Error::Invalid(vec![e.diagnostic()]))?;
        if adapted.content != *old {
            edits.files.push(FileEdit {
                path: path.to_owned(),
                old: old.clone(),
                new: adapted.content,
                changes: adapted.changes.len(),
            });
        }
    }
    edits.notes = unknown_format(&text, &edits, plan, instance);
    edits.notes.extend(leftovers(&text, &edits, plan, instance));
    Ok(edits)
}

/// Warnings for a guest whose old address is set in no network file
/// whose format is known, only elsewhere (a script, an unknown format):
/// the address there was rewritten as text, but the other addresses of
/// its old network there (a gateway) were not.
fn unknown_format(
    text: &BTreeMap<String, String>,
    edits: &Edits,
    plan: &GuestPlan,
    instance: &str,
) -> Vec<Diagnostic> {
    let own: Vec<&str> = plan.addresses.iter().map(|(a, _)| a.as_str()).collect();
    let re = ipv4_regex();
    let holds_own = |t: &str| re.find_iter(t).any(|m| own.contains(&m.as_str()));
    let known = text.iter().any(|(p, t)| {
        is_network_file(p) && p != "/etc/hosts" && p != "/etc/resolv.conf" && holds_own(t)
    });
    if known || own.is_empty() {
        return Vec::new();
    }
    let old_net = |a: &str| -> Option<String> { a.rsplit_once('.').map(|(n, _)| n.to_owned()) };
    let nets: BTreeSet<String> = own.iter().filter_map(|a| old_net(a)).collect();
    let mut notes = Vec::new();
    for (path, t) in text
        .iter()
        .filter(|(p, t)| !is_network_file(p) && holds_own(t))
    {
        let now = edits.after(path, t);
        let stale: BTreeSet<&str> = re
            .find_iter(now)
            .map(|m| m.as_str())
            .filter(|a| old_net(a).is_some_and(|n| nets.contains(&n)))
            .collect();
        let rewritten = now != t;
        notes.push(
            Diagnostic::new(
                Severity::Warning,
                format!(
                    "{instance}: its address is set in {path}, a network configuration fluidcloud does not know (it adapts ifupdown, systemd-networkd, netplan, ifcfg, NetworkManager){}{}",
                    if rewritten {
                        "; the address there was rewritten as text"
                    } else {
                        ""
                    },
                    if stale.is_empty() {
                        String::new()
                    } else {
                        format!(
                            ", but {} of the old network stayed: check them",
                            stale.into_iter().collect::<Vec<_>>().join(", ")
                        )
                    }
                ),
            )
            .in_file(path),
        );
    }
    notes
}

/// Old addresses and MACs of the instance still in any text file of the
/// guest once `edits` are applied.
fn leftovers(
    text: &BTreeMap<String, String>,
    edits: &Edits,
    plan: &GuestPlan,
    instance: &str,
) -> Vec<Diagnostic> {
    let mut own = EndpointMap::new();
    for (old, new) in &plan.addresses {
        if old != new {
            own = own.with(EntryKind::Ip, old, new);
        }
    }
    for (old, new) in &plan.macs {
        if !old.eq_ignore_ascii_case(new) {
            own = own
                .with(EntryKind::String, old.to_ascii_lowercase(), new)
                .with(EntryKind::String, old.to_ascii_uppercase(), new);
        }
    }
    if own.entries.is_empty() {
        return Vec::new();
    }
    let mut notes = Vec::new();
    for (path, content) in text {
        let now = edits.after(path, content);
        let Ok(found) = config::leftovers(path, now, Format::Text, &own) else {
            continue;
        };
        for l in found {
            let what = if l.found.contains(':') {
                "MAC"
            } else {
                "address"
            };
            notes.push(
                Diagnostic::new(
                    Severity::Warning,
                    format!(
                        "{instance}: {path} still holds the old {what} {} after adaptation: its format is not one fluidcloud adapts (ifupdown, systemd-networkd, netplan, ifcfg, NetworkManager, udev), so the guest may come up with its old network settings at the target",
                        l.found
                    ),
                )
                .in_file(path)
                .at_line(l.line),
            );
        }
    }
    notes
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    /// Files rewritten.
    pub files: Vec<FileEdit>,
    /// Warnings and notes.
    pub notes: Vec<Diagnostic>,
    /// Paths removed (cloud-init state).
    pub removed: Vec<String>,
    /// Seconds spent, from mounting to the last write.
    pub seconds: f64,
}

/// Adapts the guest on disk `index` of a read-write appliance.
///
/// # Errors
/// `Precondition` for a disk whose root cannot be found (encrypted,
/// unrecognised); `Invalid` for a file that cannot be rewritten safely.
/// Nothing is written unless every edit was computed.
pub async fn apply(
    app: &Appliance,
    index: usize,
    plan: &GuestPlan,
    instance: &str,
) -> Result<Applied> {
    let started = Instant::now();
    let device = inspect::device_of(app, index).await?;
    // The disk changed under the appliance since it started (the final
    // delta): drop what its kernel cached, and read the partitions again.
    app.call(&["blockdev-flushbufs", &device]).await?;
    app.call(&["blockdev-rereadpt", &device]).await?;
    let mounted = inspect::mount_root(app, index, true, instance).await?;
    let files = read_files(app, &plan.files).await?;
    let mut edits = plan_edits(&files, plan, instance)?;
    if let Some(bus) = &plan.new_bus {
        if !mounted.by_device.is_empty() {
            fstab_by_uuid(app, &device, &files, &mut edits, instance).await?;
        }
        edits
            .notes
            .extend(initramfs_check(app, bus, instance).await?);
    }
    for e in &edits.files {
        app.write(&e.path, e.new.as_bytes()).await?;
    }
    let mut removed = Vec::new();
    if plan.reset_cloud_init {
        for p in [
            "/var/lib/cloud/instance",
            "/var/lib/cloud/instances",
            "/var/lib/cloud/data",
        ] {
            if app.call(&["exists", p]).await?.trim() == "true" {
                app.call(&["rm-rf", p]).await?;
                removed.push(p.to_owned());
            }
        }
    }
    Ok(Applied {
        files: edits.files,
        notes: edits.notes,
        removed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `/etc` and the service's config files outside it.
///
/// # Errors
/// As [`inspect::read_tree`].
pub async fn read_files(app: &Appliance, extra: &[String]) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = inspect::read_tree(app, "/etc").await?;
    let dirs: BTreeSet<&str> = extra
        .iter()
        .filter(|p| !p.starts_with("/etc/"))
        .filter_map(|p| p.rsplit_once('/').map(|(d, _)| d))
        .filter(|d| !d.is_empty())
        .collect();
    for d in dirs {
        files.extend(inspect::read_tree(app, d).await?);
    }
    Ok(files)
}

/// The kernel module and the config option of each disk bus's driver.
fn bus_driver(bus: &str) -> Option<(&'static str, &'static str)> {
    match bus {
        "virtio" => Some(("virtio_blk", "CONFIG_VIRTIO_BLK")),
        "scsi" => Some(("virtio_scsi", "CONFIG_SCSI_VIRTIO")),
        "sata" => Some(("ahci", "CONFIG_SATA_AHCI")),
        "ide" => Some(("ata_piix", "CONFIG_ATA_PIIX")),
        _ => None,
    }
}

/// Warnings for each initramfs of `/boot` without the driver of `bus`
/// (unless its kernel has the driver built in): that guest would not find
/// its root after the bus change.
async fn initramfs_check(app: &Appliance, bus: &str, instance: &str) -> Result<Vec<Diagnostic>> {
    let Some((module, option)) = bus_driver(bus) else {
        return Ok(Vec::new());
    };
    if app.call(&["is-dir", "/boot"]).await?.trim() != "true" {
        return Ok(Vec::new());
    }
    let mut notes = Vec::new();
    for name in app.lines(&["ls", "/boot"]).await? {
        let version = match (
            name.strip_prefix("initrd.img-"),
            name.strip_prefix("initramfs-"),
        ) {
            (Some(v), _) => v.to_owned(),
            (None, Some(v)) => v.trim_end_matches(".img").to_owned(),
            (None, None) => continue,
        };
        let config = format!("/boot/config-{version}");
        if app.call(&["is-file", &config]).await?.trim() == "true"
            && app
                .call(&["cat", &config])
                .await?
                .lines()
                .any(|l| l == format!("{option}=y"))
        {
            continue;
        }
        let path = format!("/boot/{name}");
        let listed = app.call(&["initrd-list", &path]).await?;
        let has = listed.lines().any(|l| {
            let file = l.rsplit('/').next().unwrap_or(l);
            file.split('.').next() == Some(module) && file.contains(".ko")
        });
        if !has {
            notes.push(
                Diagnostic::new(
                    Severity::Warning,
                    format!("{instance}: {path} holds no {module} module and its kernel does not build it in: the guest may not find its root on the {bus} bus; rebuild its initramfs with it (update-initramfs, dracut --add-drivers {module})"),
                )
                .in_file(path.clone()),
            );
        }
    }
    Ok(notes)
}

/// fstab lines naming a device (`/dev/vda2`) name its UUID instead: the
/// device's name changes with the bus.
async fn fstab_by_uuid(
    app: &Appliance,
    device: &str,
    files: &BTreeMap<String, Vec<u8>>,
    edits: &mut Edits,
    instance: &str,
) -> Result<()> {
    let current = match edits.files.iter().find(|e| e.path == "/etc/fstab") {
        Some(e) => e.new.clone(),
        None => String::from_utf8_lossy(files.get("/etc/fstab").map_or(&[][..], Vec::as_slice))
            .into_owned(),
    };
    let mut lines: Vec<String> = current.lines().map(str::to_owned).collect();
    let mut changed = 0;
    for line in &mut lines {
        let Some(spec) = line.split_whitespace().next().map(str::to_owned) else {
            continue;
        };
        if spec.starts_with('#') || !spec.starts_with("/dev/") {
            continue;
        }
        let Some(part) = spec
            .strip_prefix("/dev/")
            .and_then(|n| {
                ["xvd", "vd", "sd", "hd"]
                    .iter()
                    .find_map(|p| n.strip_prefix(p))
            })
            .and_then(|r| r.strip_prefix('a'))
        else {
            continue;
        };
        let dev = format!("{device}{part}");
        let Ok(uuid) = app.call(&["vfs-uuid", &dev]).await else {
            edits.notes.push(
                Diagnostic::new(
                    Severity::Warning,
                    format!("{instance}: fstab names {spec}, whose UUID cannot be read; it may not be found after the disk bus change"),
                )
                .in_file("/etc/fstab"),
            );
            continue;
        };
        let uuid = uuid.trim();
        if uuid.is_empty() {
            continue;
        }
        *line = line.replacen(&spec, &format!("UUID={uuid}"), 1);
        changed += 1;
    }
    if changed == 0 {
        return Ok(());
    }
    let mut new = lines.join("\n");
    if current.ends_with('\n') {
        new.push('\n');
    }
    edits.files.retain(|e| e.path != "/etc/fstab");
    let old = String::from_utf8_lossy(files.get("/etc/fstab").map_or(&[][..], Vec::as_slice))
        .into_owned();
    edits.files.push(FileEdit {
        path: "/etc/fstab".into(),
        old,
        new,
        changes: changed,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        list.iter()
            .map(|(p, c)| ((*p).to_owned(), c.as_bytes().to_vec()))
            .collect()
    }

    fn plan() -> GuestPlan {
        GuestPlan {
            map: serde_json::json!([
                {"kind": "host", "from": "db.shop.internal", "to": "db.edge.internal"},
                {"kind": "ip", "from": "10.10.0.22", "to": "10.30.0.22"}
            ]),
            addresses: vec![("10.10.0.21".into(), "10.30.0.21".into())],
            subnet: Some("10.30.0.0/24".into()),
            macs: vec![("52:54:00:aa:00:21".into(), "52:54:00:12:34:56".into())],
            files: vec!["/etc/app/app.yaml".into()],
            ..GuestPlan::default()
        }
    }

    #[test]
    fn network_files_move_to_the_target_subnet_and_macs_follow() {
        let f = files(&[
            (
                "/etc/network/interfaces",
                "auto app0\niface app0 inet static\n    address 10.10.0.21\n    netmask 255.255.255.0\n    gateway 10.10.0.1 # router\n    dns-nameservers 10.10.0.53 192.0.2.1\n",
            ),
            (
                "/etc/systemd/network/10-app0.link",
                "[Match]\nMACAddress=52:54:00:AA:00:21\n\n[Link]\nName=app0\n",
            ),
            (
                "/etc/netplan/50.yaml",
                "network:\n  ethernets:\n    app0:\n      match: {macaddress: \"52:54:00:aa:00:21\"}\n      addresses: [10.10.0.21/24]\n",
            ),
            (
                "/etc/hosts",
                "127.0.0.1 localhost\n10.10.0.22 db.shop.internal db\n",
            ),
            (
                "/etc/app/app.yaml",
                "database:\n  host: db.shop.internal # primary\n  port: 5432\n",
            ),
            ("/etc/motd", "welcome to 10.10.0.99\n"),
        ]);
        let e = plan_edits(&f, &plan(), "web").unwrap();
        let get = |p: &str| {
            e.files
                .iter()
                .find(|x| x.path == p)
                .map(|x| x.new.clone())
                .unwrap()
        };
        assert_eq!(
            get("/etc/network/interfaces"),
            "auto app0\niface app0 inet static\n    address 10.30.0.21\n    netmask 255.255.255.0\n    gateway 10.30.0.1 # router\n    dns-nameservers 10.30.0.53 192.0.2.1\n"
        );
        assert_eq!(
            get("/etc/systemd/network/10-app0.link"),
            "[Match]\nMACAddress=52:54:00:12:34:56\n\n[Link]\nName=app0\n"
        );
        assert!(get("/etc/netplan/50.yaml").contains("macaddress: \"52:54:00:12:34:56\""));
        assert!(get("/etc/netplan/50.yaml").contains("[10.30.0.21/24]"));
        assert_eq!(
            get("/etc/hosts"),
            "127.0.0.1 localhost\n10.30.0.22 db.edge.internal db\n"
        );
        assert_eq!(
            get("/etc/app/app.yaml"),
            "database:\n  host: db.edge.internal # primary\n  port: 5432\n"
        );
        // motd is no network file: its address in the old subnet stays,
        // and it is not the instance's own address, so no warning.
        assert!(e.files.iter().all(|x| x.path != "/etc/motd"));
        assert!(e.notes.is_empty(), "{:?}", e.notes);
    }

    #[test]
    fn an_old_address_in_an_unknown_format_is_reported() {
        let f = files(&[
            ("/etc/app/app.yaml", "database:\n  host: db.shop.internal\n"),
            (
                "/etc/rc.local",
                "#!/bin/sh\nip addr add 10.10.0.21/24 dev eth0\nip route add default via 10.10.0.1\n",
            ),
        ]);
        // Not a config file of the service: left as it is, and said so
        // twice, the unknown format and the address left in it.
        let e = plan_edits(&f, &plan(), "web").unwrap();
        assert_eq!(e.notes.len(), 2, "{:?}", e.notes);
        assert!(e.notes.iter().all(|n| n.severity == Severity::Warning
            && n.file.as_deref() == Some(Path::new("/etc/rc.local"))));
        assert!(
            e.notes[0].summary.contains("does not know"),
            "{}",
            e.notes[0].summary
        );
        assert!(
            e.notes[0]
                .summary
                .contains("10.10.0.1, 10.10.0.21 of the old network stayed"),
            "{}",
            e.notes[0].summary
        );
        assert_eq!(e.notes[1].line, Some(2));
        assert!(
            e.notes[1].summary.contains("old address 10.10.0.21"),
            "{}",
            e.notes[1].summary
        );
        // A config file of the service (introspection found it names the
        // instance): the address is rewritten as text, the gateway is not.
        let mut p = plan();
        p.files.push("/etc/rc.local".into());
        let e = plan_edits(&f, &p, "web").unwrap();
        assert_eq!(e.notes.len(), 1, "{:?}", e.notes);
        assert!(
            e.notes[0]
                .summary
                .contains("rewritten as text, but 10.10.0.1 of the old network stayed"),
            "{}",
            e.notes[0].summary
        );
        let rc = e.files.iter().find(|x| x.path == "/etc/rc.local").unwrap();
        assert!(
            rc.new.contains("10.30.0.21/24") && rc.new.contains("via 10.10.0.1"),
            "{}",
            rc.new
        );
    }

    #[test]
    fn a_broken_network_file_is_an_error_naming_it() {
        let f = files(&[("/etc/netplan/50.yaml", "network: [unclosed\n")]);
        let err = plan_edits(&f, &plan(), "web").unwrap_err().to_string();
        assert!(err.contains("/etc/netplan/50.yaml"), "{err}");
    }
}
