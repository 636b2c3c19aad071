//! Conversion checked by qemu-img: for sources of every kind the readers
//! handle, our output in each writable format passes `qemu-img compare`
//! against the source, qcow2 outputs pass `qemu-img check`, and raw output
//! is sparse.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{Rng, assert_check_clean, qemu, qemu_ok, s};
use fluidcloud_migrators::image::qcow2::{Compression, Qcow2Options};
use fluidcloud_migrators::image::{ConvertOptions, convert, open};
use fluidcloud_migrators::{Error, Qcow2Writer};
use fluidcloud_plugins::ImageFormat;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const VSIZE: u64 = 10 * MIB + 3584;

/// A sparse raw disk with random, compressible and zero ranges and data on
/// the last bytes.
fn source_raw(dir: &Path) -> PathBuf {
    let mut rng = Rng::new(9);
    let mut data = vec![0u8; VSIZE as usize];
    let mut pos = 0usize;
    while pos < data.len() {
        let len = (rng.range(512, 400 * KIB) as usize).min(data.len() - pos);
        match rng.range(0, 4) {
            0 => rng.fill(&mut data[pos..pos + len]),
            1 => data[pos..pos + len]
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i / 100) as u8),
            _ => {}
        }
        pos += len;
    }
    let n = data.len();
    data[n - 10..].fill(0x42);
    let dense = dir.join("dense.raw");
    std::fs::write(&dense, &data).unwrap();
    let path = dir.join("src.raw");
    qemu_ok(&["convert", "-f", "raw", "-O", "raw", s(&dense), s(&path)]);
    std::fs::remove_file(dense).unwrap();
    path
}

/// `qemu-img convert -f raw -O FORMAT ARGS... SRC DST`.
fn qemu_convert(src: &Path, dst: &Path, format: &str, args: &[&str]) {
    let mut all = vec!["convert", "-f", "raw", "-O", format];
    all.extend(args);
    all.extend([s(src), s(dst)]);
    qemu_ok(&all);
}

fn compare(a: &Path, b: &Path) {
    let out = qemu(&["compare", s(a), s(b)]);
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qcow2(cs: u32, compression: Option<Compression>) -> ConvertOptions {
    ConvertOptions {
        format: ImageFormat::Qcow2,
        qcow2: Qcow2Options {
            cluster_size: cs,
            compression,
            ..Qcow2Options::default()
        },
        ..ConvertOptions::default()
    }
}

fn raw() -> ConvertOptions {
    ConvertOptions {
        format: ImageFormat::Raw,
        ..ConvertOptions::default()
    }
}

/// Converts `src` with every output setting and checks each result.
fn convert_all_ways(src: &Path, d: &Path, tag: &str) {
    let reader = open(src).unwrap();
    for (i, opts) in [
        raw(),
        qcow2(65536, None),
        qcow2(4096, None),
        qcow2(2 << 20, None),
        qcow2(65536, Some(Compression::Zlib)),
        qcow2(512, Some(Compression::Zlib)),
        qcow2(65536, Some(Compression::Zstd)),
        qcow2(1 << 20, Some(Compression::Zstd)),
        ConvertOptions {
            threads: 1,
            ..qcow2(65536, Some(Compression::Zlib))
        },
    ]
    .iter()
    .enumerate()
    {
        let out = d.join(format!("{tag}-out{i}.{}", opts.format));
        let last = std::sync::Mutex::new(0u64);
        let summary = convert(reader.as_ref(), &out, opts, &|done, total| {
            assert_eq!(total, reader.virtual_size());
            let mut l = last.lock().unwrap();
            assert!(done >= *l, "progress goes forward");
            *l = done;
        })
        .unwrap();
        assert_eq!(*last.lock().unwrap(), reader.virtual_size());
        assert_eq!(summary.virtual_size, reader.virtual_size());
        // Nothing allocated past the end (runs are preallocated before
        // they are written: a misplaced one would show here).
        assert!(
            summary.allocated_bytes <= summary.file_size.next_multiple_of(4096) + 16 * KIB,
            "{}: {} bytes allocated for a file of {}",
            out.display(),
            summary.allocated_bytes,
            summary.file_size
        );
        compare(src, &out);
        if opts.format == ImageFormat::Qcow2 {
            assert_check_clean(&out);
            // And we read our own output back right.
            let back = open(&out).unwrap();
            let mut a = vec![0u8; VSIZE as usize];
            let mut b = vec![0u8; VSIZE as usize];
            back.read_at(0, &mut a).unwrap();
            reader.read_at(0, &mut b).unwrap();
            assert!(a == b, "{} reads back differently", out.display());
        }
    }
}

#[test]
fn raw_and_qcow2_sources_convert_every_way() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    convert_all_ways(&src, d, "raw");
    for (tag, opts, extra) in [
        ("q64", "cluster_size=65536", None),
        ("zlib", "cluster_size=65536", Some("-c")),
        ("zstd", "compression_type=zstd", Some("-c")),
        ("xl2", "extended_l2=on", None),
    ] {
        let img = d.join(format!("{tag}.qcow2"));
        let mut args = vec!["-o", opts];
        args.extend(extra);
        qemu_convert(&src, &img, "qcow2", &args);
        convert_all_ways(&img, d, tag);
    }
}

