//! The qcow2 writer, checked against qemu-img: `check` finds no errors or
//! leaks, `convert` to raw gives back exactly the bytes written, `info`
//! reports the requested geometry and `map` shows zero clusters unallocated.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use common::{
    Rng, assert_check_clean, assert_file_is, assert_files_equal, check_json, convert_to_raw,
    info_json, map_json,
};
use fluidcloud_migrators::image::qcow2::{Qcow2Options, Qcow2Writer, WriteSummary};
use fluidcloud_migrators::{Error, ImageInfo, probe};
use fluidcloud_plugins::ImageFormat;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn opts(cluster_size: u32) -> Qcow2Options {
    Qcow2Options {
        cluster_size,
        ..Default::default()
    }
}

/// A virtual disk's expected content and the writes that produce it.
struct Scenario {
    expected: Vec<u8>,
    /// Non-overlapping, ascending `(offset, bytes)`; gaps are holes.
    writes: Vec<(u64, Vec<u8>)>,
}

impl Scenario {
    /// Random mix of holes, random data, explicitly written zero runs and
    /// data with zero runs inside, ending with data on the very last byte.
    fn random(virtual_size: u64, cs: u64, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let vs = usize::try_from(virtual_size).unwrap();
        let mut expected = vec![0u8; vs];
        let mut writes = Vec::new();
        let mut pos = 0u64;
        // Keep the last few bytes for the final write.
        let stop = virtual_size - 3;
        while pos < stop {
            let kind = rng.range(0, 4);
            let len = match kind {
                0 => rng.range(1, 4 * cs),      // hole
                1 => rng.range(1, 3 * cs),      // random data
                2 => rng.range(cs, 4 * cs + 1), // zeros, written
                _ => rng.range(3 * cs, 6 * cs), // data with a zero run inside
            }
            .min(stop - pos);
            let (start, end) = (pos as usize, (pos + len) as usize);
            match kind {
                0 => {}
                1 => {
                    rng.fill(&mut expected[start..end]);
                    writes.push((pos, expected[start..end].to_vec()));
                }
                2 => writes.push((pos, vec![0; end - start])),
                _ => {
                    rng.fill(&mut expected[start..end]);
                    // At least two whole clusters of zeros in the middle.
                    let zs = start + (len / 4) as usize;
                    let ze = (zs + 2 * cs as usize + 1).min(end);
                    expected[zs..ze].fill(0);
                    writes.push((pos, expected[start..end].to_vec()));
                }
            }
            pos += len;
        }
        let last = virtual_size - 3;
        let tail = [0x11u8, 0x22, 0xEE];
        expected[last as usize..].copy_from_slice(&tail);
        writes.push((last, tail.to_vec()));
        Self { expected, writes }
    }

    /// Writes the scenario, cutting every write into random-length pieces
    /// so pieces start and end anywhere relative to cluster boundaries.
    fn write(&self, path: &Path, cs: u32, seed: u64) -> WriteSummary {
        let mut rng = Rng::new(seed ^ 0xDEAD_BEEF);
        let vs = self.expected.len() as u64;
        let mut w = Qcow2Writer::create(path, vs, &opts(cs)).unwrap();
        for (offset, bytes) in &self.writes {
            let mut at = 0usize;
            while at < bytes.len() {
                let piece = rng.range(1, 2 * u64::from(cs) + 17) as usize;
                let end = (at + piece).min(bytes.len());
                w.write_at(offset + at as u64, &bytes[at..end]).unwrap();
                at = end;
            }
        }
        w.finish().unwrap()
    }
}

