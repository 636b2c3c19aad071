//! Block-volume copy on real files: byte-identical sparse targets, an
//! independent Merkle computation as the oracle for the root, qemu-img as
//! the oracle for image sources, resume after an interruption, incremental
//! re-sync, corrupted targets, bad input, and the `volume-copy` migrator.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{Rng, qemu, qemu_ok, s};
use fluidcloud_migrators::Error;
use fluidcloud_migrators::changes::ChangeSet;
use fluidcloud_migrators::volume::{
    self, Manifest, VolumeCopy, VolumeCopyOptions, VolumeCopySummary, manifest_path, progress_path,
};
use fluidcloud_plugins::{
    Artifact, ArtifactKind, CancelFlag, Error as SdkError, ExecContext, ImageFormat, Migrator,
    StepRequest,
};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Writes a sparse file of `size` bytes with seeded random data at each
/// `(offset, length)`.
fn sparse_file(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    for &(off, len) in data {
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).unwrap();
    }
    f.sync_all().unwrap();
}

/// The Merkle root as docs/volumes.md defines it, computed from the bytes
/// with nothing of the crate: leaves are BLAKE3 of each chunk, parents
/// BLAKE3(0x01 ‖ left ‖ right), an odd node moves up, and the root binds
/// the sizes.
fn merkle_root(path: &Path, chunk: u64) -> String {
    let data = std::fs::read(path).unwrap();
    let mut level: Vec<[u8; 32]> = data
        .chunks(chunk as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    if level.is_empty() {
        level.push(*blake3::hash(b"").as_bytes());
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| {
                if p.len() == 2 {
                    let mut h = blake3::Hasher::new();
                    h.update(&[1]).update(&p[0]).update(&p[1]);
                    *h.finalize().as_bytes()
                } else {
                    p[0]
                }
            })
            .collect();
    }
    let mut h = blake3::Hasher::new();
    h.update(b"fluidcloud-volume-merkle-v1\0")
        .update(&chunk.to_le_bytes())
        .update(&(data.len() as u64).to_le_bytes())
        .update(&level[0]);
    h.finalize().to_hex().to_string()
}

fn file_hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn opts(chunk: u64) -> VolumeCopyOptions {
    VolumeCopyOptions {
        chunk_size: chunk,
        ..VolumeCopyOptions::default()
    }
}

fn copy(src: &Path, dst: &Path, o: &VolumeCopyOptions) -> VolumeCopySummary {
    volume::copy(src, dst, o, &|_, _| {}).unwrap()
}

/// Chunks of `path` holding any non-zero byte.
fn data_chunks(path: &Path, chunk: u64) -> u64 {
    std::fs::read(path)
        .unwrap()
        .chunks(chunk as usize)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64
}

/// The chunk records of a progress log (see docs/volumes.md).
fn log_records(target: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(progress_path(target)).unwrap();
    text.lines().skip(1).map(str::to_owned).collect()
}

/// A 128 MiB volume with data in scattered places: whole chunks, pieces
/// straddling chunk borders, a short run at the very end, and a 2 MiB run
/// of written zeros (allocated, but all zero).
fn scattered(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    sparse_file(
        &src,
        128 * MIB,
        &[
            (0, 3 * MIB),
            (10 * MIB + 4096, 100_000),
            (31 * MIB - 5000, 2 * MIB),
            (64 * MIB, 8 * MIB),
            (100 * MIB + 12345, 777),
            (128 * MIB - 4096, 4096),
        ],
        7,
    );
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 80 * MIB)
        .unwrap();
    f.sync_all().unwrap();
    src
}

