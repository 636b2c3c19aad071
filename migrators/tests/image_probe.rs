//! `probe` on images made by our writer and by qemu-img (the oracle for
//! format and virtual size), and on hostile files: typed errors, no panics.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{Rng, info_json, qemu_ok, s};
use fluidcloud_migrators::image::qcow2::{Qcow2Options, Qcow2Writer};
use fluidcloud_migrators::{Error, ImageInfo, probe};
use fluidcloud_plugins::ImageFormat;

const MIB: u64 = 1024 * 1024;

/// Creates `name` in `dir` with `qemu-img create -f FORMAT [extra...] name [size]`.
fn qemu_create(dir: &Path, name: &str, format: &str, extra: &[&str], size: &str) -> PathBuf {
    let path = dir.join(name);
    let mut args = vec!["create", "-q", "-f", format];
    args.extend_from_slice(extra);
    args.push(s(&path));
    if !size.is_empty() {
        args.push(size);
    }
    qemu_ok(&args);
    path
}

/// Probes `path` and checks format and virtual size against qemu-img info.
fn probe_as(path: &Path, format: ImageFormat, qemu_format: &str) -> ImageInfo {
    let info = probe(path).unwrap();
    assert_eq!(info.format, format, "{}", path.display());
    let oracle = info_json(path, qemu_format);
    assert_eq!(
        Some(info.virtual_size),
        oracle["virtual-size"].as_u64(),
        "virtual size of {}",
        path.display()
    );
    let meta = std::fs::metadata(path).unwrap();
    assert_eq!(info.file_size, meta.len());
    info
}