/// Indices of the clusters of `expected` holding a non-zero byte.
fn nonzero_clusters(expected: &[u8], cs: usize) -> Vec<u64> {
    expected
        .chunks(cs)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

/// Clusters `qemu-img map` reports as data.
fn mapped_clusters(img: &Path, cs: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for (start, length, data) in map_json(img) {
        if data {
            assert_eq!(start % cs, 0, "data extent at {start} not cluster-aligned");
            out.extend(start / cs..(start + length).div_ceil(cs));
        }
    }
    out
}

/// Every oracle check for an image holding `expected`.
fn verify(img: &Path, summary: &WriteSummary, expected: &[u8], cs: u32) {
    let dir = img.parent().unwrap();
    let vs = expected.len() as u64;
    assert_eq!(summary.virtual_size, vs);
    assert_eq!(summary.cluster_size, cs);
    assert_eq!(summary.file_size, std::fs::metadata(img).unwrap().len());

    assert_check_clean(img);
    let check = check_json(img);
    // qemu-img leaves the field out when it is zero.
    let allocated = check["allocated-clusters"].as_u64().unwrap_or(0);
    assert_eq!(allocated, summary.data_clusters);
    assert_eq!(check["image-end-offset"].as_u64(), Some(summary.file_size));

    let info = info_json(img, "qcow2");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"].as_u64(), Some(vs));
    assert_eq!(info["cluster-size"].as_u64(), Some(u64::from(cs)));
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");

    assert_refcounts_exact(img);

    let raw = convert_to_raw(img, dir);
    assert_file_is(&raw, expected);

    let want = nonzero_clusters(expected, cs as usize);
    assert_eq!(summary.data_clusters, want.len() as u64);
    assert_eq!(
        mapped_clusters(img, u64::from(cs)),
        want,
        "allocated clusters differ"
    );
}

/// Walks the refcount table and blocks: every cluster of the file has
/// refcount 1 and every entry past the end of the file is 0. (qemu-img check
/// does not flag refcounts of clusters past the end of the file.)
fn assert_refcounts_exact(img: &Path) {
    let file = File::open(img).unwrap();
    let file_len = file.metadata().unwrap().len();
    let header = read_u64s(&file, 0, 13);
    let cluster_bits = header[2] & 0xFFFF_FFFF; // bytes 20..24
    let cs = 1u64 << cluster_bits;
    let reftable_offset = header[6];
    let reftable_clusters = header[7] >> 32; // bytes 56..60
    assert_eq!(header[12] >> 32, 4, "refcount_order"); // bytes 96..100
    assert_eq!(file_len % cs, 0, "file length is not whole clusters");
    let clusters = file_len / cs;
    let per_block = cs / 2;
    let table = read_u64s(
        &file,
        reftable_offset,
        (reftable_clusters * cs / 8) as usize,
    );
    let mut seen = 0u64;
    for (i, &entry) in table.iter().enumerate() {
        let first = i as u64 * per_block;
        if entry == 0 {
            assert!(first >= clusters, "refcount block {i} missing");
            continue;
        }
        assert_eq!(entry % cs, 0, "refcount block {i} not aligned");
        let mut block = vec![0u8; cs as usize];
        file.read_exact_at(&mut block, entry).unwrap();
        for (j, c) in block.chunks(2).enumerate() {
            let cluster = first + j as u64;
            let want = u16::from(cluster < clusters);
            let got = u16::from_be_bytes([c[0], c[1]]);
            assert_eq!(got, want, "refcount of cluster {cluster} of {clusters}");
            seen += u64::from(got);
        }
    }
    assert_eq!(seen, clusters);
}

#[test]
fn random_data_round_trips_for_every_cluster_size() {
    // Virtual sizes are deliberately not cluster multiples (only sector
    // multiples, as QEMU requires), and big enough
    // for several L2 tables and (for small clusters) refcount blocks.
    let cases: [(u32, u64); 4] = [
        (512, MIB + 3 * 512),
        (4096, 9 * MIB + 7 * 512),
        (65536, 20 * MIB + 512),
        (2 * MIB as u32, 21 * MIB + 5 * 512),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (cs, vs)) in cases.into_iter().enumerate() {
        let seed = 42 + i as u64;
        let scenario = Scenario::random(vs, u64::from(cs), seed);
        let img = dir.path().join(format!("random-{cs}.qcow2"));
        let summary = scenario.write(&img, cs, seed);
        verify(&img, &summary, &scenario.expected, cs);
        assert!(summary.data_clusters > 0);
    }
}

#[test]
fn zero_clusters_stay_unallocated_and_the_file_stays_small() {
    let cs = 4096u64;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zeros.qcow2");
    let vs = 64 * KIB;
    let mut expected = vec![0u8; vs as usize];
    let mut rng = Rng::new(7);
    rng.fill(&mut expected[..4096]);
    rng.fill(&mut expected[10 * 4096..11 * 4096]);

    let mut w = Qcow2Writer::create(&img, vs, &opts(4096)).unwrap();
    w.write_at(0, &expected[..4096]).unwrap();
    // Nine clusters of explicit zeros, in odd-sized pieces.
    for piece in expected[4096..10 * 4096].chunks(1000) {
        let at = piece.as_ptr() as usize - expected.as_ptr() as usize;
        w.write_at(at as u64, piece).unwrap();
    }
    w.write_at(10 * 4096, &expected[10 * 4096..11 * 4096])
        .unwrap();
    // A partly written cluster of zeros, the rest a hole.
    w.write_at(11 * 4096, &[0; 100]).unwrap();
    let summary = w.finish().unwrap();

    verify(&img, &summary, &expected, 4096);
    assert_eq!(summary.data_clusters, 2);
    // header + 2 data + 1 L2 + 1 L1 + 1 refcount table + 1 refcount block
    assert_eq!(summary.file_size, 7 * cs);
    let map = map_json(&img);
    assert!(
        map.contains(&(4096, 9 * 4096, false)),
        "zero run not reported as a hole: {map:?}"
    );
}

#[test]
fn data_on_the_very_last_byte_of_an_odd_size() {
    let dir = tempfile::tempdir().unwrap();
    for cs in [512u32, 65536] {
        let vs = 3 * u64::from(cs) + 512;
        let img = dir.path().join(format!("last-{cs}.qcow2"));
        let mut w = Qcow2Writer::create(&img, vs, &opts(cs)).unwrap();
        w.write_at(vs - 1, &[0xAB]).unwrap();
        let summary = w.finish().unwrap();
        let mut expected = vec![0u8; vs as usize];
        expected[vs as usize - 1] = 0xAB;
        verify(&img, &summary, &expected, cs);
        assert_eq!(summary.data_clusters, 1);
    }
}

#[test]
fn unaligned_writes_spanning_cluster_boundaries() {
    let cs = 512usize;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("unaligned.qcow2");
    let vs = 40 * cs + 512;
    let mut expected = vec![0u8; vs];
    let mut rng = Rng::new(99);
    rng.fill(&mut expected);
    // Holes: bytes 4100..4700 (spans a boundary) and the cluster 20 tail.
    expected[4100..4700].fill(0);
    expected[20 * cs + 17..21 * cs].fill(0);

    let mut w = Qcow2Writer::create(&img, vs as u64, &opts(512)).unwrap();
    // 333-byte pieces up to 4100.
    let mut at = 0;
    while at < 4100 {
        let end = (at + 333).min(4100);
        w.write_at(at as u64, &expected[at..end]).unwrap();
        at = end;
    }
    // One write from the last byte of a cluster across three boundaries.
    w.write_at(4700, &expected[4700..(10 * cs - 1)]).unwrap();
    w.write_at(10 * cs as u64 - 1, &expected[10 * cs - 1..13 * cs + 1])
        .unwrap();
    // Single bytes across a boundary.
    for i in 13 * cs + 1..15 * cs + 3 {
        w.write_at(i as u64, &expected[i..=i]).unwrap();
    }
    w.write_at((15 * cs + 3) as u64, &expected[15 * cs + 3..20 * cs + 17])
        .unwrap();
    w.write_at(21 * cs as u64, &expected[21 * cs..]).unwrap();
    let summary = w.finish().unwrap();
    verify(&img, &summary, &expected, 512);
}

#[test]
fn empty_and_zero_size_images_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero-size.qcow2");
    let summary = Qcow2Writer::create(&img, 0, &Qcow2Options::default())
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(summary.data_clusters, 0);
    assert_check_clean(&img);
    assert_eq!(info_json(&img, "qcow2")["virtual-size"].as_u64(), Some(0));

    let img = dir.path().join("no-writes.qcow2");
    let vs = 10 * MIB + 512;
    let summary = Qcow2Writer::create(&img, vs, &Qcow2Options::default())
        .unwrap()
        .finish()
        .unwrap();
    verify(&img, &summary, &vec![0; vs as usize], 65536);
    // header + L1 + refcount table + refcount block
    assert_eq!(summary.file_size, 4 * 65536);
}

