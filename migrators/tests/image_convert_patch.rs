//! `image-convert` patch mode, the warm path's final delta: a raw source
//! is pre-copied into qcow2 (or raw), changed, then the `replaces` step
//! with `patch` brings the output up to it in place, with and without a
//! change set; `qemu-img compare` and `qemu-img check` are the oracle.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{Rng, assert_check_clean, qemu, qemu_ok, s};
use fluidcloud_migrators::ImageConvert;
use fluidcloud_migrators::changes::ChangeSet;
use fluidcloud_plugins::{
    Artifact, ArtifactKind, Error, ExecContext, ImageFormat, Migrator, StepOutput, StepRequest,
};
use serde_json::json;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

fn request(step: &str, image: &Path, params: serde_json::Value) -> StepRequest {
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "image".to_owned(),
        Artifact {
            kind: ArtifactKind::DiskImage {
                format: ImageFormat::Raw,
            },
            site: "dc-paris".into(),
            locator: s(image).into(),
            size: None,
            checksum: None,
        },
    );
    StepRequest {
        step_id: step.into(),
        params,
        inputs,
    }
}

/// A raw source with random data in a few places.
fn source(d: &Path) -> std::path::PathBuf {
    let img = d.join("source.raw");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(SIZE).unwrap();
    let mut rng = Rng::new(42);
    for at in [0, 5 * MIB + 100, 20 * MIB, 40 * MIB + 7] {
        let mut buf = vec![0u8; (2 * MIB) as usize];
        rng.fill(&mut buf);
        f.write_all_at(&buf, at).unwrap();
    }
    img
}

/// Changes the source in a few ranges (into data, into holes, zeros over
/// data) and returns them.
fn change(src: &Path, seed: u64) -> Vec<(u64, u64)> {
    let f = std::fs::OpenOptions::new().write(true).open(src).unwrap();
    let mut rng = Rng::new(seed);
    let ranges = vec![
        (100, 5000),
        (5 * MIB + 4096, 70_000),
        (12 * MIB + 3, 1),
        (30 * MIB + 65_000, 3 * MIB),
        (41 * MIB, 300_000),
    ];
    for (i, &(at, len)) in ranges.iter().enumerate() {
        let mut buf = vec![0u8; len as usize];
        if i != 4 {
            rng.fill(&mut buf);
        }
        f.write_all_at(&buf, at).unwrap();
    }
    ranges
}

