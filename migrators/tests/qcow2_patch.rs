//! `Qcow2Patcher` against the qemu-img oracle: images from our writer and
//! from `qemu-img create`/`convert` (plain, 4 KiB clusters, compressed)
//! get many random writes, mirrored on a raw copy; then `qemu-img check`
//! must be clean and `qemu-img compare` must find raw and qcow2 identical.
//! Images the patcher refuses stay byte-for-byte unchanged.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{Rng, assert_check_clean, qemu, qemu_io, qemu_ok, s};
use fluidcloud_migrators::Error;
use fluidcloud_migrators::image::qcow2::{Compression, Qcow2Options, Qcow2Patcher, Qcow2Writer};

const MIB: u64 = 1 << 20;

/// A raw disk of `size` bytes with random data in a few regions, holes
/// and an all-zero run elsewhere.
fn base_raw(dir: &Path, size: u64, seed: u64) -> PathBuf {
    let path = dir.join("base.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    for _ in 0..12 {
        let len = rng.range(1, MIB);
        let at = rng.range(0, size - len);
        let mut buf = vec![0u8; len as usize];
        // Compressible data in half the regions, so `convert -c` keeps
        // some clusters compressed and others not.
        if rng.range(0, 2) == 0 {
            rng.fill(&mut buf);
        } else {
            let b = rng.range(1, 255) as u8;
            buf.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = b ^ (i / 97) as u8);
        }
        f.write_all_at(&buf, at).unwrap();
    }
    path
}

/// How the qcow2 under test is made from the base raw disk.
#[derive(Debug, Clone, Copy)]
enum Maker {
    /// `Qcow2Writer`, with this cluster size and compression.
    Ours(u32, Option<Compression>),
    /// `qemu-img create` (empty) with this cluster size.
    QemuCreate(u32),
    /// `qemu-img convert`, with this cluster size, `-c` if true.
    QemuConvert(u32, bool),
    /// `qemu-img convert -o compat=0.10` (qcow2 version 2).
    QemuConvertV2(u32),
    /// `qemu-img convert`, then `qemu-io write -z` over part of the data:
    /// zero clusters that keep their host cluster.
    QemuConvertZeroed(u32),
}

fn make(maker: Maker, base: &Path, img: &Path, size: u64) {
    match maker {
        Maker::Ours(cs, compression) => {
            let opts = Qcow2Options {
                cluster_size: cs,
                compression,
                ..Qcow2Options::default()
            };
            let mut w = Qcow2Writer::create(img, size, &opts).unwrap();
            let data = std::fs::read(base).unwrap();
            w.write_at(0, &data).unwrap();
            w.finish().unwrap();
        }
        Maker::QemuCreate(cs) => {
            qemu_ok(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                s(img),
                &size.to_string(),
            ]);
            // The raw copy must match: an empty disk.
            let f = std::fs::File::create(base).unwrap();
            f.set_len(size).unwrap();
        }
        Maker::QemuConvertV2(cs) => {
            let o = format!("compat=0.10,cluster_size={cs}");
            qemu_ok(&[
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &o,
                s(base),
                s(img),
            ]);
            assert_eq!(
                common::info_json(img, "qcow2")["format-specific"]["data"]["compat"],
                "0.10"
            );
        }
        Maker::QemuConvertZeroed(cs) => {
            make(Maker::QemuConvert(cs, false), base, img, size);
            let (at, len) = (size / 4, size / 4);
            qemu_io(img, &[&format!("write -z {at} {len}")]);
            let f = OpenOptions::new().write(true).open(base).unwrap();
            f.write_all_at(&vec![0u8; len as usize], at).unwrap();
            // The zeroed clusters kept their host clusters.
            let map = qemu_ok(&["map", "-f", "qcow2", "--output=json", s(img)]);
            assert!(
                map.contains(r#""zero": true, "data": false, "compressed": false, "offset""#),
                "{map}"
            );
        }
        Maker::QemuConvert(cs, compress) => {
            let cso = format!("cluster_size={cs}");
            let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", &cso];
            if compress {
                args.push("-c");
            }
            args.extend([s(base), s(img)]);
            qemu_ok(&args);
        }
    }
    assert_check_clean(img);
}

