//! Change tracking on libvirt: an external disk-only snapshot per domain,
//! whose overlays are the delta.
//!
//! [`ChangeTracking::begin_tracking`] saves the domain's persistent XML,
//! then takes an external disk-only snapshot of every file disk
//! (`virsh snapshot-create-as --disk-only --no-metadata --atomic`, live or
//! offline): from then on QEMU writes into one qcow2 overlay per disk under
//! [`ROOT`]`/DOMAIN/`, and each disk's own file is only read, so a pre-copy
//! reads a disk that no longer changes. The overlay's own clusters are
//! exactly what the guest wrote since: [`ChangeTracking::changes`] lists
//! them (`qemu-img map`, depth 0), so the final delta reads megabytes where
//! a re-hash reads the whole disk. [`ChangeTracking::end_tracking`] folds
//! the overlays back into the disks (offline `qemu-img commit`, or
//! `virsh blockcommit --active --pivot` while the domain runs), defines
//! the saved XML again, and removes the overlays.
//!
//! Why not dirty bitmaps with `virsh backup-begin`: a bitmap survives a
//! shutdown only inside a qcow2 disk (not a raw one), and reading it means
//! an NBD client and a running QEMU after the guest stopped. An overlay
//! works for every disk format, on or off, with tools the host has.
//! docs/relocate.md has the comparison.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use fluidcloud_migrators::changes::ChangeSet;
use fluidcloud_plugins::{Error, Result};

use super::{LibvirtSite, child, parse_xml};
use crate::driver::{ChangeTracking, InstanceState};

/// Where the overlays of tracked domains are, one directory per domain
/// (on the daemon's host).
pub(super) const ROOT: &str = "/var/lib/libvirt/fluidcloud-tracking";

/// The overlay directory of `domain`.
pub(super) fn dir(domain: &str) -> PathBuf {
    Path::new(ROOT).join(domain)
}

/// A disk of a domain that is a file.
#[derive(Debug)]
struct FileDisk {
    /// Target device (`vda`).
    dev: String,
    /// The file QEMU opens.
    file: PathBuf,
    /// What the file is the overlay of, when it has a backing store.
    backing: Option<PathBuf>,
}

/// The file disks of a domain's XML, in order, and the target devices of
/// its other disks (block devices, network disks: not tracked, their
/// final delta re-hashes them).
fn file_disks(xml: &str) -> Result<(Vec<FileDisk>, Vec<String>)> {
    let doc = parse_xml(xml, "domain XML")?;
    let mut out = Vec::new();
    let mut others = Vec::new();
    for d in doc
        .descendants()
        .filter(|n| n.has_tag_name("disk") && n.attribute("device").unwrap_or("disk") == "disk")
    {
        let file = child(d, "source").and_then(|s| s.attribute("file"));
        let Some(dev) = child(d, "target").and_then(|t| t.attribute("dev")) else {
            continue;
        };
        let Some(file) = file.filter(|_| d.attribute("type") == Some("file")) else {
            others.push(dev.to_owned());
            continue;
        };
        let backing = child(d, "backingStore")
            .and_then(|b| child(b, "source"))
            .and_then(|s| s.attribute("file"))
            .map(PathBuf::from);
        out.push(FileDisk {
            dev: dev.to_owned(),
            file: PathBuf::from(file),
            backing,
        });
    }
    Ok((out, others))
}

/// The `<backingStore>` of disk element `disk` when its file is a
/// tracking overlay: what the disk is, for the inventory.
pub(super) fn tracked_base<'a, 'i>(
    disk: roxmltree::Node<'a, 'i>,
) -> Option<roxmltree::Node<'a, 'i>> {
    let file = child(disk, "source")?.attribute("file")?;
    if !Path::new(file).starts_with(ROOT) {
        return None;
    }
    child(disk, "backingStore").filter(|b| child(*b, "source").is_some())
}