#[test]
fn sparse_raw_copy_is_identical_sparse_and_has_the_independent_root() {
    let dir = tempfile::tempdir().unwrap();
    let src = scattered(dir.path());
    let dst = dir.path().join("out").join("dst.raw");
    std::fs::create_dir(dst.parent().unwrap()).unwrap();
    let before = (file_hash(&src), std::fs::metadata(&src).unwrap().mtime());
    let done = std::cell::Cell::new(0);
    let sum = volume::copy(&src, &dst, &opts(MIB), &|d, total| {
        assert!(d <= total && d >= done.get());
        done.set(d);
    })
    .unwrap();
    assert_eq!(done.get(), 128 * MIB, "progress reaches the total");
    assert_eq!(file_hash(&dst), before.0, "target is byte-identical");
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 128 * MIB);
    assert_eq!(
        (file_hash(&src), std::fs::metadata(&src).unwrap().mtime()),
        before,
        "the source is never modified"
    );
    // Sparse: the holes and the written zeros stay unallocated.
    let data = 3 * MIB + 100_000 + 2 * MIB + 8 * MIB + 777 + 4096;
    assert!(allocated(&src) >= data + 2 * MIB);
    assert!(
        allocated(&dst) <= data + 64 * 4096,
        "target allocates {} for {data} bytes of data",
        allocated(&dst)
    );
    // The source's holes are not read; its zero run is read but not written.
    assert!(sum.bytes_read <= allocated(&src));
    assert!(sum.bytes_written <= data + 6 * 4096);
    assert_eq!(sum.root, merkle_root(&src, MIB));
    assert_eq!(sum.chunks, 128);
    assert_eq!(sum.chunks_sent, data_chunks(&src, MIB));
    assert_eq!(sum.chunks_zero, 128 - data_chunks(&src, MIB));
    assert!(sum.created && !sum.manifest_trusted);
    // The manifest beside the target agrees, and the progress log is gone.
    let m = Manifest::load(&manifest_path(&dst)).unwrap();
    assert_eq!(m.root_hex(), sum.root);
    assert_eq!(m.zero_chunks(), sum.chunks_zero);
    assert!(!progress_path(&dst).exists());
    assert_eq!(volume::manifest_of(&dst, MIB).unwrap().root_hex(), sum.root);
    // A different chunk size gives a different (but again exact) root.
    let m64k = volume::manifest_of(&src, 64 << 10).unwrap();
    assert_eq!(m64k.root_hex(), merkle_root(&src, 64 << 10));
    assert_ne!(m64k.root_hex(), sum.root);
}

#[test]
fn odd_sized_and_empty_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("odd.raw");
    sparse_file(&src, 5 * MIB + 333, &[(5 * MIB, 333), (MIB, 10)], 3);
    let dst = dir.path().join("odd.out");
    let sum = copy(&src, &dst, &opts(2 * MIB));
    assert_eq!(sum.chunks, 3);
    assert_eq!(file_hash(&dst), file_hash(&src));
    assert_eq!(sum.root, merkle_root(&src, 2 * MIB));
    let empty = dir.path().join("empty.raw");
    File::create(&empty).unwrap();
    let sum = copy(&empty, &dir.path().join("empty.out"), &opts(MIB));
    assert_eq!((sum.chunks, sum.virtual_size), (0, 0));
    assert_eq!(sum.root, merkle_root(&empty, MIB));
}

