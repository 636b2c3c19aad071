//! The Merkle manifest of a volume and its sidecar file.
//!
//! A volume is cut into fixed chunks; each chunk's leaf is the BLAKE3 hash
//! of its bytes, and an all-zero chunk is recorded as [`Leaf::Zero`]
//! instead of a hash (its leaf hash is the hash of that many zero bytes,
//! computed once per length), so sparse volumes cost nothing to describe.
//! Parents are `BLAKE3(0x01 ‖ left ‖ right)`; an odd node at the end of a
//! level moves up unchanged. The root binds the shape:
//! `BLAKE3("fluidcloud-volume-merkle-v1\0" ‖ chunk_size LE64 ‖
//! virtual_size LE64 ‖ top)`, so two volumes with the same root have the
//! same size, chunking and content. `docs/volumes.md` gives the file format.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Format name in the sidecar file.
const FORMAT: &str = "fluidcloud-volume-merkle";
/// Version of the sidecar file (and of the root definition).
pub const MANIFEST_VERSION: u64 = 1;
/// Domain separation of the root hash.
const ROOT_DOMAIN: &[u8] = b"fluidcloud-volume-merkle-v1\0";

/// One chunk of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Leaf {
    /// Every byte of the chunk is zero.
    Zero,
    /// BLAKE3 of the chunk's bytes (which are not all zero).
    Data([u8; 32]),
}

/// The hash of `len` zero bytes.
pub(crate) fn zero_hash(len: u64) -> [u8; 32] {
    static ZEROS: [u8; 65536] = [0; 65536];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64);
        h.update(ZEROS.get(..n as usize).unwrap_or_default());
        left -= n;
    }
    *h.finalize().as_bytes()
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses 64 hex digits.
pub(crate) fn unhex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        *o = (d(*b.get(2 * i)?)? * 16 + d(*b.get(2 * i + 1)?)?) as u8;
    }
    Some(out)
}

/// Who and what a sidecar file describes: the target file's identity and,
/// when the copy that made it created the target, the creator's tag (the
/// marker that lets a rollback delete the target and nothing else).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Stamp {
    /// Tag of the run that created the target file, if one of ours did.
    pub(crate) created_by: Option<String>,
    /// `st_dev` of the target.
    pub(crate) dev: u64,
    /// `st_ino` of the target.
    pub(crate) ino: u64,
    /// Length of the target when the manifest was written.
    pub(crate) len: u64,
    /// Modification time of the target (ns since the epoch) then.
    pub(crate) mtime_ns: i128,
    /// Whether the manifest file was written in a later timestamp tick than
    /// the target's last write (so any later write changes the mtime).
    pub(crate) settled: bool,
}

/// Modification time of `m` in nanoseconds since the epoch.
pub(crate) fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec())
}

/// The Merkle manifest of a volume. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Chunk size in bytes (a power of two); the last chunk may be shorter.
    pub chunk_size: u64,
    /// Size of the volume in bytes.
    pub virtual_size: u64,
    /// One leaf per chunk, front to back.
    pub leaves: Vec<Leaf>,
}

impl Manifest {
    /// Number of chunks of a volume of `virtual_size` bytes.
    pub fn chunks_for(virtual_size: u64, chunk_size: u64) -> u64 {
        virtual_size.div_ceil(chunk_size.max(1))
    }

    /// Length of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.chunk_size);
        self.virtual_size.saturating_sub(start).min(self.chunk_size)
    }

    /// How many chunks are all zero.
    pub fn zero_chunks(&self) -> u64 {
        self.leaves.iter().filter(|l| **l == Leaf::Zero).count() as u64
    }

    /// The Merkle root. Zero leaves are hashed once per distinct length.
    pub fn root(&self) -> [u8; 32] {
        merkle_root(self.chunk_size, self.virtual_size, &self.leaves)
    }

    /// The Merkle root in lowercase hex.
    pub fn root_hex(&self) -> String {
        hex(&self.root())
    }

    /// Reads a manifest sidecar file, checking its version, shape and root.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if it cannot be read; [`Error::Corrupt`] if it is not
    /// a version-1 manifest or its stored root does not match its leaves.
    pub fn load(path: &Path) -> Result<Self> {
        load_with_stamp(path).map(|(m, _)| m)
    }
}

