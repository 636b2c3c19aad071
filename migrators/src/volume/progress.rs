//! The append-only progress log of a copy in progress, `.<target>.fcprogress`.
//!
//! Line 1 is a JSON header naming the chunking and the target file
//! (`st_dev`, `st_ino`) it describes; every further line records one chunk
//! whose target data is known and durable: `<index> <64 hex>` for a chunk
//! with data, `<index> z` for an all-zero chunk, `<index> ?` for a chunk
//! about to be rewritten (an earlier record of it no longer holds). Data
//! records are appended only
//! after the target data they describe has been synced, so after a crash
//! every complete line is true of the target. A torn last line (or anything
//! after the first line that does not parse) ends the log; it is cut off
//! before new records are appended.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::manifest::{Leaf, hex, sidecar, sync_parent, unhex32};
use crate::error::{Error, Result};

const FORMAT: &str = "fluidcloud-volume-progress";
const VERSION: u64 = 1;

/// What a progress log's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) chunk_size: u64,
    pub(crate) virtual_size: u64,
    pub(crate) created_by: Option<String>,
    pub(crate) dev: u64,
    pub(crate) ino: u64,
}

/// A progress log read back.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) header: Header,
    /// Chunk records in log order (a later record of a chunk wins; `None`
    /// marks the chunk unknown).
    pub(crate) records: Vec<(u64, Option<Leaf>)>,
    /// Length of the valid prefix of the file.
    pub(crate) valid_len: u64,
}

/// The progress log path of `target`.
pub fn progress_path(target: &Path) -> PathBuf {
    sidecar(target, ".fcprogress")
}

fn parse_header(line: &str) -> Option<Header> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v.get("format")?.as_str()? != FORMAT || v.get("version")?.as_u64()? != VERSION {
        return None;
    }
    Some(Header {
        chunk_size: v.get("chunk_size")?.as_u64()?,
        virtual_size: v.get("virtual_size")?.as_u64()?,
        created_by: v
            .get("created_by")
            .and_then(Value::as_str)
            .map(str::to_owned),
        dev: v.get("dev")?.as_u64()?,
        ino: v.get("ino")?.as_u64()?,
    })
}

fn parse_record(line: &str, chunks: u64) -> Option<(u64, Option<Leaf>)> {
    let (idx, leaf) = line.split_once(' ')?;
    let idx: u64 = idx.parse().ok()?;
    if idx >= chunks {
        return None;
    }
    let leaf = match leaf {
        "z" => Some(Leaf::Zero),
        "?" => None,
        h => Some(Leaf::Data(unhex32(h)?)),
    };
    Some((idx, leaf))
}

/// Reads the progress log at `path`. `Ok(None)` when there is none or its
/// header is unreadable (then nothing in it can be trusted).
pub(crate) fn load(path: &Path) -> Result<Option<Loaded>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::io(
                format!("reading progress log {}", path.display()),
                e,
            ));
        }
    };
    let mut lines = bytes.split_inclusive(|&b| b == b'\n');
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    let Some(header) = first
        .strip_suffix(b"\n")
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(parse_header)
    else {
        return Ok(None);
    };
    let chunks = header.virtual_size.div_ceil(header.chunk_size.max(1));
    let mut valid_len = first.len() as u64;
    let mut records = Vec::new();
    for line in lines {
        let Some(rec) = line
            .strip_suffix(b"\n")
            .and_then(|l| std::str::from_utf8(l).ok())
            .and_then(|l| parse_record(l, chunks))
        else {
            break;
        };
        records.push(rec);
        valid_len += line.len() as u64;
    }
    Ok(Some(Loaded {
        header,
        records,
        valid_len,
    }))
}

/// An open progress log, appended to.
#[derive(Debug)]
pub(crate) struct Log {
    file: File,
    path: PathBuf,
}

impl Log {
    /// Starts a new log with `header` (replacing any file at `path`); with
    /// `durable`, synced together with its directory entry before
    /// returning (needed when the header is the only ownership record).
    pub(crate) fn create(path: &Path, header: &Header, durable: bool) -> Result<Self> {
        let io = |what: &str, e| Error::io(format!("{what} progress log {}", path.display()), e);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("creating", e))?;
        let mut line = serde_json::to_vec(&json!({
            "format": FORMAT,
            "version": VERSION,
            "chunk_size": header.chunk_size,
            "virtual_size": header.virtual_size,
            "created_by": header.created_by,
            "dev": header.dev,
            "ino": header.ino,
        }))
        .unwrap_or_default();
        line.push(b'\n');
        file.write_all(&line).map_err(|e| io("writing", e))?;
        if durable {
            file.sync_all().map_err(|e| io("syncing", e))?;
            sync_parent(path)?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// Reopens an existing log for appending after its valid prefix.
    pub(crate) fn reopen(path: &Path, valid_len: u64) -> Result<Self> {
        let io = |what: &str, e| Error::io(format!("{what} progress log {}", path.display()), e);
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| io("opening", e))?;
        let len = file.metadata().map_err(|e| io("reading", e))?.len();
        if len != valid_len {
            file.set_len(valid_len).map_err(|e| io("truncating", e))?;
            file.sync_all().map_err(|e| io("syncing", e))?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// Appends `records` and syncs the log. The caller has synced the
    /// target data they describe.
    pub(crate) fn append(&mut self, records: &[(u64, Option<Leaf>)]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(records.len() * 80);
        for (i, leaf) in records {
            match leaf {
                Some(Leaf::Zero) => text.push_str(&format!("{i} z\n")),
                Some(Leaf::Data(h)) => text.push_str(&format!("{i} {}\n", hex(h))),
                None => text.push_str(&format!("{i} ?\n")),
            }
        }
        let io =
            |what: &str, e| Error::io(format!("{what} progress log {}", self.path.display()), e);
        self.file
            .write_all(text.as_bytes())
            .map_err(|e| io("appending to", e))?;
        self.file.sync_data().map_err(|e| io("syncing", e))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_tail_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.fcprogress");
        let header = Header {
            chunk_size: 4096,
            virtual_size: 3 * 4096,
            created_by: Some("s1".into()),
            dev: 1,
            ino: 2,
        };
        let mut log = Log::create(&path, &header, true).unwrap();
        log.append(&[(0, Some(Leaf::Zero)), (2, Some(Leaf::Data([0xab; 32])))])
            .unwrap();
        drop(log);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"1 abc").unwrap();
        let loaded = load(&path).unwrap().unwrap();
        assert_eq!(loaded.header, header);
        assert_eq!(
            loaded.records,
            vec![(0, Some(Leaf::Zero)), (2, Some(Leaf::Data([0xab; 32])))]
        );
        let mut log = Log::reopen(&path, loaded.valid_len).unwrap();
        log.append(&[(1, Some(Leaf::Zero)), (2, None)]).unwrap();
        let loaded = load(&path).unwrap().unwrap();
        assert_eq!(loaded.records.len(), 4, "the torn line was cut off");
        assert_eq!(loaded.records[3], (2, None));
        std::fs::write(&path, b"not json\n0 z\n").unwrap();
        assert!(load(&path).unwrap().is_none());
    }
}