#[test]
fn image_sources_match_qemu_img_compare() {
    let dir = tempfile::tempdir().unwrap();
    let raw = scattered(dir.path());
    for (fmt, ext) in [("qcow2", "qcow2"), ("vmdk", "vmdk")] {
        let img = dir.path().join(format!("src.{ext}"));
        qemu_ok(&["convert", "-f", "raw", "-O", fmt, s(&raw), s(&img)]);
        let dst = dir.path().join(format!("from-{ext}.raw"));
        let sum = copy(&img, &dst, &opts(MIB));
        let out = qemu(&["compare", "-f", fmt, "-F", "raw", s(&img), s(&dst)]);
        assert!(
            out.status.success(),
            "{fmt}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(sum.root, merkle_root(&raw, MIB), "{fmt}");
        assert!(
            allocated(&dst) <= allocated(&raw),
            "{fmt}: target stays sparse"
        );
    }
    // A qcow2 with explicit zero clusters over data in its backing file.
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_ok(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        // Relative: a backing file stays in its image's directory.
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -z 64M 4M", s(&top)])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dst = dir.path().join("from-top.raw");
    let sum = copy(&top, &dst, &opts(MIB));
    assert!(
        qemu(&["compare", "-f", "qcow2", "-F", "raw", s(&top), s(&dst)])
            .status
            .success()
    );
    assert_eq!(sum.root, merkle_root(&dst, MIB));
    assert_eq!(sum.chunks_zero, 128 - data_chunks(&raw, MIB) + 4);
}

fn full_volume(dir: &Path) -> PathBuf {
    let src = dir.join("full.raw");
    let runs: Vec<(u64, u64)> = (0..64).map(|i| (i * MIB, MIB - 4096)).collect();
    sparse_file(&src, 64 * MIB, &runs, 11);
    src
}

/// Cancels a copy once `after` bytes are done; returns the error.
fn interrupted(src: &Path, dst: &Path, after: u64) -> Error {
    let cancel = CancelFlag::new();
    let o = VolumeCopyOptions {
        chunk_size: MIB,
        threads: 2,
        cancel: Some(cancel.clone()),
        ..VolumeCopyOptions::default()
    };
    volume::copy(src, dst, &o, &|done, _| {
        if done >= after {
            cancel.cancel();
        }
    })
    .unwrap_err()
}

#[test]
fn resume_after_an_interruption_sends_only_the_remaining_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let src = full_volume(dir.path());
    let dst = dir.path().join("dst.raw");
    let e = interrupted(&src, &dst, 16 * MIB);
    assert!(
        matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted),
        "{e}"
    );
    assert!(e.to_string().contains("resume"), "{e}");
    assert!(
        !manifest_path(&dst).exists(),
        "an unfinished copy has no manifest"
    );
    let first = log_records(&dst);
    assert!(first.len() >= 16 && first.len() < 64, "{}", first.len());
    let sum = copy(&src, &dst, &opts(MIB));
    assert_eq!(sum.chunks_resumed, first.len() as u64);
    assert_eq!(sum.chunks_sent, 64 - first.len() as u64);
    assert_eq!(sum.chunks_skipped, first.len() as u64);
    assert_eq!(sum.bytes_written, sum.chunks_sent * (MIB - 4096));
    assert_eq!(file_hash(&dst), file_hash(&src));
    assert_eq!(sum.root, merkle_root(&src, MIB));
    assert!(!progress_path(&dst).exists());
}

#[test]
fn a_torn_progress_log_loses_records_but_no_chunk_is_sent_twice() {
    let dir = tempfile::tempdir().unwrap();
    let src = full_volume(dir.path());
    let dst = dir.path().join("dst.raw");
    interrupted(&src, &dst, 20 * MIB);
    // As after kill -9 in mid-append: the last two records are lost and a
    // torn line is left. Their chunks are at the target all the same.
    let log = progress_path(&dst);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let kept = lines.len() - 1 - 2;
    lines.truncate(kept + 1);
    let mut torn = lines.join("\n");
    torn.push_str("\n17 3fa9");
    std::fs::write(&log, torn).unwrap();
    let sum = copy(&src, &dst, &opts(MIB));
    assert_eq!(sum.chunks_resumed, kept as u64);
    assert_eq!(
        sum.chunks_sent + sum.chunks_skipped,
        64,
        "every chunk is accounted for"
    );
    assert_eq!(
        sum.chunks_sent,
        64 - kept as u64 - 2,
        "the two unlogged chunks were hashed at the target, found complete, not re-sent"
    );
    assert!(sum.bytes_verified >= 2 * (MIB - 4096));
    assert_eq!(file_hash(&dst), file_hash(&src));
}

#[test]
fn resume_after_the_source_changed_rewrites_the_changed_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let src = full_volume(dir.path());
    let dst = dir.path().join("dst.raw");
    interrupted(&src, &dst, 8 * MIB);
    let first = log_records(&dst);
    let idx: u64 = first[0].split(' ').next().unwrap().parse().unwrap();
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(b"changed", idx * MIB + 99)
        .unwrap();
    let sum = copy(&src, &dst, &opts(MIB));
    assert_eq!(sum.chunks_sent, 64 - first.len() as u64 + 1);
    assert_eq!(file_hash(&dst), file_hash(&src));
}

