//! The `image-convert` migrator through the SDK trait: validation without
//! I/O, a plan from the extent map, execution checked by `qemu-img
//! compare`, idempotent re-runs, and rollback.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{qemu, qemu_ok, s};
use fluidcloud_migrators::ImageConvert;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Error, ExecContext, ImageFormat, Migrator, StepRequest,
};
use serde_json::json;

fn request(image: &Path, params: serde_json::Value) -> StepRequest {
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "image".to_owned(),
        Artifact {
            kind: ArtifactKind::DiskImage {
                format: ImageFormat::Qcow2,
            },
            site: "dc-paris".into(),
            locator: s(image).into(),
            size: None,
            checksum: None,
        },
    );
    StepRequest {
        step_id: "convert web disk".into(),
        params,
        inputs,
    }
}

fn source(d: &Path) -> std::path::PathBuf {
    let img = d.join("source.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&img), "32M"]);
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x17 1M 3M",
            "-c",
            "write -c -P 0x18 20M 1M",
            s(&img),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    img
}

#[test]
fn describe_and_validate_without_io() {
    let m = ImageConvert;
    let d = m.describe();
    assert_eq!(d.name, "image-convert");
    assert!(d.consumes.contains(&ArtifactKind::DiskImage {
        format: ImageFormat::Qcow2
    }));
    assert!(d.produces.contains(&ArtifactKind::DiskImage {
        format: ImageFormat::Vmdk
    }));
    let ok = request(
        Path::new("/nonexistent.qcow2"),
        json!({"format": "raw", "output": "/x.raw"}),
    );
    assert!(m.validate(&ok).is_empty());
    let bad = request(
        Path::new("/x"),
        json!({"format": "iso", "cluster_size": 1000, "compression": "lz4"}),
    );
    let problems = m.validate(&bad);
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(problems.len(), 4, "{text:?}");
    // Subformats: each named at its key.
    for params in [
        json!({"format": "vmdk", "output": "/x", "subformat": "dynamic"}),
        json!({"format": "vhd", "output": "/x", "subformat": "streamOptimized"}),
        json!({"format": "vhd", "output": "/x", "subformat": "dynamic", "azure": true}),
        json!({"format": "raw", "output": "/x", "subformat": "fixed"}),
    ] {
        let problems = m.validate(&request(Path::new("/x"), params.clone()));
        assert_eq!(problems.len(), 1, "{params}: {problems:?}");
        assert!(
            problems[0].to_string().contains("params.subformat"),
            "{params}: {}",
            problems[0]
        );
    }
    for (format, sub) in [
        ("vmdk", "monolithicSparse"),
        ("vmdk", "streamOptimized"),
        ("vhd", "dynamic"),
        ("vhd", "fixed"),
    ] {
        let req = request(
            Path::new("/x"),
            json!({"format": format, "output": "/x", "subformat": sub}),
        );
        assert!(m.validate(&req).is_empty(), "{format} {sub}");
    }
    assert!(d.produces.contains(&ArtifactKind::DiskImage {
        format: ImageFormat::Vhdx
    }));
    let mut missing = bad.clone();
    missing.inputs.clear();
    assert!(
        m.validate(&missing)
            .iter()
            .any(|p| p.to_string().contains("`image`"))
    );
}

#[tokio::test]
async fn plan_execute_rerun_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = source(d);
    let m = ImageConvert;
    for (format, qemu_format, extra) in [
        ("vmdk", "vmdk", json!({})),
        ("qcow2", "qcow2", json!({"compression": "zstd"})),
        ("vhd", "vpc", json!({"azure": true})),
        ("vhdx", "vhdx", json!({})),
        ("vhd", "vpc", json!({"subformat": "dynamic"})),
        ("vmdk", "vmdk", json!({"subformat": "monolithicSparse"})),
    ] {
        let out = d.join(format!("web.{format}"));
        let mut params = json!({"format": format, "output": s(&out)});
        params
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let req = request(&img, params);
        let plan = m.plan(&req).await.unwrap();
        // 3 MiB + one 64 KiB cluster... the compressed 1 MiB: 4 MiB of data.
        assert_eq!(plan.bytes_read, 4 << 20);
        let ctx = ExecContext::quiet();
        let done = m.execute(&req, &ctx).await.unwrap();
        let art = &done.artifacts["image"];
        assert_eq!(art.locator, s(&out));
        assert_eq!(art.site, "dc-paris");
        assert_eq!(art.size, Some(std::fs::metadata(&out).unwrap().len()));
        assert_eq!(done.measured.bytes_read, 4 << 20, "{format}: {done:?}");
        let cmp = qemu(&["compare", "-F", qemu_format, s(&img), s(&out)]);
        assert!(
            cmp.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        // Re-running the step returns the finished output untouched.
        let mtime = std::fs::metadata(&out).unwrap().modified().unwrap();
        let again = m.execute(&req, &ctx).await.unwrap();
        assert_eq!(again.artifacts["image"], *art);
        assert_eq!(std::fs::metadata(&out).unwrap().modified().unwrap(), mtime);
        m.rollback(&req, Some(&done), &ctx).await.unwrap();
        assert!(!out.exists());
        // Rolling back twice is fine.
        m.rollback(&req, None, &ctx).await.unwrap();
    }
    // A foreign file at the output is not overwritten.
    let foreign = d.join("foreign.qcow2");
    std::fs::write(&foreign, b"not mine").unwrap();
    let req = request(&img, json!({"format": "qcow2", "output": s(&foreign)}));
    let e = m.execute(&req, &ExecContext::quiet()).await.unwrap_err();
    assert!(matches!(e, Error::Precondition(_)), "{e}");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"not mine");
    // A corrupt source is a typed error that is never retried.
    let cut = d.join("cut.qcow2");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let req = request(
        &cut,
        json!({"format": "raw", "output": s(&d.join("cut.raw"))}),
    );
    let e = m.execute(&req, &ExecContext::quiet()).await.unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    assert!(!d.join("cut.raw").exists());
}
