//! Disks moved between two sites that both run in this process: the same
//! chunks, leaves and Merkle root as an agent-to-agent transfer, read
//! through the source site's [`Disks`] and written through the target's,
//! with no network between them.
//!
//! Each worker takes the next chunk, hashes it at the source and at the
//! target, and writes it only when they differ (zeros as holes), then
//! reads the written chunk back and checks its hash. A repeated run (the
//! final delta, a resumed step) therefore writes only what changed. Given
//! the chunks a change set names and the leaves of the last verified run
//! ([`Leaves`]), it looks at those chunks alone: the source wrote nowhere
//! else since, and nothing else writes a disk this relocation owns.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use fluidcloud_migrators::image::ImageReader;
use fluidcloud_migrators::volume::{Leaf, Manifest};
use fluidcloud_plugins::{CancelFlag, Error, Result};
use serde::{Deserialize, Serialize};

use super::{CHUNK, DiskRef, PullState, PullStatus, chunk_len, chunks_of, hex, read_leaf, unhex32};
use crate::driver::{DiskWriter, Disks};

/// One disk to move between two sites of this process.
pub struct LocalMove<'a> {
    /// The source site's disks.
    pub source: &'a dyn Disks,
    /// The disk there.
    pub from: &'a DiskRef,
    /// The target site's disks.
    pub target: &'a dyn Disks,
    /// The disk to write there.
    pub into: &'a DiskRef,
    /// Creator tag of the written disk (`RELOCATION/STEP`).
    pub owner: &'a str,
    /// Threads reading, hashing and writing chunks.
    pub workers: usize,
    /// The only chunks that can differ, with the leaves of the last
    /// verified run (a change set after the pre-copy); `None`: all.
    pub since: Option<(Vec<u64>, Manifest)>,
    /// Stops the move at the next chunk.
    pub cancel: &'a CancelFlag,
    /// Chunks settled, of all chunks looked at.
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
}

/// What a move did.
#[derive(Debug)]
pub struct Moved {
    /// As an agent-to-agent pull reports it: chunks written and kept, the
    /// verified root, the written disk's record.
    pub status: PullStatus,
    /// The leaves the root is of.
    pub leaves: Manifest,
    /// Bytes of data read at the source.
    pub read: u64,
}

/// What one chunk came to.
enum Outcome {
    Same,
    Zeroed,
    Written(u64),
}

/// The shared state of a move's workers.
struct Work<'a> {
    reader: &'a dyn ImageReader,
    current: &'a dyn ImageReader,
    writer: &'a dyn DiskWriter,
    todo: &'a [u64],
    next: AtomicUsize,
    leaves: Mutex<Manifest>,
    status: Mutex<PullStatus>,
    read: AtomicU64,
}

