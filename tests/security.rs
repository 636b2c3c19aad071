//! Attacks on fluidcloud, each a test named after it (docs/security.md).
//!
//! A guest controls the bytes of its disks. Here it writes a qcow2 header
//! whose backing file is a host file into the start of its *raw* disk (the
//! class of QEMU's CVE-2008-2004), or an image names a backing file or
//! extent outside its directory. None of that may make fluidcloud read a
//! host file into an output.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fails, ok, qemu_img, relocate_shop, run, stderr, tree_digest};

/// Bytes no disk, image or report would hold by chance.
const SECRET: &[u8] = b"FLUIDCLOUD-HOST-SECRET-7f3a9c1e0b5d4e2f-do-not-leak";

/// A host file holding [`SECRET`], repeated, outside every site.
fn host_secret(dir: &Path) -> PathBuf {
    let p = dir.join("host-secret");
    std::fs::write(&p, SECRET.repeat(4096)).unwrap();
    p
}

/// A 1 MiB raw disk whose first bytes are a qcow2 header naming `backing`
/// as a raw backing file: what a guest can write to its own disk.
fn raw_disk_with_qcow2_header(path: &Path, backing: &Path) {
    let tmp = path.with_extension("header.qcow2");
    let out = Command::new(qemu_img())
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(backing)
        .args(["-F", "raw"])
        .arg(&tmp)
        .arg("1M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut disk = std::fs::read(&tmp).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    // Guest data after the header, so the disk is more than a header.
    disk.resize(1 << 20, 0);
    for (i, b) in disk.iter_mut().enumerate().skip(512 << 10) {
        *b = (i % 251) as u8;
    }
    std::fs::write(path, &disk).unwrap();
}

/// Every file under `dir` whose bytes contain [`SECRET`].
fn files_with_secret(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file()
                && std::fs::read(&p)
                    .unwrap()
                    .windows(SECRET.len())
                    .any(|w| w == SECRET)
            {
                found.push(p);
            }
        }
    }
    found
}

/// A demo whose web instance boots from `disk` (written by `make`) with
/// the `[format]` declaration `declared` (none when `None`).
fn demo_with_web_disk(
    name: &str,
    declared: Option<&str>,
    make: impl FnOnce(&Path),
) -> (PathBuf, String, PathBuf) {
    let (dir, config) = common::fresh_demo(name);
    let disk = dir.join("sites/dc-paris/images/web-disk.raw");
    make(&disk);
    let manifest = dir.join("sites/dc-paris/instances/web.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut text = text.replace("shop-web.qcow2", "web-disk.raw");
    let format_line = "\"web-disk.raw\" = \"qcow2\"";
    text = match declared {
        Some(f) => text.replace(format_line, &format!("\"web-disk.raw\" = \"{f}\"")),
        None => text.replace(&format!("[format]\n{format_line}\n"), ""),
    };
    std::fs::write(&manifest, text).unwrap();
    (dir, config, disk)
}

#[test]
fn a_raw_disk_beginning_with_a_qcow2_header_naming_a_host_file_relocates_as_its_raw_bytes() {
    let (dir, config, disk) = demo_with_web_disk("evil-raw", Some("raw"), |_| {});
    let secret = host_secret(&dir);
    raw_disk_with_qcow2_header(&disk, &secret);
    let source_bytes = std::fs::read(&disk).unwrap();

    let out = ok(&run(&relocate_shop(&config, "dc-paris", "edge-rennes")));
    assert!(out.contains("succeeded"), "{out}");

    // The target disk holds the source's raw bytes, header and all.
    let target = dir.join("sites/edge-rennes/images/web-disk.raw");
    assert_eq!(std::fs::read(&target).unwrap(), source_bytes);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        source_bytes,
        "the source was touched"
    );
    // And no byte of the host file is anywhere the relocation wrote.
    for d in ["sites/edge-rennes", ".fluidcloud"] {
        let leaked = files_with_secret(&dir.join(d));
        assert!(leaked.is_empty(), "host file bytes in {leaked:?}");
    }
}

#[test]
fn a_disk_without_a_declared_format_whose_bytes_look_like_qcow2_is_refused_before_anything_is_written()
 {
    let (dir, config, disk) = demo_with_web_disk("undeclared", None, |_| {});
    let secret = host_secret(&dir);
    raw_disk_with_qcow2_header(&disk, &secret);
    let before = tree_digest(&dir.join("sites"));

    let err = fails(&run(&relocate_shop(&config, "dc-paris", "edge-rennes")), 7);
    assert!(
        err.contains("disk web-disk.raw of instance web on site dc-paris has no declared format")
            && err.contains("looks like qcow2")
            && err.contains("[format]"),
        "{err}"
    );
    assert_eq!(
        tree_digest(&dir.join("sites")),
        before,
        "something was written"
    );
}