#[test]
fn backing_chain_source_flattens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    source_raw(d);
    let top = d.join("top.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "src.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    let io = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x21 1M 300k",
            "-c",
            "write -z 4M 1M",
            s(&top),
        ])
        .output()
        .unwrap();
    assert!(io.status.success());
    convert_all_ways(&top, d, "chain");
}

#[test]
fn raw_output_is_as_sparse_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    let img = d.join("s.qcow2");
    qemu_ok(&["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&img)]);
    let ours = d.join("ours.raw");
    let summary = convert(open(&img).unwrap().as_ref(), &ours, &raw(), &|_, _| {}).unwrap();
    let theirs = d.join("theirs.raw");
    qemu_ok(&["convert", "-O", "raw", s(&img), s(&theirs)]);
    compare(&ours, &theirs);
    let ours_alloc = std::fs::metadata(&ours).unwrap().blocks() * 512;
    let theirs_alloc = std::fs::metadata(&theirs).unwrap().blocks() * 512;
    assert_eq!(summary.allocated_bytes, ours_alloc);
    assert!(
        ours_alloc <= theirs_alloc,
        "ours uses {ours_alloc} bytes, qemu-img's {theirs_alloc}"
    );
    assert!(ours_alloc < VSIZE, "raw output must be sparse");
}

#[test]
fn qcow2_output_with_a_backing_file_stores_only_differences() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    let base = d.join("base.qcow2");
    qemu_ok(&["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&base)]);
    // The new disk: the base with a few changes, including zeros over data.
    let changed = d.join("changed.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&changed),
    ]);
    let io = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x31 64k 64k",
            "-c",
            "write -z 0 8k",
            "-c",
            "write -z 2M 3M",
            s(&changed),
        ])
        .output()
        .unwrap();
    assert!(io.status.success());
    let flat = d.join("flat.qcow2");
    qemu_ok(&["convert", "-O", "qcow2", s(&changed), s(&flat)]);
    for compression in [None, Some(Compression::Zstd)] {
        let out = d.join(format!("delta-{compression:?}.qcow2"));
        let mut opts = qcow2(65536, compression);
        opts.qcow2.backing_file = Some("base.qcow2".into());
        opts.qcow2.backing_format = Some(ImageFormat::Qcow2);
        convert(open(&flat).unwrap().as_ref(), &out, &opts, &|_, _| {}).unwrap();
        assert_check_clean(&out);
        compare(&flat, &out);
        let info: serde_json::Value =
            serde_json::from_str(&qemu_ok(&["info", "--output=json", s(&out)])).unwrap();
        assert_eq!(info["backing-filename"], "base.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
        // Only the changed clusters are stored: far less than the disk.
        let size = std::fs::metadata(&out).unwrap().len();
        assert!(size < 2 * MIB, "delta image is {size} bytes");
    }
}