/// Moves `m.from` into `m.into`. The written disk's status (chunks
/// written and kept, the verified Merkle root of the source), and the
/// leaves that root is of.
///
/// # Errors
/// Either site's refusal (a disk someone else created, of another size),
/// I/O errors naming the disk, a chunk that reads back other than it was
/// written (`Corrupt`), or `Transient` when cancelled.
pub fn run(m: &LocalMove<'_>) -> Result<Moved> {
    let started = Instant::now();
    let reader = m.source.read(m.from.store, &m.from.name, m.from.format)?;
    let size = reader.virtual_size();
    let writer = m
        .target
        .write(m.into.store, &m.into.name, m.into.format, size, m.owner)?;
    let current = writer.current()?;
    let (todo, base) = match &m.since {
        Some((chunks, base)) if base.virtual_size == size => (chunks.clone(), base.clone()),
        _ => ((0..chunks_of(size)).collect(), Manifest::zero(CHUNK, size)),
    };
    let work = Work {
        reader: reader.as_ref(),
        current: current.as_ref(),
        writer: writer.as_ref(),
        todo: &todo,
        next: AtomicUsize::new(0),
        leaves: Mutex::new(base),
        status: Mutex::new(PullStatus {
            state: Some(PullState::Running),
            chunks: chunks_of(size),
            ..PullStatus::default()
        }),
        read: AtomicU64::new(0),
    };
    let first_error = std::thread::scope(|s| {
        let handles: Vec<_> = (0..m.workers.max(1))
            .map(|_| s.spawn(|| work.worker(m)))
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or_else(|_| Err(panicked())).err())
            .next()
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let leaves = work
        .leaves
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let record = writer.finish()?;
    let mut status = work
        .status
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    status.done = status.chunks;
    status.state = Some(PullState::Succeeded);
    status.elapsed_s = started.elapsed().as_secs_f64();
    status.root = Some(leaves.root_hex());
    status.record = Some(record);
    Ok(Moved {
        status,
        leaves,
        read: work.read.into_inner(),
    })
}

fn panicked() -> Error {
    Error::Transient("a transfer worker stopped unexpectedly".into())
}

impl Work<'_> {
    fn worker(&self, m: &LocalMove<'_>) -> Result<()> {
        let (mut src, mut dst) = (Vec::new(), Vec::new());
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&index) = self.todo.get(n) else {
                return Ok(());
            };
            if m.cancel.is_cancelled() {
                return Err(Error::Transient(format!(
                    "cancelled while moving {}; a resumed step sends only what is missing",
                    m.from
                )));
            }
            let (leaf, outcome) = self.chunk(m, index, &mut src, &mut dst)?;
            self.leaves
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .set(index, leaf);
            let mut s = self.status.lock().unwrap_or_else(PoisonError::into_inner);
            match outcome {
                Outcome::Same => s.same_chunks += 1,
                Outcome::Zeroed => {}
                Outcome::Written(len) => {
                    s.data_chunks += 1;
                    s.data_bytes += len;
                }
            }
            s.done += 1;
            (m.progress)(s.done, self.todo.len() as u64);
        }
    }

    /// Chunk `index`: its source leaf, and what it took to make the target
    /// hold it.
    fn chunk(
        &self,
        m: &LocalMove<'_>,
        index: u64,
        src: &mut Vec<u8>,
        dst: &mut Vec<u8>,
    ) -> Result<(Leaf, Outcome)> {
        let size = self.reader.virtual_size();
        let leaf = read_leaf(self.reader, index, src)?;
        let data = data_in(self.reader, index * CHUNK, chunk_len(size, index))?;
        self.read.fetch_add(data, Ordering::Relaxed);
        let held = read_leaf(self.current, index, dst)?;
        if held == leaf {
            return Ok((leaf, Outcome::Same));
        }
        let (offset, len) = (index * CHUNK, chunk_len(size, index));
        let outcome = match leaf {
            Leaf::Zero => {
                self.writer.zero(offset, len)?;
                Outcome::Zeroed
            }
            Leaf::Data(_) => {
                let bytes = src.get(..len as usize).unwrap_or_default();
                // `dst` holds the target's chunk when it has data there,
                // else it is zeros: only the blocks that differ are
                // written.
                let held = matches!(held, Leaf::Data(_)).then_some(dst.as_slice());
                Outcome::Written(self.write_changed(offset, bytes, held)?)
            }
        };
        if read_leaf(self.current, index, dst)? != leaf {
            return Err(Error::Corrupt {
                what: format!(
                    "{} at the target: a chunk read back other than written",
                    m.into
                ),
                offset,
            });
        }
        Ok((leaf, outcome))
    }
}

/// Granularity of a chunk's rewrite onto a target that holds data there:
/// the guest's writes since the pre-copy are usually far smaller than a
/// chunk. Neighbouring blocks that differ are written at once.
const BLOCK: usize = 4 << 10;