/// Overwrites 1000 bytes near the start of each listed MiB of `path`.
fn scribble(path: &Path, chunks: &[u64], seed: u64) {
    scribble_in(path, chunks, MIB, seed);
}

/// Overwrites 1000 bytes near the start of each listed chunk of `path`.
fn scribble_in(path: &Path, chunks: &[u64], chunk: u64, seed: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    let mut rng = Rng::new(seed);
    for &c in chunks {
        let mut buf = vec![0u8; 1000];
        rng.fill(&mut buf);
        f.write_all_at(&buf, c * chunk + 5000).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn resync_after_changing_one_percent_writes_only_those_chunks() {
    const CS: u64 = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let runs: Vec<(u64, u64)> = (0..256).step_by(2).map(|i| (i * CS, CS)).collect();
    sparse_file(&src, 256 * CS, &runs, 5);
    let dst = dir.path().join("dst.raw");
    let first = copy(&src, &dst, &opts(CS));
    assert_eq!(first.chunks_sent, 128);
    // 1% of 256 chunks: two data chunks and a hole change, and one data
    // chunk becomes all zero.
    scribble_in(&src, &[10, 101, 200], CS, 9);
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&vec![0u8; CS as usize], 40 * CS)
        .unwrap();
    let alloc_before = allocated(&dst);
    let sum = copy(&src, &dst, &opts(CS));
    assert!(
        sum.manifest_trusted,
        "the manifest still describes the target"
    );
    assert_eq!(sum.chunks_sent, 4);
    assert_eq!(sum.chunks_skipped, 252);
    assert_eq!(sum.bytes_sent, 4 * CS);
    assert!(sum.bytes_written <= 2 * CS + 8192, "{}", sum.bytes_written);
    assert!(
        sum.bytes_verified <= 4 * CS,
        "only written chunks are read back"
    );
    assert_eq!(file_hash(&dst), file_hash(&src));
    assert_eq!(sum.root, merkle_root(&src, CS));
    assert!(
        allocated(&dst) < alloc_before,
        "the chunk that became zero was punched out"
    );
    // Nothing changed: nothing is written.
    let again = copy(&src, &dst, &opts(CS));
    assert_eq!((again.chunks_sent, again.bytes_written), (0, 0));
    assert_eq!(again.root, sum.root);
}

#[test]
fn a_change_set_limits_the_resync_to_the_chunks_it_names() {
    const CS: u64 = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let runs: Vec<(u64, u64)> = (0..256).map(|i| (i * CS, CS)).collect();
    sparse_file(&src, 256 * CS, &runs, 6);
    let dst = dir.path().join("dst.raw");
    copy(&src, &dst, &opts(CS));
    // The guest writes 1000 bytes into chunks 3 and 77 and 64 KiB across
    // the boundary of chunks 150 and 151.
    scribble_in(&src, &[3, 77], CS, 12);
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .write_all_at(&vec![0xa5; 64 << 10], 151 * CS - (32 << 10))
        .unwrap();
    let changes = ChangeSet::new(
        src.display().to_string(),
        256 * CS,
        vec![
            (3 * CS + 5000, 1000),
            (77 * CS + 5000, 1000),
            (151 * CS - (32 << 10), 64 << 10),
        ],
    );
    let tracked = VolumeCopyOptions {
        changes: Some(changes.clone()),
        ..opts(CS)
    };
    let sum = copy(&src, &dst, &tracked);
    assert!(sum.tracked && sum.manifest_trusted);
    // Each touched chunk is hashed, then read again to be written.
    assert_eq!(
        sum.bytes_read,
        2 * 4 * CS,
        "only the four touched chunks are read"
    );
    assert_eq!(sum.chunks_sent, 4);
    assert_eq!(file_hash(&dst), file_hash(&src));
    assert_eq!(
        sum.root,
        merkle_root(&src, CS),
        "the root covers every chunk"
    );

    // A change set of another size is refused, naming the disk.
    let wrong = VolumeCopyOptions {
        changes: Some(ChangeSet::new("/pool/x.raw", 4096, vec![(0, 1)])),
        ..opts(CS)
    };
    let e = volume::copy(&src, &dst, &wrong, &|_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("/pool/x.raw") && e.contains("4096"), "{e}");

    // Without a trusted manifest the change set cannot stand for the rest:
    // every chunk is compared.
    std::fs::remove_file(manifest_path(&dst)).unwrap();
    scribble_in(&src, &[200], CS, 13);
    let full = volume::copy(
        &src,
        &dst,
        &VolumeCopyOptions {
            overwrite: true,
            ..tracked
        },
        &|_, _| {},
    )
    .unwrap();
    assert!(!full.tracked);
    assert!(full.bytes_read >= 256 * CS, "{}", full.bytes_read);
    assert_eq!(file_hash(&dst), file_hash(&src));
}

#[test]
fn a_corrupted_target_is_not_trusted_and_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let src = full_volume(dir.path());
    let dst = dir.path().join("dst.raw");
    let good = copy(&src, &dst, &opts(MIB));
    // Someone writes into the target after the copy: its manifest no
    // longer describes it, so the target is hashed and the chunk re-sent.
    scribble(&dst, &[33], 1);
    let sum = copy(&src, &dst, &opts(MIB));
    assert!(!sum.manifest_trusted);
    assert_eq!(sum.chunks_sent, 1);
    assert!(sum.bytes_verified >= 64 * (MIB - 4096));
    assert_eq!(file_hash(&dst), file_hash(&src));
    assert_eq!(sum.root, good.root);
    // Truncated target: the lost tail is re-sent.
    File::options()
        .write(true)
        .open(&dst)
        .unwrap()
        .set_len(60 * MIB + 7)
        .unwrap();
    let sum = copy(&src, &dst, &opts(MIB));
    assert!(!sum.manifest_trusted);
    assert_eq!(sum.chunks_sent, 4);
    assert_eq!(file_hash(&dst), file_hash(&src));
    // A different chunk size: the manifest is not used, the target is
    // hashed, found identical, and nothing is written.
    let sum = copy(&src, &dst, &opts(2 * MIB));
    assert!(!sum.manifest_trusted);
    assert_eq!((sum.chunks_sent, sum.bytes_written), (0, 0));
    assert_eq!(sum.root, merkle_root(&src, 2 * MIB));
    // A tampered manifest (its root no longer matches its leaves) is not
    // trusted either.
    let mp = manifest_path(&dst);
    let text = std::fs::read_to_string(&mp).unwrap();
    let root = Manifest::load(&mp).unwrap().root_hex();
    std::fs::write(&mp, text.replace(&root, &"0".repeat(64))).unwrap();
    assert!(matches!(Manifest::load(&mp), Err(Error::Corrupt { .. })));
    let sum = copy(&src, &dst, &opts(2 * MIB));
    assert!(!sum.manifest_trusted);
    assert_eq!(sum.chunks_sent, 0);
}

