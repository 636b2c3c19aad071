//! Relocating a service whose guest keeps writing, on local sites: no
//! write is lost, boot disk included (docs/relocate.md, "The warm path").
//!
//! The guest is a real process: it holds the instance's run lock
//! (`instances/.NAME.run`, a shared `flock`) while the manifest says
//! `running`, and writes a counter to its raw boot image and to its volume,
//! each write synced, until the manifest says `stopped`. The local site's
//! stop returns only once it let go, as a hypervisor's does once the domain
//! is off.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{ok, run, same_bytes};

const MIB: u64 = 1 << 20;
/// The disks' size.
const DISK: u64 = 32 * MIB;
/// Where the counter is written, in both disks: four places in the first
/// two 4 MiB chunks of eight, so the final delta has two chunks to send.
const SLOTS: [u64; 4] = [MIB, 2 * MIB, 5 * MIB, 6 * MIB];

fn site_toml(name: &str, formats: &str) -> String {
    format!(
        r#"[sites.{name}]
kind = "local"
path = "sites/{name}"
jurisdiction = "EU/FR"
image_formats = {formats}
location = {{ region = "lab", latitude = 48.1, longitude = -1.7 }}
"#
    )
}

/// Sites `a` (the running `counter` service) and `b`, empty, accepting
/// `b_formats`; the sites file.
fn world(tag: &str, b_formats: &str) -> (PathBuf, String) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("live-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    fluidcloud_testkit::scratch(&dir);
    for s in ["a", "b"] {
        common::local_site(&dir.join("sites").join(s));
    }
    let a = dir.join("sites/a");
    common::random_file(&a.join("images/box.raw"), DISK);
    common::random_file(&a.join("volumes/box-data.raw"), DISK);
    std::fs::write(
        a.join("instances/box.toml"),
        r#"name = "box"
service = "counter"
state = "running"
vcpus = 1
memory_mib = 256
boot_image = "box.raw"
volumes = ["box-data.raw"]

[format]
"box.raw" = "raw"
"box-data.raw" = "raw"
"#,
    )
    .unwrap();
    let config = dir.join("fluidcloud.toml");
    std::fs::write(
        &config,
        format!(
            "{}{}",
            site_toml("a", r#"["raw"]"#),
            site_toml("b", b_formats)
        ),
    )
    .unwrap();
    (dir, config.to_str().unwrap().to_owned())
}

/// The guest: writes counter N (16 ASCII digits) at a slot of both disks,
/// synced, then records N in `last`; stops when the manifest says
/// `stopped`.
fn start_writer(dir: &Path) -> Child {
    let a = dir.join("sites/a");
    let script = format!(
        r#"i=0
while grep -q '^state = "running"' instances/box.toml; do
    i=$((i+1))
    case $((i % 4)) in 0) s={s0};; 1) s={s1};; 2) s={s2};; *) s={s3};; esac
    for f in images/box.raw volumes/box-data.raw; do
        printf '%016d' "$i" | dd of="$f" bs=16 seek="$s" conv=notrunc,fsync status=none
    done
    echo "$i" > ../../last.tmp && mv ../../last.tmp ../../last
done"#,
        s0 = SLOTS[0] / 16,
        s1 = SLOTS[1] / 16,
        s2 = SLOTS[2] / 16,
        s3 = SLOTS[3] / 16,
    );
    Command::new("flock")
        .arg("-s")
        .arg("instances/.box.run")
        .args(["sh", "-c", &script])
        .current_dir(&a)
        .spawn()
        .unwrap()
}

fn last(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("last"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// The largest counter value found at the slots of `disk`.
fn counter_in(disk: &Path) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(disk).unwrap();
    SLOTS
        .iter()
        .map(|&at| {
            let mut b = [0u8; 16];
            f.read_exact_at(&mut b, at).unwrap();
            std::str::from_utf8(&b)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0)
        })
        .max()
        .unwrap()
}

fn wait_for_writes(dir: &Path, n: u64) -> u64 {
    let t = Instant::now();
    while last(dir) < n {
        assert!(t.elapsed() < Duration::from_secs(60), "the writer is stuck");
        std::thread::sleep(Duration::from_millis(20));
    }
    last(dir)
}