impl Work<'_> {
    /// Writes the runs of blocks of `bytes` that differ from what the
    /// target `held` at `offset` (`None`: zeros). The bytes written.
    fn write_changed(&self, offset: u64, bytes: &[u8], held: Option<&[u8]>) -> Result<u64> {
        let held = held.filter(|h| h.len() >= bytes.len());
        let differs = |b: usize| {
            let r = b * BLOCK..((b + 1) * BLOCK).min(bytes.len());
            let new = bytes.get(r.clone()).unwrap_or_default();
            match held {
                Some(h) => Some(new) != h.get(r),
                None => new.iter().any(|&x| x != 0),
            }
        };
        let blocks = bytes.len().div_ceil(BLOCK);
        let (mut written, mut b) = (0, 0);
        while b < blocks {
            if !differs(b) {
                b += 1;
                continue;
            }
            let first = b;
            while b < blocks && differs(b) {
                b += 1;
            }
            let run = bytes
                .get(first * BLOCK..(b * BLOCK).min(bytes.len()))
                .unwrap_or_default();
            self.writer.write_at(offset + (first * BLOCK) as u64, run)?;
            written += run.len() as u64;
        }
        Ok(written)
    }
}

/// Bytes of `offset..offset + len` the reader's extent map says hold data
/// (what reading the chunk costs).
fn data_in(reader: &dyn ImageReader, offset: u64, len: u64) -> Result<u64> {
    let (end, mut pos, mut data) = (offset + len, offset, 0);
    while pos < end {
        let e = reader.extent_at(pos).map_err(Error::from)?;
        let e_end = e.end().min(end);
        if e_end <= pos {
            break;
        }
        if e.kind == fluidcloud_migrators::image::ExtentKind::Data {
            data += e_end - pos;
        }
        pos = e_end;
    }
    Ok(data)
}

/// The leaves of a disk as the last verified run left it, kept by the
/// orchestrator so that a final delta with a change set need look at the
/// changed chunks alone.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Leaves {
    virtual_size: u64,
    chunk: u64,
    /// Chunks holding data, by index: their BLAKE3, hex.
    data: BTreeMap<u64, String>,
    /// Creator tag of the transfer that left them (kept by agents, whose
    /// disks outlive a relocation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

impl Leaves {
    /// The leaves stored at `path`, when there are any of this chunk size.
    ///
    /// # Errors
    /// An unreadable or malformed file, naming it.
    pub fn load(path: &Path) -> Result<Option<Manifest>> {
        Self::load_for(path, None)
    }