/// The root over `leaves` (see the module docs).
pub(crate) fn merkle_root(chunk_size: u64, virtual_size: u64, leaves: &[Leaf]) -> [u8; 32] {
    let full = zero_hash(chunk_size.min(virtual_size));
    let tail_len = virtual_size % chunk_size.max(1);
    let tail = if tail_len == 0 {
        full
    } else {
        zero_hash(tail_len)
    };
    let last = leaves.len().saturating_sub(1);
    let mut level: Vec<[u8; 32]> = leaves
        .iter()
        .enumerate()
        .map(|(i, l)| match l {
            Leaf::Data(h) => *h,
            Leaf::Zero if i == last => tail,
            Leaf::Zero => full,
        })
        .collect();
    if level.is_empty() {
        level.push(*blake3::hash(b"").as_bytes());
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => {
                    let mut h = blake3::Hasher::new();
                    h.update(&[1]);
                    h.update(l);
                    h.update(r);
                    *h.finalize().as_bytes()
                }
                [one] => *one,
                _ => [0; 32],
            })
            .collect();
    }
    let mut h = blake3::Hasher::new();
    h.update(ROOT_DOMAIN);
    h.update(&chunk_size.to_le_bytes());
    h.update(&virtual_size.to_le_bytes());
    h.update(level.first().unwrap_or(&[0; 32]));
    *h.finalize().as_bytes()
}

/// The manifest sidecar path of `target`: `.<name>.fcmerkle` beside it (a
/// dot-file, so site listings do not take it for a volume).
pub fn manifest_path(target: &Path) -> PathBuf {
    sidecar(target, ".fcmerkle")
}

/// `.<file name of target><suffix>`, in the target's directory.
pub(crate) fn sidecar(target: &Path, suffix: &str) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(target.file_name().unwrap_or_default());
    name.push(suffix);
    target.with_file_name(name)
}

fn corrupt(path: &Path, why: &str) -> Error {
    Error::Corrupt {
        what: format!("volume manifest {} ({why})", path.display()),
        offset: 0,
    }
}

/// Encodes leaves as JSON: a hex string per data chunk, a number `n` for a
/// run of `n` zero chunks.
fn encode_leaves(leaves: &[Leaf]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut zeros = 0u64;
    for l in leaves {
        match l {
            Leaf::Zero => zeros += 1,
            Leaf::Data(h) => {
                if zeros > 0 {
                    out.push(json!(zeros));
                    zeros = 0;
                }
                out.push(json!(hex(h)));
            }
        }
    }
    if zeros > 0 {
        out.push(json!(zeros));
    }
    out
}

fn decode_leaves(path: &Path, v: &Value, chunks: u64) -> Result<Vec<Leaf>> {
    let arr = v
        .as_array()
        .ok_or_else(|| corrupt(path, "`leaves` is not a list"))?;
    let mut out = Vec::new();
    for item in arr {
        if let Some(n) = item.as_u64() {
            if n == 0 || out.len() as u64 + n > chunks {
                return Err(corrupt(path, "bad zero run in `leaves`"));
            }
            out.resize(out.len() + n as usize, Leaf::Zero);
        } else {
            let h = item
                .as_str()
                .and_then(unhex32)
                .ok_or_else(|| corrupt(path, "a leaf is neither a hash nor a zero run"))?;
            out.push(Leaf::Data(h));
        }
        if out.len() as u64 > chunks {
            return Err(corrupt(path, "more leaves than chunks"));
        }
    }
    if out.len() as u64 != chunks {
        return Err(corrupt(path, "fewer leaves than chunks"));
    }
    Ok(out)
}

pub(crate) fn load_with_stamp(path: &Path) -> Result<(Manifest, Option<Stamp>)> {
    let text = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading volume manifest {}", path.display()), e))?;
    let v: Value =
        serde_json::from_slice(&text).map_err(|e| corrupt(path, &format!("not JSON: {e}")))?;
    if v.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(corrupt(path, "not a fluidcloud volume manifest"));
    }
    if v.get("version").and_then(Value::as_u64) != Some(MANIFEST_VERSION) {
        return Err(corrupt(path, "unknown version"));
    }
    if v.get("hash").and_then(Value::as_str) != Some("blake3") {
        return Err(corrupt(path, "unknown hash"));
    }
    let num = |k: &str| {
        v.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| corrupt(path, &format!("missing `{k}`")))
    };
    let chunk_size = num("chunk_size")?;
    let virtual_size = num("virtual_size")?;
    if !chunk_size.is_power_of_two() {
        return Err(corrupt(path, "chunk size is not a power of two"));
    }
    let chunks = Manifest::chunks_for(virtual_size, chunk_size);
    if num("chunks")? != chunks {
        return Err(corrupt(path, "chunk count does not match the sizes"));
    }
    let leaves = decode_leaves(path, v.get("leaves").unwrap_or(&Value::Null), chunks)?;
    let m = Manifest {
        chunk_size,
        virtual_size,
        leaves,
    };
    if v.get("root").and_then(Value::as_str) != Some(m.root_hex().as_str()) {
        return Err(corrupt(path, "root does not match the leaves"));
    }
    let stamp = v.get("target").filter(|t| t.is_object()).map(|t| {
        let n = |k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0);
        Stamp {
            created_by: t
                .get("created_by")
                .and_then(Value::as_str)
                .map(str::to_owned),
            dev: n("dev"),
            ino: n("ino"),
            len: n("len"),
            mtime_ns: t
                .get("mtime_ns")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1),
            settled: t.get("settled").and_then(Value::as_bool).unwrap_or(false),
        }
    });
    Ok((m, stamp))
}