/// Reads big-endian `u64`s at `offset` of a file.
fn read_u64s(file: &File, offset: u64, count: usize) -> Vec<u64> {
    let mut buf = vec![0u8; count * 8];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf.chunks(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn large_sparse_image_needs_many_l2_tables_and_refcount_blocks() {
    let cs = 4096u32;
    let vs = 1024 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("large.qcow2");
    let expected_path = dir.path().join("large.expected.raw");
    let expected = File::create(&expected_path).unwrap();
    expected.set_len(vs).unwrap();

    // 100 extents of about 1 MiB, one every ~10 MiB at unaligned offsets,
    // each with a 64 KiB zero run inside.
    let mut rng = Rng::new(2024);
    let mut w = Qcow2Writer::create(&img, vs, &opts(cs)).unwrap();
    let mut buf = vec![0u8; MIB as usize + 5000];
    for i in 0..100u64 {
        let offset = i * 10 * MIB + rng.range(0, 9 * MIB);
        let len = rng.range(MIB - 5000, MIB + 5000) as usize;
        let data = &mut buf[..len];
        rng.fill(data);
        data[len / 2..len / 2 + 64 * 1024].fill(0);
        expected.write_all_at(data, offset).unwrap();
        for (k, piece) in data.chunks(100_000).enumerate() {
            w.write_at(offset + (k * 100_000) as u64, piece).unwrap();
        }
    }
    drop(expected);
    let summary = w.finish().unwrap();
    assert!(summary.data_clusters > 24_000, "{summary:?}");

    assert_check_clean(&img);
    let check = check_json(&img);
    assert_eq!(
        check["allocated-clusters"].as_u64(),
        Some(summary.data_clusters)
    );
    assert_eq!(check["image-end-offset"].as_u64(), Some(summary.file_size));
    let info = info_json(&img, "qcow2");
    assert_eq!(info["virtual-size"].as_u64(), Some(vs));
    assert_eq!(info["cluster-size"].as_u64(), Some(u64::from(cs)));
    let raw = convert_to_raw(&img, dir.path());
    assert_files_equal(&raw, &expected_path);

    // The structures really are plural: read them back from the header.
    let file = File::open(&img).unwrap();
    let header = read_u64s(&file, 0, 8);
    let l1_size = (header[4] & 0xFFFF_FFFF) as usize; // bytes 36..40
    let l1_offset = header[5];
    let reftable_offset = header[6];
    let reftable_clusters = (header[7] >> 32) as usize; // bytes 56..60
    let l2_tables = read_u64s(&file, l1_offset, l1_size)
        .into_iter()
        .filter(|&e| e != 0)
        .count();
    let refblocks = read_u64s(&file, reftable_offset, reftable_clusters * 512)
        .into_iter()
        .filter(|&e| e != 0)
        .count();
    assert!(l2_tables >= 90, "only {l2_tables} L2 tables");
    assert!(refblocks > 10, "only {refblocks} refcount blocks");
}

#[test]
fn rejected_writes_leave_the_writer_usable() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("errors.qcow2");
    let vs = 8192 + 1024;
    let mut w = Qcow2Writer::create(&img, vs, &opts(4096)).unwrap();
    w.write_at(100, &[1; 50]).unwrap();

    // Before the end of the previous write: out of order or overlapping.
    for (offset, len) in [(0u64, 10usize), (149, 1), (120, 100)] {
        let e = w.write_at(offset, &vec![2; len]).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("increasing offset order")),
            "{e}"
        );
    }
    // Past the virtual size, including offsets that overflow.
    for (offset, len) in [(vs - 5, 6usize), (vs, 1), (u64::MAX, 1), (u64::MAX - 2, 5)] {
        let e = w.write_at(offset, &vec![3; len]).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("past the virtual size")),
            "{e}"
        );
    }
    let sdk: fluidcloud_plugins::Error = w.write_at(0, &[1]).unwrap_err().into();
    assert!(matches!(sdk, fluidcloud_plugins::Error::Precondition(_)));

    // Empty writes and writes right at the end are fine.
    w.write_at(150, &[]).unwrap();
    w.write_at(vs - 5, &[4; 5]).unwrap();
    let summary = w.finish().unwrap();
    let mut expected = vec![0u8; vs as usize];
    expected[100..150].fill(1);
    expected[vs as usize - 5..].fill(4);
    verify(&img, &summary, &expected, 4096);
}

