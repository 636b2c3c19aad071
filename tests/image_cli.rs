//! `fluidcloud image info|convert|check|compare` run as a person would,
//! with qemu-img as the oracle for what the images hold. Fails (never
//! skips) without qemu-img.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails, ok, run_in};

fn qemu(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-img is the oracle of these tests and must be installed: {e}")
        });
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(img.to_str().unwrap());
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    assert!(out.status.success());
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A base image and an overlay with some changes, zeros and compression.
fn images(d: &Path) -> (PathBuf, PathBuf) {
    let base = d.join("base.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", s(&base), "20M"]);
    qemu_io(
        &base,
        &[
            "write -P 0x61 0 3M",
            "write -c -P 0x62 5M 1M",
            "write -P 0x63 20476k 4k",
        ],
    );
    let top = d.join("top.qcow2");
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 0x71 1M 64k", "write -z 2M 128k"]);
    (base, top)
}

#[test]
fn info_shows_format_chain_and_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, top) = images(d);
    let out = ok(&run_in(d, &["image", "info", "--json", "top.qcow2"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 20 << 20);
    assert_eq!(v["chain"].as_array().unwrap().len(), 2);
    assert_eq!(v["chain"][1]["format"], "qcow2");
    assert_eq!(v["qcow2"]["backing_file"], "base.qcow2");
    assert_eq!(v["qcow2"]["cluster_size"], 65536);
    assert_eq!(v["zero_bytes"], 128 << 10);
    // Data, in whole clusters: 3M + 1M + the last 64k cluster of the base
    // (the overlay's 64k lies inside the 3M), less the 128k zeroed on top.
    assert_eq!(v["data_bytes"], (4 << 20) + (64 << 10) - (128 << 10));
    let text = ok(&run_in(d, &["image", "info", s(&top)]));
    assert!(text.contains("format:         qcow2"), "{text}");
    assert!(text.contains("backing 1:"), "{text}");
}

#[test]
fn convert_to_raw_and_compressed_qcow2_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, top) = images(d);
    let raw = d.join("out.raw");
    let text = ok(&run_in(
        d,
        &["image", "convert", "-O", "raw", "top.qcow2", "out.raw"],
    ));
    assert!(text.contains("converted"), "{text}");
    qemu(&["compare", s(&top), s(&raw)]);
    let q = d.join("out.qcow2");
    let out = ok(&run_in(
        d,
        &[
            "image",
            "convert",
            "--json",
            "-O",
            "qcow2",
            "-c",
            "zstd",
            "--cluster-size",
            "4K",
            "top.qcow2",
            "out.qcow2",
        ],
    ));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["virtual_size"], 20 << 20);
    qemu(&["compare", s(&top), s(&q)]);
    qemu(&["check", s(&q)]);
    let info: serde_json::Value =
        serde_json::from_str(&qemu(&["info", "--output=json", s(&q)])).unwrap();
    assert_eq!(info["cluster-size"], 4096);
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");
    // Our own compare agrees, and check reads everything.
    let same = ok(&run_in(d, &["image", "compare", "out.raw", "out.qcow2"]));
    assert!(same.contains("identical"), "{same}");
    let checked = ok(&run_in(d, &["image", "check", "out.qcow2"]));
    assert!(checked.contains("No errors were found"), "{checked}");
    // The output exists now: refused without --force (precondition, 7).
    let err = fails(
        &run_in(
            d,
            &["image", "convert", "-O", "raw", "top.qcow2", "out.raw"],
        ),
        7,
    );
    assert!(err.contains("exists"), "{err}");
    ok(&run_in(
        d,
        &[
            "image",
            "convert",
            "--force",
            "-O",
            "raw",
            "top.qcow2",
            "out.raw",
        ],
    ));
}