/// Runs `qemu-img ARGS`; its stdout, or an error saying `what` failed.
async fn qemu_img(args: &[&str], what: &str) -> Result<Vec<u8>> {
    let out = tokio::process::Command::new("qemu-img")
        .args(args)
        .output()
        .await
        .map_err(|e| Error::io("running qemu-img (Debian: qemu-utils)", e))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(Error::Precondition(format!(
            "{what}: qemu-img: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, serde::Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u32,
}

/// The ranges an overlay holds itself (written since it was made), and
/// the virtual size.
async fn overlay_ranges(overlay: &Path) -> Result<(u64, Vec<(u64, u64)>)> {
    let path = overlay.display().to_string();
    let what = format!("mapping the overlay {path}");
    let json = qemu_img(&["map", "--output=json", "-f", "qcow2", &path], &what).await?;
    let entries: Vec<MapEntry> = serde_json::from_slice(&json)
        .map_err(|e| Error::Precondition(format!("{what}: unreadable map: {e}")))?;
    let size = entries
        .iter()
        .map(|e| e.start + e.length)
        .max()
        .unwrap_or(0);
    let ranges = entries
        .iter()
        .filter(|e| e.depth == 0)
        .map(|e| (e.start, e.length))
        .collect();
    Ok((size, ranges))
}

/// `file` as a `--diskspec` value wants it: commas doubled.
fn diskspec(dev: &str, file: &Path) -> String {
    format!(
        "{dev},snapshot=external,driver=qcow2,file={}",
        file.display().to_string().replace(',', ",,")
    )
}

/// A domain as tracking sees it.
struct Tracked {
    domain: String,
    /// Its overlay directory.
    dir: PathBuf,
    disks: Vec<FileDisk>,
    /// Target devices of disks that are not files.
    others: Vec<String>,
}

impl LibvirtSite {
    /// The domain of instance `name`, its overlay directory and file disks,
    /// after the checks every tracking call needs.
    async fn tracked_disks(&self, name: &str) -> Result<Tracked> {
        let name = self.checked_name(name, "instance")?;
        if !self.is_local() {
            return Err(self.err_local_only("change tracking"));
        }
        let domain = self.domain_name(name);
        let xml = self.domain_xml(&domain, name).await?;
        let (disks, others) = file_disks(&xml)?;
        Ok(Tracked {
            dir: dir(&domain),
            domain,
            disks,
            others,
        })
    }
}

#[async_trait]
impl ChangeTracking for LibvirtSite {
    async fn begin_tracking(&self, name: &str) -> Result<()> {
        let Tracked {
            domain,
            dir,
            disks,
            others,
        } = self.tracked_disks(name).await?;
        let on_overlay = disks.iter().filter(|d| d.file.starts_with(&dir)).count();
        if disks.is_empty() || on_overlay == disks.len() {
            return Ok(());
        }
        if on_overlay > 0 {
            return Err(Error::Precondition(format!(
                "instance {name}: only some disks of domain {domain} are on overlays in {}; \
                 end the tracking first (fluidcloud rollback of the relocation)",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let saved = dir.join("domain.xml");
        if !saved.exists() {
            // The definition before tracking, defined again at its end.
            let xml = self.domain_xml(&domain, name).await?;
            crate::relocate::store::write_atomic(&saved, xml.as_bytes())
                .map_err(|e| Error::Precondition(e.to_string()))?;
        }
        let mut args: Vec<String> = [
            "snapshot-create-as",
            &domain,
            "--disk-only",
            "--no-metadata",
            "--atomic",
        ]
        .map(str::to_owned)
        .to_vec();
        for d in &disks {
            let overlay = dir.join(format!("{}.qcow2", d.dev));
            // A stale overlay of a run that crashed before the snapshot.
            let _ = std::fs::remove_file(&overlay);
            args.push("--diskspec".into());
            args.push(diskspec(&d.dev, &overlay));
        }
        for dev in others {
            args.push("--diskspec".into());
            args.push(format!("{dev},snapshot=no"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.virsh(&args, &format!("tracking the disks of instance {name}"))
            .await
            .map(drop)
    }

    async fn changes(&self, name: &str) -> Result<Option<Vec<ChangeSet>>> {
        let Tracked {
            domain, dir, disks, ..
        } = self.tracked_disks(name).await?;
        if self.domain_state(&domain, name).await? != InstanceState::Stopped {
            return Err(Error::Precondition(format!(
                "instance {name} runs: its changes are read once it stopped"
            )));
        }
        let tracked: Vec<&FileDisk> = disks.iter().filter(|d| d.file.starts_with(&dir)).collect();
        if tracked.is_empty() {
            return Ok(None);
        }
        let mut sets = Vec::new();
        for d in tracked {
            let base = d.backing.as_ref().ok_or_else(|| {
                Error::Precondition(format!(
                    "instance {name}: overlay {} has no backing store in the domain XML",
                    d.file.display()
                ))
            })?;
            let (size, ranges) = overlay_ranges(&d.file).await?;
            sets.push(ChangeSet::new(base.display().to_string(), size, ranges));
        }
        Ok(Some(sets))
    }

    async fn end_tracking(&self, name: &str) -> Result<()> {
        let Tracked {
            domain, dir, disks, ..
        } = self.tracked_disks(name).await?;
        if !dir.exists() {
            return Ok(());
        }
        let what = format!("ending the tracking of instance {name}");
        let running = self.domain_state(&domain, name).await? == InstanceState::Running;
        for d in disks.iter().filter(|d| d.file.starts_with(&dir)) {
            if running {
                self.virsh(
                    &[
                        "blockcommit",
                        &domain,
                        &d.dev,
                        "--active",
                        "--pivot",
                        "--wait",
                    ],
                    &what,
                )
                .await?;
            } else {
                let overlay = d.file.display().to_string();
                qemu_img(&["commit", "-q", "-f", "qcow2", &overlay], &what).await?;
            }
        }
        let saved = dir.join("domain.xml");
        if saved.exists() {
            let path = saved.display().to_string();
            self.virsh(&["define", &path], &what).await?;
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::io(format!("removing {}", dir.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_disks_with_and_without_a_backing_store() {
        let xml = r"<domain><devices>
          <disk type='file' device='disk'><driver type='qcow2'/>
            <source file='/t/web/vda.qcow2'/>
            <backingStore type='file'><format type='raw'/><source file='/pool/web.raw'/></backingStore>
            <target dev='vda'/></disk>
          <disk type='file' device='cdrom'><source file='/iso'/><target dev='hdc'/></disk>
          <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdc'/></disk>
          <disk type='file' device='disk'><source file='/pool/data.raw'/><target dev='vdb'/></disk>
        </devices></domain>";
        let (d, others) = file_disks(xml).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(others, ["vdc"]);
        assert_eq!(d[0].dev, "vda");
        assert_eq!(d[0].backing.as_deref(), Some(Path::new("/pool/web.raw")));
        assert_eq!(d[1].file, Path::new("/pool/data.raw"));
        assert!(d[1].backing.is_none());
        assert_eq!(
            diskspec("vda", Path::new("/a,b/x.qcow2")),
            "vda,snapshot=external,driver=qcow2,file=/a,,b/x.qcow2"
        );
    }
}
