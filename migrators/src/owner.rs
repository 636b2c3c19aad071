//! Who created an output file: `.<name>.fcowner` beside it.
//!
//! A relocation must never adopt, overwrite or delete what it did not
//! create, and two relocations of one service to one site write the same
//! output names. So every file an output step creates gets a sidecar naming
//! its creator (`RELOCATION/STEP`), written before the file appears under
//! its name; a later run or a rollback acts on the file only when it finds
//! its own tag there. (Volume copies keep the same tag in their manifest and
//! progress sidecars.)

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The owner sidecar of `output`.
pub fn sidecar_path(output: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(output.file_name().unwrap_or_default());
    name.push(".fcowner");
    output.with_file_name(name)
}

/// The creator tag recorded for `output`, if any.
///
/// # Errors
/// [`Error::Io`] when the sidecar exists but cannot be read.
pub fn read(output: &Path) -> Result<Option<String>> {
    let p = sidecar_path(output);
    match std::fs::read_to_string(&p) {
        Ok(t) => Ok(Some(t.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(
            format!("reading owner record {}", p.display()),
            e,
        )),
    }
}

/// Records `tag` as the creator of `output`, durably (written and synced
/// through a temporary file, then renamed).
///
/// # Errors
/// [`Error::Io`] naming the sidecar.
pub fn write(output: &Path, tag: &str) -> Result<()> {
    let p = sidecar_path(output);
    let tmp = p.with_extension("fcowner.tmp");
    let io = |what: &str, e| Error::io(format!("{what} owner record {}", tmp.display()), e);
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
    f.write_all(format!("{tag}\n").as_bytes())
        .map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, &p).map_err(|e| io("renaming", e))
}

/// Removes the sidecar of `output` (nothing when there is none).
///
/// # Errors
/// [`Error::Io`] naming the sidecar.
pub fn remove(output: &Path) -> Result<()> {
    let p = sidecar_path(output);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(
            format!("removing owner record {}", p.display()),
            e,
        )),
    }
}

/// The relocation of a creator tag `RELOCATION/STEP` (the whole tag when
/// it has no step).
pub fn relocation_of(tag: &str) -> &str {
    tag.split('/').next().unwrap_or(tag)
}

/// Whether two creator tags belong to the same relocation: a later step of
/// a relocation may write or remove what an earlier one of it created.
pub fn same_relocation(a: &str, b: &str) -> bool {
    relocation_of(a) == relocation_of(b)
}

/// "created by `TAG`" or "created by no relocation", for messages.
pub fn describe(tag: Option<&str>) -> String {
    tag.map_or_else(
        || "created by no relocation (no owner record)".to_owned(),
        |t| format!("created by `{t}`"),
    )
}