#[test]
fn existing_output_needs_overwrite_and_failures_remove_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    let reader = open(&src).unwrap();
    let out = d.join("o.qcow2");
    std::fs::write(&out, b"keep").unwrap();
    let e = convert(reader.as_ref(), &out, &qcow2(65536, None), &|_, _| {}).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    let mut opts = qcow2(65536, None);
    opts.overwrite = true;
    convert(reader.as_ref(), &out, &opts, &|_, _| {}).unwrap();
    compare(&src, &out);
    // A bad cluster size fails before anything is written.
    let bad = d.join("bad.qcow2");
    assert!(convert(reader.as_ref(), &bad, &qcow2(1000, None), &|_, _| {}).is_err());
    assert!(!bad.exists());
    // Azure takes fixed VHDs only: a dynamic one for Azure is refused.
    let x = d.join("x.vhd");
    let e = convert(
        reader.as_ref(),
        &x,
        &ConvertOptions {
            format: ImageFormat::Vhd,
            vhd_subformat: fluidcloud_migrators::image::VhdSubformat::Dynamic,
            azure: true,
            ..ConvertOptions::default()
        },
        &|_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(!x.exists());
}

#[test]
fn writer_compression_through_write_at_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    for c in [Compression::Zlib, Compression::Zstd] {
        for cs in [512u32, 65536] {
            let path = dir.path().join(format!("w-{c:?}-{cs}.qcow2"));
            let opts = Qcow2Options {
                cluster_size: cs,
                compression: Some(c),
                ..Qcow2Options::default()
            };
            let mut w = Qcow2Writer::create(&path, 4 * MIB + 512, &opts).unwrap();
            let mut rng = Rng::new(u64::from(cs));
            let mut expected = vec![0u8; (4 * MIB + 512) as usize];
            for (i, b) in expected[..MIB as usize].iter_mut().enumerate() {
                *b = (i % 7) as u8;
            }
            rng.fill(&mut expected[2 * MIB as usize..(2 * MIB + 100 * KIB) as usize]);
            expected[(4 * MIB) as usize..].fill(3);
            w.write_at(0, &expected).unwrap();
            w.finish().unwrap();
            assert_check_clean(&path);
            let raw = common::convert_to_raw(&path, dir.path());
            common::assert_file_is(&raw, &expected);
            let map = common::map_json(&path);
            assert!(!map.is_empty());
            std::fs::remove_file(raw).unwrap();
        }
    }
}

#[test]
fn fixed_vhd_output_and_azure_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    let img = d.join("s.qcow2");
    qemu_convert(&src, &img, "qcow2", &["-c"]);
    let reader = open(&img).unwrap();
    for azure in [false, true] {
        let out = d.join(format!("out-{azure}.vhd"));
        let opts = ConvertOptions {
            format: ImageFormat::Vhd,
            azure,
            ..ConvertOptions::default()
        };
        let summary = convert(reader.as_ref(), &out, &opts, &|_, _| {}).unwrap();
        let info: serde_json::Value =
            serde_json::from_str(&qemu_ok(&["info", "-f", "vpc", "--output=json", s(&out)]))
                .unwrap();
        let vsize = info["virtual-size"].as_u64().unwrap();
        let expected = if azure {
            VSIZE.div_ceil(MIB) * MIB
        } else {
            VSIZE
        };
        assert_eq!(vsize, expected, "azure={azure}");
        assert_eq!(summary.file_size, expected + 512);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), expected + 512);
        let cmp = qemu(&["compare", "-F", "vpc", s(&img), s(&out)]);
        assert!(
            cmp.status.success(),
            "{}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        // We read our own output back (by content: the footer).
        let back = open(&out).unwrap();
        assert_eq!(back.format(), ImageFormat::Vhd);
        assert_eq!(back.virtual_size(), expected);
        let mut a = vec![0u8; VSIZE as usize];
        let mut b = vec![0u8; VSIZE as usize];
        back.read_at(0, &mut a).unwrap();
        reader.read_at(0, &mut b).unwrap();
        assert!(a == b);
        // Sparse: the holes of the source stay holes.
        assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < VSIZE);
    }
}

