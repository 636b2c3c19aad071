//! A real libvirt daemon for tests: `scripts/libvirt`, virsh, dir pools.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn libvirt_up() {
    let out = Command::new(repo().join("scripts/libvirt"))
        .arg("start")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "these tests need libvirtd; `scripts/libvirt start` exited {:?}: {} (run scripts/setup)",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn virsh_maybe(args: &[&str]) -> Option<String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn state(domain: &str) -> String {
    virsh_maybe(&["domstate", domain])
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "undefined".into())
}

/// A dir pool in a fresh directory; domains of its prefix and the pool go
/// on drop.
pub struct Pool {
    pub name: String,
    pub dir: PathBuf,
}

impl Pool {
    pub fn new(name: String) -> Self {
        let dir = PathBuf::from("/var/lib/libvirt/fluidcloud-tests").join(&name);
        let p = Self { name, dir };
        p.clean();
        std::fs::create_dir_all(&p.dir).unwrap();
        virsh(&[
            "pool-define-as",
            &p.name,
            "dir",
            "--target",
            p.dir.to_str().unwrap(),
        ]);
        virsh(&["pool-start", &p.name]);
        p
    }

    pub fn prefix(&self) -> String {
        format!("{}-", self.name)
    }

    pub fn clean(&self) {
        if let Some(list) = virsh_maybe(&["list", "--all", "--name"]) {
            for d in list.lines().filter(|d| d.starts_with(&self.prefix())) {
                let _ = virsh_maybe(&["destroy", d]);
                let _ = virsh_maybe(&["undefine", d]);
            }
        }
        let _ = virsh_maybe(&["pool-destroy", &self.name]);
        let _ = virsh_maybe(&["pool-undefine", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.clean();
    }
}

pub fn sha256_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

pub fn console_log(domain: &str) -> PathBuf {
    PathBuf::from(format!("/var/log/libvirt/qemu/{domain}.console.log"))
}
