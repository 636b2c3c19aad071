//! Headers that announce huge disks or huge tables: every reader, `check`,
//! conversion to every output format and volume copy stay within bounded
//! memory, and every refusal is a typed error naming the file and the
//! field (security issue, item 3; the caps are `image::limits`).
//!
//! Tests run under cargo-nextest, one process per test, so the peak RSS of
//! the process (`getrusage`) at the end of a test bounds everything the
//! test did. [`RSS_LIMIT_MIB`] is far below what the unbounded code paths
//! took (an eagerly loaded 512 MiB BAT, a chunk list per 4 MiB of a
//! 512 TiB FLAT extent, a grain directory per extent line).
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{qemu_ok, s};
use fluidcloud_migrators::Error;
use fluidcloud_migrators::image::qcow2::Qcow2Options;
use fluidcloud_migrators::image::vmdk::VmdkSubformat;
use fluidcloud_migrators::image::{
    ConvertOptions, ExtentKind, ImageReader, VhdSubformat, check, convert, data_bytes, extents,
    open,
};
use fluidcloud_migrators::volume::{self, VolumeCopyOptions};
use fluidcloud_plugins::ImageFormat;

/// What a test may use at its peak, everything included.
const RSS_LIMIT_MIB: u64 = 200;

/// Peak resident set of this process, in MiB.
fn peak_rss_mib() -> u64 {
    // SAFETY: getrusage fills the struct it is given, nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    u64::try_from(ru.ru_maxrss).unwrap() / 1024
}

fn assert_bounded(what: &str) {
    let rss = peak_rss_mib();
    eprintln!("{what}: peak RSS {rss} MiB");
    assert!(
        rss < RSS_LIMIT_MIB,
        "{what}: peak RSS {rss} MiB, over {RSS_LIMIT_MIB} MiB"
    );
}

/// Every output the converter writes, with the file name it gets.
fn outputs() -> Vec<(&'static str, ConvertOptions)> {
    let base = ConvertOptions {
        sync: false,
        ..ConvertOptions::default()
    };
    let with = |format, f: &dyn Fn(&mut ConvertOptions)| {
        let mut o = ConvertOptions {
            format,
            ..base.clone()
        };
        f(&mut o);
        o
    };
    vec![
        ("out.raw", with(ImageFormat::Raw, &|_| {})),
        ("out.qcow2", with(ImageFormat::Qcow2, &|_| {})),
        (
            "out-2m.qcow2",
            with(ImageFormat::Qcow2, &|o| {
                o.qcow2 = Qcow2Options {
                    cluster_size: 2 << 20,
                    ..Qcow2Options::default()
                };
            }),
        ),
        ("out-stream.vmdk", with(ImageFormat::Vmdk, &|_| {})),
        (
            "out-sparse.vmdk",
            with(ImageFormat::Vmdk, &|o| {
                o.vmdk_subformat = VmdkSubformat::MonolithicSparse;
            }),
        ),
        ("out-fixed.vhd", with(ImageFormat::Vhd, &|_| {})),
        (
            "out-dynamic.vhd",
            with(ImageFormat::Vhd, &|o| {
                o.vhd_subformat = VhdSubformat::Dynamic
            }),
        ),
        ("out.vhdx", with(ImageFormat::Vhdx, &|_| {})),
    ]
}

/// What happened to one conversion or copy.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Written (sparsely: the test's disk holds it).
    Written,
    /// Refused before anything was allocated: the format's limit.
    Refused,
    /// The file system cannot hold a file that large (`EFBIG`).
    TooLarge,
}

