//! Relocations of a running guest between real libvirt sites (two storage
//! pools of the libvirtd that `scripts/libvirt` starts) and a local site.
//!
//! The guest is `scripts/libvirt guest`: Debian's kernel and a busybox
//! initramfs whose init prints `FLUIDCLOUD-SUM <sha256 of /dev/vda>` on the
//! serial console. It runs at the source from a qcow2 disk; the target
//! accepts raw only, so the disk is converted; the target's boot check
//! starts it under QEMU's software emulation (TCG) and the checksum it
//! prints must equal the source's, and the test checks it again
//! independently (sha256sum of the raw data, the source console).
//!
//! These tests fail, never skip, when libvirtd cannot be started.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::libvirt::{Pool, console_log, libvirt_up, repo, sha256_file, state, virsh};
use common::{fails, ok, relocation_id, run};

const SUM_RE: &str = "FLUIDCLOUD-SUM ([0-9a-f]{64})";

/// One test's world: a work directory, source pool A with a running
/// guest, target pool B, a local site, and the sites file.
struct World {
    dir: PathBuf,
    config: String,
    a: Pool,
    b: Pool,
    /// SHA-256 of the guest's data disk contents.
    sum: String,
    /// The source domain.
    source: String,
}

fn console_sum(log: &Path, timeout: Duration) -> String {
    let re = regex::Regex::new(SUM_RE).unwrap();
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(c) = re.captures(&text) {
            return c[1].to_owned();
        }
        assert!(
            start.elapsed() < timeout,
            "no checksum on {} after {:?}:\n{text}",
            log.display(),
            timeout
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The source guest's data disk.
enum Disk {
    /// Patterned data with holes, as qcow2.
    Qcow2,
    /// Raw, declared raw, and beginning with a qcow2 header whose backing
    /// file is this host file: what a guest can write to its own disk.
    RawWithHeaderNaming(PathBuf),
}

impl World {
    fn new(tag: &str, b_boot_check: &str) -> Self {
        Self::with(tag, b_boot_check, Disk::Qcow2, false)
    }

    /// `writer`: the guest gets a second disk (4 MiB, raw) and keeps
    /// writing a counter to both (`fc.writer`, scripts/libvirt).
    fn with(tag: &str, b_boot_check: &str, disk: Disk, writer: bool) -> Self {
        libvirt_up();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("libvirt-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        fluidcloud_testkit::scratch(&dir);
        common::local_site(&dir.join("sites/loc"));
        let guest = dir.join("guest");
        let out = Command::new(repo().join("scripts/libvirt"))
            .arg("guest")
            .arg(&guest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/libvirt guest: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let a = Pool::new(format!("fct-{tag}-a"));
        let b = Pool::new(format!("fct-{tag}-b"));

        // The data disk: 6 MiB of patterned bytes with holes, as qcow2.
        let raw = dir.join("data.raw");
        let mut data = vec![0u8; 6 << 20];
        for (i, chunk) in data.chunks_mut(4096).enumerate() {
            if i % 3 != 1 {
                let seed = (i as u32).wrapping_mul(2_654_435_761) ^ tag.len() as u32;
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (seed.rotate_left(j as u32 % 32) >> 3) as u8 ^ j as u8;
                }
            }
        }
        let (disk_file, disk_type) = match &disk {
            Disk::Qcow2 => ("guest.qcow2", "qcow2"),
            Disk::RawWithHeaderNaming(_) => ("guest.raw", "raw"),
        };
        if let Disk::RawWithHeaderNaming(secret) = &disk {
            let header = dir.join("header.qcow2");
            let q = Command::new(common::qemu_img())
                .args(["create", "-q", "-f", "qcow2", "-b"])
                .arg(secret)
                .args(["-F", "raw"])
                .arg(&header)
                .arg("6M")
                .output()
                .unwrap();
            assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
            let h = std::fs::read(&header).unwrap();
            data[..h.len()].copy_from_slice(&h);
        }
        std::fs::write(&raw, &data).unwrap();
        let sum = sha256_file(&raw);
        let q = Command::new(common::qemu_img())
            .args(["convert", "-f", "raw", "-O", disk_type])
            .arg(&raw)
            .arg(a.dir.join(disk_file))
            .output()
            .unwrap();
        assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
        std::fs::copy(guest.join("vmlinuz"), a.dir.join("vmlinuz")).unwrap();
        std::fs::copy(guest.join("initrd.img"), a.dir.join("initrd.img")).unwrap();
        virsh(&["pool-refresh", &a.name]);

        // The source guest, defined by hand as on any libvirt host, with
        // fluidcloud's metadata naming its service.
        let source = format!("{}tiny", a.prefix());
        let _ = std::fs::remove_file(console_log(&source));
        let xml = format!(
            r#"<domain type='qemu'>
  <name>{source}</name>
  <metadata><fc:instance xmlns:fc='https://fluidcloud.dev/xmlns/instance/1'>
    <fc:service>tiny</fc:service><fc:hostname>tiny.lab.internal</fc:hostname>
  </fc:instance></metadata>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{a}/vmlinuz</kernel><initrd>{a}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet</cmdline></os>
  <features><acpi/></features>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='{disk_type}'/>
      <source file='{a}/{disk_file}'/><target dev='vda' bus='virtio'/></disk>
    <interface type='user'><mac address='52:54:00:0a:0b:0c'/><model type='virtio'/></interface>
    <serial type='file'><source path='{log}' append='off'/><target port='0'/></serial>
  </devices>
</domain>"#,
            a = a.dir.display(),
            log = console_log(&source).display()
        );
        let xml = if writer {
            let second = a.dir.join("second.raw");
            std::fs::write(&second, vec![0u8; 4 << 20]).unwrap();
            virsh(&["pool-refresh", &a.name]);
            xml.replace("quiet</cmdline>", "quiet fc.writer</cmdline>")
                .replace(
                    "<interface",
                    &format!(
                        "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\n      <source file='{}'/><target dev='vdb' bus='virtio'/></disk>\n    <interface",
                        second.display()
                    ),
                )
        } else {
            xml
        };
        let xml_path = dir.join("source.xml");
        std::fs::write(&xml_path, xml).unwrap();
        virsh(&["define", xml_path.to_str().unwrap()]);
        virsh(&["start", &source]);

        let lv = |name: &str, pool: &Pool, formats: &str, extra: &str| {
            format!(
                r#"[sites.{name}]
kind = "libvirt"
uri = "qemu:///system"
pool = "{pool}"
domain_prefix = "{prefix}"
shutdown_timeout_s = 0
accel = "tcg"
jurisdiction = "EU/FR"
image_formats = {formats}
location = {{ region = "lab", latitude = 48.1, longitude = -1.7 }}
{extra}
"#,
                pool = pool.name,
                prefix = pool.prefix()
            )
        };
        let config = format!(
            "{}{}{}",
            lv("lv-a", &a, r#"["qcow2", "raw"]"#, ""),
            lv(
                "lv-b",
                &b,
                r#"["raw"]"#,
                &format!(
                    "boot_check = {{ console = \"{b_boot_check}\", timeout_s = 300 }}\nadapt = {{ mac = \"generate\", disk_bus = \"virtio\" }}"
                )
            ),
            r#"[sites.loc]
kind = "local"
path = "sites/loc"
jurisdiction = "EU/FR"
image_formats = ["raw"]
location = { region = "lab", latitude = 48.1, longitude = -1.7 }
"#
        );
        let config_path = dir.join("fluidcloud.toml");
        std::fs::write(&config_path, config.replace('\\', "\\\\")).unwrap();
        Self {
            dir,
            config: config_path.to_str().unwrap().to_owned(),
            a,
            b,
            sum,
            source,
        }
    }

    /// Makes the target site `lv-b` accept `formats` (a TOML array).
    fn target_formats(&self, formats: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let at = text.find("[sites.lv-b]").unwrap();
        let (head, tail) = text.split_at(at);
        let tail = tail.replacen(
            r#"image_formats = ["raw"]"#,
            &format!("image_formats = {formats}"),
            1,
        );
        std::fs::write(&self.config, format!("{head}{tail}")).unwrap();
    }

    fn fc(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["--config", &self.config];
        all.extend_from_slice(args);
        common::run_in(&self.dir, &all)
    }

    fn relocate(&self, from: &str, to: &str) -> (String, String) {
        let t = Instant::now();
        let out = ok(&self.fc(&[
            "relocate",
            "--from",
            from,
            "--service",
            "tiny",
            "--to",
            to,
            "--yes",
        ]));
        eprintln!(
            "relocate {from} -> {to}: {:.1} s",
            t.elapsed().as_secs_f64()
        );
        (relocation_id(&out), out)
    }
}

fn qemu_format(p: &Path) -> String {
    let out = Command::new(common::qemu_img())
        .args(["info", "--output=json"])
        .arg(p)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["format"].as_str().unwrap().to_owned()
}

#[test]
fn a_running_guest_moves_between_two_libvirt_pools_boots_there_with_the_same_checksum_and_rolls_back()
 {
    let w = World::new("pools", SUM_RE);
    let t = Instant::now();
    let source_sum = console_sum(&console_log(&w.source), Duration::from_secs(300));
    eprintln!("source boot: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(source_sum, w.sum, "the source guest reads its disk");

    let (id, out) = w.relocate("lv-a", "lv-b");
    let target = format!("{}tiny", w.b.prefix());
    // The disk became a raw volume of pool B; kernel and initrd came along.
    let disk = w.b.dir.join("guest.raw");
    assert_eq!(qemu_format(&disk), "raw");
    assert_eq!(sha256_file(&disk), w.sum);
    let vols = virsh(&["vol-list", "--pool", &w.b.name]);
    for v in ["guest.raw", "vmlinuz", "initrd.img"] {
        assert!(vols.contains(v), "{v} not in pool B:\n{vols}");
    }
    // It booted at B under TCG and printed the same checksum.
    assert_eq!(state(&target), "running");
    assert_eq!(
        console_sum(&console_log(&target), Duration::from_secs(300)),
        w.sum
    );
    let xml = virsh(&["dumpxml", &target]);
    assert!(xml.contains("type='qemu'"), "{xml}");
    assert!(
        xml.contains(&format!("{}/guest.raw", w.b.dir.display())),
        "{xml}"
    );
    assert!(xml.contains("<driver name='qemu' type='raw'/>"), "{xml}");
    assert!(xml.contains("bus='virtio'"), "{xml}");
    // MAC policy `generate`: a new QEMU-range address.
    assert!(!xml.contains("52:54:00:0a:0b:0c"), "{xml}");
    assert!(xml.contains("<mac address='52:54:00:"), "{xml}");
    // The source is stopped (not deleted).
    assert_eq!(state(&w.source), "shut off", "{out}");
    assert!(w.a.dir.join("guest.qcow2").exists());

    // Rollback: the target is gone, the source runs again.
    let rb = ok(&w.fc(&["rollback", &id, "--force"]));
    assert_eq!(state(&target), "undefined", "{rb}");
    assert_eq!(state(&w.source), "running", "{rb}");
}

#[test]
fn a_guest_goes_from_libvirt_to_a_local_site_and_back_to_libvirt_with_the_same_checksum() {
    let w = World::new("local", SUM_RE);
    assert_eq!(
        console_sum(&console_log(&w.source), Duration::from_secs(300)),
        w.sum
    );
    // libvirt -> local: an instance manifest with the converted disk and
    // the boot files.
    w.relocate("lv-a", "loc");
    let loc = w.dir.join("sites/loc");
    let manifest = std::fs::read_to_string(loc.join("instances/tiny.toml")).unwrap();
    for want in [
        "boot_image = \"guest.raw\"",
        "kernel = \"vmlinuz\"",
        "initrd = \"initrd.img\"",
        "cmdline = \"console=ttyS0 quiet\"",
        "mac = \"52:54:00:0a:0b:0c\"",
        "state = \"running\"",
    ] {
        assert!(manifest.contains(want), "{want} missing:\n{manifest}");
    }
    assert_eq!(sha256_file(&loc.join("images/guest.raw")), w.sum);
    assert_eq!(state(&w.source), "shut off");

    // local -> libvirt: boots at B with the same checksum.
    w.relocate("loc", "lv-b");
    let target = format!("{}tiny", w.b.prefix());
    assert_eq!(state(&target), "running");
    assert_eq!(
        console_sum(&console_log(&target), Duration::from_secs(300)),
        w.sum
    );
    let manifest = std::fs::read_to_string(loc.join("instances/tiny.toml")).unwrap();
    assert!(manifest.contains("state = \"stopped\""), "{manifest}");
}

#[test]
fn a_failed_boot_check_leaves_the_source_running_and_rollback_cleans_the_target() {
    // B waits for a line the guest never prints.
    let w = World::new("nocheck", "FLUIDCLOUD-NEVER-PRINTED");
    let mut text = std::fs::read_to_string(w.dir.join("fluidcloud.toml")).unwrap();
    text = text.replace("timeout_s = 300", "timeout_s = 15");
    std::fs::write(w.dir.join("fluidcloud.toml"), text).unwrap();
    let out = w.fc(&[
        "relocate",
        "--from",
        "lv-a",
        "--service",
        "tiny",
        "--to",
        "lv-b",
        "--yes",
    ]);
    let err = fails(&out, 1);
    assert!(err.contains("verify"), "{err}");
    assert!(err.contains("FLUIDCLOUD-NEVER-PRINTED"), "{err}");
    // Verification failed, so the source was never stopped.
    assert_eq!(state(&w.source), "running", "{err}");
    let id = relocation_id(&common::stdout(&out));
    let target = format!("{}tiny", w.b.prefix());
    // The check booted a throw-away copy: the target itself never ran,
    // and the copy is gone.
    assert_eq!(state(&target), "shut off");
    assert_eq!(state(&format!("{target}-fc-trial")), "undefined");
    // The running source writes into its tracking overlay meanwhile...
    let tracking = format!("/var/lib/libvirt/fluidcloud-tracking/{}", w.source);
    assert!(virsh(&["dumpxml", &w.source]).contains(&tracking));
    ok(&w.fc(&["rollback", &id]));
    assert_eq!(state(&target), "undefined");
    assert_eq!(state(&w.source), "running");
    // ... which the rollback folds back into its disk while it runs.
    for xml in [
        virsh(&["dumpxml", &w.source]),
        virsh(&["dumpxml", "--inactive", &w.source]),
    ] {
        assert!(
            xml.contains(&format!("{}/guest.qcow2", w.a.dir.display()))
                && !xml.contains("fluidcloud-tracking"),
            "{xml}"
        );
    }
    assert!(!Path::new(&tracking).exists());
    let _ = run(&["--version"]);
}

#[test]
fn a_raw_guest_disk_beginning_with_a_qcow2_header_naming_a_host_file_moves_as_raw_and_boots() {
    let secret_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("libvirt-secret");
    std::fs::create_dir_all(&secret_dir).unwrap();
    fluidcloud_testkit::scratch(&secret_dir);
    let secret = secret_dir.join("host-secret");
    let marker = b"FLUIDCLOUD-LIBVIRT-HOST-SECRET-91c2";
    std::fs::write(&secret, marker.repeat(8192)).unwrap();
    let w = World::with("evil", SUM_RE, Disk::RawWithHeaderNaming(secret), false);
    assert_eq!(
        console_sum(&console_log(&w.source), Duration::from_secs(300)),
        w.sum,
        "the source guest reads its raw disk"
    );
    w.relocate("lv-a", "lv-b");
    let target = format!("{}tiny", w.b.prefix());
    let disk = w.b.dir.join("guest.raw");
    // Moved as the raw bytes it is, declared raw to the target's libvirt,
    // and the guest there reads the same disk.
    assert_eq!(sha256_file(&disk), w.sum);
    let xml = virsh(&["dumpxml", &target]);
    assert!(xml.contains("<driver name='qemu' type='raw'/>"), "{xml}");
    assert_eq!(
        console_sum(&console_log(&target), Duration::from_secs(300)),
        w.sum
    );
    let bytes = std::fs::read(&disk).unwrap();
    assert!(
        !bytes.windows(marker.len()).any(|x| x == marker),
        "host file bytes in the relocated disk"
    );
}

/// The last `FLUIDCLOUD-COUNT N` on a console log.
fn last_count(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .filter_map(|l| l.trim().strip_prefix("FLUIDCLOUD-COUNT "))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_count(log: &Path, n: u64, timeout: Duration) -> u64 {
    let t = Instant::now();
    loop {
        let c = last_count(log);
        if c >= n {
            return c;
        }
        assert!(
            t.elapsed() < timeout,
            "{} shows no FLUIDCLOUD-COUNT {n} after {timeout:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's counter at 1 MiB of `disk`, read by qemu-img (the oracle).
fn counter_in(disk: &Path, format: &str, scratch: &Path) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let raw = scratch.join(format!(
        "{}.counter.raw",
        disk.file_name().unwrap().to_string_lossy()
    ));
    let q = Command::new(common::qemu_img())
        .args(["convert", "-U", "-f", format, "-O", "raw"])
        .arg(disk)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let mut b = [0u8; 16];
    std::fs::File::open(&raw)
        .unwrap()
        .read_exact_at(&mut b, 1 << 20)
        .unwrap();
    std::str::from_utf8(&b).unwrap().parse().unwrap()
}

/// What a watcher saw of the boot check's throw-away instance.
#[derive(Debug, Default)]
struct TrialSeen {
    xml: String,
    target_state: String,
    disks_before: Vec<String>,
    disks_after: Vec<String>,
}

/// Watches for `trial` while the relocation runs: its XML and the real
/// target's state when it appears, and the target's disks' checksums then
/// and once the trial has written five counters to what it sees as disks.
fn watch_trial(trial: String, target: String, disks: Vec<PathBuf>) -> TrialSeen {
    let deadline = Instant::now() + Duration::from_secs(600);
    let sums = || disks.iter().map(|d| sha256_file(d)).collect::<Vec<_>>();
    while state(&trial) != "running" {
        assert!(Instant::now() < deadline, "no boot check instance appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut seen = TrialSeen {
        xml: virsh(&["dumpxml", &trial]),
        target_state: state(&target),
        disks_before: sums(),
        ..TrialSeen::default()
    };
    wait_count(&console_log(&trial), 5, Duration::from_secs(300));
    seen.disks_after = sums();
    seen
}

#[test]
fn a_guest_writing_to_its_boot_disk_and_volume_loses_no_write_and_its_boot_check_runs_unplugged_on_overlays()
 {
    // The check passes once the booted copy wrote five counters.
    let w = World::with("writer", "FLUIDCLOUD-COUNT 5", Disk::Qcow2, true);
    let before = wait_count(&console_log(&w.source), 3, Duration::from_secs(300));
    let target = format!("{}tiny", w.b.prefix());
    let trial = format!("{}tiny-fc-trial", w.b.prefix());
    let target_disks = vec![w.b.dir.join("guest.raw"), w.b.dir.join("second.raw")];
    let watcher = {
        let (trial, target, disks) = (trial.clone(), target.clone(), target_disks.clone());
        std::thread::spawn(move || watch_trial(trial, target, disks))
    };
    let (id, out) = w.relocate("lv-a", "lv-b");
    let seen = watcher.join().unwrap();

    // The final delta read what the guest wrote from the tracking overlays,
    // which are folded back: the source domain is on its own disks again.
    let report: serde_json::Value =
        serde_json::from_str(&ok(&w.fc(&["--json", "report", &id]))).unwrap();
    let fd = &report["final_delta"];
    assert_eq!(fd["disks_tracked"], 2, "{report}");
    assert_eq!(fd["disks_rehashed"], 0, "{report}");
    let changed = fd["changed_bytes"].as_u64().unwrap();
    assert!(changed > 0 && changed < 4 << 20, "{changed}");
    let xml = virsh(&["dumpxml", "--inactive", &w.source]);
    assert!(
        xml.contains(&format!("{}/guest.qcow2", w.a.dir.display()))
            && !xml.contains("fluidcloud-tracking")
            && !xml.contains("<backingStore"),
        "{xml}"
    );
    assert!(
        !Path::new(&format!(
            "/var/lib/libvirt/fluidcloud-tracking/{}",
            w.source
        ))
        .exists()
    );

    // The boot check: a copy with no network interface, on overlays, while
    // the real target stayed off; the target's disks unchanged by it.
    assert!(!seen.xml.contains("<interface"), "{}", seen.xml);
    assert!(
        seen.xml.contains("/var/lib/libvirt/fluidcloud-trials/")
            && seen.xml.contains("type='qcow2'"),
        "{}",
        seen.xml
    );
    assert_eq!(seen.target_state, "shut off");
    assert_eq!(
        seen.disks_before, seen.disks_after,
        "the boot check wrote the target's disks"
    );
    assert_eq!(state(&trial), "undefined", "the boot check's copy is left");
    assert!(!Path::new(&format!("/var/lib/libvirt/fluidcloud-trials/{trial}")).exists());

    // No write lost: the source's disks, read after its stop, hold a
    // counter at least as far as the last one it printed, written during
    // the relocation; and the target booted from exactly those bytes (it
    // prints its disks' SHA-256 at boot, before writing anything).
    assert_eq!(state(&w.source), "shut off", "{out}");
    let printed = last_count(&console_log(&w.source));
    let scratch = w.dir.clone();
    let boot_raw = scratch.join("source-boot.raw");
    let q = Command::new(common::qemu_img())
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(w.a.dir.join("guest.qcow2"))
        .arg(&boot_raw)
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let boot = counter_in(&boot_raw, "raw", &scratch);
    let vol = counter_in(&w.a.dir.join("second.raw"), "raw", &scratch);
    assert!(
        boot >= printed && boot > before,
        "{before} {printed} {boot}"
    );
    assert!(vol >= printed && vol > before, "{before} {printed} {vol}");
    let target_log = console_log(&target);
    assert_eq!(
        console_sum(&target_log, Duration::from_secs(300)),
        sha256_file(&boot_raw),
        "the target's boot disk is not the stopped source's"
    );
    let text = std::fs::read_to_string(&target_log).unwrap();
    let sumb = regex::Regex::new("FLUIDCLOUD-SUMB ([0-9a-f]{64})")
        .unwrap()
        .captures(&text)
        .map(|c| c[1].to_owned());
    assert_eq!(
        sumb.as_deref(),
        Some(sha256_file(&w.a.dir.join("second.raw")).as_str()),
        "the target's volume is not the stopped source's:\n{text}"
    );
    assert_eq!(state(&target), "running");
}

/// Seconds from the moment domain `source` stopped to the moment `log`
/// (the target's console) shows `marker`, polling both every 50 ms on this
/// test's own monotonic clock: (from when it was first seen shut off, from
/// when it was last seen running).
fn downtime_seen(source: &str, log: &Path, marker: &str) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(900);
    // The source stopped between the start of the last poll that saw it
    // running and the end of the first that saw it shut off: under load a
    // `virsh` call takes a while, and that interval is the stopwatch's
    // uncertainty.
    let mut stopped: Option<(Instant, Instant)> = None;
    let mut last_running = Instant::now();
    while Instant::now() < deadline {
        if stopped.is_none() {
            let asked = Instant::now();
            if state(source) == "shut off" {
                stopped = Some((Instant::now(), last_running));
            } else {
                last_running = asked;
            }
        }
        if let Some((seen_off, still_on)) = stopped
            && std::fs::read_to_string(log).is_ok_and(|t| t.contains(marker))
        {
            return (
                seen_off.elapsed().as_secs_f64(),
                still_on.elapsed().as_secs_f64(),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{source} never stopped, or {} never showed {marker}",
        log.display()
    );
}

/// `qemu-img ARGS` succeeds; its stdout.
fn qemu_img_ok(args: &[&str]) -> String {
    let q = Command::new(common::qemu_img())
        .args(args)
        .output()
        .unwrap();
    assert!(
        q.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&q.stdout),
        String::from_utf8_lossy(&q.stderr)
    );
    String::from_utf8_lossy(&q.stdout).into_owned()
}

#[test]
fn a_writing_guest_moves_to_a_qcow2_pool_whose_boot_disk_is_patched_in_place_from_its_change_set() {
    let w = World::with("writerq", "FLUIDCLOUD-COUNT 5", Disk::Qcow2, true);
    w.target_formats(r#"["qcow2"]"#);
    let before = wait_count(&console_log(&w.source), 3, Duration::from_secs(300));
    let target = format!("{}tiny", w.b.prefix());
    // An earlier run's console would show the marker at once.
    let _ = std::fs::remove_file(console_log(&target));
    let stopwatch = {
        let (source, log) = (w.source.clone(), console_log(&target));
        std::thread::spawn(move || downtime_seen(&source, &log, "FLUIDCLOUD-COUNT 5"))
    };
    let (id, _) = w.relocate("lv-a", "lv-b");
    let report: serde_json::Value =
        serde_json::from_str(&ok(&w.fc(&["--json", "report", &id]))).unwrap();
    // The downtime reported is the one seen from outside: the source shut
    // off until the target's console shows its boot check passing.
    let (low, high) = stopwatch.join().unwrap();
    let reported = report["downtime_seconds"].as_f64().unwrap();
    eprintln!("downtime: reported {reported:.2} s, seen {low:.2} to {high:.2} s");
    assert!(
        reported > low - 0.5 && reported < high + 0.5,
        "reported {reported} s, seen {low} to {high} s"
    );
    assert_eq!(report["final_delta"]["disks_tracked"], 2, "{report}");
    assert_eq!(report["final_delta"]["disks_rehashed"], 0, "{report}");
    // The boot disk's final delta read only the 4 MiB chunk the counter
    // lives in, not the 6 MiB disk, and patched the qcow2 in place.
    let last = common::report_step(&report, "final:guest.qcow2");
    assert_eq!(last["migrator"], "disk-transfer");
    let read = last["bytes_read"].as_u64().unwrap();
    assert!(read > 0 && read <= 4 << 20, "{last}");
    let written = last["bytes_written"].as_u64().unwrap();
    assert!(written > 0 && written <= 64 << 10, "{last}");

    // The target's qcow2 is clean (its guest runs and writes on), and it
    // booted from exactly the stopped source's bytes: it prints its disk's
    // SHA-256 at boot, before writing anything.
    let target_disk = w.b.dir.join("guest.qcow2");
    qemu_img_ok(&["check", "-U", "-f", "qcow2", target_disk.to_str().unwrap()]);
    let source_disk = w.a.dir.join("guest.qcow2");
    let source_raw = w.dir.join("source-boot.raw");
    qemu_img_ok(&[
        "convert",
        "-U",
        "-f",
        "qcow2",
        "-O",
        "raw",
        source_disk.to_str().unwrap(),
        source_raw.to_str().unwrap(),
    ]);
    assert_eq!(
        console_sum(&console_log(&target), Duration::from_secs(300)),
        sha256_file(&source_raw),
        "the target's boot disk is not the stopped source's"
    );
    // Which holds the last counter the guest printed before it stopped.
    let printed = last_count(&console_log(&w.source));
    let boot = counter_in(&source_raw, "raw", &w.dir);
    assert!(
        boot >= printed && boot > before,
        "{before} {printed} {boot}"
    );
    let xml = virsh(&["dumpxml", "--inactive", &w.source]);
    assert!(!xml.contains("fluidcloud-tracking"), "{xml}");
}

#[test]
fn a_guest_moves_between_pools_served_by_agents_in_two_namespaces_and_boots_with_its_checksum() {
    let w = World::new("agents", SUM_RE);
    let source_sum = console_sum(&console_log(&w.source), Duration::from_secs(300));
    assert_eq!(source_sum, w.sum, "the source guest reads its disk");
    let agents =
        common::libvirt::AgentPair::start("fc-lv-agents", Path::new(&w.config), &w.dir, &w.a, &w.b);
    let out = agents.fc(&[
        "relocate",
        "--from",
        "lv-a",
        "--service",
        "tiny",
        "--to",
        "lv-b",
        "--yes",
    ]);
    let text = ok(&out);
    assert!(text.contains("disk-transfer"), "{text}");
    // The source agent tracked the guest's writes; the final delta between
    // the agents looked only at the chunks they touched.
    let id = common::relocation_id(&text);
    let report: serde_json::Value =
        serde_json::from_str(&ok(&agents.fc(&["--json", "report", &id]))).unwrap();
    drop(agents);
    assert_eq!(report["final_delta"]["disks_rehashed"], 0, "{report}");
    assert!(
        report["final_delta"]["disks_tracked"].as_u64().unwrap() >= 1,
        "{report}"
    );
    let last = common::report_step(&report, "final:guest.qcow2");
    assert_eq!(last["state"], "succeeded", "{last}");
    if report["final_delta"]["changed_bytes"] == 0 {
        assert_eq!(last["bytes_written"], 0, "the guest wrote nothing: {last}");
    }
    let target = format!("{}tiny", w.b.prefix());
    let disk = w.b.dir.join("guest.raw");
    assert_eq!(qemu_format(&disk), "raw");
    assert_eq!(sha256_file(&disk), w.sum);
    let vols = virsh(&["vol-list", "--pool", &w.b.name]);
    for v in ["guest.raw", "vmlinuz", "initrd.img"] {
        assert!(vols.contains(v), "{v} not in pool B:\n{vols}");
    }
    assert_eq!(state(&target), "running");
    assert_eq!(state(&w.source), "shut off");
    assert_eq!(
        console_sum(&console_log(&target), Duration::from_secs(300)),
        w.sum
    );
}
