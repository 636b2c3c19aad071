//! Hostile input: images made by qemu-img, then damaged. Every reader
//! answers with a typed error (`Corrupt` naming the offset where it can),
//! never a panic, a hang or an allocation sized by the file.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{Rng, qemu_ok, s};
use fluidcloud_migrators::Error;
use fluidcloud_migrators::image::{check, extents, open};

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// A 4 MiB qcow2 image with 64 KiB clusters and data in its first clusters.
fn base(d: &Path, opts: &str, compressed: bool) -> Vec<u8> {
    let raw = d.join("data.raw");
    let mut data = vec![0u8; 4 << 20];
    Rng::new(3).fill(&mut data[..300 << 10]);
    data[(2 << 20)..(2 << 20) + 70000].fill(0x61);
    std::fs::write(&raw, &data).unwrap();
    let img = d.join("base.qcow2");
    let _ = std::fs::remove_file(&img);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", opts];
    if compressed {
        args.push("-c");
    }
    args.extend([s(&raw), s(&img)]);
    qemu_ok(&args);
    std::fs::read(img).unwrap()
}

/// Offset of the first L2 table.
fn first_l2(b: &[u8]) -> usize {
    let l1 = be64(b, 40) as usize;
    (be64(b, l1) & 0x00ff_ffff_ffff_fe00) as usize
}

fn write(d: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Opens and reads the whole image; returns the first error.
fn read_all(p: &Path) -> Result<(), Error> {
    let r = open(p)?;
    for e in extents(r.as_ref()) {
        e?;
    }
    let mut buf = vec![0u8; r.virtual_size().min(64 << 20) as usize];
    r.read_at(0, &mut buf)?;
    check(r.as_ref(), 2, &|_, _| {})?;
    Ok(())
}

fn assert_corrupt(p: &Path, what: &str) {
    match read_all(p) {
        Err(Error::Corrupt { what: w, .. }) => {
            assert!(
                w.contains(what),
                "{}: `{w}` should mention `{what}`",
                p.display()
            );
            assert!(w.contains(p.file_name().unwrap().to_str().unwrap()), "{w}");
        }
        other => panic!("{}: expected Corrupt ({what}), got {other:?}", p.display()),
    }
}

#[test]
fn qcow2_tables_pointing_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = base(d, "cluster_size=65536", false);
    // L1 entry past the end of the file.
    let mut x = b.clone();
    let l1 = be64(&x, 40) as usize;
    put64(&mut x, l1, (1 << 40) | (1 << 63));
    assert_corrupt(&write(d, "l1.qcow2", &x), "L1 entry");
    // L2 entry past the end.
    let mut x = b.clone();
    let l2 = first_l2(&x);
    put64(&mut x, l2, (1 << 40) | (1 << 63));
    assert_corrupt(&write(d, "l2.qcow2", &x), "L2 entry");
    // Unaligned data cluster.
    let mut x = b.clone();
    let v = be64(&x, l2);
    put64(&mut x, l2, v + 512);
    assert_corrupt(&write(d, "unaligned.qcow2", &x), "unaligned");
    // Truncated file: data clusters gone.
    assert_corrupt(&write(d, "cut.qcow2", &b[..b.len() / 2]), "past the end");
    // Absurd L1 size.
    let mut x = b.clone();
    put32(&mut x, 36, u32::MAX);
    assert_corrupt(&write(d, "l1size.qcow2", &x), "L1 table");
    // L1 too small for the virtual size.
    let mut x = b.clone();
    put64(&mut x, 24, 1 << 50);
    assert_corrupt(&write(d, "vsize.qcow2", &x), "L1 table");
    // Absurd snapshot count.
    let mut x = b.clone();
    put32(&mut x, 60, u32::MAX);
    put64(&mut x, 64, 65536);
    assert_corrupt(&write(d, "snaps.qcow2", &x), "snapshot");
    // Cluster bits out of range.
    let mut x = b;
    put32(&mut x, 20, 40);
    assert_corrupt(&write(d, "bits.qcow2", &x), "cluster_bits");
}

