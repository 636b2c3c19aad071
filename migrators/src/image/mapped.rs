//! Read-only memory maps of source image files, so that a conversion copies
//! stored data once instead of twice.
//!
//! Through `pread`, every data byte of a conversion is copied twice: from
//! the source's page cache into our buffer, then from the buffer into the
//! output's page cache. Through a map the buffer copy goes away: the zero
//! scan reads the source's page cache where it is, and the output's `pwrite`
//! copies straight from it. Measured on this project's 4 GiB benchmark disk
//! (single thread, pages in cache), `pwrite` from a map moved the data in
//! less than half the time of `pread` + `pwrite`.
//!
//! # A file that shrinks underneath
//!
//! Touching a mapped page past the end of a file that was truncated after it
//! was mapped (or a page the disk fails to read) raises `SIGBUS`, which would
//! kill the process and leave a half-written output behind. A [`FileMap`]
//! therefore registers its address range with a process-wide `SIGBUS`
//! handler: a fault inside a registered range maps a page of zeros over the
//! faulting page, marks the map as [faulted](FileMap::faulted) and lets the
//! access complete; the converter checks the mark after every chunk and
//! fails with a clear error (removing its output, as on any error). A fault
//! anywhere else is passed to the handler that was installed before (Rust's
//! own, then the default action), so other crashes behave as they did.
//! Reads of the map by the kernel (the output's `pwrite`) never raise the
//! signal; they fail with `EFAULT`, which the converter reports the same way.

use std::ffi::c_void;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Maps alive at once (one per conversion running in this process).
const SLOTS: usize = 32;

/// A registered address range; `end == 0` means the slot is free.
struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Self {
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            faulted: AtomicBool::new(false),
        }
    }
}

static REGIONS: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The `SIGBUS` disposition before ours, for faults outside our maps.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Installs the `SIGBUS` handler once; false if that failed (then nothing
/// is mapped and conversions read through buffers).
fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(page) = usize::try_from(page)
            && page.is_power_of_two()
        {
            PAGE.store(page, Ordering::Relaxed);
        }
        // SAFETY: sigaction with valid, zero-initialised structures; the
        // handler only touches atomics and async-signal-safe calls.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &raw mut old) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(old);
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&raw mut new.sa_mask);
            libc::sigaction(libc::SIGBUS, &raw const new, std::ptr::null_mut()) == 0
        }
    })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for slot in &REGIONS {
        let start = slot.start.load(Ordering::Acquire);
        if start != 0 && addr >= start && addr < slot.end.load(Ordering::Acquire) {
            let at = addr & !(page - 1);
            // SAFETY: replaces one page inside a range this process mapped
            // read-only and still owns; mmap is a plain system call.
            let r = unsafe {
                libc::mmap(
                    at as *mut c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if r != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                return;
            }
            break;
        }
    }
    // Not one of ours: what would have happened without this handler.
    match PREVIOUS.get() {
        Some(prev) if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN => {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO,
                // so it has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                    unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler takes the signal number only.
                let f: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: resetting a disposition; returning re-runs the access,
            // which now takes the default action.
            unsafe {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
    }
}

/// A whole file mapped read-only. See the module docs.
pub(crate) struct FileMap {
    ptr: *const u8,
    len: usize,
    slot: usize,
}

// SAFETY: the map is read-only and only ever read; the pointer stays valid
// until drop.
unsafe impl Send for FileMap {}
// SAFETY: as above: shared reads of immutable memory.
unsafe impl Sync for FileMap {}

impl std::fmt::Debug for FileMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileMap").field("len", &self.len).finish()
    }
}

