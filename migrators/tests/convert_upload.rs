//! `image::convert_to_object`: conversion straight into a multipart upload
//! on a real Garage S3 server (`scripts/garage`), checked by downloading the
//! object and running `qemu-img compare` against the source.
//!
//! Garage must be installed (`scripts/setup`); without it these tests fail,
//! they never skip.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{Rng, qemu, qemu_ok, s};
use fluidcloud_migrators::Error;
use fluidcloud_migrators::image::vmdk::VmdkSubformat;
use fluidcloud_migrators::image::{ConvertOptions, VhdSubformat, convert_to_object, open};
use fluidcloud_migrators::objects::{BucketLocation, open_store};
use fluidcloud_plugins::ImageFormat;
use fluidcloud_testkit::Garage;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as OPath;

const MIB: u64 = 1 << 20;

/// The run's shared Garage pair, its variables exported as `UPLOAD_*`,
/// and this process's bucket on instance A.
fn garage() -> &'static (String, &'static Garage) {
    static READY: OnceLock<(String, &'static Garage)> = OnceLock::new();
    READY.get_or_init(|| {
        let g = Garage::shared();
        g.export("UPLOAD");
        let bucket = format!("images-{}", std::process::id());
        g.bucket("A", &bucket);
        (bucket, g)
    })
}

/// The location of object `key` in this process's bucket.
fn url(key: &str) -> String {
    let (bucket, g) = garage();
    g.url("UPLOAD", "A", &format!("{bucket}/{key}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Downloads `key` into `path`; returns its size.
fn download(key: &str, path: &Path) -> u64 {
    let store = open_store(&BucketLocation::parse(&url("")).unwrap()).unwrap();
    runtime().block_on(async {
        let mut stream = store.get(&OPath::from(key)).await.unwrap().into_stream();
        let f = std::fs::File::create(path).unwrap();
        let mut at = 0u64;
        while let Some(b) = stream.try_next().await.unwrap() {
            f.write_all_at(&b, at).unwrap();
            at += b.len() as u64;
        }
        at
    })
}

/// The keys in the bucket.
fn keys() -> Vec<String> {
    let store = open_store(&BucketLocation::parse(&url("")).unwrap()).unwrap();
    runtime().block_on(async {
        let list: Vec<_> = store.list(None).try_collect().await.unwrap();
        list.into_iter().map(|m| m.location.to_string()).collect()
    })
}

/// A sparse 40 MiB + 1.5 KiB raw disk (several 16 MiB parts): random and
/// compressible runs between holes, data on the last bytes.
fn source(dir: &Path) -> PathBuf {
    let size = 40 * MIB + 1536;
    let path = dir.join("src.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(17);
    let mut pos = 0u64;
    while pos < size {
        let len = rng.range(4096, 3 * MIB).min(size - pos);
        match rng.range(0, 3) {
            0 => {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                f.write_all_at(&buf, pos).unwrap();
            }
            1 => {
                let buf: Vec<u8> = (0..len).map(|i| (i / 300) as u8).collect();
                f.write_all_at(&buf, pos).unwrap();
            }
            _ => {}
        }
        pos += len;
    }
    f.write_all_at(&[0x5A; 100], size - 100).unwrap();
    path
}

fn assert_same(src: &Path, fmt: &str, out: &Path) {
    let cmp = qemu(&["compare", "-f", "raw", "-F", fmt, s(src), s(out)]);
    assert!(
        cmp.status.success(),
        "qemu-img compare {} {}: {}{}",
        src.display(),
        out.display(),
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

#[test]
fn raw_fixed_vhd_and_stream_vmdk_upload_in_parts_and_match_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let size = std::fs::metadata(&src).unwrap().len();
    // A qcow2 source too: the reader, not the file, is what is uploaded.
    let qcow = d.join("src.qcow2");
    qemu_ok(&["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&qcow)]);
    let cases = [
        ("disk.raw", &src, ImageFormat::Raw, "raw"),
        ("from-qcow2.raw", &qcow, ImageFormat::Raw, "raw"),
        ("disk.vhd", &src, ImageFormat::Vhd, "vpc"),
        ("disk.vmdk", &qcow, ImageFormat::Vmdk, "vmdk"),
    ];
    for (key, input, format, fmt) in cases {
        let reader = open(input).unwrap();
        let opts = ConvertOptions {
            format,
            overwrite: true,
            ..ConvertOptions::default()
        };
        let loc = BucketLocation::parse(&url(&format!("vm/{key}"))).unwrap();
        let summary = convert_to_object(reader.as_ref(), &loc, &opts, &|_, _| {}).unwrap();
        let out = d.join(key);
        let got = download(&format!("vm/{key}"), &out);
        assert_eq!(got, summary.file_size, "{key}");
        match format {
            ImageFormat::Raw => assert_eq!(got, size),
            ImageFormat::Vhd => assert_eq!(got, size.div_ceil(512) * 512 + 512),
            _ => {
                let info: serde_json::Value = serde_json::from_str(&qemu_ok(&[
                    "info",
                    "-f",
                    "vmdk",
                    "--output=json",
                    s(&out),
                ]))
                .unwrap();
                assert_eq!(
                    info["format-specific"]["data"]["create-type"],
                    "streamOptimized"
                );
            }
        }
        assert_same(&src, fmt, &out);
    }
    let mut k = keys();
    k.sort();
    assert!(k.contains(&"vm/disk.vmdk".to_owned()), "{k:?}");
    // An existing object is replaced only when asked.
    let reader = open(&src).unwrap();
    let loc = BucketLocation::parse(&url("vm/disk.raw")).unwrap();
    let mut opts = ConvertOptions {
        format: ImageFormat::Raw,
        ..ConvertOptions::default()
    };
    let err = convert_to_object(reader.as_ref(), &loc, &opts, &|_, _| {}).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    opts.overwrite = true;
    convert_to_object(reader.as_ref(), &loc, &opts, &|_, _| {}).unwrap();
}

#[test]
fn formats_that_seek_back_are_refused_before_any_upload() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let reader = open(&src).unwrap();
    for (name, opts) in [
        (
            "qcow2",
            ConvertOptions {
                format: ImageFormat::Qcow2,
                ..ConvertOptions::default()
            },
        ),
        (
            "dynamic.vhd",
            ConvertOptions {
                format: ImageFormat::Vhd,
                vhd_subformat: VhdSubformat::Dynamic,
                ..ConvertOptions::default()
            },
        ),
        (
            "vhdx",
            ConvertOptions {
                format: ImageFormat::Vhdx,
                ..ConvertOptions::default()
            },
        ),
        (
            "sparse.vmdk",
            ConvertOptions {
                format: ImageFormat::Vmdk,
                vmdk_subformat: VmdkSubformat::MonolithicSparse,
                ..ConvertOptions::default()
            },
        ),
    ] {
        let key = format!("refused/{name}");
        let loc = BucketLocation::parse(&url(&key)).unwrap();
        let err = convert_to_object(reader.as_ref(), &loc, &opts, &|_, _| {}).unwrap_err();
        assert!(
            matches!(&err, Error::Unsupported { what } if what.contains("front to back")),
            "{name}: {err}"
        );
        assert!(!keys().contains(&key), "{name} left an object");
    }
    // A location without a key names the problem.
    let loc = BucketLocation::parse(&url("")).unwrap();
    let err = convert_to_object(
        reader.as_ref(),
        &loc,
        &ConvertOptions {
            format: ImageFormat::Raw,
            ..ConvertOptions::default()
        },
        &|_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::BadLocation { .. }), "{err}");
}

#[test]
fn a_source_that_turns_out_corrupt_aborts_the_upload() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    // qcow2 with 4 KiB clusters: one L2 table maps 2 MiB, so damaging the
    // 18th L1 entry breaks the image 36 MiB in, after a 16 MiB part has
    // gone (the extent map is read a few MiB ahead of the writes).
    let qcow = d.join("bad.qcow2");
    qemu_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&src),
        s(&qcow),
    ]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&qcow)
        .unwrap();
    let mut h = [0u8; 8];
    f.read_exact_at(&mut h, 40).unwrap();
    let l1 = u64::from_be_bytes(h);
    let past_end = (1u64 << 63) | (1 << 40);
    for i in 18..21 {
        f.write_all_at(&past_end.to_be_bytes(), l1 + 8 * i).unwrap();
    }
    drop(f);
    let reader = open(&qcow).unwrap();
    let loc = BucketLocation::parse(&url("broken/disk.raw")).unwrap();
    let opts = ConvertOptions {
        format: ImageFormat::Raw,
        ..ConvertOptions::default()
    };
    let done = std::sync::atomic::AtomicU64::new(0);
    let err = convert_to_object(reader.as_ref(), &loc, &opts, &|d, _| {
        done.store(d, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(
        done.load(std::sync::atomic::Ordering::Relaxed) >= 16 * MIB,
        "the damage was found before a part was sent"
    );
    assert!(!keys().iter().any(|k| k.starts_with("broken/")));
}
