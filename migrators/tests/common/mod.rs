//! Helpers shared by the integration tests: the qemu-img oracle and a
//! seeded PRNG.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The qemu-img binary. Tests fail (not skip) without it: the writer's
/// correctness is only meaningful against an independent reader.
pub fn qemu_img() -> PathBuf {
    let candidates = [PathBuf::from("/usr/bin/qemu-img")];
    for c in candidates {
        if c.is_file() {
            return c;
        }
    }
    panic!(
        "qemu-img not found at /usr/bin/qemu-img: these tests use it as the oracle; \
         install it (e.g. apt-get install qemu-utils)"
    );
}

/// Runs qemu-img with `args` and returns its output, whatever the exit code.
pub fn qemu(args: &[&str]) -> Output {
    Command::new(qemu_img()).args(args).output().unwrap()
}

/// Runs qemu-img with `args`, panicking with its stderr on failure.
pub fn qemu_ok(args: &[&str]) -> String {
    let out = qemu(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `qemu-io` on `img` with each of `cmds` (`-c`), panicking with its
/// output on failure.
pub fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = Vec::new();
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = Command::new("qemu-io")
        .args(&args)
        .arg(img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?} failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` exits 0, finds no errors and no leaked clusters.
pub fn assert_check_clean(img: &Path) {
    let out = qemu(&["check", "-f", "qcow2", s(img)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-img check {} exited {:?}:\n{stdout}\n{stderr}",
        img.display(),
        out.status.code()
    );
    assert!(
        stdout.contains("No errors were found"),
        "qemu-img check {}:\n{stdout}\n{stderr}",
        img.display()
    );
    assert!(
        !stdout.contains("leaked"),
        "leaked clusters in {}:\n{stdout}",
        img.display()
    );
}

/// `qemu-img check --output=json`.
pub fn check_json(img: &Path) -> serde_json::Value {
    let out = qemu(&["check", "-f", "qcow2", "--output=json", s(img)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `qemu-img info --output=json` with an explicit format.
pub fn info_json(img: &Path, format: &str) -> serde_json::Value {
    let text = qemu_ok(&["info", "-f", format, "--output=json", s(img)]);
    serde_json::from_str(&text).unwrap()
}

/// `qemu-img map --output=json`: `(start, length, data)` per extent.
pub fn map_json(img: &Path) -> Vec<(u64, u64, bool)> {
    let text = qemu_ok(&["map", "-f", "qcow2", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// Converts a qcow2 image to raw with qemu-img and returns the raw path.
pub fn convert_to_raw(img: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join(format!(
        "{}.raw",
        img.file_name().unwrap().to_str().unwrap()
    ));
    qemu_ok(&["convert", "-f", "qcow2", "-O", "raw", s(img), s(&raw)]);
    raw
}

/// Asserts two files have the same bytes, comparing in chunks, and names
/// the first differing offset.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    assert_eq!(
        la,
        lb,
        "{} and {} differ in length",
        a.display(),
        b.display()
    );
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut at = 0u64;
    while at < la {
        let n = usize::try_from((la - at).min(ba.len() as u64)).unwrap();
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            panic!(
                "{} and {} differ at offset {}",
                a.display(),
                b.display(),
                at + i as u64
            );
        }
        at += n as u64;
    }
}

/// Asserts a file holds exactly `expected`.
pub fn assert_file_is(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(got.len(), expected.len(), "length of {}", path.display());
    if got != expected {
        let i = got.iter().zip(expected).position(|(x, y)| x != y).unwrap();
        panic!(
            "{} differs from the expected bytes at offset {i}",
            path.display()
        );
    }
}

/// splitmix64: a tiny seeded PRNG, plenty for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    /// Fills `buf` with random bytes, none of whole 8-byte words zero.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64() | 1;
            chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
        }
    }
}