#[test]
fn stream_optimized_vmdk_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    let img = d.join("s.qcow2");
    qemu_ok(&["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&img)]);
    let reader = open(&img).unwrap();
    let out = d.join("out.vmdk");
    let opts = ConvertOptions {
        format: ImageFormat::Vmdk,
        ..ConvertOptions::default()
    };
    convert(reader.as_ref(), &out, &opts, &|_, _| {}).unwrap();
    let cmp = qemu(&["compare", "-F", "vmdk", s(&img), s(&out)]);
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let info: serde_json::Value =
        serde_json::from_str(&qemu_ok(&["info", "-f", "vmdk", "--output=json", s(&out)])).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    assert_eq!(info["virtual-size"], VSIZE.div_ceil(512) * 512);
    // qemu-img check of the vmdk finds nothing wrong.
    let check = qemu(&["check", "-f", "vmdk", s(&out)]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    // And we read it back, by content.
    let back = open(&out).unwrap();
    assert_eq!(back.format(), ImageFormat::Vmdk);
    let mut a = vec![0u8; VSIZE as usize];
    let mut b = vec![0u8; VSIZE as usize];
    back.read_at(0, &mut a).unwrap();
    reader.read_at(0, &mut b).unwrap();
    assert!(a == b);
    // Compressed: much smaller than the data.
    assert!(std::fs::metadata(&out).unwrap().len() < VSIZE / 2);
}

#[test]
fn vmdk_vhd_and_vhdx_sources_convert() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    for (name, fmt, opts) in [
        ("s.vmdk", "vmdk", "subformat=streamOptimized"),
        ("f.vmdk", "vmdk", "subformat=monolithicFlat"),
        ("d.vhd", "vpc", "subformat=dynamic,force_size=on"),
        ("d.vhdx", "vhdx", "subformat=dynamic"),
    ] {
        let img = d.join(name);
        qemu_convert(&src, &img, fmt, &["-o", opts]);
        let reader = open(&img).unwrap();
        for (i, opts) in [raw(), qcow2(65536, Some(Compression::Zstd))]
            .iter()
            .enumerate()
        {
            let out = d.join(format!("{name}-{i}.out"));
            convert(reader.as_ref(), &out, opts, &|_, _| {}).unwrap();
            let f = if opts.format == ImageFormat::Raw {
                "raw"
            } else {
                "qcow2"
            };
            let cmp = qemu(&["compare", "-f", fmt, "-F", f, s(&img), s(&out)]);
            assert!(
                cmp.status.success(),
                "{name} -> {f}: {}",
                String::from_utf8_lossy(&cmp.stdout)
            );
        }
    }
}

#[test]
fn monolithic_sparse_vmdk_output() {
    use fluidcloud_migrators::image::vmdk::VmdkSubformat;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    let reader = open(&src).unwrap();
    let out = d.join("out.vmdk");
    let opts = ConvertOptions {
        format: ImageFormat::Vmdk,
        vmdk_subformat: VmdkSubformat::MonolithicSparse,
        ..ConvertOptions::default()
    };
    convert(reader.as_ref(), &out, &opts, &|_, _| {}).unwrap();
    let cmp = qemu(&["compare", "-F", "vmdk", s(&src), s(&out)]);
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let check = qemu(&["check", "-f", "vmdk", s(&out)]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let info: serde_json::Value =
        serde_json::from_str(&qemu_ok(&["info", "-f", "vmdk", "--output=json", s(&out)])).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["create-type"],
        "monolithicSparse"
    );
    // Zero grains are not stored: one 64 KiB of metadata, then exactly the
    // non-zero grains.
    let len = std::fs::metadata(&out).unwrap().len();
    let bytes = std::fs::read(&src).unwrap();
    let grains = bytes
        .chunks(65536)
        .filter(|g| g.iter().any(|&b| b != 0))
        .count() as u64;
    assert_eq!(len, 65536 + grains * 65536);
    let back = open(&out).unwrap();
    let mut a = vec![0u8; VSIZE as usize];
    back.read_at(0, &mut a).unwrap();
    assert!(a == std::fs::read(&src).unwrap());
}

/// Converts `src` to `opts` at `out`, then: `qemu-img compare` with the
/// given output format equals the source, and our reader reads back the
/// source's bytes.
fn convert_and_compare(src: &Path, out: &Path, opts: &ConvertOptions, qemu_fmt: &str) {
    let reader = open(src).unwrap();
    convert(reader.as_ref(), out, opts, &|_, _| {}).unwrap();
    let cmp = qemu(&["compare", "-F", qemu_fmt, s(src), s(out)]);
    assert!(
        cmp.status.success(),
        "qemu-img compare {} {}: {}{}",
        src.display(),
        out.display(),
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    let back = open(out).unwrap();
    assert_eq!(back.format(), opts.format);
    let size = reader.virtual_size();
    let (mut a, mut b) = (vec![0u8; size as usize], vec![0u8; size as usize]);
    reader.read_at(0, &mut a).unwrap();
    back.read_at(0, &mut b).unwrap();
    assert!(a == b, "{} reads back differently", out.display());
}

/// qemu-img's view of an image's virtual size.
fn qemu_virtual_size(img: &Path, fmt: &str) -> u64 {
    let info: serde_json::Value =
        serde_json::from_str(&qemu_ok(&["info", "-f", fmt, "--output=json", s(img)])).unwrap();
    info["virtual-size"].as_u64().unwrap()
}

#[test]
fn dynamic_vhd_output_matches_the_source() {
    use fluidcloud_migrators::image::VhdSubformat;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    let qcow = d.join("src.qcow2");
    qemu_ok(&["convert", "-O", "qcow2", s(&src), s(&qcow)]);
    let opts = ConvertOptions {
        format: ImageFormat::Vhd,
        vhd_subformat: VhdSubformat::Dynamic,
        ..ConvertOptions::default()
    };
    for (i, source) in [&src, &qcow].into_iter().enumerate() {
        let out = d.join(format!("out{i}.vhd"));
        convert_and_compare(source, &out, &opts, "vpc");
        // Sized like the source (rounded up to whole sectors).
        assert_eq!(qemu_virtual_size(&out, "vpc"), VSIZE.div_ceil(512) * 512);
        // Disk type 3 (dynamic) in the footer copy at the start.
        let head = std::fs::read(&out).unwrap();
        assert_eq!(&head[..8], b"conectix");
        assert_eq!(head[60..64], 3u32.to_be_bytes());
        // Only the 2 MiB blocks holding data are stored.
        let bytes = std::fs::read(&src).unwrap();
        let blocks = bytes
            .chunks(2 << 20)
            .filter(|b| b.iter().any(|&x| x != 0))
            .count() as u64;
        let len = std::fs::metadata(&out).unwrap().len();
        assert!(
            len <= 2048 + 512 + blocks * ((2 << 20) + 512) + 512,
            "{len}"
        );
    }
    // A disk that is all zeros stores no block at all.
    let zeros = d.join("zeros.raw");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(5 * MIB)
        .unwrap();
    let out = d.join("zeros.vhd");
    convert_and_compare(&zeros, &out, &opts, "vpc");
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        512 + 1024 + 512 + 512
    );
}

#[test]
fn vhdx_output_matches_the_source_and_passes_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    let qcow = d.join("src.qcow2");
    qemu_ok(&["convert", "-O", "qcow2", s(&src), s(&qcow)]);
    // A larger sparse disk: data in the first and the 130th block, so the
    // BAT holds a sector-bitmap entry (one per 128 payload blocks).
    let big = d.join("big.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(4200 * MIB + 512).unwrap();
        f.write_all_at(&[7u8; 70000], 5 * MIB + 3).unwrap();
        f.write_all_at(&[9u8; 4096], 129 * 32 * MIB + 4096).unwrap();
        f.write_all_at(&[1u8; 512], 4200 * MIB).unwrap();
    }
    let opts = ConvertOptions {
        format: ImageFormat::Vhdx,
        ..ConvertOptions::default()
    };
    for (i, source) in [&src, &qcow, &big].into_iter().enumerate() {
        let out = d.join(format!("out{i}.vhdx"));
        if i == 2 {
            // Too large to read back whole: compare with qemu-img only.
            let reader = open(source).unwrap();
            convert(reader.as_ref(), &out, &opts, &|_, _| {}).unwrap();
            compare(source, &out);
            assert!(std::fs::metadata(&out).unwrap().blocks() * 512 < 100 * MIB);
        } else {
            convert_and_compare(source, &out, &opts, "vhdx");
        }
        let check = qemu(&["check", "-f", "vhdx", s(&out)]);
        assert!(
            check.status.success() && String::from_utf8_lossy(&check.stdout).contains("No errors"),
            "qemu-img check {}: {}{}",
            out.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let expected = std::fs::metadata(source).unwrap().len().div_ceil(512) * 512;
        let expected = if i == 1 {
            VSIZE.div_ceil(512) * 512
        } else {
            expected
        };
        assert_eq!(qemu_virtual_size(&out, "vhdx"), expected);
    }
}

/// A source file cut short while it is being converted (its pages gone
/// from under the converter's map of it) fails the conversion with an
/// error naming the source, never a crash or a silently zero-filled
/// output; the partial output is removed. Raw and qcow2 sources, raw and
/// qcow2 outputs.
#[test]
fn a_source_truncated_during_the_conversion_fails_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut data = vec![0u8; (48 * MIB) as usize];
    Rng::new(5).fill(&mut data);
    let pristine_raw = d.join("pristine.raw");
    std::fs::write(&pristine_raw, &data).unwrap();
    let pristine_qcow2 = d.join("pristine.qcow2");
    convert(
        open(&pristine_raw).unwrap().as_ref(),
        &pristine_qcow2,
        &qcow2(65536, None),
        &|_, _| {},
    )
    .unwrap();
    for (pristine, tag) in [(&pristine_raw, "raw"), (&pristine_qcow2, "qcow2")] {
        for opts in [raw(), qcow2(65536, None)] {
            let src = d.join(format!("victim.{tag}"));
            std::fs::copy(pristine, &src).unwrap();
            let reader = open(&src).unwrap();
            let out = d.join("out.img");
            let cut = std::sync::atomic::AtomicBool::new(false);
            let e = convert(reader.as_ref(), &out, &opts, &|done, _| {
                if done > 0 && !cut.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&src)
                        .unwrap()
                        .set_len(MIB)
                        .unwrap();
                }
            })
            .unwrap_err();
            let msg = format!("{e}: {:?}", std::error::Error::source(&e));
            assert!(cut.load(std::sync::atomic::Ordering::SeqCst));
            assert!(
                msg.contains("victim") && msg.contains("shrank"),
                "{tag} source, {} output: {msg}",
                opts.format
            );
            assert!(!out.exists(), "{tag} source: the partial output is left");
        }
    }
}