/// Random writes: unaligned, spanning clusters, large, some all zeros.
fn random_writes(rng: &mut Rng, size: u64, cs: u64, count: usize) -> Vec<(u64, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let len = match i % 5 {
                0 => rng.range(1, 64),
                1 => rng.range(1, cs * 3),
                2 => cs * rng.range(1, 8),
                3 => rng.range(cs, 300 * 1024),
                _ => rng.range(1, 9000),
            };
            let len = len.min(size);
            let at = if i % 5 == 2 {
                rng.range(0, (size - len) / cs + 1) * cs
            } else {
                rng.range(0, size - len + 1)
            };
            let mut buf = vec![0u8; len as usize];
            if i % 11 != 7 {
                rng.fill(&mut buf);
            }
            (at, buf)
        })
        .collect()
}

fn compare_identical(raw: &Path, img: &Path) {
    let out = qemu(&["compare", "-f", "raw", "-F", "qcow2", s(raw), s(img)]);
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        raw.display(),
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_case(maker: Maker, size: u64, writes_per_session: usize, sessions: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = base_raw(d, size, seed);
    let img = d.join("disk.qcow2");
    make(maker, &base, &img, size);
    let expect = d.join("expect.raw");
    std::fs::copy(&base, &expect).unwrap();
    let raw = OpenOptions::new().write(true).open(&expect).unwrap();
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut total = fluidcloud_migrators::image::qcow2::PatchSummary::default();
    for session in 0..sessions {
        let mut p = Qcow2Patcher::open(&img).unwrap();
        assert_eq!(p.virtual_size(), size);
        let cs = p.cluster_size();
        for (at, data) in random_writes(&mut rng, size, cs, writes_per_session) {
            p.write_at(at, &data).unwrap();
            raw.write_all_at(&data, at).unwrap();
            // The patcher reads back what it wrote before `finish`.
            let mut back = vec![0u8; data.len()];
            p.read_at(at, &mut back).unwrap();
            assert!(
                back == data,
                "{maker:?} session {session}: read-back at {at}"
            );
        }
        let sum = p.finish(session % 2 == 0).unwrap();
        total.clusters_allocated += sum.clusters_allocated;
        total.clusters_overwritten += sum.clusters_overwritten;
        total.bytes_written += sum.bytes_written;
        assert_check_clean(&img);
        compare_identical(&expect, &img);
    }
    assert!(total.clusters_allocated > 0, "{maker:?}: {total:?}");
    assert!(total.bytes_written > 0);
    if !matches!(maker, Maker::QemuCreate(_)) || sessions > 1 {
        assert!(total.clusters_overwritten > 0, "{maker:?}: {total:?}");
    }
}

#[test]
fn images_from_our_writer() {
    run_case(Maker::Ours(65536, None), 64 * MIB, 120, 2, 1);
    run_case(Maker::Ours(4096, None), 24 * MIB, 150, 2, 2);
    run_case(Maker::Ours(512, None), 4 * MIB, 100, 1, 3);
}

#[test]
fn compressed_images_from_our_writer() {
    run_case(
        Maker::Ours(65536, Some(Compression::Zlib)),
        32 * MIB,
        120,
        2,
        4,
    );
    run_case(
        Maker::Ours(4096, Some(Compression::Zstd)),
        16 * MIB,
        150,
        1,
        5,
    );
}

#[test]
fn images_from_qemu_img_create() {
    run_case(Maker::QemuCreate(65536), 64 * MIB, 120, 2, 6);
    run_case(Maker::QemuCreate(4096), 24 * MIB, 150, 2, 7);
}

#[test]
fn images_from_qemu_img_convert() {
    run_case(Maker::QemuConvert(65536, false), 64 * MIB, 120, 2, 8);
    run_case(Maker::QemuConvert(4096, false), 24 * MIB, 150, 2, 9);
}

#[test]
fn version_2_images_from_qemu_img_convert() {
    run_case(Maker::QemuConvertV2(65536), 32 * MIB, 120, 2, 12);
    run_case(Maker::QemuConvertV2(4096), 16 * MIB, 150, 1, 13);
}

#[test]
fn zero_clusters_that_keep_their_allocation() {
    run_case(Maker::QemuConvertZeroed(65536), 32 * MIB, 150, 2, 14);
    run_case(Maker::QemuConvertZeroed(4096), 16 * MIB, 200, 1, 15);
}

#[test]
fn compressed_images_from_qemu_img_convert() {
    run_case(Maker::QemuConvert(65536, true), 32 * MIB, 120, 2, 10);
    run_case(Maker::QemuConvert(4096, true), 16 * MIB, 150, 2, 11);
}

/// With 4 KiB clusters a refcount block covers 8 MiB of file: filling a
/// disk from empty crosses several blocks' coverage.
#[test]
fn growth_across_refcount_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("grow.qcow2");
    let size = 40 * MIB;
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&img),
        "40M",
    ]);
    let expect = d.join("grow.raw");
    let raw = std::fs::File::create(&expect).unwrap();
    raw.set_len(size).unwrap();
    let mut rng = Rng::new(77);
    let mut p = Qcow2Patcher::open(&img).unwrap();
    // Back to front, in odd pieces, so clusters land out of guest order.
    let mut at = size;
    while at > 0 {
        let len = rng.range(1, 200_000).min(at);
        at -= len;
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        p.write_at(at, &buf).unwrap();
        raw.write_all_at(&buf, at).unwrap();
    }
    let sum = p.finish(true).unwrap();
    assert_eq!(sum.clusters_allocated, size / 4096);
    assert!(std::fs::metadata(&img).unwrap().len() > 4 * 8 * MIB);
    assert_check_clean(&img);
    compare_identical(&expect, &img);
}