impl FileMap {
    /// Maps `file` (as long as it is now); `None` when it cannot be mapped
    /// (empty, too large, no free slot, or the system refuses), in which
    /// case callers read through buffers as before.
    pub(crate) fn new(file: &File) -> Option<Self> {
        if !install() {
            return None;
        }
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        // SAFETY: a fresh shared read-only mapping of a descriptor we own;
        // the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let start = ptr as usize;
        for (i, slot) in REGIONS.iter().enumerate() {
            if slot
                .end
                .compare_exchange(0, start + len, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.faulted.store(false, Ordering::Release);
                slot.start.store(start, Ordering::Release);
                return Some(Self {
                    ptr: ptr.cast::<u8>(),
                    len,
                    slot: i,
                });
            }
        }
        // SAFETY: unmapping what was just mapped and never handed out.
        unsafe {
            libc::munmap(ptr, len);
        }
        None
    }

    /// The mapped bytes `offset..offset + len`, if all of them are inside
    /// the file as it was mapped.
    pub(crate) fn get(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of a live mapping; the bytes are never written
        // through it, and a page removed underneath reads as zeros (module
        // docs), so the slice stays readable for the map's lifetime.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) })
    }

    /// Whether a page of the map could not be read (the file shrank or the
    /// disk failed) since it was mapped: the bytes read may be wrong.
    pub(crate) fn faulted(&self) -> bool {
        REGIONS
            .get(self.slot)
            .is_some_and(|s| s.faulted.load(Ordering::Acquire))
    }

    /// Drops the pages of `offset..offset + len` from this process's page
    /// tables (they stay in the page cache), so a long conversion's resident
    /// memory stays bounded. A hint: failures are ignored.
    pub(crate) fn release(&self, offset: u64, len: usize) {
        let page = PAGE.load(Ordering::Relaxed) as u64;
        let start = offset / page * page;
        let end = offset.saturating_add(len as u64).min(self.len as u64);
        let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
            return;
        };
        if end <= start {
            return;
        }
        // SAFETY: a range inside our own read-only file mapping; dropping
        // its page-table entries loses nothing (the next access faults the
        // page back in from the page cache).
        unsafe {
            libc::madvise(
                self.ptr.add(start).cast_mut().cast::<c_void>(),
                end - start,
                libc::MADV_DONTNEED,
            );
        }
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        if let Some(slot) = REGIONS.get(self.slot) {
            slot.start.store(0, Ordering::Release);
            slot.faulted.store(false, Ordering::Release);
            slot.end.store(0, Ordering::Release);
        }
        // SAFETY: unmapping our own mapping; no slice of it outlives `self`
        // (they borrow it).
        unsafe {
            libc::munmap(self.ptr.cast_mut().cast::<c_void>(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write;

    use super::*;

    #[test]
    fn reads_the_file_and_refuses_ranges_past_its_end() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[7u8; 10_000]).unwrap();
        let map = FileMap::new(&f).unwrap();
        assert_eq!(map.get(9_000, 1_000).unwrap(), &[7u8; 1_000][..]);
        assert!(map.get(9_001, 1_000).is_none());
        assert!(map.get(u64::MAX, 1).is_none());
        map.release(0, 10_000);
        assert_eq!(map.get(0, 3).unwrap(), &[7, 7, 7]);
        assert!(!map.faulted());
    }

    #[test]
    fn a_file_truncated_underneath_reads_zeros_and_is_marked_not_killed() {
        let page = PAGE.load(Ordering::Relaxed).max(4096);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![0xabu8; 4 * page]).unwrap();
        let map = FileMap::new(&f).unwrap();
        assert_eq!(map.get(0, 1).unwrap(), &[0xab]);
        f.set_len(page as u64).unwrap();
        // Past the new end: without the handler this access is SIGBUS.
        let tail = map.get(2 * page as u64, page).unwrap();
        assert!(tail.iter().all(|&b| b == 0));
        assert!(map.faulted());
        // Still inside the file: unchanged.
        assert_eq!(map.get(10, 1).unwrap(), &[0xab]);
        // Another map of another file is not marked.
        let g = tempfile::tempfile().unwrap();
        g.set_len(4096).unwrap();
        let other = FileMap::new(&g).unwrap();
        assert!(!other.faulted());
    }

    #[test]
    fn empty_files_are_not_mapped() {
        let f = tempfile::tempfile().unwrap();
        assert!(FileMap::new(&f).is_none());
    }
}