/// When the target's manifest first says `running`, polled every 2 ms.
fn watch_target_start(dir: &Path) -> std::thread::JoinHandle<Instant> {
    let manifest = dir.join("sites/b/instances/box.toml");
    std::thread::spawn(move || {
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&manifest).unwrap_or_default();
            if text.contains("state = \"running\"") {
                return Instant::now();
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "the target never ran"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// The guest's last counter when the boot disk's pre-copy was complete
/// (its file appeared at the target under its name): anything the guest
/// wrote later must come with the final delta.
fn watch_precopy(dir: &Path, name: &str) -> std::thread::JoinHandle<u64> {
    let (dir, disk) = (dir.to_owned(), dir.join("sites/b/images").join(name));
    std::thread::spawn(move || {
        let t = Instant::now();
        while !disk.exists() {
            assert!(t.elapsed() < Duration::from_secs(300), "no pre-copy");
            std::thread::sleep(Duration::from_millis(1));
        }
        last(&dir)
    })
}

/// What the test saw of a relocation, independently of fluidcloud.
struct Seen {
    out: String,
    /// Writer exit (the guest stopped) → target manifest `running`.
    downtime: Duration,
    /// The guest's counter once the boot disk's pre-copy was complete.
    after_precopy: u64,
}

fn relocate_while_writing(tag: &str, b_formats: &str) -> (PathBuf, Seen) {
    let (dir, config) = world(tag, b_formats);
    let mut writer = start_writer(&dir);
    let before = wait_for_writes(&dir, 5);
    let exited = std::thread::spawn(move || {
        let status = writer.wait().unwrap();
        (status, Instant::now())
    });
    let started = watch_target_start(&dir);
    let boot = if b_formats.contains("qcow2") {
        "box.qcow2"
    } else {
        "box.raw"
    };
    let precopied = watch_precopy(&dir, boot);
    let out = ok(&run(&[
        "--config",
        &config,
        "relocate",
        "--from",
        "a",
        "--service",
        "counter",
        "--to",
        "b",
        "--yes",
    ]));
    // The stop waited for the guest: it has exited, on its own.
    assert!(
        exited.is_finished(),
        "the writer still runs after the relocation"
    );
    let (status, exit_at) = exited.join().unwrap();
    assert!(status.success(), "the writer failed: {status:?}");
    let start_at = started.join().unwrap();
    let last = last(&dir);
    assert!(
        last > before,
        "the guest wrote nothing during the relocation ({before} → {last})"
    );
    let downtime = start_at.saturating_duration_since(exit_at);
    let after_precopy = precopied.join().unwrap();
    (
        dir,
        Seen {
            out,
            downtime,
            after_precopy,
        },
    )
}

fn report(dir: &Path, out: &str) -> serde_json::Value {
    serde_json::from_str(&ok(&run(&[
        "--config",
        dir.join("fluidcloud.toml").to_str().unwrap(),
        "--json",
        "report",
        &common::relocation_id(out),
    ])))
    .unwrap()
}

#[test]
fn a_guest_writing_to_its_raw_boot_disk_and_volume_loses_no_write() {
    let (dir, seen) = relocate_while_writing("raw", r#"["raw"]"#);
    let out = &seen.out;
    let (a, b) = (dir.join("sites/a"), dir.join("sites/b"));
    let n = last(&dir);
    for disk in ["images/box.raw", "volumes/box-data.raw"] {
        // The last value the guest wrote before it stopped is at the
        // target, and the target is the stopped source, byte for byte.
        assert_eq!(counter_in(&b.join(disk)), n, "{disk}\n{out}");
        same_bytes(&a.join(disk), &b.join(disk));
    }
    // The boot disk went the warm way: a pre-copy, then a final delta
    // after the stop, which sent only what changed.
    assert!(
        out.contains("image:box.raw") && out.contains("final:box.raw"),
        "{out}"
    );
    let report = report(&dir, out);
    let fin = common::report_step(&report, "final:box.raw");
    let written = fin["bytes_written"].as_u64().unwrap();
    assert!(
        written <= 8 * MIB,
        "the final delta wrote {written} bytes of a 32 MiB disk whose guest changed two chunks"
    );
    // What the guest wrote after the pre-copy came with the final delta
    // (under load the guest may not get to write in between; and what it
    // wrote while the pre-copy ran may come with it too).
    assert!(
        written > 0 || n == seen.after_precopy,
        "the final delta wrote nothing; the guest counted {} after the pre-copy, {n} at its stop",
        seen.after_precopy
    );
    assert_eq!(
        common::report_step(&report, "image:box.raw")["state"],
        "succeeded"
    );

    // The downtime it reports is the one the test saw: from the guest's
    // exit to the target's manifest saying `running`, to a few
    // milliseconds (both sides poll), split into its stages.
    let reported = report["downtime_seconds"].as_f64().unwrap();
    let observed = seen.downtime.as_secs_f64();
    eprintln!("downtime: reported {reported:.3} s, observed {observed:.3} s");
    assert!(
        (reported - observed).abs() < 0.15,
        "reported {reported:.3} s, observed {observed:.3} s"
    );
    let stages: f64 = report["downtime_stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["seconds"].as_f64().unwrap())
        .sum();
    assert!((stages - reported).abs() < 1e-6, "{report}");
}

#[test]
fn a_boot_disk_converted_to_qcow2_is_patched_in_place_from_the_stopped_source() {
    let (dir, seen) = relocate_while_writing("qcow2", r#"["qcow2"]"#);
    let out = &seen.out;
    let (a, b) = (dir.join("sites/a"), dir.join("sites/b"));
    let n = last(&dir);
    // qemu-img, not fluidcloud, reads the target back.
    let raw = dir.join("target-boot.raw");
    let q = Command::new(common::qemu_img())
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(b.join("images/box.qcow2"))
        .arg(&raw)
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    assert_eq!(counter_in(&raw), n, "{out}");
    same_bytes(&a.join("images/box.raw"), &raw);
    assert_eq!(counter_in(&b.join("volumes/box-data.raw")), n);
    same_bytes(
        &a.join("volumes/box-data.raw"),
        &b.join("volumes/box-data.raw"),
    );
    // The disk belongs to this relocation, and no raw mirror of it is
    // left beside it.
    let rep = report(&dir, out);
    let owner = std::fs::read_to_string(b.join("images/.box.qcow2.fcowner")).unwrap();
    assert_eq!(
        owner.trim(),
        format!("{}/box.qcow2", rep["id"].as_str().unwrap()),
        "{owner}"
    );
    let left: Vec<_> = std::fs::read_dir(b.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".fcmirror") || n.ends_with(".fcconvert"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Patched in place, not converted again: the final step wrote the
    // counter's blocks, not the disk's data; a local site tracks nothing,
    // so both disks were re-hashed.
    let last_step = common::report_step(&rep, "final:box.raw");
    let written = last_step["bytes_written"].as_u64().unwrap();
    assert!(written <= 64 << 10, "{last_step}");
    assert!(written > 0 || n == seen.after_precopy, "{last_step}");
    assert_eq!(rep["final_delta"]["disks_rehashed"], 2, "{rep}");
    assert_eq!(rep["final_delta"]["disks_tracked"], 0, "{rep}");
}