/// A copy of `src` at `dst` with `patch` applied to its bytes.
fn patched(src: &Path, dst: &Path, patch: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(src).unwrap();
    patch(&mut bytes);
    std::fs::write(dst, &bytes).unwrap();
    dst.to_owned()
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A small valid qcow2 image made by our writer.
fn our_qcow2(dir: &Path) -> PathBuf {
    let path = dir.join("ours.qcow2");
    let mut w = Qcow2Writer::create(
        &path,
        8 * MIB,
        &Qcow2Options {
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    w.write_at(MIB, &[7; 10_000]).unwrap();
    w.finish().unwrap();
    path
}

#[test]
fn our_qcow2_images_probe_with_their_geometry() {
    let dir = tempfile::tempdir().unwrap();
    for (cs, vs) in [
        (512u32, 3 * MIB + 512),
        (65536, 100 * MIB),
        (2 << 20, 5 * MIB),
    ] {
        let path = dir.path().join(format!("ours-{cs}.qcow2"));
        let mut w = Qcow2Writer::create(
            &path,
            vs,
            &Qcow2Options {
                cluster_size: cs,
                ..Default::default()
            },
        )
        .unwrap();
        w.write_at(vs - 4096, &[1; 4096]).unwrap();
        let summary = w.finish().unwrap();
        let info = probe_as(&path, ImageFormat::Qcow2, "qcow2");
        assert_eq!(info.virtual_size, vs);
        assert_eq!(info.cluster_size, Some(cs));
        assert_eq!(info.qcow2_version, Some(3));
        assert_eq!(info.backing_file, None);
        assert_eq!(info.file_size, summary.file_size);
        assert!(info.allocated_bytes > 0);
    }
}

#[test]
fn qemu_qcow2_v3_v2_and_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = qemu_create(d, "base.qcow2", "qcow2", &[], "64M");
    let info = probe_as(&base, ImageFormat::Qcow2, "qcow2");
    assert_eq!(
        (info.virtual_size, info.cluster_size, info.qcow2_version),
        (64 * MIB, Some(65536), Some(3))
    );
    assert_eq!(info.backing_file, None);

    let overlay = qemu_create(
        d,
        "overlay.qcow2",
        "qcow2",
        &["-b", "base.qcow2", "-F", "qcow2"],
        "",
    );
    let info = probe_as(&overlay, ImageFormat::Qcow2, "qcow2");
    assert_eq!(info.virtual_size, 64 * MIB);
    assert_eq!(info.backing_file.as_deref(), Some("base.qcow2"));

    let v2 = qemu_create(
        d,
        "v2.qcow2",
        "qcow2",
        &["-o", "compat=0.10,cluster_size=4096"],
        "1G",
    );
    let info = probe_as(&v2, ImageFormat::Qcow2, "qcow2");
    assert_eq!(
        (info.virtual_size, info.cluster_size, info.qcow2_version),
        (1 << 30, Some(4096), Some(2))
    );
}

#[test]
fn vmdk_sparse_stream_optimized_and_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sparse = qemu_create(d, "sparse.vmdk", "vmdk", &[], "100M");
    let info = probe_as(&sparse, ImageFormat::Vmdk, "vmdk");
    assert_eq!(info.virtual_size, 100 * MIB);
    assert_eq!((info.cluster_size, info.qcow2_version), (None, None));

    let stream = qemu_create(
        d,
        "stream.vmdk",
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        "300M",
    );
    assert_eq!(
        probe_as(&stream, ImageFormat::Vmdk, "vmdk").virtual_size,
        300 * MIB
    );

    let child = qemu_create(
        d,
        "child.vmdk",
        "vmdk",
        &["-b", "sparse.vmdk", "-F", "vmdk"],
        "",
    );
    let info = probe_as(&child, ImageFormat::Vmdk, "vmdk");
    assert_eq!(info.backing_file.as_deref(), Some("sparse.vmdk"));

    // Text descriptors whose extents are separate files.
    let flat = qemu_create(
        d,
        "flat.vmdk",
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
        "10M",
    );
    assert_eq!(
        probe_as(&flat, ImageFormat::Vmdk, "vmdk").virtual_size,
        10 * MIB
    );
    let split = qemu_create(
        d,
        "split.vmdk",
        "vmdk",
        &["-o", "subformat=twoGbMaxExtentSparse"],
        "5G",
    );
    assert_eq!(
        probe_as(&split, ImageFormat::Vmdk, "vmdk").virtual_size,
        5 << 30
    );
    // An extent file of a split image is itself a sparse extent.
    let extent = d.join("split-s003.vmdk");
    assert_eq!(probe(&extent).unwrap().format, ImageFormat::Vmdk);
}

#[test]
fn vhd_dynamic_and_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // qemu-img rounds these sizes to a CHS geometry; the oracle agrees
    // with the footer's current size either way.
    let dynamic = qemu_create(d, "dynamic.vhd", "vpc", &[], "1G");
    let info = probe_as(&dynamic, ImageFormat::Vhd, "vpc");
    assert!(info.virtual_size >= 1 << 30);
    assert_eq!(info.backing_file, None);

    let fixed = qemu_create(d, "fixed.vhd", "vpc", &["-o", "subformat=fixed"], "100M");
    let info = probe_as(&fixed, ImageFormat::Vhd, "vpc");
    assert_eq!(info.file_size, info.virtual_size + 512);

    // force_size keeps the exact size.
    let exact = qemu_create(
        d,
        "exact.vhd",
        "vpc",
        &["-o", "subformat=fixed,force_size=on"],
        "64M",
    );
    assert_eq!(
        probe_as(&exact, ImageFormat::Vhd, "vpc").virtual_size,
        64 * MIB
    );

    // A dynamic disk whose end footer is damaged falls back on the copy
    // at offset 0.
    let damaged = patched(&dynamic, &d.join("damaged.vhd"), |b| {
        let end = b.len() - 512;
        b[end..end + 8].copy_from_slice(b"garbage!");
    });
    assert_eq!(
        probe(&damaged).unwrap().virtual_size,
        probe(&dynamic).unwrap().virtual_size
    );
}