fn manifest_json(m: &Manifest, stamp: &Stamp) -> Vec<u8> {
    let v = json!({
        "format": FORMAT,
        "version": MANIFEST_VERSION,
        "hash": "blake3",
        "chunk_size": m.chunk_size,
        "virtual_size": m.virtual_size,
        "chunks": m.leaves.len(),
        "zero_chunks": m.zero_chunks(),
        "root": m.root_hex(),
        "target": {
            "created_by": stamp.created_by,
            "dev": stamp.dev,
            "ino": stamp.ino,
            "len": stamp.len,
            "mtime_ns": stamp.mtime_ns.to_string(),
            "settled": stamp.settled,
        },
        "leaves": encode_leaves(&m.leaves),
    });
    let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
    out.push(b'\n');
    out
}

/// Syncs the directory holding `path`, so a create, rename or unlink in it
/// is durable.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// Writes the manifest of `target` (whose data is already synced)
/// atomically beside it, stamped with the target's current metadata.
///
/// The stamp is only trusted later if the manifest's own mtime is in a
/// later timestamp tick than the target's: then any write to the target
/// after this point moves its mtime away from the stamp (git's "racy
/// clean" problem). We wait up to about a second for the tick to pass.
pub(crate) fn store(target: &Path, m: &Manifest, created_by: Option<String>) -> Result<()> {
    let meta = std::fs::metadata(target)
        .map_err(|e| Error::io(format!("reading metadata of {}", target.display()), e))?;
    let mut stamp = Stamp {
        created_by,
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: mtime_ns(&meta),
        settled: false,
    };
    let path = manifest_path(target);
    let tmp = sidecar(target, ".fcmerkle.tmp");
    let io = |what: &str, e| Error::io(format!("{what} volume manifest {}", tmp.display()), e);
    for attempt in 0..200 {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io("creating", e))?;
        f.write_all(&manifest_json(m, &stamp))
            .map_err(|e| io("writing", e))?;
        let written = f.metadata().map_err(|e| io("reading metadata of", e))?;
        if stamp.settled || mtime_ns(&written) > stamp.mtime_ns {
            if stamp.settled {
                f.sync_all().map_err(|e| io("syncing", e))?;
                break;
            }
            // The tick has passed: rewrite once with `settled` set (the
            // rewrite's mtime is later still).
            stamp.settled = true;
            continue;
        }
        if attempt == 199 {
            f.sync_all().map_err(|e| io("syncing", e))?;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::rename(&tmp, &path).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", tmp.display(), path.display()),
            e,
        )
    })?;
    sync_parent(&path)
}

/// Whether `stamp` still describes the file with metadata `meta`.
pub(crate) fn stamp_matches(stamp: &Stamp, meta: &std::fs::Metadata, manifest: &Path) -> bool {
    let manifest_mtime = std::fs::metadata(manifest)
        .map(|m| mtime_ns(&m))
        .unwrap_or(i128::MIN);
    stamp.settled
        && stamp.dev == meta.dev()
        && stamp.ino == meta.ino()
        && stamp.len == meta.len()
        && stamp.mtime_ns == mtime_ns(meta)
        && manifest_mtime > stamp.mtime_ns
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let h = *blake3::hash(b"x").as_bytes();
        assert_eq!(unhex32(&hex(&h)), Some(h));
        assert_eq!(unhex32("zz"), None);
        assert_eq!(unhex32(&"g".repeat(64)), None);
    }

    #[test]
    fn zero_leaves_hash_like_zero_bytes() {
        let cs = 4096u64;
        let data = vec![0u8; 4096 + 100];
        let a = Manifest {
            chunk_size: cs,
            virtual_size: data.len() as u64,
            leaves: vec![Leaf::Zero, Leaf::Zero],
        };
        let b = Manifest {
            leaves: vec![
                Leaf::Data(*blake3::hash(&data[..4096]).as_bytes()),
                Leaf::Data(*blake3::hash(&data[4096..]).as_bytes()),
            ],
            ..a.clone()
        };
        assert_eq!(a.root(), b.root());
        let c = Manifest {
            virtual_size: 4096 + 101,
            ..a.clone()
        };
        assert_ne!(a.root(), c.root(), "the size is bound into the root");
    }

    #[test]
    fn leaves_encode_with_zero_runs() {
        let h = Leaf::Data([7; 32]);
        let leaves = vec![Leaf::Zero, Leaf::Zero, h, Leaf::Zero];
        let enc = Value::Array(encode_leaves(&leaves));
        assert_eq!(enc[0], json!(2));
        assert_eq!(enc[2], json!(1));
        let p = Path::new("m");
        assert_eq!(decode_leaves(p, &enc, 4).unwrap(), leaves);
        assert!(decode_leaves(p, &enc, 3).is_err());
        assert!(decode_leaves(p, &enc, 5).is_err());
        assert!(decode_leaves(p, &json!([0, "x"]), 1).is_err());
    }
}