/// Sorts an error of writing `out`: it must name the file; a refusal must
/// be an `InvalidArgument` naming the limit, an I/O error `EFBIG`.
fn outcome(out: &Path, r: Result<(), Error>) -> Outcome {
    let name = out.file_name().unwrap().to_str().unwrap();
    match r {
        Ok(()) => Outcome::Written,
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains(name), "{m}: should name {name}");
            assert!(m.contains("at most") || m.contains("limit"), "{m}");
            Outcome::Refused
        }
        Err(Error::Io { context, source }) => {
            assert!(context.contains(name), "{context}: should name {name}");
            assert_eq!(
                source.raw_os_error(),
                Some(libc::EFBIG),
                "{context}: {source}"
            );
            Outcome::TooLarge
        }
        Err(e) => panic!("{}: unexpected {e:?}", out.display()),
    }
}

/// Reads the whole image every way the product does; returns the data
/// bytes and what each conversion and the volume copy did.
fn read_convert_copy(img: &Path, dir: &Path) -> (u64, Vec<(&'static str, Outcome)>) {
    let r = open(img).unwrap();
    let size = r.virtual_size();
    let mut covered = 0;
    for e in extents(r.as_ref()) {
        let e = e.unwrap();
        assert_eq!(e.offset, covered);
        covered = e.end();
    }
    assert_eq!(covered, size);
    let data = data_bytes(r.as_ref()).unwrap();
    let report = check(r.as_ref(), 2, &|_, _| {}).unwrap();
    assert_eq!(report.data_bytes, data);
    assert_eq!(
        report.data_bytes + report.zero_bytes + report.unallocated_bytes,
        size
    );
    let mut done = Vec::new();
    for (name, opts) in outputs() {
        let out = dir.join(name);
        let res = convert(r.as_ref(), &out, &opts, &|_, _| {}).map(|_| ());
        let o = outcome(&out, res);
        if o == Outcome::Written {
            // What was written reads back as the same disk.
            let back = open(&out).unwrap();
            assert_eq!(back.virtual_size().div_ceil(512), size.div_ceil(512));
            // Data is stored by whole clusters, grains or blocks.
            let stored = data_bytes(back.as_ref()).unwrap();
            assert!(
                stored <= data + (128 << 20),
                "{name}: {stored} bytes of data for {data}"
            );
        } else {
            assert!(!out.exists(), "{name}: the refused output was left behind");
        }
        std::fs::remove_file(&out).ok();
        done.push((name, o));
    }
    let target = dir.join("copy.raw");
    let copied = volume::copy(img, &target, &VolumeCopyOptions::default(), &|_, _| {});
    done.push(("volume copy", outcome(&target, copied.map(|_| ()))));
    (data, done)
}

fn outcome_of<'a>(done: &'a [(&str, Outcome)], name: &str) -> &'a Outcome {
    &done.iter().find(|(n, _)| *n == name).unwrap().1
}

/// The largest legal qcow2: 2 MiB clusters, a 32 MiB L1 table (QEMU's
/// cap), 2^61 bytes, with data at both ends.
#[test]
fn a_qcow2_claiming_2_pow_61_bytes_is_read_and_converted_within_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("huge.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        s(&img),
        "2E",
    ]);
    common::qemu_io(&img, &["write -P 0x5a 0 1M", "write -P 0x33 1E 64k"]);
    let (data, done) = read_convert_copy(&img, dir.path());
    assert_eq!(data, (2 << 20) * 2, "two 2 MiB clusters hold data");
    let r = open(&img).unwrap();
    let mut buf = vec![0u8; 4096];
    r.read_at(1 << 60, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
    // Every format with a table refuses 2 EiB by its limit; raw and fixed
    // VHD have none and meet the file system's (ext4: 16 TiB).
    for name in [
        "out.qcow2",
        "out-2m.qcow2",
        "out-stream.vmdk",
        "out-sparse.vmdk",
        "out-dynamic.vhd",
        "out.vhdx",
    ] {
        assert_eq!(outcome_of(&done, name), &Outcome::Refused, "{name}");
    }
    for name in ["out.raw", "out-fixed.vhd", "volume copy"] {
        assert_ne!(outcome_of(&done, name), &Outcome::Refused, "{name}");
    }
    assert_bounded("2^61-byte qcow2");
}