#[test]
fn bad_input_gives_errors_naming_the_file_or_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = full_volume(d);
    let src_hash = file_hash(&src);
    // Missing source.
    let e = volume::copy(&d.join("nope.raw"), &d.join("t1"), &opts(MIB), &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("nope.raw"), "{e}");
    assert!(!d.join("t1").exists());
    // Corrupt image: a qcow2 header with an impossible cluster size.
    let bad = d.join("bad.qcow2");
    let mut hdr = vec![0u8; 512];
    hdr[..4].copy_from_slice(b"QFI\xfb");
    hdr[7] = 3;
    hdr[23] = 1;
    hdr[31] = 40; // cluster_bits = 40
    std::fs::write(&bad, &hdr).unwrap();
    let e = volume::copy(&bad, &d.join("t2"), &opts(MIB), &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("bad.qcow2"), "{e}");
    assert!(!d.join("t2").exists() && !manifest_path(&d.join("t2")).exists());
    // Target in a missing directory.
    let e = volume::copy(&src, &d.join("no/dir/t3"), &opts(MIB), &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("no/dir"), "{e}");
    assert!(!d.join("no").exists());
    // Chunk sizes.
    for cs in [0, 3000, 1024, 128 * MIB, 3 * MIB] {
        let e = volume::copy(&src, &d.join("t4"), &opts(cs), &|_, _| {}).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(ref m) if m.contains("chunk_size")),
            "{cs}: {e}"
        );
        assert!(volume::manifest_of(&src, cs).is_err());
    }
    assert!(!d.join("t4").exists());
    // A pre-existing file that no copy wrote is refused and left alone...
    let foreign = d.join("foreign.raw");
    std::fs::write(&foreign, b"someone's data").unwrap();
    let e = volume::copy(&src, &foreign, &opts(MIB), &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("overwrite"), "{e}");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"someone's data");
    // ...unless asked for, and the copy may not target its own source.
    let o = VolumeCopyOptions {
        overwrite: true,
        ..opts(MIB)
    };
    let sum = copy(&src, &foreign, &o);
    assert!(!sum.created);
    assert_eq!(file_hash(&foreign), src_hash);
    let e = volume::copy(&src, &src, &o, &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("source itself"), "{e}");
    let e = volume::copy(&src, d, &o, &|_, _| {}).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    assert_eq!(file_hash(&src), src_hash, "the source is never modified");
}

