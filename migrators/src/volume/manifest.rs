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

use std::collections::BTreeMap;
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
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses 64 hex digits.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
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
///
/// Sparse: only chunks holding data have an entry, so a manifest costs
/// memory in proportion to a volume's data, never to its size (a header
/// may claim 2^61 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Chunk size in bytes (a power of two); the last chunk may be shorter.
    pub chunk_size: u64,
    /// Size of the volume in bytes.
    pub virtual_size: u64,
    /// BLAKE3 of each chunk that is not all zero, by chunk index; every
    /// other chunk is all zero.
    pub data: BTreeMap<u64, [u8; 32]>,
}

impl Manifest {
    /// An all-zero volume.
    pub fn zero(chunk_size: u64, virtual_size: u64) -> Self {
        Self {
            chunk_size,
            virtual_size,
            data: BTreeMap::new(),
        }
    }

    /// Number of chunks of a volume of `virtual_size` bytes.
    pub fn chunks_for(virtual_size: u64, chunk_size: u64) -> u64 {
        virtual_size.div_ceil(chunk_size.max(1))
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        Self::chunks_for(self.virtual_size, self.chunk_size)
    }

    /// Length of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.chunk_size);
        self.virtual_size.saturating_sub(start).min(self.chunk_size)
    }

    /// The leaf of chunk `index`.
    pub fn leaf(&self, index: u64) -> Leaf {
        self.data.get(&index).map_or(Leaf::Zero, |h| Leaf::Data(*h))
    }

    /// Records the leaf of chunk `index`.
    pub fn set(&mut self, index: u64, leaf: Leaf) {
        match leaf {
            Leaf::Zero => self.data.remove(&index),
            Leaf::Data(h) => self.data.insert(index, h),
        };
    }

    /// How many chunks are all zero.
    pub fn zero_chunks(&self) -> u64 {
        self.chunks() - self.data.len() as u64
    }

    /// The first chunk whose leaf differs from `other`'s.
    pub fn first_difference(&self, other: &Manifest) -> Option<u64> {
        let a = self.data.iter().map(|(i, h)| (*i, Some(h)));
        let b = other.data.iter().map(|(i, h)| (*i, Some(h)));
        let mut all: Vec<(u64, Option<&[u8; 32]>)> = a.chain(b).collect();
        all.sort_by_key(|(i, _)| *i);
        all.dedup_by_key(|(i, _)| *i);
        all.into_iter()
            .map(|(i, _)| i)
            .find(|&i| self.leaf(i) != other.leaf(i))
    }

    /// The Merkle root. Runs of zero chunks are hashed once per tree level.
    pub fn root(&self) -> [u8; 32] {
        merkle_root(self.chunk_size, self.virtual_size, &self.data)
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

fn parent_hash(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&[1]);
    h.update(l);
    h.update(r);
    *h.finalize().as_bytes()
}

/// The tree over the leaves, computed sparsely: level by level the leaves
/// pair up and an odd node at the end moves up unchanged (see the module
/// docs), but a subtree of whole all-zero chunks is looked up, not hashed.
struct Tree<'a> {
    n: u64,
    data: &'a BTreeMap<u64, [u8; 32]>,
    /// Hash of a complete all-zero subtree per level (full-size chunks).
    zero: Vec<[u8; 32]>,
    /// Leaf hash of the last chunk when it is zero (it may be shorter).
    tail: [u8; 32],
    tail_is_full: bool,
}

impl Tree<'_> {
    /// The node at `level` with index `i`: leaves `i << level` to
    /// `(i + 1) << level` (cut at `n`).
    fn node(&self, level: u32, i: u64) -> [u8; 32] {
        let lo = i << level;
        let hi = lo.saturating_add(1u64 << level).min(self.n);
        if self.data.range(lo..hi).next().is_none() {
            let complete = hi - lo == 1u64 << level && (hi < self.n || self.tail_is_full);
            if complete {
                return self.zero[level as usize];
            }
            if level == 0 {
                return self.tail;
            }
        }
        if level == 0 {
            return self.data.get(&lo).copied().unwrap_or(self.zero[0]);
        }
        let left = self.node(level - 1, 2 * i);
        if ((2 * i + 1) << (level - 1)) < self.n {
            parent_hash(&left, &self.node(level - 1, 2 * i + 1))
        } else {
            left
        }
    }
}

