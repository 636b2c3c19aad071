//! Block-volume copy: chunked, BLAKE3-hashed, resumable and incremental.
//!
//! [`copy`] copies a volume — a raw file or any image [`crate::image::open`]
//! reads (qcow2, VMDK, VHD, VHDX) — into a sparse raw file, and
//! [`manifest_of`] hashes any volume on its own. [`VolumeCopy`] is the
//! `volume-copy` migrator built on them.
//!
//! ## Why chunks and a Merkle manifest
//!
//! A relocation copies a volume while its service still runs (pre-copy),
//! then once more after the service stops (the final delta at cut-over),
//! and must be able to stop and continue at any time. All three need to
//! know, cheaply, which parts of the target already hold the source's
//! bytes. The volume is cut into fixed chunks (4 MiB by default); each
//! chunk's BLAKE3 hash is a leaf of a Merkle tree whose root names the
//! whole volume (see [`manifest`] for the exact definition). The target's
//! manifest, `.<target>.fcmerkle` (a dot-file beside the target), lets a later run compare source hashes
//! with it and write only the chunks that changed, and the root is the
//! checksum the relocation report shows for source and target alike.
//!
//! ## Sparse in, sparse out
//!
//! The source's extent map says which ranges hold data; holes and zero
//! extents are neither read nor written. A chunk without data is a
//! [`Leaf::Zero`] (its hash is known without reading anything), and data
//! blocks of 4 KiB that turn out to be all zero are not written either, so
//! the target is at least as sparse as the source (`set_len` gives it the
//! virtual size; a chunk that became zero is punched out).
//!
//! ## Verification
//!
//! Every chunk written is read back from the target and hashed again; the
//! copy is done only when the target's root equals the source's. Chunks
//! that were skipped were verified when written by an earlier run (their
//! manifest is trusted only when it still describes the target file, see
//! below) or were hashed at the target in this run.
//! [`VolumeCopyOptions::verify_all`] re-hashes the whole target at the end.
//!
//! ## Resume and re-sync
//!
//! While a copy runs, `.<target>.fcprogress` is an append-only log of the
//! chunks known to be at the target; a batch of records is appended only
//! after the target data it describes has been synced (every 256 MiB
//! written or every second). After a crash or `kill -9`, or a
//! cancellation, the next run reads the log, still hashes each source
//! chunk (the source may have changed meanwhile), and sends only those
//! whose hash differs from the log: completed chunks are never sent again.
//! On success the manifest is written atomically and the log removed.
//!
//! A manifest is trusted only while it still describes the target file:
//! same device, inode, length and modification time as when it was written,
//! the manifest itself written in a later timestamp tick (so a write to the
//! target after it always moves the mtime away from the recorded one), and
//! the same chunk size and virtual size. Otherwise — the target was changed
//! or truncated, or the chunking differs — the target is hashed instead
//! (holes cost nothing), which is slower but never wrong.
//!
//! ## Memory
//!
//! Each worker thread holds two chunk buffers (source and read-back), so
//! memory is about `2 × chunk size × threads`, plus about 100 bytes per
//! chunk *that holds data*: manifests, progress and the work list are
//! sparse, and only chunks overlapping data extents (of the source, or of
//! a target not known to be zero) are visited at all. A header claiming
//! 2^61 bytes costs nothing until it has data; it fails when the target
//! file cannot be that large, not by exhausting memory.
//!
//! ## Ownership
//!
//! A target the copy did not create, and that has no manifest or log of
//! ours, is refused unless [`VolumeCopyOptions::overwrite`] is set. The
//! sidecar files record who created the target
//! ([`VolumeCopyOptions::owner`]), which is what lets a rollback delete it.

mod copy;
pub mod manifest;
mod migrator;
mod progress;

pub use copy::{
    DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, VolumeCopyOptions, VolumeCopySummary,
    check_chunk_size, copy, manifest_of,
};
pub use manifest::{Leaf, Manifest, manifest_path};
pub use migrator::VolumeCopy;
pub use progress::progress_path;

/// The creator tag recorded in the sidecar files of `target`, if any of
/// them still describes that file: `Some(tag)` when a volume copy tagged
/// `tag` created it, `None` when it was not created by one (or nothing
/// records it).
///
/// # Errors
///
/// [`crate::Error::Io`] when a sidecar file exists but cannot be read.
pub fn created_by(target: &std::path::Path) -> crate::Result<Option<String>> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(None);
    };
    if let Some(log) = progress::load(&progress_path(target))?
        && ((log.header.ino == 0 && log.records.is_empty())
            || (log.header.dev == meta.dev() && log.header.ino == meta.ino()))
    {
        return Ok(log.header.created_by);
    }
    if let Ok((_, Some(stamp))) = manifest::load_with_stamp(&manifest_path(target))
        && stamp.dev == meta.dev()
        && stamp.ino == meta.ino()
    {
        return Ok(stamp.created_by);
    }
    Ok(None)
}