#[test]
fn refused_images_are_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let mut cases: Vec<(PathBuf, &str)> = Vec::new();

    let overlay = d.join("overlay.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&overlay),
    ]);
    cases.push((overlay, "backing file"));

    let snap = d.join("snap.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&snap), "8M"]);
    qemu_io(&snap, &["write -P 0x33 0 1M"]);
    qemu_ok(&["snapshot", "-c", "before", s(&snap)]);
    cases.push((snap, "internal snapshots"));

    let rc8 = d.join("rc8.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=8",
        s(&rc8),
        "8M",
    ]);
    cases.push((rc8, "8-bit refcounts"));

    let ext = d.join("extl2.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        s(&ext),
        "8M",
    ]);
    cases.push((ext, "extended L2"));

    let bitmap = d.join("bitmap.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&bitmap), "8M"]);
    qemu_ok(&["bitmap", "--add", s(&bitmap), "b0"]);
    cases.push((bitmap, "bitmap"));

    let dirty = d.join("dirty.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&dirty), "8M"]);
    // incompatible_features, bit 0.
    let f = OpenOptions::new().write(true).open(&dirty).unwrap();
    f.write_all_at(&1u64.to_be_bytes(), 72).unwrap();
    cases.push((dirty, "dirty bit"));

    for (img, feature) in cases {
        let before = std::fs::read(&img).unwrap();
        let e = Qcow2Patcher::open(&img).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, Error::Unsupported { .. }),
            "{}: {text}",
            img.display()
        );
        assert!(
            text.contains(feature) && text.contains(s(&img)),
            "{feature}: {text}"
        );
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{} changed",
            img.display()
        );
    }
}

