//! Conversion output that goes straight into an object-storage multipart
//! upload, without a temporary file.
//!
//! Only formats written front to back can be streamed: raw (holes are sent
//! as zeros: an object has no holes), fixed VHD (raw and a footer) and
//! streamOptimized VMDK. The others seek back to fill in tables (qcow2's
//! L1/L2 and refcounts, a dynamic VHD's BAT, a VHDX's BAT, a
//! monolithicSparse VMDK's grain tables) and are refused with
//! [`Error::Unsupported`] before anything is uploaded.
//!
//! [`PartUploader`] is a [`std::io::Write`]: bytes fill a part buffer; a
//! full part is handed to the store's upload and sent on a small private
//! Tokio runtime while the conversion goes on, with at most
//! [`MAX_PARTS_IN_FLIGHT`] parts in flight, so memory stays bounded at
//! `(1 + MAX_PARTS_IN_FLIGHT) × part size` (80 MiB for images up to
//! 140 GiB). If the conversion fails, the upload is aborted: no object and
//! no orphaned parts are left.

use std::collections::VecDeque;
use std::sync::Arc;

use object_store::path::Path as StorePath;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};

/// Parts uploading at once while the next one fills.
pub const MAX_PARTS_IN_FLIGHT: usize = 4;
/// Smallest part we send (S3's floor is 5 MiB for all parts but the last).
pub const MIN_PART: u64 = 16 << 20;
/// S3 allows 10 000 parts; we keep a margin for the size estimate.
const MAX_PARTS: u64 = 9000;

/// Part size for an object of about `expected` bytes: 16 MiB, or more
/// (whole MiB) when the object would need more than 9000 parts.
pub fn part_size(expected: u64) -> u64 {
    (expected.div_ceil(MAX_PARTS).div_ceil(1 << 20) * (1 << 20)).max(MIN_PART)
}

/// A multipart upload written as a byte stream.
pub struct PartUploader {
    rt: tokio::runtime::Runtime,
    upload: Box<dyn MultipartUpload>,
    buf: Vec<u8>,
    part: usize,
    inflight: VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
    parts: usize,
    total: u64,
    what: String,
}

impl std::fmt::Debug for PartUploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartUploader")
            .field("what", &self.what)
            .field("parts", &self.parts)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl PartUploader {
    /// Starts a multipart upload of `key` in `store`, in parts of
    /// `part_size` bytes; `what` names the object in errors. Unless
    /// `overwrite`, an existing object is an error.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the runtime cannot start; [`Error::InvalidArgument`]
    /// if the object exists and not `overwrite`; [`Error::ObjectStore`] if
    /// the server refuses to start the upload.
    pub fn start(
        store: Arc<dyn ObjectStore>,
        key: &str,
        part_size: u64,
        what: &str,
        overwrite: bool,
    ) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fluidcloud-upload")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the upload runtime", e))?;
        let path = StorePath::from(key);
        if !overwrite {
            match rt.block_on(store.head(&path)) {
                Ok(_) => {
                    return Err(Error::InvalidArgument(format!(
                        "{what} exists; remove it or ask to overwrite it"
                    )));
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => {
                    return Err(Error::ObjectStore {
                        context: format!("looking for {what}"),
                        source,
                    });
                }
            }
        }
        let upload =
            rt.block_on(store.put_multipart(&path))
                .map_err(|source| Error::ObjectStore {
                    context: format!("starting the upload of {what}"),
                    source,
                })?;
        let part = usize::try_from(part_size.max(5 << 20)).unwrap_or(usize::MAX);
        Ok(Self {
            rt,
            upload,
            buf: Vec::with_capacity(part),
            part,
            inflight: VecDeque::new(),
            parts: 0,
            total: 0,
            what: what.to_owned(),
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn send(&mut self) -> std::io::Result<()> {
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part));
        let fut = self.upload.put_part(PutPayload::from(data));
        self.inflight.push_back(self.rt.spawn(fut));
        self.parts += 1;
        while self.inflight.len() > MAX_PARTS_IN_FLIGHT {
            self.wait_oldest()?;
        }
        Ok(())
    }

    fn wait_oldest(&mut self) -> std::io::Result<()> {
        if let Some(h) = self.inflight.pop_front() {
            self.rt
                .block_on(h)
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Sends the last part, waits for all and completes the upload;
    /// returns the object size.
    ///
    /// # Errors
    ///
    /// [`Error::ObjectStore`] if a part or the completion fails (the
    /// upload is then aborted).
    pub fn finish(mut self) -> Result<u64> {
        let sent = (|| {
            if !self.buf.is_empty() || self.parts == 0 {
                self.send()?;
            }
            while !self.inflight.is_empty() {
                self.wait_oldest()?;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = sent {
            let what = self.what.clone();
            self.abort();
            return Err(Error::io(format!("uploading {what}"), e));
        }
        let done = self.rt.block_on(self.upload.complete());
        match done {
            Ok(_) => Ok(self.total),
            Err(source) => {
                let what = self.what.clone();
                self.abort();
                Err(Error::ObjectStore {
                    context: format!("completing the upload of {what}"),
                    source,
                })
            }
        }
    }

    /// Abandons the upload: parts in flight are dropped and the server is
    /// told to discard what it received (best effort).
    pub fn abort(mut self) {
        for h in self.inflight.drain(..) {
            h.abort();
        }
        let _ = self.rt.block_on(self.upload.abort());
    }
}

impl std::io::Write for PartUploader {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = self.part - self.buf.len();
        let n = room.min(data.len());
        self.buf
            .extend_from_slice(data.get(..n).unwrap_or_default());
        self.total += n as u64;
        if self.buf.len() == self.part {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_stays_within_the_part_count() {
        assert_eq!(part_size(0), MIN_PART);
        assert_eq!(part_size(1 << 30), MIN_PART);
        let big = 1u64 << 41; // 2 TiB
        let p = part_size(big);
        assert!(big.div_ceil(p) <= 9000);
        assert_eq!(p % (1 << 20), 0);
    }
}