/// `RW 1152921504606846976 ZERO`: 2^60 sectors, 2^69 bytes. Refused by
/// the VMDK cap, naming the file and the line; a ZERO extent at the cap
/// (64 TiB) is read, checked, converted and copied sparsely.
#[test]
fn a_vmdk_descriptor_of_zero_extents_past_2_pow_64_bytes_is_refused_and_64_tib_stays_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let desc = |sectors: u64| {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"monolithicFlat\"\n\nRW {sectors} ZERO\n"
        )
    };
    let huge = dir.path().join("huge.vmdk");
    std::fs::write(&huge, desc(1_152_921_504_606_846_976)).unwrap();
    match open(&huge).map(|r| r.virtual_size()) {
        Err(Error::Corrupt { what, .. }) => {
            assert!(
                what.contains("huge.vmdk") && what.contains("64 TiB"),
                "{what}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Many lines of the largest extent do not add up past the cap either.
    let many = dir.path().join("many.vmdk");
    let lines: String = (0..1000).map(|_| "RW 137438953472 ZERO\n").collect();
    std::fs::write(&many, format!("{}{lines}", desc(1))).unwrap();
    match open(&many).map(|r| r.virtual_size()) {
        Err(Error::Corrupt { what, .. }) => {
            assert!(
                what.contains("many.vmdk") && what.contains("64 TiB"),
                "{what}"
            )
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The reader says which line (`open` probes first, which refuses it
    // too).
    match fluidcloud_migrators::image::vmdk::VmdkReader::open(&many).map(|r| r.virtual_size()) {
        Err(Error::Corrupt { what, .. }) => {
            assert!(
                what.contains("many.vmdk") && what.contains("extent line 2"),
                "{what}"
            )
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }

    let img = dir.path().join("zero.vmdk");
    std::fs::write(&img, desc(64 << 31)).unwrap();
    let (data, done) = read_convert_copy(&img, dir.path());
    assert_eq!(data, 0);
    for name in ["out.qcow2", "out-2m.qcow2", "out-stream.vmdk", "out.vhdx"] {
        assert_eq!(outcome_of(&done, name), &Outcome::Written, "{name}");
    }
    for name in ["out-sparse.vmdk", "out-dynamic.vhd"] {
        assert_eq!(outcome_of(&done, name), &Outcome::Refused, "{name}");
    }
    assert_bounded("64 TiB of ZERO extents");
}

/// A FLAT extent claiming 512 TiB of a 1 MiB file (the disk's whole
/// length would have been "data" to check and copy), and one ending past
/// its file.
#[test]
fn a_flat_vmdk_extent_longer_than_its_file_is_refused_before_it_is_walked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("small.raw"), vec![7u8; 1 << 20]).unwrap();
    let write = |name: &str, lines: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\n\n{lines}"
            ),
        )
        .unwrap();
        p
    };
    let corrupt = |p: &Path, what: &str| match open(p).map(|r| r.virtual_size()) {
        Err(Error::Corrupt { what: w, .. }) => {
            let name = p.file_name().unwrap().to_str().unwrap();
            assert!(w.contains(name) && w.contains(what), "{w}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    };
    corrupt(
        &write("huge.vmdk", "RW 1099511627776 FLAT \"small.raw\" 0\n"),
        "64 TiB",
    );
    corrupt(
        &write("long.vmdk", "RW 2049 FLAT \"small.raw\" 0\n"),
        "extent line 1: 2049 sectors from sector 0",
    );
    corrupt(
        &write("offset.vmdk", "RW 2048 FLAT \"small.raw\" 1\n"),
        "end past its 1048576 bytes",
    );
    // A sparse 1 TiB file as a FLAT extent: its holes are holes.
    let big = dir.path().join("big.raw");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(1 << 40).unwrap();
    f.write_all_at(&[1; 4096], 1 << 39).unwrap();
    drop(f);
    let img = write("flat.vmdk", "RW 2147483648 FLAT \"big.raw\" 0\n");
    let (data, done) = read_convert_copy(&img, dir.path());
    assert!((4096..=1 << 20).contains(&data), "{data} data bytes");
    assert_eq!(outcome_of(&done, "out.qcow2"), &Outcome::Written);
    assert_bounded("1 TiB FLAT extent");
}

/// A monolithicSparse extent of 4 TiB in 512-byte grains: a 64 MiB grain
/// directory (holes in the file), named by 16 extent lines of one
/// descriptor. The directories are paged and share one cache.
#[test]
fn a_vmdk_descriptor_repeating_a_sparse_extent_with_a_64_mib_grain_directory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let extent = dir.path().join("big-gd.vmdk");
    let capacity: u64 = 4 << 31; // sectors: 4 TiB
    let gd_entries = capacity / 512; // one sector per grain, 512 per table
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&1u64.to_le_bytes()); // grain: 1 sector
    h[44..48].copy_from_slice(&512u32.to_le_bytes());
    h[56..64].copy_from_slice(&1u64.to_le_bytes()); // GD at sector 1
    let f = std::fs::File::create(&extent).unwrap();
    f.write_all_at(&h, 0).unwrap();
    f.set_len(512 + gd_entries * 4).unwrap();
    drop(f);
    let lines: String = (0..16).map(|_| "RW 8 SPARSE \"big-gd.vmdk\"\n").collect();
    let img = dir.path().join("repeat.vmdk");
    std::fs::write(
        &img,
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"twoGbMaxExtentSparse\"\n\n{lines}"
        ),
    )
    .unwrap();
    let r = open(&img).unwrap();
    assert_bounded("opening 16 sparse extents with 64 MiB grain directories");
    assert_eq!(r.virtual_size(), 16 * 8 * 512);
    drop(r);
    let (data, _) = read_convert_copy(&img, dir.path());
    assert_eq!(data, 0);
    // The extent alone: 4 TiB, every grain directory page read once.
    let r = open(&extent).unwrap();
    assert_eq!(r.virtual_size(), 4 << 40);
    assert_eq!(data_bytes(r.as_ref()).unwrap(), 0);
    assert_bounded("16 sparse extents with 64 MiB grain directories");
}

/// CRC-32C (Castagnoli), as VHDX checksums its headers and tables.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The largest legal VHDX: 64 TiB in 1 MiB blocks, a 513 MiB BAT (in
/// holes of the file). qemu-img makes a small empty one; the BAT region
/// and the virtual size are grown by hand, checksums fixed; qemu-io then
/// writes data (QEMU reads the grown image as legal).
#[test]
fn the_largest_legal_vhdx_64_tib_in_1_mib_blocks_is_read_and_converted_within_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("huge.vhdx");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        s(&img),
        "1G",
    ]);
    let mut b = std::fs::read(&img).unwrap();
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let bat_guid = [
        0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A,
        0x08,
    ];
    let meta_guid = [
        0x06, 0xA2, 0x7C, 0x8B, 0x90, 0x47, 0x9A, 0x4B, 0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88,
        0x6E,
    ];
    let size_guid = [
        0x24, 0x42, 0xA5, 0x2F, 0x1B, 0xCD, 0x76, 0x48, 0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4,
        0xB8,
    ];
    // The BAT moves past everything qemu-img laid out (the empty image's
    // BAT is all zeros, and so are the holes it moves to) and grows.
    let new_bat_len: u64 = 513 << 20;
    let bat_at: u64 = 8 << 20;
    let mut meta_at = 0;
    for table in [0x3_0000usize, 0x4_0000] {
        for i in 0..le32(&b, table + 8) as usize {
            let e = table + 16 + 32 * i;
            if b[e..e + 16] == bat_guid {
                assert!(le64(&b, e + 16) + u64::from(le32(&b, e + 24)) <= bat_at);
                b[e + 16..e + 24].copy_from_slice(&bat_at.to_le_bytes());
                b[e + 24..e + 28].copy_from_slice(&(new_bat_len as u32).to_le_bytes());
            } else if b[e..e + 16] == meta_guid {
                meta_at = le64(&b, e + 16) as usize;
            }
        }
        b[table + 4..table + 8].fill(0);
        let sum = crc32c(&b[table..table + 65536]);
        b[table + 4..table + 8].copy_from_slice(&sum.to_le_bytes());
    }
    assert!(meta_at > 0 && b.len() as u64 <= bat_at);
    let items = usize::from(u16::from_le_bytes([b[meta_at + 10], b[meta_at + 11]]));
    let item = (0..items)
        .map(|i| meta_at + 32 + 32 * i)
        .find(|&e| b[e..e + 16] == size_guid)
        .unwrap();
    let at = meta_at + le32(&b, item + 16) as usize;
    b[at..at + 8].copy_from_slice(&(64u64 << 40).to_le_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&b, 0).unwrap();
    f.set_len((bat_at + new_bat_len).max(b.len() as u64))
        .unwrap();
    drop(f);
    common::qemu_io(&img, &["write -P 0x5a 0 1M", "write -P 0x33 63T 1M"]);

    let (data, done) = read_convert_copy(&img, dir.path());
    assert_eq!(data, 2 << 20);
    let r = open(&img).unwrap();
    assert_eq!(r.virtual_size(), 64 << 40);
    let mut buf = vec![0u8; 4096];
    r.read_at(63 << 40, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0x33));
    for name in ["out.qcow2", "out-stream.vmdk", "out.vhdx"] {
        assert_eq!(outcome_of(&done, name), &Outcome::Written, "{name}");
    }
    assert_bounded("64 TiB VHDX");
}