#[test]
fn qcow2_compressed_clusters_that_do_not_inflate_to_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for opts in [
        "cluster_size=65536",
        "cluster_size=65536,compression_type=zstd",
    ] {
        let b = base(d, opts, true);
        // The cluster at 2 MiB holds compressible data.
        let l2 = first_l2(&b) + 32 * 8;
        let entry = be64(&b, l2);
        assert_ne!(entry & (1 << 62), 0, "the cluster at 2 MiB is compressed");
        let host = (entry & ((1u64 << 54) - 1)) as usize;
        // Garbage instead of compressed data.
        let mut x = b.clone();
        Rng::new(5).fill(&mut x[host..host + 200]);
        assert_corrupt(&write(d, "garbage.qcow2", &x), "compressed cluster");
        // A stream that inflates to more than a cluster: 1 MiB of zeros,
        // compressed, written over the cluster's data.
        let bomb = if opts.contains("zstd") {
            zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap()
        } else {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = Vec::with_capacity(1 << 20);
            c.compress_vec(&vec![0u8; 1 << 20], &mut out, flate2::FlushCompress::Finish)
                .unwrap();
            out
        };
        let mut x = b.clone();
        if x.len() < host + bomb.len() + 512 {
            x.resize(host + bomb.len() + 512, 0);
        }
        x[host..host + bomb.len()].copy_from_slice(&bomb);
        // Make the descriptor cover the whole stream.
        let sectors = (bomb.len() as u64).div_ceil(512) + 1;
        let shift = 62 - (16 - 8);
        let e = (1u64 << 62) | ((sectors - 1) << shift) | host as u64;
        let mut x2 = x.clone();
        put64(&mut x2, l2, e);
        assert_corrupt(&write(d, "bomb.qcow2", &x2), "compressed cluster");
    }
}

#[test]
fn extended_l2_subcluster_both_allocated_and_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = base(d, "cluster_size=65536,extended_l2=on", false);
    let l2 = first_l2(&b);
    let mut x = b;
    // Bitmap: subcluster 0 allocated (bit 0) and zero (bit 32).
    put64(&mut x, l2 + 8, 1 | (1 << 32));
    assert_corrupt(&write(d, "xl2.qcow2", &x), "both allocated and zero");
}

#[test]
fn unknown_incompatible_bits_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut x = base(d, "cluster_size=65536", false);
    put64(&mut x, 72, 1 << 20);
    let e = read_all(&write(d, "bits.qcow2", &x)).unwrap_err();
    assert!(
        matches!(&e, Error::Unsupported { what } if what.contains("0x100000")),
        "{e}"
    );
}

/// Random damage to every format's metadata: never a panic.
#[test]
fn random_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    let mut data = vec![0u8; 3 << 20];
    Rng::new(11).fill(&mut data[..200 << 10]);
    data[(1 << 20)..(1 << 20) + 300_000].fill(0x42);
    std::fs::write(&raw, &data).unwrap();
    let mut images = Vec::new();
    for (name, fmt, opts) in [
        ("a.qcow2", "qcow2", "cluster_size=4096"),
        ("b.qcow2", "qcow2", "cluster_size=65536,extended_l2=on"),
        ("c.qcow2", "qcow2", "compat=0.10,cluster_size=512"),
        ("d.vmdk", "vmdk", "subformat=streamOptimized"),
        ("e.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("f.vhd", "vpc", "subformat=dynamic"),
        ("g.vhdx", "vhdx", "subformat=dynamic,block_size=1M"),
    ] {
        let p = d.join(name);
        qemu_ok(&[
            "convert",
            "-f",
            "raw",
            "-O",
            fmt,
            "-o",
            opts,
            s(&raw),
            s(&p),
        ]);
        images.push(std::fs::read(&p).unwrap());
    }
    // Compressed clusters too.
    let z = d.join("z.qcow2");
    qemu_ok(&["convert", "-f", "raw", "-O", "qcow2", "-c", s(&raw), s(&z)]);
    images.push(std::fs::read(&z).unwrap());
    let mut rng = Rng::new(99);
    let target = d.join("damaged");
    let mut errors = 0;
    for round in 0..600 {
        let mut x = images[round % images.len()].clone();
        let flips = rng.range(1, 8);
        for _ in 0..flips {
            // Mostly metadata: the first 64 KiB and the last 2 KiB.
            let at = if rng.range(0, 4) == 0 {
                x.len() - 1 - rng.range(0, 2048.min(x.len() as u64)) as usize
            } else {
                rng.range(0, (64 << 10).min(x.len() as u64)) as usize
            };
            x[at] = rng.next_u64() as u8;
        }
        if rng.range(0, 10) == 0 {
            x.truncate(rng.range(0, x.len() as u64) as usize);
        }
        std::fs::write(&target, &x).unwrap();
        if read_all(&target).is_err() {
            errors += 1;
        }
    }
    // The damage must have been noticed at least sometimes.
    assert!(
        errors > 50,
        "only {errors} of 600 damaged images gave errors"
    );
}