    /// As [`Self::load`], and only when a transfer of the same relocation
    /// as `owner` left them (any, without `owner`).
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn load_for(path: &Path, owner: Option<&str>) -> Result<Option<Manifest>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let bad = |why: String| Error::Corrupt {
            what: format!("leaves file {}: {why}", path.display()),
            offset: 0,
        };
        let l: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let same = match (owner, &l.owner) {
            (None, _) => true,
            (Some(want), Some(had)) => fluidcloud_migrators::owner::same_relocation(had, want),
            (Some(_), None) => false,
        };
        if l.chunk != CHUNK || !same {
            return Ok(None);
        }
        let mut m = Manifest::zero(CHUNK, l.virtual_size);
        for (i, h) in &l.data {
            if *i >= chunks_of(l.virtual_size) {
                return Err(bad(format!("chunk {i} is past the disk's end")));
            }
            let h = unhex32(h).ok_or_else(|| bad(format!("chunk {i}: not a BLAKE3 hash")))?;
            m.set(*i, Leaf::Data(h));
        }
        Ok(Some(m))
    }

    /// Stores `m` at `path`, left by the transfer of `owner`, replacing
    /// it whole.
    ///
    /// # Errors
    /// I/O errors naming the file.
    pub fn store(path: &Path, m: &Manifest, owner: Option<&str>) -> Result<()> {
        let l = Self {
            virtual_size: m.virtual_size,
            chunk: m.chunk_size,
            data: m.data.iter().map(|(i, h)| (*i, hex(h))).collect(),
            owner: owner.map(str::to_owned),
        };
        let text = serde_json::to_vec(&l).map_err(|e| Error::Transient(e.to_string()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        crate::relocate::store::write_atomic(path, &text).map_err(crate::relocate::steps::to_sdk)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::FileExt as _;

    use fluidcloud_migrators::image::OpenOptions;
    use fluidcloud_plugins::ImageFormat;

    use super::*;
    use crate::driver::DiskStore;
    use crate::drivers::filedisk::FileDisks;

    const MIB: u64 = 1 << 20;

    struct Sites {
        _dir: tempfile::TempDir,
        a: FileDisks,
        b: FileDisks,
        a_vol: std::path::PathBuf,
        b_vol: std::path::PathBuf,
    }

    fn sites() -> Sites {
        let dir = tempfile::tempdir().unwrap();
        let (a_vol, b_vol) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&a_vol, &b_vol] {
            std::fs::create_dir_all(d).unwrap();
        }
        Sites {
            a: FileDisks::new("a", a_vol.clone(), a_vol.clone(), Vec::new()),
            b: FileDisks::new("b", b_vol.clone(), b_vol.clone(), Vec::new()),
            _dir: dir,
            a_vol,
            b_vol,
        }
    }

    /// A 20 MiB raw disk: data in chunks 0 and 2 (part of it), zeros
    /// written in chunk 1, holes elsewhere.
    fn source(path: &Path) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(20 * MIB).unwrap();
        let data: Vec<u8> = (0..3 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        f.write_all_at(&vec![0u8; MIB as usize], 4 * MIB).unwrap();
        f.write_all_at(&data[..MIB as usize], 9 * MIB).unwrap();
    }

    fn disk(name: &str, format: ImageFormat) -> DiskRef {
        DiskRef {
            store: DiskStore::Volume,
            name: name.into(),
            format,
        }
    }

    fn guest_bytes(path: &Path, format: ImageFormat) -> Vec<u8> {
        let r = fluidcloud_migrators::image::open_with(
            path,
            &OpenOptions {
                format: Some(format),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; r.virtual_size() as usize];
        r.read_at(0, &mut buf).unwrap();
        buf
    }

    fn move_once(s: &Sites, into: &DiskRef, since: Option<(Vec<u64>, Manifest)>) -> Moved {
        let cancel = CancelFlag::new();
        run(&LocalMove {
            source: &s.a,
            from: &disk("d.raw", ImageFormat::Raw),
            target: &s.b,
            into,
            owner: "reloc-1/d",
            workers: 3,
            since,
            cancel: &cancel,
            progress: &|_, _| {},
        })
        .unwrap()
    }

    #[test]
    fn a_disk_moves_then_a_second_run_writes_only_the_changed_blocks() {
        let s = sites();
        source(&s.a_vol.join("d.raw"));
        let into = disk("d.raw", ImageFormat::Raw);
        let first = move_once(&s, &into, None);
        assert_eq!(
            guest_bytes(&s.b_vol.join("d.raw"), ImageFormat::Raw),
            guest_bytes(&s.a_vol.join("d.raw"), ImageFormat::Raw)
        );
        // Chunks 0 and 2 hold data; chunk 1's written zeros are not data.
        assert_eq!(first.status.data_chunks, 2);
        assert_eq!(first.status.data_bytes, 4 * MIB);
        assert_eq!(first.read, 4 * MIB + MIB);
        // The root is the source's, as the agents' source half computes it.
        let mut m = Manifest::zero(CHUNK, 20 * MIB);
        let r =
            s.a.read(DiskStore::Volume, "d.raw", ImageFormat::Raw)
                .unwrap();
        let mut buf = Vec::new();
        for i in 0..chunks_of(20 * MIB) {
            m.set(i, read_leaf(r.as_ref(), i, &mut buf).unwrap());
        }
        assert_eq!(first.status.root.as_deref(), Some(m.root_hex().as_str()));

        // The guest writes 10 bytes: one 4 KiB block is written again.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.a_vol.join("d.raw"))
            .unwrap();
        f.write_all_at(b"0123456789", 9 * MIB + 5000).unwrap();
        let second = move_once(&s, &into, None);
        assert_eq!(second.status.data_bytes, 4096);
        assert_eq!(second.status.same_chunks, chunks_of(20 * MIB) - 1);
        assert_eq!(
            guest_bytes(&s.b_vol.join("d.raw"), ImageFormat::Raw),
            guest_bytes(&s.a_vol.join("d.raw"), ImageFormat::Raw)
        );

        // With a change set naming chunk 2 and the last run's leaves, only
        // that chunk is looked at; the root is still the whole disk's.
        f.write_all_at(b"abc", 10 * MIB).unwrap();
        let third = move_once(&s, &into, Some((vec![2], second.leaves.clone())));
        assert_eq!(third.status.same_chunks + third.status.data_chunks, 1);
        assert_eq!(third.status.data_bytes, 4096);
        let fourth = move_once(&s, &into, None);
        assert_eq!(fourth.status.data_bytes, 0);
        assert_eq!(third.status.root, fourth.status.root);
    }

    #[test]
    fn a_qcow2_target_is_converted_once_then_patched_in_place() {
        let s = sites();
        source(&s.a_vol.join("d.raw"));
        let into = disk("d.qcow2", ImageFormat::Qcow2);
        move_once(&s, &into, None);
        let target = s.b_vol.join("d.qcow2");
        assert_eq!(
            guest_bytes(&target, ImageFormat::Qcow2),
            guest_bytes(&s.a_vol.join("d.raw"), ImageFormat::Raw)
        );
        let names: Vec<String> = std::fs::read_dir(&s.b_vol)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".fcmirror")), "{names:?}");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.a_vol.join("d.raw"))
            .unwrap();
        // One block in a chunk with data, one in a hole.
        f.write_all_at(b"patched", MIB + 100).unwrap();
        f.write_all_at(b"new", 17 * MIB).unwrap();
        let before = std::fs::metadata(&target).unwrap().len();
        let second = move_once(&s, &into, None);
        assert_eq!(second.status.data_bytes, 2 * 4096);
        assert_eq!(
            guest_bytes(&target, ImageFormat::Qcow2),
            guest_bytes(&s.a_vol.join("d.raw"), ImageFormat::Raw)
        );
        // In place: the file grew by about the new data, not a copy.
        let after = std::fs::metadata(&target).unwrap().len();
        assert!(after - before < 4 * MIB, "{before} -> {after}");
    }

    #[test]
    fn a_disk_someone_else_made_is_not_written() {
        let s = sites();
        source(&s.a_vol.join("d.raw"));
        std::fs::write(s.b_vol.join("d.raw"), b"theirs").unwrap();
        let cancel = CancelFlag::new();
        let err = run(&LocalMove {
            source: &s.a,
            from: &disk("d.raw", ImageFormat::Raw),
            target: &s.b,
            into: &disk("d.raw", ImageFormat::Raw),
            owner: "reloc-1/d",
            workers: 2,
            since: None,
            cancel: &cancel,
            progress: &|_, _| {},
        })
        .unwrap_err();
        assert!(err.to_string().contains("no relocation"), "{err}");
        assert_eq!(std::fs::read(s.b_vol.join("d.raw")).unwrap(), b"theirs");
        assert_eq!(s.b.holder(DiskStore::Volume, "d.raw").unwrap(), Some(None));
        assert_eq!(s.b.holder(DiskStore::Volume, "other.raw").unwrap(), None);
    }

    #[test]
    fn leaves_round_trip_and_a_malformed_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l/x.json");
        let mut m = Manifest::zero(CHUNK, 9 * MIB);
        m.set(1, Leaf::Data([7; 32]));
        Leaves::store(&path, &m, None).unwrap();
        assert_eq!(Leaves::load(&path).unwrap(), Some(m));
        assert_eq!(Leaves::load(&dir.path().join("none")).unwrap(), None);
        std::fs::write(
            &path,
            r#"{"virtual_size":1,"chunk":4194304,"data":{"9":"00"}}"#,
        )
        .unwrap();
        let e = Leaves::load(&path).unwrap_err().to_string();
        assert!(e.contains("x.json") && e.contains("chunk 9"), "{e}");
    }
}
