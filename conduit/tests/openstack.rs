//! The `openstack` driver against real OpenStack services on loopback:
//! Keystone, Glance and Swift from PyPI, started by `scripts/openstack`
//! (once per run, shared; the tests fail, never skip, when it is missing).
//! What the driver says is checked against what the services hold, read
//! independently with the `openstack` CLI and Glance's own store.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use fluidcloud_conduit::config::{OpenstackConfig, SiteConfig};
use fluidcloud_conduit::conformance;
use fluidcloud_conduit::driver::{DiskStore, SiteDriver};
use fluidcloud_conduit::drivers::local::LocalSite;
use fluidcloud_conduit::drivers::openstack::OpenStack;
use fluidcloud_conduit::transfer::DiskRef;
use fluidcloud_conduit::transfer::local::{LocalMove, run};
use fluidcloud_plugins::{CancelFlag, Error, ImageFormat};
use fluidcloud_testkit::Lock;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/openstack")
}

/// The run's cloud: started once (under a lock, `scripts/openstack start`
/// is idempotent), its `OS_*` variables exported into this process.
fn cloud() -> &'static BTreeMap<String, String> {
    static ENV: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let _lock = Lock::take("openstack-start");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openstack-shared");
        let out = Command::new(script())
            .args(["start", dir.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`scripts/openstack start` exited {:?}: {} (run scripts/setup)",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        let env: BTreeMap<String, String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        // SAFETY: set once, before this test starts threads that read the
        // environment (nextest runs each test in a process of its own).
        for (k, v) in &env {
            unsafe { std::env::set_var(k, v) };
        }
        env
    })
}

fn site_config(region: Option<&str>) -> SiteConfig {
    let env = cloud();
    let mut c: SiteConfig = toml::from_str(
        "kind = \"openstack\"\njurisdiction = \"EU/FR\"\n\
         location = { region = \"fr\", latitude = 48.1, longitude = -1.7 }\n",
    )
    .unwrap();
    c.region = region.map(str::to_owned);
    c.openstack = Some(OpenstackConfig {
        auth_url: env["OS_AUTH_URL"].clone(),
        project: Some("fluid".into()),
        user: Some("fluid".into()),
        password_env: Some("OS_PASSWORD".into()),
        ..OpenstackConfig::default()
    });
    c
}

fn site() -> OpenStack {
    OpenStack::open("os-test", &site_config(Some("RegionOne"))).unwrap()
}