#[test]
fn vhdx_virtual_size_comes_from_the_metadata_region() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, size, want) in [
        ("small.vhdx", "10M", 10 * MIB),
        ("big.vhdx", "3G", 3 << 30),
        ("odd.vhdx", "1000001K", 1_000_001 * 1024),
    ] {
        let path = qemu_create(d, name, "vhdx", &[], size);
        let info = probe_as(&path, ImageFormat::Vhdx, "vhdx");
        assert_eq!(info.virtual_size, want, "{name}");
        assert_eq!(info.backing_file, None);
    }

    // The first region table damaged: the copy at 256 KiB is used.
    let good = d.join("small.vhdx");
    let first_bad = patched(&good, &d.join("first-bad.vhdx"), |b| {
        b[0x3_0000 + 100] ^= 0xFF;
    });
    assert_eq!(probe(&first_bad).unwrap().virtual_size, 10 * MIB);
    // Both damaged: corrupt, naming the first table's offset.
    let both_bad = patched(&good, &d.join("both-bad.vhdx"), |b| {
        b[0x3_0000 + 100] ^= 0xFF;
        b[0x4_0000 + 100] ^= 0xFF;
    });
    let e = probe(&both_bad).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Corrupt {
                offset: 0x3_0000,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn raw_files_empty_files_and_sparse_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = qemu_create(d, "disk.raw", "raw", &[], "1G");
    let info = probe_as(&raw, ImageFormat::Raw, "raw");
    assert_eq!(info.virtual_size, 1 << 30);
    assert_eq!(info.file_size, 1 << 30);
    // Sparse: far less is allocated than the file's length.
    assert!(info.allocated_bytes < 64 * MIB, "{info:?}");

    let empty = d.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let info = probe(&empty).unwrap();
    assert_eq!((info.format, info.virtual_size), (ImageFormat::Raw, 0));
    assert_eq!((info.file_size, info.allocated_bytes), (0, 0));

    // Written data is allocated; the name never matters.
    let dense = d.join("looks-like.qcow2");
    let mut bytes = vec![0u8; 3 * MIB as usize];
    Rng::new(5).fill(&mut bytes);
    std::fs::write(&dense, &bytes).unwrap();
    let info = probe(&dense).unwrap();
    assert_eq!(info.format, ImageFormat::Raw);
    assert_eq!(info.virtual_size, 3 * MIB);
    assert!(info.allocated_bytes >= 3 * MIB, "{info:?}");

    // Short files that start like a magic but are too short for it.
    let tiny = d.join("tiny");
    std::fs::write(&tiny, b"KDM").unwrap();
    assert_eq!(probe(&tiny).unwrap().format, ImageFormat::Raw);
}

#[test]
fn unreadable_paths_are_io_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.qcow2");
    match probe(&missing).unwrap_err() {
        Error::Io { context, source } => {
            assert!(context.contains(s(&missing)), "{context}");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Io, got {other:?}"),
    }
    // A directory opens but cannot be read.
    match probe(dir.path()).unwrap_err() {
        Error::Io { context, .. } => assert!(context.contains(s(dir.path())), "{context}"),
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn truncated_qcow2_header_is_corrupt_at_the_file_length() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(our_qcow2(dir.path())).unwrap();
    let cut = dir.path().join("cut.qcow2");
    for len in 4..104usize {
        std::fs::write(&cut, &good[..len]).unwrap();
        let e = probe(&cut).unwrap_err();
        assert!(
            matches!(&e, Error::Corrupt { offset, what } if *offset == len as u64
                && what.contains("qcow2 header")),
            "length {len}: {e:?}"
        );
    }
    // A v2 header needs only 72 bytes.
    let mut v2 = good[..72].to_vec();
    put_be32(&mut v2, 4, 2);
    std::fs::write(&cut, &v2[..71]).unwrap();
    assert!(matches!(
        probe(&cut).unwrap_err(),
        Error::Corrupt { offset: 71, .. }
    ));
    std::fs::write(&cut, &v2).unwrap();
    assert_eq!(probe(&cut).unwrap().qcow2_version, Some(2));
}

#[test]
fn hostile_qcow2_fields_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = our_qcow2(d);
    let len = std::fs::metadata(&good).unwrap().len();

    for bits in [0u32, 8, 22, 30, u32::MAX] {
        let p = patched(&good, &d.join("bits.qcow2"), |b| put_be32(b, 20, bits));
        let e = probe(&p).unwrap_err();
        assert!(
            matches!(&e, Error::Corrupt { offset: 20, what } if what.contains(&format!("cluster_bits {bits}"))),
            "{bits}: {e:?}"
        );
    }

    // Backing file name past the end of the file, or overflowing.
    for (offset, size) in [(len - 5, 10u32), (len, 1), (u64::MAX - 3, 100)] {
        let p = patched(&good, &d.join("backing.qcow2"), |b| {
            put_be64(b, 8, offset);
            put_be32(b, 16, size);
        });
        let e = probe(&p).unwrap_err();
        assert!(matches!(e, Error::Corrupt { offset: 8, .. }), "{e:?}");
    }
    // Longer than the spec's 1023 bytes.
    let p = patched(&good, &d.join("long.qcow2"), |b| {
        put_be64(b, 8, 512);
        put_be32(b, 16, 5000);
    });
    assert!(matches!(
        probe(&p).unwrap_err(),
        Error::Corrupt { offset: 16, .. }
    ));

    for method in [1u32, 2, 77] {
        let p = patched(&good, &d.join("crypt.qcow2"), |b| put_be32(b, 32, method));
        let e = probe(&p).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported { what } if what.contains("encrypted qcow2")),
            "{e:?}"
        );
        let sdk: fluidcloud_plugins::Error = e.into();
        assert!(matches!(
            sdk,
            fluidcloud_plugins::Error::NotSupported { .. }
        ));
    }

    let p = patched(&good, &d.join("features.qcow2"), |b| {
        put_be64(b, 72, (1 << 40) | (1 << 5) | 1);
    });
    let e = probe(&p).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { what } if what.contains("0x10000000020")),
        "{e:?}"
    );
    // Known bits (dirty, corrupt, ...) are reported, not refused.
    let p = patched(&good, &d.join("dirty.qcow2"), |b| put_be64(b, 72, 0b11));
    assert_eq!(probe(&p).unwrap().format, ImageFormat::Qcow2);

    for version in [0u32, 1, 4, u32::MAX] {
        let p = patched(&good, &d.join("version.qcow2"), |b| put_be32(b, 4, version));
        let e = probe(&p).unwrap_err();
        assert!(
            matches!(&e, Error::Unsupported { what } if what.contains(&format!("qcow2 version {version}"))),
            "{e:?}"
        );
    }

    for header_length in [0u32, 100, 105, 1 << 20] {
        let p = patched(&good, &d.join("hlen.qcow2"), |b| {
            put_be32(b, 100, header_length)
        });
        let e = probe(&p).unwrap_err();
        assert!(matches!(e, Error::Corrupt { offset: 100, .. }), "{e:?}");
    }
}

