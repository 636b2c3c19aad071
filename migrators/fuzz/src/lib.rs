//! What every fuzz target does with its input: write it to a file (the
//! parsers read files, with `pread`), open it with one parser, and if that
//! succeeds walk the extent map and read guest data, all bounded so that a
//! valid image with a huge virtual size does not stall the fuzzer. Any
//! error is fine; a panic, an abort, a hang or unbounded memory is a bug.

use std::path::PathBuf;
use std::sync::OnceLock;

use fluidcloud_migrators::image::{ImageReader, extents};

/// Largest number of extents looked at per input.
const MAX_EXTENTS: usize = 64;
/// Bytes read from the start of each extent.
const READ: usize = 64 * 1024;

/// A private directory for this process's input file: backing file names
/// and VMDK extent names resolve inside it (or, when absolute, anywhere;
/// opening them read-only is harmless).
fn input_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fluidcloud-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz directory");
        dir.join("input.img")
    })
}

/// Writes `data` to the input file and runs `open` on it; on success
/// exercises the reader.
pub fn run<R, F>(data: &[u8], open: F)
where
    R: ImageReader,
    F: FnOnce(&std::path::Path) -> fluidcloud_migrators::Result<R>,
{
    let path = input_path();
    std::fs::write(path, data).expect("writing the fuzz input");
    if let Ok(reader) = open(path) {
        exercise(&reader);
    }
}

/// [`run`] for openers that return a boxed reader (`image::open`).
pub fn run_boxed<F>(data: &[u8], open: F)
where
    F: FnOnce(&std::path::Path) -> fluidcloud_migrators::Result<Box<dyn ImageReader>>,
{
    let path = input_path();
    std::fs::write(path, data).expect("writing the fuzz input");
    if let Ok(reader) = open(path) {
        exercise(reader.as_ref());
    }
}

/// Walks at most [`MAX_EXTENTS`] extents and reads the head of each, plus
/// the last bytes of the disk and an unaligned window.
pub fn exercise(reader: &dyn ImageReader) {
    let size = reader.virtual_size();
    let mut buf = vec![0u8; READ];
    for extent in extents(reader).take(MAX_EXTENTS) {
        let Ok(extent) = extent else { break };
        assert!(extent.length > 0 && extent.end() <= size, "bad extent {extent:?}");
        let n = usize::try_from(extent.length).unwrap_or(READ).min(READ);
        let _ = reader.read_at(extent.offset, &mut buf[..n]);
    }
    if size > 0 {
        let n = usize::try_from(size).unwrap_or(READ).min(READ);
        let _ = reader.read_at(size - n as u64, &mut buf[..n]);
        let n = n.min(4097);
        let at = (size - n as u64) / 3 | 1;
        let _ = reader.read_at(at.min(size - n as u64), &mut buf[..n]);
    }
}
