//! Change sets: the byte ranges of a disk its guest wrote since a point in
//! time, as a site's change tracking reports them (libvirt: the clusters an
//! external snapshot overlay holds).
//!
//! The final delta of a warm relocation reads only these ranges instead of
//! re-hashing the whole disk. A change set is a JSON file the conduit writes
//! once the source stopped and the migrators read:
//!
//! ```json
//! {"version": 1, "disk": "/pool/web.raw", "virtual_size": 4294967296,
//!  "extents": [[1048576, 65536], [8388608, 131072]]}
//! ```
//!
//! `extents` are `[offset, length]` pairs, sorted, not overlapping, inside
//! the virtual size. A range may read as anything, zeros included: it only
//! says "look here", never what is there.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The only version this build reads and writes.
pub const VERSION: u32 = 1;

/// The ranges of one disk written since tracking began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeSet {
    /// Format version, [`VERSION`].
    pub version: u32,
    /// The disk the ranges are of (its locator at the source), for messages
    /// and to catch a change set handed to the wrong step.
    pub disk: String,
    /// The disk's size as the guest sees it.
    pub virtual_size: u64,
    /// `(offset, length)`, sorted, disjoint, inside `virtual_size`.
    pub extents: Vec<(u64, u64)>,
}

impl ChangeSet {
    /// A change set from ranges in any order, overlapping or touching:
    /// sorted and merged. Empty ranges are dropped.
    pub fn new(disk: impl Into<String>, virtual_size: u64, mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.retain(|&(_, len)| len > 0);
        ranges.sort_unstable();
        let mut extents: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (off, len) in ranges {
            match extents.last_mut() {
                Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
                _ => extents.push((off, len)),
            }
        }
        Self {
            version: VERSION,
            disk: disk.into(),
            virtual_size,
            extents,
        }
    }

    /// Where the change set of `disk` is kept in directory `dir`: a name
    /// derived from the disk's locator, so the step that writes it and the
    /// steps that read it agree without passing it along.
    pub fn file_in(dir: &Path, disk: &str) -> PathBuf {
        let h = blake3::hash(disk.as_bytes()).to_hex();
        dir.join(format!("{}.json", &h.as_str()[..16]))
    }

    /// Bytes the ranges cover.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|&(_, l)| l).sum()
    }

    /// Indices of the `chunk`-sized chunks the ranges touch, in order.
    pub fn chunks(&self, chunk: u64) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for &(off, len) in &self.extents {
            let (first, last) = (off / chunk, (off + len - 1) / chunk);
            let from = out.last().map_or(first, |&l| first.max(l + 1));
            out.extend(from..=last);
        }
        out
    }

    /// Checks the invariants a file from disk must keep.
    fn check(&self, path: &Path) -> Result<()> {
        let bad =
            |why: String| Error::InvalidArgument(format!("change set {}: {why}", path.display()));
        if self.version != VERSION {
            return Err(bad(format!(
                "version {} (this build reads {VERSION})",
                self.version
            )));
        }
        let mut end = 0u64;
        for (i, &(off, len)) in self.extents.iter().enumerate() {
            let stop = off.checked_add(len).filter(|&s| s <= self.virtual_size);
            match stop {
                Some(s) if len > 0 && off >= end => end = s,
                _ => {
                    return Err(bad(format!(
                        "extents[{i}] = [{off}, {len}] is empty, overlaps the one before or ends past the virtual size {}",
                        self.virtual_size
                    )));
                }
            }
        }
        Ok(())
    }

    /// Reads and checks a change set file.
    ///
    /// # Errors
    /// `Io` naming the file; `InvalidArgument` naming the file and the
    /// field for malformed JSON, another version, or extents that are
    /// unsorted, overlapping or outside the disk.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read(path)
            .map_err(|e| Error::io(format!("reading change set {}", path.display()), e))?;
        let set: Self = serde_json::from_slice(&text)
            .map_err(|e| Error::InvalidArgument(format!("change set {}: {e}", path.display())))?;
        set.check(path)?;
        Ok(set)
    }

    /// The change set of `disk` at `path`, as a final delta reads it:
    /// `None` when there is no file (the source site did not track the
    /// disk: every chunk is compared), else the checked file.
    ///
    /// # Errors
    /// As [`Self::load`]; `InvalidArgument` naming the file when it is of
    /// another disk.
    pub fn load_for(path: &Path, disk: &Path) -> Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let set = Self::load(path)?;
        if Path::new(&set.disk) != disk {
            return Err(Error::InvalidArgument(format!(
                "change set {} is of {}, not of the input {}",
                path.display(),
                set.disk,
                disk.display()
            )));
        }
        Ok(Some(set))
    }

    /// Writes the change set to `path` atomically (a temporary file renamed
    /// into place, synced).
    ///
    /// # Errors
    /// `Io` naming the file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_vec(self)
            .map_err(|e| Error::InvalidArgument(format!("change set {}: {e}", path.display())))?;
        let io = |e| Error::io(format!("writing change set {}", path.display()), e);
        let tmp = path.with_extension("json.partial");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        std::io::Write::write_all(&mut f, &text).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_sorted_and_merged() {
        let c = ChangeSet::new(
            "d",
            1 << 20,
            vec![(100, 10), (0, 50), (40, 20), (110, 5), (7, 0)],
        );
        assert_eq!(c.extents, vec![(0, 60), (100, 15)]);
        assert_eq!(c.bytes(), 75);
        assert_eq!(c.chunks(64), vec![0, 1]);
        assert_eq!(
            ChangeSet::new("d", 1 << 20, vec![(65536, 1)]).chunks(65536),
            vec![1]
        );
    }

    #[test]
    fn a_file_round_trips_and_bad_ones_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        let c = ChangeSet::new("/pool/a.raw", 4096, vec![(512, 512), (0, 512)]);
        c.save(&p).unwrap();
        assert_eq!(ChangeSet::load(&p).unwrap(), c);
        for (text, needle) in [
            (
                r#"{"version":2,"disk":"d","virtual_size":9,"extents":[]}"#,
                "version 2",
            ),
            (
                r#"{"version":1,"disk":"d","virtual_size":9,"extents":[[0,10]]}"#,
                "extents[0]",
            ),
            (
                r#"{"version":1,"disk":"d","virtual_size":99,"extents":[[5,5],[0,1]]}"#,
                "extents[1]",
            ),
            (r#"{"version":1,"disk":"d","virtual_size":9}"#, "extents"),
            (
                r#"{"version":1,"disk":"d","virtual_size":9,"extents":[],"x":1}"#,
                "unknown field",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = ChangeSet::load(&p).unwrap_err().to_string();
            assert!(e.contains("c.json") && e.contains(needle), "{text}: {e}");
        }
    }
}