#[test]
fn a_disk_declared_qcow2_whose_content_is_raw_is_refused_not_reinterpreted() {
    let (dir, config, disk) = demo_with_web_disk("mislabelled", Some("qcow2"), |p| {
        std::fs::write(p, vec![7u8; 1 << 20]).unwrap();
    });
    let _ = disk;
    let before = tree_digest(&dir.join("sites"));
    let err = fails(&run(&relocate_shop(&config, "dc-paris", "edge-rennes")), 7);
    assert!(
        err.contains("is declared qcow2 but its content is raw"),
        "{err}"
    );
    assert_eq!(tree_digest(&dir.join("sites")), before);
}

#[test]
fn image_commands_read_a_guest_disk_as_raw_with_f_raw_and_refuse_its_host_backing_file_when_probed()
{
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let secret = host_secret(tmp.path());
    let guest = tmp.path().join("guest");
    std::fs::create_dir(&guest).unwrap();
    let disk = guest.join("disk.raw");
    raw_disk_with_qcow2_header(&disk, &secret);
    let d = disk.to_str().unwrap();

    // Probed, it looks like qcow2: the absolute backing file is refused.
    let o = run(&["image", "info", d]);
    let err = fails(&o, 10);
    assert!(
        err.contains("names backing file") && err.contains("host-secret"),
        "{err}"
    );
    let out = guest.join("out.raw");
    let o = run(&["image", "convert", d, out.to_str().unwrap(), "-O", "raw"]);
    fails(&o, 10);
    assert!(!out.exists(), "a refused conversion left an output");

    // Declared raw, it is read as the raw bytes it is.
    let info = ok(&run(&["--json", "image", "info", "-f", "raw", d]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual_size"], 1 << 20);
    ok(&run(&[
        "image",
        "convert",
        "-f",
        "raw",
        d,
        out.to_str().unwrap(),
        "-O",
        "raw",
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
    assert!(files_with_secret(&guest).is_empty());
}

#[test]
fn a_probed_image_with_a_backing_file_gets_a_warning() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = tmp.path().join("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let top = tmp.path().join("top.qcow2");
    let o = Command::new(qemu_img())
        .args(["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"])
        .arg(&top)
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = run(&["image", "info", top.to_str().unwrap()]);
    ok(&o);
    let err = stderr(&o);
    assert!(
        err.contains("warning:") && err.contains("base.raw") && err.contains("-f raw"),
        "{err}"
    );
    let o = run(&["image", "info", "-f", "qcow2", top.to_str().unwrap()]);
    ok(&o);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

/// A qcow2 image in `dir` whose backing file is named `name`.
fn qcow2_with_backing(dir: &Path, name: &str) -> PathBuf {
    let top = dir.join("top.qcow2");
    let _ = std::fs::remove_file(&top);
    let o = Command::new(qemu_img())
        .current_dir(dir)
        .args(["create", "-q", "-f", "qcow2", "-u", "-b", name, "-F", "raw"])
        .arg(&top)
        .arg("1M")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    top
}

#[test]
fn backing_files_escaping_their_directory_are_refused_by_absolute_path_dotdot_symlink_and_device() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let secret = host_secret(tmp.path());
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::os::unix::fs::symlink(&secret, images.join("innocent.raw")).unwrap();
    std::fs::write(images.join("fine.raw"), vec![3u8; 1 << 20]).unwrap();
    let cases = [
        (
            secret.to_str().unwrap().to_owned(),
            "absolute paths are refused",
        ),
        ("../host-secret".to_owned(), "outside"),
        ("innocent.raw".to_owned(), "outside"),
    ];
    for (name, why) in &cases {
        let top = qcow2_with_backing(&images, name);
        let err = fails(&run(&["image", "info", top.to_str().unwrap()]), 10);
        assert!(
            err.contains(why) && err.contains(name.as_str()),
            "{name}: {err}"
        );
        let out = images.join("out.raw");
        let o = run(&[
            "image",
            "convert",
            "-f",
            "qcow2",
            top.to_str().unwrap(),
            out.to_str().unwrap(),
            "-O",
            "raw",
        ]);
        fails(&o, 10);
        assert!(!out.exists());
    }
    // A device, even in a directory the user allows.
    let top = qcow2_with_backing(&images, "/dev/zero");
    let err = fails(
        &run(&[
            "image",
            "info",
            "--allow-backing-dir",
            "/dev",
            top.to_str().unwrap(),
        ]),
        10,
    );
    assert!(err.contains("not a regular file"), "{err}");
    // A relative name inside the directory is fine, and an allowed
    // directory admits an absolute name.
    let top = qcow2_with_backing(&images, "fine.raw");
    ok(&run(&["image", "info", top.to_str().unwrap()]));
    let top = qcow2_with_backing(&images, secret.to_str().unwrap());
    ok(&run(&[
        "image",
        "info",
        "--allow-backing-dir",
        tmp.path().to_str().unwrap(),
        top.to_str().unwrap(),
    ]));
}

#[test]
fn vmdk_extents_escaping_their_directory_are_refused() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let secret = host_secret(tmp.path());
    let images = tmp.path().join("images");
    std::fs::create_dir(&images).unwrap();
    for (extent, why) in [
        (
            secret.to_str().unwrap().to_owned(),
            "absolute paths are refused",
        ),
        ("../host-secret".to_owned(), "outside"),
        ("/dev/sda".to_owned(), "absolute paths are refused"),
    ] {
        let desc = images.join("disk.vmdk");
        std::fs::write(
            &desc,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"{extent}\" 0\n\n# The Disk Data Base\nddb.virtualHWVersion = \"4\"\n"
            ),
        )
        .unwrap();
        let err = fails(
            &run(&["image", "info", "-f", "vmdk", desc.to_str().unwrap()]),
            10,
        );
        assert!(
            err.contains("names extent") && err.contains(&extent) && err.contains(why),
            "{extent}: {err}"
        );
    }
}

/// Values that must appear in no output of a relocation.
const URL_PASSWORD: &str = "UrlPassw0rd-4b7c";
const YAML_PASSWORD: &str = "YamlPassw0rd-91df";
const CREDENTIAL_VALUE: &str = "CredentialValue-e5a0";

/// Every file under `dir` whose bytes contain any of `needles`, with the
/// needle.
fn files_containing(dir: &Path, needles: &[&str]) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                for n in needles {
                    if bytes.windows(n.len()).any(|w| w == n.as_bytes()) {
                        found.push((p.clone(), (*n).to_owned()));
                    }
                }
            }
        }
    }
    found
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn config_passwords_and_credential_values_appear_in_no_output_report_journal_or_log() {
    let (dir, config) = common::fresh_demo("secrets");
    let app = dir.join("sites/dc-paris/config/shop/app");
    // A URL password, a password key, and (under an innocent key) the value
    // of a variable the sites file names as a credential.
    let env = std::fs::read_to_string(app.join(".env")).unwrap().replace(
        "postgres://shop@db",
        &format!("postgres://shop:{URL_PASSWORD}@db"),
    ) + &format!("MEDIA_ID={CREDENTIAL_VALUE}\n");
    std::fs::write(app.join(".env"), env).unwrap();
    let yaml = std::fs::read_to_string(app.join("app.yaml"))
        .unwrap()
        .replace(
            "  name: shop\n",
            &format!("  name: shop\n  password: {YAML_PASSWORD}\n"),
        );
    std::fs::write(app.join("app.yaml"), yaml).unwrap();
    let sites = std::fs::read_to_string(&config).unwrap().replace(
        "[sites.edge-nantes]\n",
        "[sites.edge-nantes]\ncredentials = { token_env = \"NANTES_TOKEN\" }\n",
    );
    std::fs::write(&config, sites).unwrap();

    let fc = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fluidcloud"))
            .args(args)
            .current_dir(&dir)
            .env("NANTES_TOKEN", CREDENTIAL_VALUE)
            .env("RUST_LOG", "debug")
            .env_remove("FLUIDCLOUD_CONFIG")
            .output()
            .unwrap()
    };
    let o = fc(&relocate_shop(&config, "dc-paris", "edge-nantes"));
    let out = ok(&o);
    let id = common::relocation_id(&out);
    let report = ok(&fc(&["--config", &config, "report", &id]));
    let report_json = ok(&fc(&["--config", &config, "--json", "report", &id]));
    let status = ok(&fc(&["--config", &config, "--json", "status"]));
    let secrets = [URL_PASSWORD, YAML_PASSWORD, CREDENTIAL_VALUE];
    for (what, text) in [
        ("relocate stdout", out.clone()),
        ("relocate stderr (debug log)", stderr(&o)),
        ("report", report.clone()),
        ("report --json", report_json.clone()),
        ("status", status),
    ] {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows {s}:\n{text}");
        }
    }
    let leaked = files_containing(&dir.join(".fluidcloud"), &secrets);
    assert!(leaked.is_empty(), "in the state directory: {leaked:?}");
    // The report still shows that the secret lines changed (the database
    // host moved), with the secret replaced.
    assert!(
        report.contains("-DATABASE_URL=postgres://shop:«redacted»@db.shop.paris.internal")
            && report.contains("+DATABASE_URL=postgres://shop:«redacted»@db.shop.nantes.internal"),
        "{report}"
    );
    // The credential's value sits in the diff's context, under a key that
    // names nothing secret: it goes because the sites file names it.
    assert!(report.contains(" MEDIA_ID=«redacted»"), "{report}");
    // Only its owner reads the state.
    let state = dir.join(".fluidcloud");
    let rel = state.join("relocations").join(&id);
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("relocations")), 0o700);
    assert_eq!(mode(&rel), 0o700);
    for f in ["relocation.json", "report.json", "journal.sqlite"] {
        assert_eq!(mode(&rel.join(f)), 0o600, "{f}");
    }
}