#[test]
fn real_luks_encrypted_qcow2_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("enc.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=not-a-real-secret",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&path),
        "16M",
    ]);
    let e = probe(&path).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { what } if what.contains("encrypted qcow2") && what.contains("LUKS")),
        "{e:?}"
    );
}

/// Images of every format, truncated at many lengths and with random bytes
/// overwritten in their headers: `probe` returns, whatever it returns.
#[test]
fn damaged_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = [
        our_qcow2(d),
        qemu_create(d, "q.qcow2", "qcow2", &[], "1G"),
        qemu_create(d, "s.vmdk", "vmdk", &[], "64M"),
        qemu_create(
            d,
            "so.vmdk",
            "vmdk",
            &["-o", "subformat=streamOptimized"],
            "64M",
        ),
        qemu_create(
            d,
            "flat.vmdk",
            "vmdk",
            &["-o", "subformat=monolithicFlat"],
            "1M",
        ),
        qemu_create(d, "d.vhd", "vpc", &[], "64M"),
        qemu_create(d, "f.vhd", "vpc", &["-o", "subformat=fixed"], "1M"),
        qemu_create(d, "x.vhdx", "vhdx", &[], "64M"),
    ];
    let victim = d.join("victim");
    let mut rng = Rng::new(0xBAD);
    let mut outcomes = [0usize; 2];
    for image in &images {
        let bytes = std::fs::read(image).unwrap();
        let n = bytes.len();
        // Truncations: every length up to 1100, then around the structures
        // VMDK, VHD and VHDX keep further in. Longest first, so one write
        // and then shrinking the file produces every case.
        let mut lengths: Vec<usize> = (0..1100).collect();
        for mark in [0x1_0000usize, 0x3_0000, 0x4_0000, 0x10_0000, 0x20_0000] {
            lengths.extend(mark.saturating_sub(40)..mark + 40);
        }
        lengths.extend(n.saturating_sub(600)..n);
        lengths.retain(|&l| l < n);
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        std::fs::write(&victim, &bytes).unwrap();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap();
        for len in lengths {
            file.set_len(len as u64).unwrap();
            outcomes[usize::from(probe(&victim).is_ok())] += 1;
        }
        // Random overwrites in the first 4 KiB, the VHDX tables and the end,
        // undone after each probe.
        std::fs::write(&victim, &bytes).unwrap();
        for _ in 0..300 {
            let mut touched = Vec::new();
            for _ in 0..rng.range(1, 6) {
                let region = match rng.range(0, 4) {
                    0 => 0..4096.min(n),
                    1 => 0x3_0000.min(n)..(0x3_0000 + 256).min(n),
                    2 => 0x20_0000.min(n)..(0x20_0000 + 4096).min(n),
                    _ => n.saturating_sub(512)..n,
                };
                if !region.is_empty() {
                    let at = rng.range(region.start as u64, region.end as u64) as usize;
                    file.write_all_at(&[rng.next_u64() as u8], at as u64)
                        .unwrap();
                    touched.push(at);
                }
            }
            outcomes[usize::from(probe(&victim).is_ok())] += 1;
            for at in touched {
                file.write_all_at(&bytes[at..=at], at as u64).unwrap();
            }
        }
    }
    // Both outcomes happen: damage is sometimes detected, sometimes harmless.
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}
