//! `scripts/setup --check`: proves that an install from scratch resolves,
//! on a machine that already has everything. The regression it guards
//! against: bookworm-backports' QEMU needs backports' seabios, and a
//! version pin on the `qemu-*` packages alone left apt with "held broken
//! packages" on every fresh machine, hidden on machines set up earlier.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn check(extra_preferences: Option<&Path>) -> std::process::Output {
    let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup"));
    cmd.arg("--check");
    if let Some(p) = extra_preferences {
        cmd.arg("--apt-preferences").arg(p);
    }
    cmd.output().unwrap()
}

#[test]
fn seabios_held_at_bookworms_version_fails_the_check_in_one_line_naming_both_packages() {
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("seabios.pref");
    // What the old script effectively did: everything but qemu-* from
    // bookworm, so seabios stays at 1.16.2.
    std::fs::write(
        &pin,
        "Package: seabios\nPin: release n=bookworm\nPin-Priority: 1001\n",
    )
    .unwrap();
    let out = check(Some(&pin));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let failures: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("cannot install"))
        .collect();
    assert_eq!(
        failures.len(),
        1,
        "one line, not apt's whole output:\n{err}"
    );
    let line = failures[0];
    assert!(
        line.starts_with("setup: cannot install qemu-system-x86: it depends on seabios (> 1.16.3"),
        "{line}"
    );
    assert!(line.contains("but 1.16.2"), "{line}");
}

#[test]
fn the_check_passes_without_the_bad_pin_and_installs_nothing() {
    let before = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Version} ${Status}\n"])
        .output()
        .unwrap();
    let out = check(None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("check: apt can install"), "{err}");
    assert!(
        err.contains("qemu-system-x86") && err.contains("libvirt-daemon"),
        "{err}"
    );
    assert!(
        err.contains("check: every crate of Cargo.lock resolves"),
        "{err}"
    );
    let after = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Version} ${Status}\n"])
        .output()
        .unwrap();
    assert_eq!(
        before.stdout, after.stdout,
        "the check changed installed packages"
    );
}