#[test]
fn convert_to_azure_vhd_rounds_up_to_a_whole_mib() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("odd.qcow2");
    qemu(&["create", "-q", "-f", "qcow2", s(&img), "3000k"]);
    qemu_io(&img, &["write -P 0x55 2999k 1k"]);
    ok(&run_in(
        d,
        &[
            "image",
            "convert",
            "-O",
            "vhd",
            "--azure",
            "odd.qcow2",
            "az.vhd",
        ],
    ));
    let vhd = d.join("az.vhd");
    let info: serde_json::Value =
        serde_json::from_str(&qemu(&["info", "-f", "vpc", "--output=json", s(&vhd)])).unwrap();
    assert_eq!(info["virtual-size"], 3 << 20);
    assert_eq!(std::fs::metadata(&vhd).unwrap().len(), (3 << 20) + 512);
    qemu(&["compare", "-F", "vpc", s(&img), s(&vhd)]);
    let out = ok(&run_in(d, &["image", "info", "--json", "az.vhd"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "vhd");
}

#[test]
fn convert_to_both_vmdk_subformats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, top) = images(d);
    for sub in ["streamOptimized", "monolithicSparse"] {
        let out = d.join(format!("{sub}.vmdk"));
        ok(&run_in(
            d,
            &[
                "image",
                "convert",
                "-O",
                "vmdk",
                "--subformat",
                sub,
                "top.qcow2",
                s(&out),
            ],
        ));
        qemu(&["compare", "-F", "vmdk", s(&top), s(&out)]);
        let info: serde_json::Value =
            serde_json::from_str(&qemu(&["info", "-f", "vmdk", "--output=json", s(&out)])).unwrap();
        assert_eq!(info["format-specific"]["data"]["create-type"], sub);
    }
}

#[test]
fn convert_to_dynamic_vhd_and_vhdx_and_refuse_a_wrong_subformat() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (_, top) = images(d);
    for (format, sub, qemu_fmt) in [("vhd", Some("dynamic"), "vpc"), ("vhdx", None, "vhdx")] {
        let out = d.join(format!("out.{format}"));
        let mut args = vec!["image", "convert", "-O", format];
        if let Some(sub) = sub {
            args.extend(["--subformat", sub]);
        }
        args.extend(["top.qcow2", s(&out)]);
        ok(&run_in(d, &args));
        qemu(&["compare", "-F", qemu_fmt, s(&top), s(&out)]);
    }
    let err = fails(
        &run_in(
            d,
            &[
                "image",
                "convert",
                "-O",
                "qcow2",
                "--subformat",
                "dynamic",
                "top.qcow2",
                "x.qcow2",
            ],
        ),
        7,
    );
    assert!(err.contains("does not apply"), "{err}");
}

#[test]
fn compare_reports_the_first_difference_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, top) = images(d);
    let out = run_in(d, &["image", "compare", "--json", s(&base), s(&top)]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identical"], false);
    assert_eq!(v["first_difference"], 1 << 20);
    let err = fails(&run_in(d, &["image", "compare", s(&base), s(&top)]), 1);
    assert!(err.contains("differ at guest offset 1048576"), "{err}");
}

#[test]
fn corrupt_and_unsupported_images_have_their_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, _) = images(d);
    // Cut the file: L2 entries now point past its end.
    let bytes = std::fs::read(&base).unwrap();
    let cut = d.join("cut.qcow2");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = fails(&run_in(d, &["image", "check", "cut.qcow2"]), 8);
    assert!(
        err.contains("corrupt") && err.contains("cut.qcow2"),
        "{err}"
    );
    let err = fails(
        &run_in(
            d,
            &["image", "convert", "-O", "raw", "cut.qcow2", "cut.raw"],
        ),
        8,
    );
    assert!(err.contains("corrupt"), "{err}");
    assert!(
        !d.join("cut.raw").exists(),
        "a failed conversion leaves no output"
    );
    let luks = d.join("luks.qcow2");
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&luks),
        "1M",
    ]);
    let err = fails(&run_in(d, &["image", "info", "luks.qcow2"]), 6);
    assert!(err.contains("encrypted"), "{err}");
    let err = fails(&run_in(d, &["image", "info", "missing.qcow2"]), 1);
    assert!(err.contains("missing.qcow2"), "{err}");
}