/// The root over the leaves in `data` (see the module docs).
pub(crate) fn merkle_root(
    chunk_size: u64,
    virtual_size: u64,
    data: &BTreeMap<u64, [u8; 32]>,
) -> [u8; 32] {
    let n = Manifest::chunks_for(virtual_size, chunk_size);
    let top = if n == 0 {
        *blake3::hash(b"").as_bytes()
    } else {
        let full = zero_hash(chunk_size.min(virtual_size));
        let tail_len = virtual_size % chunk_size.max(1);
        let height = if n == 1 {
            0
        } else {
            u64::BITS - (n - 1).leading_zeros()
        };
        let mut zero = vec![full];
        for l in 1..=height as usize {
            let below = zero[l - 1];
            zero.push(parent_hash(&below, &below));
        }
        let tree = Tree {
            n,
            data,
            zero,
            tail: if tail_len == 0 {
                full
            } else {
                zero_hash(tail_len)
            },
            tail_is_full: tail_len == 0,
        };
        tree.node(height, 0)
    };
    let mut h = blake3::Hasher::new();
    h.update(ROOT_DOMAIN);
    h.update(&chunk_size.to_le_bytes());
    h.update(&virtual_size.to_le_bytes());
    h.update(&top);
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
fn encode_leaves(m: &Manifest) -> Vec<Value> {
    let mut out = Vec::new();
    let mut next = 0u64;
    for (&i, h) in &m.data {
        if i > next {
            out.push(json!(i - next));
        }
        out.push(json!(hex(h)));
        next = i + 1;
    }
    if m.chunks() > next {
        out.push(json!(m.chunks() - next));
    }
    out
}

fn decode_leaves(path: &Path, v: &Value, chunks: u64) -> Result<BTreeMap<u64, [u8; 32]>> {
    let arr = v
        .as_array()
        .ok_or_else(|| corrupt(path, "`leaves` is not a list"))?;
    let mut out = BTreeMap::new();
    let mut pos = 0u64;
    for item in arr {
        if let Some(n) = item.as_u64() {
            if n == 0 || pos.checked_add(n).is_none_or(|end| end > chunks) {
                return Err(corrupt(path, "bad zero run in `leaves`"));
            }
            pos += n;
        } else {
            let h = item
                .as_str()
                .and_then(unhex32)
                .ok_or_else(|| corrupt(path, "a leaf is neither a hash nor a zero run"))?;
            if pos >= chunks {
                return Err(corrupt(path, "more leaves than chunks"));
            }
            out.insert(pos, h);
            pos += 1;
        }
    }
    if pos != chunks {
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
    let data = decode_leaves(path, v.get("leaves").unwrap_or(&Value::Null), chunks)?;
    let m = Manifest {
        chunk_size,
        virtual_size,
        data,
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
        "chunks": m.chunks(),
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
        "leaves": encode_leaves(m),
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

    /// The definition the sparse tree must match: every leaf hashed, then
    /// pairs level by level, an odd node moving up.
    fn dense_root(chunk_size: u64, virtual_size: u64, leaves: &[Leaf]) -> [u8; 32] {
        let n = leaves.len();
        let full = zero_hash(chunk_size.min(virtual_size));
        let tail_len = virtual_size % chunk_size;
        let tail = if tail_len == 0 {
            full
        } else {
            zero_hash(tail_len)
        };
        let mut level: Vec<[u8; 32]> = leaves
            .iter()
            .enumerate()
            .map(|(i, l)| match l {
                Leaf::Data(h) => *h,
                Leaf::Zero if i + 1 == n => tail,
                Leaf::Zero => full,
            })
            .collect();
        if level.is_empty() {
            level.push(*blake3::hash(b"").as_bytes());
        }
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|p| match p {
                    [l, r] => parent_hash(l, r),
                    [one] => *one,
                    _ => unreachable!(),
                })
                .collect();
        }
        let mut h = blake3::Hasher::new();
        h.update(ROOT_DOMAIN);
        h.update(&chunk_size.to_le_bytes());
        h.update(&virtual_size.to_le_bytes());
        h.update(&level[0]);
        *h.finalize().as_bytes()
    }

    #[test]
    fn the_sparse_root_equals_the_dense_definition() {
        let cs = 4096u64;
        let mut x = 7u64;
        for n in [0u64, 1, 2, 3, 5, 8, 13, 31, 64, 100] {
            for tail in [0u64, 1, 100] {
                if n == 0 && tail > 0 {
                    continue;
                }
                let size = if tail == 0 {
                    n * cs
                } else {
                    (n - 1) * cs + tail
                };
                let mut leaves = vec![Leaf::Zero; n as usize];
                let mut m = Manifest::zero(cs, size);
                for (i, l) in leaves.iter_mut().enumerate() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x.is_multiple_of(3) {
                        *l = Leaf::Data(*blake3::hash(&x.to_le_bytes()).as_bytes());
                        m.set(i as u64, *l);
                    }
                }
                assert_eq!(m.root(), dense_root(cs, size, &leaves), "n {n} tail {tail}");
            }
        }
    }

    #[test]
    fn a_huge_empty_volume_has_a_root_without_a_leaf_per_chunk() {
        // 2^61 bytes in 4 KiB chunks: 2^49 leaves, none of them stored.
        let mut m = Manifest::zero(4096, 1 << 61);
        let empty = m.root();
        m.set((1 << 49) - 1, Leaf::Data([9; 32]));
        assert_ne!(m.root(), empty);
        assert_eq!(m.zero_chunks(), (1 << 49) - 1);
        assert_eq!(
            m.first_difference(&Manifest::zero(4096, 1 << 61)),
            Some((1 << 49) - 1)
        );
    }

    #[test]
    fn zero_leaves_hash_like_zero_bytes() {
        let cs = 4096u64;
        let data = vec![0u8; 4096 + 100];
        let a = Manifest::zero(cs, data.len() as u64);
        let mut b = a.clone();
        b.data.insert(0, *blake3::hash(&data[..4096]).as_bytes());
        b.data.insert(1, *blake3::hash(&data[4096..]).as_bytes());
        assert_eq!(a.root(), b.root());
        let c = Manifest::zero(cs, 4096 + 101);
        assert_ne!(a.root(), c.root(), "the size is bound into the root");
    }

    #[test]
    fn leaves_encode_with_zero_runs() {
        let mut m = Manifest::zero(4096, 4 * 4096);
        m.set(2, Leaf::Data([7; 32]));
        let enc = Value::Array(encode_leaves(&m));
        assert_eq!(enc[0], json!(2));
        assert_eq!(enc[2], json!(1));
        let p = Path::new("m");
        assert_eq!(decode_leaves(p, &enc, 4).unwrap(), m.data);
        assert!(decode_leaves(p, &enc, 3).is_err());
        assert!(decode_leaves(p, &enc, 5).is_err());
        assert!(decode_leaves(p, &json!([0, "x"]), 1).is_err());
        // A run claiming more chunks than exist allocates nothing first.
        assert!(decode_leaves(p, &json!([u64::MAX]), 4).is_err());
    }
}