fn identical(format: &str, src: &Path, out: &Path) {
    let cmp = qemu(&["compare", "-f", "raw", "-F", format, s(src), s(out)]);
    assert!(
        cmp.status.success(),
        "{}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

fn fact(out: &StepOutput, key: &str) -> serde_json::Value {
    out.facts["patch"][key].clone()
}

/// Pre-copies `src` into `out` as step `precopy` of relocation `r1`.
async fn precopy(src: &Path, out: &Path, format: &str) {
    let req = request(
        "precopy",
        src,
        json!({"format": format, "output": s(out), "relocation": "r1"}),
    );
    ImageConvert
        .execute(&req, &ExecContext::quiet())
        .await
        .unwrap();
}

fn final_request(src: &Path, out: &Path, format: &str, extra: serde_json::Value) -> StepRequest {
    let mut params = json!({
        "format": format, "output": s(out), "relocation": "r1",
        "replaces": "precopy", "patch": true, "verify": true,
    });
    params
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    request("final", src, params)
}

#[test]
fn patch_needs_replaces_and_changes_needs_patch() {
    let m = ImageConvert;
    let p = m.validate(&request(
        "f",
        Path::new("/x"),
        json!({"format": "qcow2", "output": "/o", "patch": true}),
    ));
    assert!(
        p.len() == 1 && p[0].to_string().contains("params.patch"),
        "{p:?}"
    );
    let p = m.validate(&request(
        "f",
        Path::new("/x"),
        json!({"format": "qcow2", "output": "/o", "changes": "/c.json"}),
    ));
    assert!(
        p.len() == 1 && p[0].to_string().contains("params.changes"),
        "{p:?}"
    );
}

#[tokio::test]
async fn patch_mode_brings_qcow2_and_raw_outputs_up_to_the_source() {
    for format in ["qcow2", "raw"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let src = source(d);
        let out = d.join(format!("web.{format}"));
        precopy(&src, &out, format).await;
        change(&src, 1);
        let req = final_request(&src, &out, format, json!({}));
        let ctx = ExecContext::quiet();
        let done = ImageConvert.execute(&req, &ctx).await.unwrap();
        assert_eq!(fact(&done, "mode"), "patch", "{format}: {:?}", done.facts);
        let written = fact(&done, "bytes_written").as_u64().unwrap();
        let compared = fact(&done, "bytes_compared").as_u64().unwrap();
        // Every changed range was written, not the whole disk.
        assert!(
            written >= 5000 + 70_000 + 1 + 3 * MIB,
            "{format}: {written}"
        );
        assert!(written < 6 * MIB, "{format}: {written}");
        assert!(compared < SIZE, "{format}: {compared}");
        assert_eq!(done.measured.bytes_written, written);
        identical(format, &src, &out);
        if format == "qcow2" {
            assert_check_clean(&out);
        }
        assert_eq!(
            fluidcloud_migrators::owner::read(&out).unwrap().as_deref(),
            Some("r1/final")
        );
        assert_eq!(
            done.artifacts["image"].size,
            Some(std::fs::metadata(&out).unwrap().len())
        );
        // A re-run returns the output as it is.
        let again = ImageConvert.execute(&req, &ctx).await.unwrap();
        assert!(again.facts.is_empty());
        // Rollback of the final step removes the output, as with a
        // replacing conversion.
        ImageConvert
            .rollback(&req, Some(&done), &ctx)
            .await
            .unwrap();
        assert!(!out.exists());
    }
}

#[tokio::test]
async fn a_change_set_limits_what_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let out = d.join("web.qcow2");
    precopy(&src, &out, "qcow2").await;
    let ranges = change(&src, 2);
    let set = ChangeSet::new(s(&src), SIZE, ranges);
    let set_path = d.join("changes.json");
    set.save(&set_path).unwrap();
    let req = final_request(&src, &out, "qcow2", json!({"changes": s(&set_path)}));
    let done = ImageConvert
        .execute(&req, &ExecContext::quiet())
        .await
        .unwrap();
    let chunks = set.chunks(MIB).len() as u64;
    assert_eq!(fact(&done, "mode"), "patch");
    assert_eq!(fact(&done, "bytes_compared").as_u64(), Some(chunks * MIB));
    assert_eq!(done.measured.bytes_read, 2 * chunks * MIB);
    assert!(chunks * MIB < SIZE / 4);
    identical("qcow2", &src, &out);
    assert_check_clean(&out);

    // A change set of another disk size, or of another disk, is refused,
    // naming the file; the output stays the pre-copy's.
    let bad = d.join("bad.json");
    for (disk, needle) in [(s(&src), "bytes"), ("/pool/other.raw", "/pool/other.raw")] {
        ChangeSet::new(disk, SIZE + MIB, vec![(0, 1)])
            .save(&bad)
            .unwrap();
        std::fs::remove_file(&out).unwrap();
        fluidcloud_migrators::owner::remove(&out).unwrap();
        precopy(&src, &out, "qcow2").await;
        let req = final_request(&src, &out, "qcow2", json!({"changes": s(&bad)}));
        let e = ImageConvert
            .execute(&req, &ExecContext::quiet())
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("bad.json") && e.to_string().contains(needle),
            "{e}"
        );
        assert_eq!(
            fluidcloud_migrators::owner::read(&out).unwrap().as_deref(),
            Some("r1/precopy")
        );
    }

    // No change set file: the source did not track the disk, and every
    // chunk holding data is compared.
    std::fs::remove_file(&bad).unwrap();
    let req = final_request(&src, &out, "qcow2", json!({"changes": s(&bad)}));
    let done = ImageConvert
        .execute(&req, &ExecContext::quiet())
        .await
        .unwrap();
    assert_eq!(fact(&done, "mode"), "patch");
    assert_eq!(done.facts["tracked"], json!(false));
    assert!(fact(&done, "bytes_compared").as_u64().unwrap() > chunks * MIB);
    identical("qcow2", &src, &out);
}

#[tokio::test]
async fn an_output_the_patcher_refuses_is_converted_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let out = d.join("web.qcow2");
    precopy(&src, &out, "qcow2").await;
    // An internal snapshot: the patcher says Unsupported.
    qemu_ok(&["snapshot", "-c", "s1", s(&out)]);
    change(&src, 3);
    let req = final_request(&src, &out, "qcow2", json!({}));
    let done = ImageConvert
        .execute(&req, &ExecContext::quiet())
        .await
        .unwrap();
    assert_eq!(fact(&done, "mode"), "convert", "{:?}", done.facts);
    assert!(
        fact(&done, "fallback")
            .as_str()
            .unwrap()
            .contains("internal snapshots")
    );
    identical("qcow2", &src, &out);
    assert_check_clean(&out);
    // The conversion leaves no snapshot behind.
    let info = common::info_json(&out, "qcow2");
    assert!(info.get("snapshots").is_none(), "{info}");
    assert!(matches!(
        ImageConvert
            .execute(
                &request("other", &src, json!({"format": "qcow2", "output": s(&out)})),
                &ExecContext::quiet()
            )
            .await
            .unwrap_err(),
        Error::Precondition(_)
    ));
}