/// `openstack ARGS -f json` as the test's user, parsed.
fn cli(args: &[&str]) -> serde_json::Value {
    cloud();
    let out = Command::new(script())
        .arg("cli")
        .args(args)
        .args(["-f", "json"])
        .env_remove("AWS_CA_BUNDLE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openstack {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

fn sha512(path: &Path) -> String {
    let out = Command::new("sha512sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..128].to_owned()
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn move_disk(
    source: &dyn SiteDriver,
    target: &dyn SiteDriver,
    name: &str,
    format: ImageFormat,
    owner: &str,
) -> fluidcloud_plugins::Result<()> {
    let disk = DiskRef {
        store: DiskStore::Image,
        name: name.to_owned(),
        format,
    };
    let cancel = CancelFlag::new();
    run(&LocalMove {
        source: source.disks().unwrap(),
        from: &disk,
        target: target.disks().unwrap(),
        into: &disk,
        owner,
        workers: 4,
        since: None,
        cancel: &cancel,
        progress: &|_, _| {},
    })
    .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openstack_driver_passes_the_conformance_suite_on_keystone_and_glance() {
    let _lock = Lock::take("openstack-images");
    let site = site();
    // The cloud outlives a run: what a failed run left goes first.
    let store = fluidcloud_conduit::driver::require_image_store(&site).unwrap();
    for name in store.list_images().await.unwrap() {
        store.delete_image(&name).await.unwrap();
    }
    conformance::run_all(&site).await.unwrap();
    let caps: Vec<_> = site
        .capabilities()
        .into_iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(caps, ["image-store"]);
    let left = cli(&["image", "list", "--name", "conf-image"]);
    assert_eq!(left, serde_json::json!([]));
}

#[test]
fn a_qcow2_image_goes_into_glance_with_its_format_and_hash_and_comes_back_equal() {
    // The project's images are the conformance suite's to list.
    let _lock = Lock::take("openstack-images");
    let dir = tempfile::tempdir().unwrap();
    let a = LocalSite::create("a", dir.path().join("a")).unwrap();
    let b = LocalSite::create("b", dir.path().join("b")).unwrap();
    let src = a.root().join("images/os-web.qcow2");
    qemu_img(&["create", "-f", "qcow2", src.to_str().unwrap(), "256M"]);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 8M",
            "-c",
            "write -P 0x33 100M 4M",
        ])
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let os = site();
    let name = "os-web.qcow2";
    // A leftover of an earlier run of this test goes first.
    let _ = os.disks().unwrap().remove(DiskStore::Image, name, "t1/x");
    move_disk(&a, &os, name, ImageFormat::Qcow2, "t1/precopy:os-web").unwrap();
    // What Glance holds, as its CLI shows it and as its store keeps it.
    let shown = cli(&["image", "show", name]);
    assert_eq!(shown["disk_format"], "qcow2");
    assert_eq!(shown["status"], "active");
    let stored = PathBuf::from(&cloud()["OS_GLANCE_DIR"]).join(shown["id"].as_str().unwrap());
    assert_eq!(
        shown["properties"]["os_hash_value"]
            .as_str()
            .or(shown["os_hash_value"].as_str()),
        Some(sha512(&stored).as_str())
    );
    qemu_img(&["check", stored.to_str().unwrap()]);
    // Another relocation may not write it.
    let other = move_disk(&a, &os, name, ImageFormat::Qcow2, "t2/precopy:os-web");
    assert!(matches!(other, Err(Error::Precondition(_))), "{other:?}");
    // Back to another site: the guest bytes are equal.
    move_disk(&os, &b, name, ImageFormat::Qcow2, "t3/back:os-web").unwrap();
    let raw = |p: &Path, out: &Path| {
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            p.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        sha256(out)
    };
    assert_eq!(
        raw(&src, &dir.path().join("x.raw")),
        raw(
            &b.root().join("images").join(name),
            &dir.path().join("y.raw")
        )
    );
    // Only t1 removes it.
    let disks = os.disks().unwrap();
    assert!(matches!(
        disks.remove(DiskStore::Image, name, "t2/x"),
        Err(Error::Precondition(_))
    ));
    assert!(disks.remove(DiskStore::Image, name, "t1/x").unwrap());
    assert_eq!(
        cli(&["image", "list", "--name", name]),
        serde_json::json!([])
    );
}

#[tokio::test]
async fn a_wrong_password_and_a_missing_region_are_clear_errors() {
    let env = cloud();
    unsafe { std::env::set_var("FC_TEST_WRONG_PASSWORD", "not-it") };
    let mut c = site_config(Some("RegionOne"));
    c.openstack.as_mut().unwrap().password_env = Some("FC_TEST_WRONG_PASSWORD".into());
    let wrong = OpenStack::open("os-test", &c).unwrap();
    let e = wrong.check().await.unwrap_err();
    assert!(
        matches!(&e, Error::PermissionDenied { what, site: Some(s) } if s == "os-test" && what.contains(&env["OS_AUTH_URL"])),
        "{e:?}"
    );
    // Keystone cannot be asked: no capability is claimed.
    assert!(wrong.capabilities().is_empty());
    let nowhere = OpenStack::open("os-test", &site_config(Some("Nowhere"))).unwrap();
    let e = nowhere.check().await.unwrap_err();
    assert!(
        matches!(&e, Error::NotSupported { operation, .. } if operation.contains("image") && operation.contains("region Nowhere")),
        "{e:?}"
    );
    let mut c = site_config(None);
    c.openstack.as_mut().unwrap().password_env = Some("FC_TEST_UNSET_VARIABLE_43".into());
    let e = OpenStack::open("os-test", &c).unwrap_err().to_string();
    assert!(e.contains("FC_TEST_UNSET_VARIABLE_43"), "{e}");
    let mut c = site_config(None);
    c.openstack.as_mut().unwrap().auth_url = "ftp://keystone".into();
    let e = OpenStack::open("os-test", &c).unwrap_err().to_string();
    assert!(e.contains("sites.os-test.openstack.auth_url"), "{e}");
}