#[test]
fn corrupt_metadata_names_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("bad.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_io(&img, &["write -P 0x44 0 64k"]);
    let info = common::info_json(&img, "qcow2");
    assert_eq!(info["cluster-size"].as_u64(), Some(65536));
    // The L1 table of a fresh 8M image sits at 0x30000: point entry 0 far
    // past the end of the file.
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&((1u64 << 40) | (1 << 63)).to_be_bytes(), 0x30000)
        .unwrap();
    let mut p = Qcow2Patcher::open(&img).unwrap();
    let e = p.write_at(100, b"x").unwrap_err();
    match &e {
        Error::Corrupt { what, offset } => {
            assert!(
                what.contains("bad.qcow2") && what.contains("L1 entry 0"),
                "{e}"
            );
            assert_eq!(*offset, 0x30000);
        }
        _ => panic!("{e}"),
    }
    // Out of range writes are an argument error naming the file.
    let mut p = Qcow2Patcher::open(&img).unwrap();
    let e = p.write_at(8 * MIB - 1, b"xy").unwrap_err();
    assert!(e.to_string().contains("bad.qcow2"), "{e}");
    // Not a qcow2 file at all.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 4096]).unwrap();
    let e = Qcow2Patcher::open(&raw).unwrap_err();
    assert!(matches!(e, Error::Corrupt { offset: 0, .. }), "{e}");
}

/// With 512-byte clusters one cluster of refcount table covers 8 MiB of
/// file: filling a 24 MiB disk moves the table to larger copies.
#[test]
fn the_refcount_table_grows() {
    for maker in ["qemu", "ours"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let img = d.join("small.qcow2");
        let size = 24 * MIB;
        if maker == "qemu" {
            qemu_ok(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                s(&img),
                "24M",
            ]);
        } else {
            let opts = Qcow2Options {
                cluster_size: 512,
                ..Qcow2Options::default()
            };
            let mut w = Qcow2Writer::create(&img, size, &opts).unwrap();
            w.write_at(MIB, &[7u8; 4096]).unwrap();
            w.finish().unwrap();
        }
        let expect = d.join("small.raw");
        qemu_ok(&["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&expect)]);
        let raw = OpenOptions::new().write(true).open(&expect).unwrap();
        let header = |p: &Path| {
            let b = std::fs::read(p).unwrap();
            (
                u64::from_be_bytes(b[48..56].try_into().unwrap()),
                u32::from_be_bytes(b[56..60].try_into().unwrap()),
            )
        };
        let before = header(&img);
        let mut rng = Rng::new(99);
        let mut p = Qcow2Patcher::open(&img).unwrap();
        let mut at = 0;
        while at < size {
            let len = rng.range(1, 100_000).min(size - at);
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf);
            p.write_at(at, &buf).unwrap();
            raw.write_all_at(&buf, at).unwrap();
            at += len;
        }
        p.finish(true).unwrap();
        let after = header(&img);
        assert!(after.1 > before.1, "{maker}: {before:?} -> {after:?}");
        assert_check_clean(&img);
        compare_identical(&expect, &img);
    }
}

/// An L2 entry pointing at the L1 table is corrupt, not a place to write.
#[test]
fn data_is_never_written_over_the_tables() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("overlap.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&img), "8M"]);
    qemu_io(&img, &["write -P 0x44 0 64k"]);
    // Fresh 8M image: L1 at 0x30000, the first L2 table right after it.
    let bytes = std::fs::read(&img).unwrap();
    let l2 =
        u64::from_be_bytes(bytes[0x30000..0x30008].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&(0x30000u64 | (1 << 63)).to_be_bytes(), l2)
        .unwrap();
    let before = std::fs::read(&img).unwrap();
    let mut p = Qcow2Patcher::open(&img).unwrap();
    let e = p.write_at(10, b"x").unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Corrupt {
                offset: 0x30000,
                ..
            }
        ) && e.to_string().contains("L1 table"),
        "{e}"
    );
    drop(p);
    assert!(std::fs::read(&img).unwrap() == before);
}
