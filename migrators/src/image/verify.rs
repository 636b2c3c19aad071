//! Whole-image checks: [`check`] reads every allocated byte of an image
//! (following every table and decompressing every cluster) and [`compare`]
//! compares the guest content of two images. Both read in parallel and
//! skip ranges that the extent maps show to be zeros.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fluidcloud_plugins::ImageFormat;
use serde::Serialize;

use super::reader::{ExtentKind, ImageReader, extents};
use crate::error::Result;

/// Work unit of [`check`] and [`compare`].
const CHUNK: u64 = 4 * 1024 * 1024;

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainEntry {
    /// Its file.
    pub path: String,
    /// Its format.
    pub format: ImageFormat,
    /// Its virtual size.
    pub virtual_size: u64,
}

/// What [`check`] found: nothing wrong, and how the disk is made up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Virtual size of the disk.
    pub virtual_size: u64,
    /// Bytes in data extents (all read and decoded).
    pub data_bytes: u64,
    /// Bytes in explicit zero extents.
    pub zero_bytes: u64,
    /// Bytes allocated nowhere in the chain.
    pub unallocated_bytes: u64,
    /// The image and its backing files, top first.
    pub chain: Vec<ChainEntry>,
}

/// The image and its backing files, top first.
pub fn chain(reader: &dyn ImageReader) -> Vec<ChainEntry> {
    std::iter::successors(Some(reader), |r| r.backing())
        .map(|r| ChainEntry {
            path: r.path().display().to_string(),
            format: r.format(),
            virtual_size: r.virtual_size(),
        })
        .collect()
}

/// Reads every data extent of `reader` with `threads` threads (0: one per
/// core); `progress(done, total)` counts data bytes.
///
/// # Errors
///
/// The first [`crate::Error`] met: [`crate::Error::Corrupt`] for malformed
/// metadata or compressed data, [`crate::Error::Io`] for read errors.
pub fn check(
    reader: &dyn ImageReader,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<CheckReport> {
    let mut report = CheckReport {
        virtual_size: reader.virtual_size(),
        data_bytes: 0,
        zero_bytes: 0,
        unallocated_bytes: 0,
        chain: chain(reader),
    };
    // Two walks of the extent map (it is cheap): the totals first, for the
    // progress, then the data chunks as the threads ask for them, so that
    // memory does not grow with the number of chunks (a FLAT VMDK extent
    // may map terabytes of data).
    for e in extents(reader) {
        let e = e?;
        match e.kind {
            ExtentKind::Data => report.data_bytes += e.length,
            ExtentKind::Zero => report.zero_bytes += e.length,
            ExtentKind::Unallocated => report.unallocated_bytes += e.length,
        }
    }
    let total = report.data_bytes;
    let done = AtomicU64::new(0);
    let feed = Mutex::new(DataChunks {
        extents: extents(reader),
        current: None,
    });
    let next = || -> Result<Option<(u64, u64)>> {
        feed.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next_chunk()
    };
    parallel(usize::MAX, threads, |_| {
        let Some((offset, len)) = next()? else {
            return Ok(false);
        };
        let mut buf = vec![0u8; len as usize];
        reader.read_at(offset, &mut buf)?;
        progress(done.fetch_add(len, Ordering::Relaxed) + len, total);
        Ok(true)
    })?;
    Ok(report)
}

/// The data extents of an extent map cut into chunks of at most [`CHUNK`]
/// bytes that do not cross a multiple of it.
struct DataChunks<'a> {
    extents: super::reader::Extents<'a>,
    /// The rest of the data extent being cut.
    current: Option<(u64, u64)>,
}

impl DataChunks<'_> {
    fn next_chunk(&mut self) -> Result<Option<(u64, u64)>> {
        loop {
            if let Some((at, end)) = self.current {
                let stop = ((at / CHUNK + 1) * CHUNK).min(end);
                self.current = (stop < end).then_some((stop, end));
                return Ok(Some((at, stop - at)));
            }
            match self.extents.next() {
                None => return Ok(None),
                Some(e) => {
                    let e = e?;
                    if e.kind == ExtentKind::Data {
                        self.current = Some((e.offset, e.end()));
                    }
                }
            }
        }
    }
}

/// Compares the guest content of two images, like `qemu-img compare`
/// without `--strict`: where one disk is larger, its tail must read as
/// zeros. Returns the first differing offset, `None` if identical.
///
/// # Errors
///
/// Errors of reading either image.
pub fn compare(
    a: &dyn ImageReader,
    b: &dyn ImageReader,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Option<u64>> {
    let size = a.virtual_size().max(b.virtual_size());
    let chunks = usize::try_from(size.div_ceil(CHUNK)).unwrap_or(usize::MAX);
    let first = Mutex::new(None::<u64>);
    let done = AtomicU64::new(0);
    parallel(chunks, threads, |i| {
        let offset = i as u64 * CHUNK;
        let end = (offset + CHUNK).min(size);
        let before_found = first
            .lock()
            .map(|f| f.is_none_or(|at| at > offset))
            .unwrap_or(true);
        if before_found {
            let x = read_or_zero(a, offset, end)?;
            let y = read_or_zero(b, offset, end)?;
            let diff = match (x, y) {
                (None, None) => None,
                (Some(x), None) | (None, Some(x)) => x.iter().position(|&v| v != 0),
                (Some(x), Some(y)) => x.iter().zip(&y).position(|(p, q)| p != q),
            };
            if let Some(d) = diff {
                let at = offset + d as u64;
                if let Ok(mut f) = first.lock()
                    && f.is_none_or(|prev| at < prev)
                {
                    *f = Some(at);
                }
            }
        }
        progress(
            done.fetch_add(end - offset, Ordering::Relaxed) + end - offset,
            size,
        );
        Ok(true)
    })?;
    Ok(first.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// The bytes `offset..end` of `r`, or `None` if they read as zeros by the
/// extent map (or lie past its end).
fn read_or_zero(r: &dyn ImageReader, offset: u64, end: u64) -> Result<Option<Vec<u8>>> {
    let size = r.virtual_size();
    if offset >= size {
        return Ok(None);
    }
    let stop = end.min(size);
    let mut at = offset;
    let mut all_zero = true;
    while at < stop {
        let e = r.extent_at(at)?;
        if !e.kind.reads_as_zero() {
            all_zero = false;
            break;
        }
        at = e.end();
    }
    if all_zero {
        return Ok(None);
    }
    let mut buf = vec![0u8; (end - offset) as usize];
    let inside = (stop - offset) as usize;
    if let Some(head) = buf.get_mut(..inside) {
        r.read_at(offset, head)?;
    }
    Ok(Some(buf))
}

/// Runs `f(0..count)` on `threads` threads (0: one per core), stopping at
/// the first error or when `f` says there is no more work (`false`).
fn parallel(count: usize, threads: usize, f: impl Fn(usize) -> Result<bool> + Sync) -> Result<()> {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
    } else {
        threads
    };
    let next = AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let error = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= count {
                        return;
                    }
                    match f(i) {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            if let Ok(mut slot) = error.lock() {
                                slot.get_or_insert(e);
                            }
                            stop.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
        }
    });
    match error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