#[test]
fn bad_cluster_sizes_are_rejected_before_creating_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.qcow2");
    for cs in [0u32, 1, 256, 511, 1000, 1536, 4 << 20, u32::MAX, 1 << 31] {
        let e = Qcow2Writer::create(&img, MIB, &opts(cs)).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains(&format!("cluster size {cs} "))),
            "{cs}: {e}"
        );
        assert!(!img.exists());
    }
}

#[test]
fn virtual_sizes_that_are_not_whole_sectors_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("odd.qcow2");
    for vs in [1, 511, 513, MIB + 1] {
        let e = Qcow2Writer::create(&img, vs, &Qcow2Options::default()).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("multiple of 512")),
            "{vs}: {e}"
        );
    }
    assert!(!img.exists());
}

#[test]
fn virtual_sizes_beyond_qemu_limits_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("huge.qcow2");
    // 512-byte clusters: the 32 MiB L1 table caps the disk at 128 GiB.
    let e = Qcow2Writer::create(&img, 1 << 40, &opts(512)).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidArgument(m) if m.contains("L1 table")),
        "{e}"
    );
    let e = Qcow2Writer::create(&img, u64::MAX - 511, &opts(2 << 20)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(!img.exists());
    // The same size with 64 KiB clusters is fine (and costs nothing yet).
    let summary = Qcow2Writer::create(&img, 1 << 40, &Qcow2Options::default())
        .unwrap()
        .finish()
        .unwrap();
    assert_check_clean(&img);
    assert_eq!(summary.virtual_size, 1 << 40);
}