/// How many of the pages of `path` are in the page cache.
#[allow(unsafe_code)]
fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = usize::try_from(file.metadata().unwrap().len()).unwrap();
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: a private read-only map of a file we hold open, only passed
    // to mincore and unmapped before returning.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
        libc::munmap(addr, len);
    }
    vec.iter().filter(|&&b| b & 1 == 1).count()
}

#[test]
fn decompressed_data_goes_to_raw_output_past_the_page_cache() {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source_raw(d);
    // Whether this file system takes O_DIRECT at all.
    let direct = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(d.join("probe"))
        .is_ok();
    for (tag, opts) in [
        ("zlib", "cluster_size=65536"),
        ("zstd", "compression_type=zstd"),
    ] {
        let img = d.join(format!("{tag}.qcow2"));
        qemu_convert(&src, &img, "qcow2", &["-c", "-o", opts]);
        let ours = d.join(format!("{tag}.raw"));
        let summary = convert(open(&img).unwrap().as_ref(), &ours, &raw(), &|_, _| {}).unwrap();
        let resident = resident_pages(&ours);
        let data_pages = usize::try_from(summary.allocated_bytes / 4096).unwrap();
        if direct {
            // Chunks that were decompressed are written with O_DIRECT, so
            // they are not left in the page cache; what is, is chunks
            // stored uncompressed (from the source's map) and the image's
            // unaligned tail.
            assert!(
                resident * 4 < data_pages,
                "{tag}: {resident} of {data_pages} data pages of the output are cached"
            );
        }
        compare(&src, &ours);
        let theirs = d.join(format!("{tag}-theirs.raw"));
        qemu_ok(&["convert", "-O", "raw", s(&img), s(&theirs)]);
        let theirs_alloc = std::fs::metadata(&theirs).unwrap().blocks() * 512;
        assert!(
            summary.allocated_bytes <= theirs_alloc,
            "{tag}: ours uses {} bytes, qemu-img's {theirs_alloc}",
            summary.allocated_bytes
        );
    }
}
