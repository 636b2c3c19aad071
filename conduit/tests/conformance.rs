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
