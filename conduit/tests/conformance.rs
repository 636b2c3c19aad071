//! Every built-in driver passes the shared conformance suite.
#![allow(clippy::unwrap_used)]

use fluidcloud_conduit::conformance;
use fluidcloud_conduit::drivers::local::LocalSite;

#[tokio::test]
async fn local_driver_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let site = LocalSite::create("conf", dir.path().join("site")).unwrap();
    conformance::run_all(&site).await.unwrap();
    // Nothing half-written is left behind (temporary files are dot-files).
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn a_local_site_whose_directory_is_missing_fails_the_core_check() {
    let dir = tempfile::tempdir().unwrap();
    let site = LocalSite::new("ghost", dir.path().join("absent"));
    let err = conformance::run_all(&site).await.unwrap_err();
    assert!(err.starts_with("core: check:"), "{err}");
    assert!(
        err.contains("site directory") && err.contains("absent"),
        "{err}"
    );
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        if e.is_dir() {
            out.extend(walk(&e));
        }
        out.push(e);
    }
    out
}

/// libvirtd must be there: these tests fail (never skip) without it.
fn libvirt_up() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/libvirt");
    let out = std::process::Command::new(&script)
        .arg("start")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the libvirt driver tests need a running libvirtd; `scripts/libvirt start` exited {:?}: {} (run scripts/setup)",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn virsh(args: &[&str]) -> std::process::Output {
    std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap()
}

/// A `dir` storage pool of its own in a fresh directory, removed on drop
/// with every domain of `prefix`.
struct Pool {
    name: String,
    prefix: String,
    dir: std::path::PathBuf,
}

impl Pool {
    fn new(tag: &str) -> Self {
        libvirt_up();
        let name = format!("fc-{tag}-{}", std::process::id());
        let dir = std::path::PathBuf::from("/var/lib/libvirt/fluidcloud-tests").join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let _ = virsh(&["pool-destroy", &name]);
        let _ = virsh(&["pool-undefine", &name]);
        let out = virsh(&[
            "pool-define-as",
            &name,
            "dir",
            "--target",
            dir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = virsh(&["pool-start", &name]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            prefix: format!("{name}-"),
            name,
            dir,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let list = virsh(&["list", "--all", "--name"]);
        for d in String::from_utf8_lossy(&list.stdout).lines() {
            if d.starts_with(&self.prefix) {
                let _ = virsh(&["destroy", d]);
                let _ = virsh(&["undefine", d]);
            }
        }
        let _ = virsh(&["pool-destroy", &self.name]);
        let _ = virsh(&["pool-undefine", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn libvirt_driver_passes_the_conformance_suite() {
    use fluidcloud_conduit::drivers::libvirt::{Accel, LibvirtSite};
    let pool = Pool::new("conf");
    let site = LibvirtSite::new("conf-lv", "qemu:///system", &pool.name)
        .with_prefix(&pool.prefix)
        .with_shutdown_timeout(std::time::Duration::ZERO)
        .with_accel(Accel::Tcg);
    conformance::run_all(&site).await.unwrap();
    // Nothing left in the pool, no temporary file either.
    let left: Vec<_> = std::fs::read_dir(&pool.dir).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn a_libvirt_site_whose_pool_is_missing_fails_the_core_check() {
    use fluidcloud_conduit::drivers::libvirt::LibvirtSite;
    libvirt_up();
    let site = LibvirtSite::new("ghost", "qemu:///system", "fc-no-such-pool");
    let err = conformance::run_all(&site).await.unwrap_err();
    assert!(err.starts_with("core: check:"), "{err}");
    assert!(err.contains("fc-no-such-pool"), "{err}");
}