fn request(step: &str, input: &Path, kind: ArtifactKind, params: serde_json::Value) -> StepRequest {
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "volume".to_owned(),
        Artifact {
            kind,
            site: "edge-lyon".into(),
            locator: s(input).into(),
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

#[test]
fn migrator_validates_without_io() {
    let m = VolumeCopy;
    let d = m.describe();
    assert_eq!(d.name, "volume-copy");
    assert!(d.consumes.contains(&ArtifactKind::Volume));
    assert!(d.consumes.contains(&ArtifactKind::DiskImage {
        format: ImageFormat::Qcow2
    }));
    assert_eq!(d.produces, vec![ArtifactKind::Volume]);
    let keys = |r: &StepRequest| -> Vec<String> {
        m.validate(r)
            .into_iter()
            .map(|d| d.key.unwrap_or_default())
            .collect()
    };
    let src = Path::new("/nowhere/v.raw");
    let ok = request(
        "s",
        src,
        ArtifactKind::Volume,
        json!({"output": "/t/v.raw"}),
    );
    assert!(m.validate(&ok).is_empty());
    let bad = request(
        "s",
        Path::new("rel.raw"),
        ArtifactKind::Bucket,
        json!({"chunk_size": 1000, "site": 3, "colour": "red", "overwrite": "yes"}),
    );
    let k = keys(&bad);
    for want in [
        "inputs.volume.kind",
        "inputs.volume.locator",
        "params.output",
        "params.chunk_size",
        "params.site",
        "params.colour",
        "params.overwrite",
    ] {
        assert!(k.contains(&want.to_owned()), "{want} missing in {k:?}");
    }
    let rel = request("s", src, ArtifactKind::Volume, json!({"output": "t.raw"}));
    assert_eq!(keys(&rel), vec!["params.output"]);
    let same = request("s", src, ArtifactKind::Volume, json!({"output": s(src)}));
    assert_eq!(keys(&same), vec!["params.output"]);
}

#[tokio::test]
async fn migrator_copies_resyncs_and_rolls_back_only_what_it_created() {
    let dir = tempfile::tempdir().unwrap();
    let src = full_volume(dir.path());
    let img = dir.path().join("src.qcow2");
    qemu_ok(&["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&img)]);
    let dst = dir.path().join("dst.raw");
    let m = VolumeCopy;
    let params = json!({"output": s(&dst), "chunk_size": MIB, "site": "dc-paris"});
    let precopy = request(
        "precopy",
        &img,
        ArtifactKind::DiskImage {
            format: ImageFormat::Qcow2,
        },
        params.clone(),
    );
    let plan = m.plan(&precopy).await.unwrap();
    assert!(plan.bytes_read >= 64 * (MIB - 4096) && plan.bytes_read <= 64 * MIB + MIB);
    assert_eq!(plan.bytes_sent, plan.bytes_read, "the copy crosses sites");
    let ctx = ExecContext::quiet();
    let out = m.execute(&precopy, &ctx).await.unwrap();
    let a = &out.artifacts["volume"];
    assert_eq!(a.kind, ArtifactKind::Volume);
    assert_eq!(a.site, "dc-paris");
    assert_eq!(a.locator, s(&dst));
    assert_eq!(a.size, Some(64 * MIB));
    let checksum = format!("blake3-merkle:{}", merkle_root(&src, MIB));
    assert_eq!(a.checksum.as_deref(), Some(checksum.as_str()));
    assert_eq!(out.measured.bytes_written, 64 * (MIB - 4096));
    assert!(out.measured.bytes_read >= out.measured.bytes_written);
    // Re-running the same step finds the work done.
    let again = m.execute(&precopy, &ctx).await.unwrap();
    assert_eq!(again.measured.bytes_written, 0);
    assert_eq!(again.artifacts, out.artifacts);
    // The final delta, a new step from the raw volume after a change.
    let precopy_hash = file_hash(&src);
    scribble(&src, &[3], 4);
    let delta = request(
        "cutover",
        &src,
        ArtifactKind::Volume,
        json!({"output": s(&dst), "chunk_size": MIB}),
    );
    let out2 = m.execute(&delta, &ctx).await.unwrap();
    assert!(out2.measured.bytes_written > 0 && out2.measured.bytes_written <= MIB);
    assert_eq!(
        out2.artifacts["volume"].site, "edge-lyon",
        "default: the input's site"
    );
    assert_eq!(out2.measured.bytes_sent, 0);
    assert_eq!(file_hash(&dst), file_hash(&src));
    // Rolling back the delta step leaves the pre-copy's volume in place;
    // rolling back the pre-copy removes it and its manifest.
    m.rollback(&delta, Some(&out2), &ctx).await.unwrap();
    assert!(dst.exists() && manifest_path(&dst).exists());
    m.rollback(&precopy, Some(&out), &ctx).await.unwrap();
    assert!(!dst.exists() && !manifest_path(&dst).exists());
    assert!(src.exists() && img.exists(), "sources are never touched");
    // An interrupted step is resumable and its rollback cleans up.
    let ctx2 = ExecContext::quiet();
    ctx2.cancel.cancel();
    let e = m.execute(&precopy, &ctx2).await.unwrap_err();
    assert!(matches!(e, SdkError::Io { .. }), "{e}");
    assert!(dst.exists() && progress_path(&dst).exists());
    m.rollback(&precopy, None, &ctx).await.unwrap();
    assert!(!dst.exists() && !progress_path(&dst).exists());
    // A pre-existing file is refused, and with overwrite it is used but a
    // rollback never deletes it.
    std::fs::write(&dst, b"not ours").unwrap();
    let e = m.execute(&precopy, &ctx).await.unwrap_err();
    assert!(matches!(e, SdkError::Precondition(_)), "{e}");
    let mut adopt = precopy.clone();
    adopt.params["overwrite"] = json!(true);
    m.execute(&adopt, &ctx).await.unwrap();
    m.rollback(&adopt, None, &ctx).await.unwrap();
    assert!(dst.exists());
    assert_eq!(file_hash(&dst), precopy_hash);
    // Bad input at execute time is an error, not a panic.
    let missing = request(
        "x",
        &dir.path().join("gone.raw"),
        ArtifactKind::Volume,
        json!({"output": s(&dir.path().join("y.raw"))}),
    );
    let e = m.execute(&missing, &ctx).await.unwrap_err();
    assert!(e.to_string().contains("gone.raw"), "{e}");
}
