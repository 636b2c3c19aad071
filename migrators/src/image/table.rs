//! Top-level tables (qcow2 L1, VMDK grain directory, VHD and VHDX BAT)
//! read in pages on demand, so that a header announcing a huge table costs
//! a bounded cache, not an allocation of the table's size (see
//! [`super::limits`]).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::limits::{TABLE_CACHE_BYTES, TABLE_PAGE_BYTES};
use super::reader::pread_full;
use crate::error::Result;

/// Byte order and width of a table's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Big-endian `u64` (qcow2).
    Be64,
    /// Big-endian `u32` (VHD).
    Be32,
    /// Little-endian `u64` (VHDX).
    Le64,
    /// Little-endian `u32` (VMDK).
    Le32,
}

impl Entry {
    fn width(self) -> u64 {
        match self {
            Self::Be64 | Self::Le64 => 8,
            Self::Be32 | Self::Le32 => 4,
        }
    }

    fn decode(self, b: &[u8]) -> u64 {
        let mut w = [0u8; 8];
        let n = b.len().min(self.width() as usize);
        match self {
            Self::Be64 | Self::Be32 => {
                w[8 - n..].copy_from_slice(b.get(..n).unwrap_or_default());
                u64::from_be_bytes(w)
            }
            Self::Le64 | Self::Le32 => {
                w[..n].copy_from_slice(b.get(..n).unwrap_or_default());
                u64::from_le_bytes(w)
            }
        }
    }
}

/// A table of `len` entries at file offset `at`, whose bounds the caller
/// has checked against the file. Pages of [`TABLE_PAGE_BYTES`] are read on
/// first use and at most `cache_bytes` of them are kept.
#[derive(Debug)]
pub(crate) struct PagedTable {
    at: u64,
    len: u64,
    entry: Entry,
    max_pages: usize,
    cache: Mutex<HashMap<u64, Arc<[u64]>>>,
}

impl PagedTable {
    /// A table with the default cache ([`TABLE_CACHE_BYTES`]).
    pub(crate) fn new(at: u64, len: u64, entry: Entry) -> Self {
        Self::with_cache(at, len, entry, TABLE_CACHE_BYTES)
    }

    /// A table keeping at most `cache_bytes` of pages (at least one page).
    pub(crate) fn with_cache(at: u64, len: u64, entry: Entry, cache_bytes: u64) -> Self {
        Self {
            at,
            len,
            entry,
            max_pages: usize::try_from(cache_bytes / TABLE_PAGE_BYTES)
                .unwrap_or(usize::MAX)
                .max(1),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn per_page(&self) -> u64 {
        TABLE_PAGE_BYTES / self.entry.width()
    }

    /// Entry `index`, `None` past the end of the table.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Io`] if reading its page fails.
    pub(crate) fn get(&self, file: &File, path: &Path, index: u64) -> Result<Option<u64>> {
        Ok(self
            .page(file, path, index)?
            .and_then(|(page, within)| page.get(within).copied()))
    }

    /// The page holding entry `index` and the index's place in it (the
    /// entries after it in the page follow it in the table), `None` past
    /// the end of the table: for scanning runs of entries without a lookup
    /// each.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Io`] if reading the page fails.
    pub(crate) fn page(
        &self,
        file: &File,
        path: &Path,
        index: u64,
    ) -> Result<Option<(Arc<[u64]>, usize)>> {
        if index >= self.len {
            return Ok(None);
        }
        let per_page = self.per_page();
        let page = index / per_page;
        let within = (index % per_page) as usize;
        let lock = || {
            // A panic while holding the lock cannot leave the map
            // inconsistent.
            self.cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(p) = lock().get(&page) {
            return Ok(Some((Arc::clone(p), within)));
        }
        let first = page * per_page;
        let count = (self.len - first).min(per_page);
        let width = self.entry.width();
        let mut raw = vec![0u8; (count * width) as usize];
        pread_full(file, path, self.at + first * width, &mut raw)?;
        let entries: Arc<[u64]> = raw
            .chunks_exact(width as usize)
            .map(|c| self.entry.decode(c))
            .collect();
        let mut cache = lock();
        if cache.len() >= self.max_pages {
            cache.clear();
        }
        cache.insert(page, Arc::clone(&entries));
        Ok(Some((entries, within)))
    }
}

impl PagedTable {
    /// Records that entry `index` now holds `value` on disk (a writer
    /// wrote it): the cached page holding it, if any, is updated so later
    /// reads do not see the old entry. Pages not cached are read from the
    /// file when next used, which already holds the new value.
    pub(crate) fn set(&self, index: u64, value: u64) {
        if index >= self.len {
            return;
        }
        let per_page = self.per_page();
        let page = index / per_page;
        let within = (index % per_page) as usize;
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = cache.get_mut(&page) {
            let mut entries = p.to_vec();
            if let Some(slot) = entries.get_mut(within) {
                *slot = value;
            }
            *p = entries.into();
        }
    }
}

/// Reads entries of a [`PagedTable`] in order, holding the current page:
/// a scan over a run of entries takes one cache lookup per page, not one
/// per entry.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    table: &'a PagedTable,
    file: &'a File,
    path: &'a Path,
    /// First index of the page held, and the page.
    page: Option<(u64, Arc<[u64]>)>,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(table: &'a PagedTable, file: &'a File, path: &'a Path) -> Self {
        Self {
            table,
            file,
            path,
            page: None,
        }
    }

    /// Entry `index`, `None` past the end of the table.
    ///
    /// # Errors
    ///
    /// As [`PagedTable::get`].
    pub(crate) fn get(&mut self, index: u64) -> Result<Option<u64>> {
        if let Some((first, page)) = &self.page
            && let Some(i) = index.checked_sub(*first)
            && let Some(&e) = usize::try_from(i).ok().and_then(|i| page.get(i))
        {
            return Ok(Some(e));
        }
        let Some((page, within)) = self.table.page(self.file, self.path, index)? else {
            return Ok(None);
        };
        let e = page.get(within).copied();
        self.page = Some((index - within as u64, page));
        Ok(e)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn entries_are_read_by_page_and_end_with_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let f = File::create(&path).unwrap();
        // 20 000 big-endian u32 entries at offset 100: three pages.
        let bytes: Vec<u8> = (0..20_000u32).flat_map(|i| (i * 3).to_be_bytes()).collect();
        f.write_all_at(&bytes, 100).unwrap();
        let f = File::open(&path).unwrap();
        let t = PagedTable::with_cache(100, 20_000, Entry::Be32, 0);
        for i in [0u64, 1, 16383, 16384, 19_999, 5] {
            assert_eq!(t.get(&f, &path, i).unwrap(), Some(i * 3));
        }
        assert_eq!(t.get(&f, &path, 20_000).unwrap(), None);
        let mut c = Cursor::new(&t, &f, &path);
        for i in (0..20_000).step_by(7).chain([3, 19_999]) {
            assert_eq!(c.get(i).unwrap(), Some(i * 3));
        }
        assert_eq!(c.get(20_000).unwrap(), None);
        assert_eq!(t.cache.lock().unwrap().len(), 1);
        let le = PagedTable::new(0, 2, Entry::Le64);
        std::fs::write(&path, 7u64.to_le_bytes()).unwrap();
        let f = File::open(&path).unwrap();
        // Past the end of the file reads as zeros.
        assert_eq!(le.get(&f, &path, 0).unwrap(), Some(7));
        assert_eq!(le.get(&f, &path, 1).unwrap(), Some(0));
        assert_eq!(le.get(&f, &path, 2).unwrap(), None);
    }
}