#[test]
fn existing_path_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("taken.qcow2");
    std::fs::write(&img, b"precious").unwrap();
    let e = Qcow2Writer::create(&img, MIB, &Qcow2Options::default()).unwrap_err();
    match &e {
        Error::Io { context, source } => {
            assert!(context.contains(img.to_str().unwrap()), "{context}");
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert_eq!(std::fs::read(&img).unwrap(), b"precious");
}

#[test]
fn unfinished_image_does_not_probe_as_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("unfinished.qcow2");
    let mut w = Qcow2Writer::create(&img, 64 * MIB, &Qcow2Options::default()).unwrap();
    w.write_at(0, &vec![9; 3 * 65536]).unwrap();
    drop(w);
    let info: ImageInfo = probe(&img).unwrap();
    assert_eq!(info.format, ImageFormat::Raw);
}

/// Not a test of speed (no assertion on time): prints the throughput of a
/// 256 MiB random-data image. Run with
/// `cargo test -p fluidcloud-migrators --release --test qcow2_writer -- --ignored --nocapture`.
#[test]
#[ignore = "measurement, run by hand with --release"]
fn throughput_256_mib_random() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bench.qcow2");
    let size = 256 * MIB;
    let mut rng = Rng::new(1);
    let mut chunk = vec![0u8; MIB as usize];
    let mut generate = 0.0;
    let start = Instant::now();
    let mut w = Qcow2Writer::create(&img, size, &Qcow2Options::default()).unwrap();
    for i in 0..size / MIB {
        let g = Instant::now();
        rng.fill(&mut chunk);
        generate += g.elapsed().as_secs_f64();
        w.write_at(i * MIB, &chunk).unwrap();
    }
    let summary = w.finish().unwrap();
    let total = start.elapsed().as_secs_f64();
    let writing = total - generate;
    println!(
        "256 MiB random data, 64 KiB clusters: {:.0} MiB/s through the writer \
         ({writing:.2} s incl. fsync; {generate:.2} s spent generating data), file {} bytes",
        256.0 / writing,
        summary.file_size
    );
    assert_check_clean(&img);
}
