//! `kill -9` of `fluidcloud relocate` in the middle of a large volume copy,
//! then `resume`: the relocation completes, the chunks finished before the
//! kill are not copied again, and the result is byte-identical.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{chunks_written, ok, random_file, run};

const MIB: u64 = 1 << 20;
/// The volume's size: big enough that the copy takes seconds.
const VOLUME: u64 = 1536 * MIB;
const CHUNK: u64 = 4 * MIB;

#[test]
fn kill_9_during_a_volume_copy_then_resume_completes_without_recopying() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("relocate-kill9");
    let _ = std::fs::remove_dir_all(&dir);
    fluidcloud_testkit::scratch(&dir);
    ok(&run(&["demo", "init", dir.to_str().unwrap()]));
    let config = dir.join("fluidcloud.toml").to_str().unwrap().to_owned();
    let src = dir.join("sites/dc-paris/volumes/db-data.raw");
    random_file(&src, VOLUME);
    let target = dir.join("sites/edge-nantes/volumes/db-data.raw");
    // The transfer writes the new volume beside its name until it is
    // complete; its random chunks allocate what they fill.
    let part = dir.join("sites/edge-nantes/volumes/.db-data.raw.fcpart");
    let chunks_written = || chunks_written(&part);

    let mut child = Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
        .args([
            "--config",
            &config,
            "relocate",
            "--from",
            "dc-paris",
            "--service",
            "shop",
            "--to",
            "edge-nantes",
            "--yes",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a fifth of the volume's chunks are written.
    let start = Instant::now();
    let want = VOLUME / CHUNK / 5;
    while chunks_written() < want {
        assert!(
            child.try_wait().unwrap().is_none(),
            "relocate finished before it could be killed ({} chunks written)",
            chunks_written()
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = chunks_written();
    assert!(
        before < VOLUME / CHUNK,
        "the copy had finished ({before} chunks)"
    );

    let list: serde_json::Value =
        serde_json::from_str(&ok(&run(&["--config", &config, "--json", "status"]))).unwrap();
    let entry = &list.as_array().unwrap()[0];
    assert_eq!(entry["status"], "interrupted", "{list:#}");
    let id = entry["id"].as_str().unwrap().to_owned();

    let out = ok(&run(&["--config", &config, "resume", &id]));
    assert!(out.contains("succeeded"), "{out}");
    let cmp = Command::new("cmp").arg(&src).arg(&target).output().unwrap();
    assert!(cmp.status.success(), "volumes differ after resume");

    let rep: serde_json::Value =
        serde_json::from_str(&ok(&run(&["--config", &config, "--json", "report", &id]))).unwrap();
    assert_eq!(rep["status"], "succeeded");
    let pre = rep["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "precopy:db-data.raw")
        .unwrap();
    assert_eq!(pre["attempts"], 2, "{pre:#}");
    // The resumed attempt wrote what was left, plus at most the chunks
    // that were in flight (one per copying thread) when the kill came:
    // what was written is found intact by hashing the target.
    let written = pre["bytes_written"].as_u64().unwrap();
    let left = VOLUME - before * CHUNK;
    assert!(
        written <= left + 8 * CHUNK,
        "resume wrote {written} bytes; only {left} were left"
    );
    assert!(
        written >= left.saturating_sub(8 * CHUNK),
        "resume wrote {written} bytes of {left}"
    );
    // Everything else finished too: the target runs the service.
    let db = std::fs::read_to_string(dir.join("sites/edge-nantes/instances/db.toml")).unwrap();
    assert!(db.contains("state = \"running\""), "{db}");
}