/// A dynamic VHD whose header asks for 16 Mi BAT entries (64 MiB of
/// table, in holes) for a 1 MiB disk, and one asking for 2^32 - 1.
#[test]
fn a_dynamic_vhd_with_absurd_bat_counts_is_refused_or_read_within_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.vhd");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        s(&src),
        "1M",
    ]);
    let b = std::fs::read(&src).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let dyn_at = be64(&b, 16) as usize;
    let with_entries = |name: &str, entries: u32, table_at: u64| {
        let mut x = b.clone();
        x[dyn_at + 16..dyn_at + 24].copy_from_slice(&table_at.to_be_bytes());
        x[dyn_at + 28..dyn_at + 32].copy_from_slice(&entries.to_be_bytes());
        let p = dir.path().join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.write_all_at(&x, 0).unwrap();
        // The table, past the old end: all 0xFF (unallocated) where read.
        f.write_all_at(&[0xFF; 4096], table_at).unwrap();
        let end = table_at + u64::from(entries) * 4;
        // A footer copy at the end of the file, as dynamic VHDs have.
        f.write_all_at(&x[..512], end).unwrap();
        drop(f);
        p
    };
    let huge = with_entries("bat.vhd", u32::MAX, 1 << 20);
    match open(&huge).map(|r| r.virtual_size()) {
        Err(Error::Corrupt { what, offset }) => {
            assert!(
                what.contains("bat.vhd") && what.contains("max table entries"),
                "{what}"
            );
            assert_eq!(offset, dyn_at as u64 + 28);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let img = with_entries("wide.vhd", 1 << 24, 1 << 20);
    let (data, done) = read_convert_copy(&img, dir.path());
    assert_eq!(data, 0);
    assert_eq!(outcome_of(&done, "out.raw"), &Outcome::Written);
    assert_bounded("dynamic VHD with 16 Mi BAT entries");
}

/// 2048 snapshot entries whose ids and names (64 KiB each) lie in holes of
/// the file: 256 MiB of strings for a few MiB on disk. Held to QEMU's
/// 64 MiB snapshot table.
#[test]
fn a_qcow2_snapshot_table_of_256_mib_of_names_is_refused_within_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("snaps.qcow2");
    qemu_ok(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    let mut b = std::fs::read(&img).unwrap();
    let table: u64 = 1 << 20;
    b[60..64].copy_from_slice(&2048u32.to_be_bytes());
    b[64..72].copy_from_slice(&table.to_be_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&b, 0).unwrap();
    let mut at = table;
    for _ in 0..2048 {
        let mut e = [0u8; 40];
        e[12..14].copy_from_slice(&u16::MAX.to_be_bytes()); // id
        e[14..16].copy_from_slice(&u16::MAX.to_be_bytes()); // name
        f.write_all_at(&e, at).unwrap();
        at = (at + 40 + 2 * 65535).div_ceil(8) * 8;
    }
    f.set_len(at + 4096).unwrap();
    drop(f);
    let opened = open(&img).map(|r| r.virtual_size());
    assert_bounded("qcow2 with 2048 snapshots of 128 KiB of names");
    match opened {
        Err(Error::Corrupt { what, .. }) => {
            assert!(
                what.contains("snaps.qcow2") && what.contains("snapshot table"),
                "{what}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// Writers refuse sizes past their format's limit before creating the
/// file, naming it and the limit.
#[test]
fn writers_refuse_sizes_past_their_format_limit_before_allocating() {
    use fluidcloud_migrators::image::qcow2::Qcow2Writer;
    use fluidcloud_migrators::image::vhd::DynamicVhdWriter;
    use fluidcloud_migrators::image::vhdx::VhdxWriter;
    use fluidcloud_migrators::image::vmdk::{MonolithicSparseWriter, StreamOptimizedWriter};
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| -> PathBuf { dir.path().join(n) };
    let huge = 1u64 << 61;
    let refused = |out: PathBuf, r: Result<(), Error>| {
        assert_eq!(outcome(&out, r), Outcome::Refused);
        assert!(!out.exists());
    };
    refused(
        p("a.qcow2"),
        Qcow2Writer::create(&p("a.qcow2"), huge, &Qcow2Options::default()).map(|_| ()),
    );
    refused(
        p("b.vmdk"),
        StreamOptimizedWriter::create(&p("b.vmdk"), huge).map(|_| ()),
    );
    refused(
        p("c.vmdk"),
        MonolithicSparseWriter::create(&p("c.vmdk"), huge).map(|_| ()),
    );
    refused(
        p("d.vhd"),
        DynamicVhdWriter::create(&p("d.vhd"), huge).map(|_| ()),
    );
    refused(
        p("e.vhdx"),
        VhdxWriter::create(&p("e.vhdx"), huge).map(|_| ()),
    );
    refused(
        p("f.vmdk"),
        StreamOptimizedWriter::create(&p("f.vmdk"), (64 << 40) + 512).map(|_| ()),
    );
    refused(
        p("g.vhd"),
        DynamicVhdWriter::create(&p("g.vhd"), (2040 << 30) + 1).map(|_| ()),
    );
    assert_bounded("writers");
}

#[test]
fn extents_of_a_huge_unallocated_qcow2_are_few_and_unallocated() {
    // Each L1 entry of a 2 MiB-cluster image maps 512 GiB: walking 2^61
    // bytes is 4 Mi L1 lookups, served from a bounded page cache.
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.qcow2");
    qemu_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        s(&img),
        "2E",
    ]);
    let r = open(&img).unwrap();
    let all: Vec<_> = extents(r.as_ref()).collect::<Result<_, _>>().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].kind, ExtentKind::Unallocated);
    assert_eq!(all[0].length, 1 << 61);
    assert_bounded("extents of an empty 2^61-byte qcow2");
}
