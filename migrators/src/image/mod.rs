//! Disk images: format detection ([`probe`]), readers ([`reader`]) and
//! writers ([`qcow2`], [`vmdk`], [`vhd`], [`vhdx`], raw through
//! [`convert`]).
//!
//! Headers are guest-controlled bytes: every size and count read from one
//! is checked against the file's length and a documented cap before
//! anything is allocated, and readers page their top-level tables, so
//! metadata memory is bounded whatever the virtual size. [`limits`] holds
//! every cap, with the specification or QEMU limit it follows.

use fluidcloud_plugins::ImageFormat;
use serde::Serialize;

pub mod convert;
pub mod limits;
mod mapped;
mod probe;
pub mod qcow2;
pub mod reader;
mod table;
pub mod upload;
pub mod verify;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use convert::{ConvertOptions, ConvertSummary, VhdSubformat, convert, convert_to_object};
pub use probe::probe;
pub use reader::{
    BackingPolicy, Extent, ExtentKind, Extents, ImageReader, OpenOptions, RawReader, data_bytes,
    extents, open, open_with,
};
pub use verify::{ChainEntry, CheckReport, check, compare};

/// What [`probe`] learnt about an image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// Container format, detected from the content.
    pub format: ImageFormat,
    /// Size of the disk the guest sees, in bytes.
    pub virtual_size: u64,
    /// Length of the file (`st_size`).
    pub file_size: u64,
    /// Disk space the file really uses (`st_blocks * 512`), smaller than
    /// `file_size` for sparse files.
    pub allocated_bytes: u64,
    /// Backing (parent) image named in the header, as written there: qcow2
    /// backing file, VMDK `parentFileNameHint`, VHD parent name. Not read
    /// for VHDX yet (its parent locator is left to the VHDX reader).
    pub backing_file: Option<String>,
    /// Cluster size in bytes (qcow2 only).
    pub cluster_size: Option<u32>,
    /// qcow2 version, 2 or 3 (qcow2 only).
    pub qcow2_version: Option<u32>,
}

/// Opens an image file for reading, with its length; errors name the path.
pub(crate) fn open_file(path: &std::path::Path) -> crate::Result<(std::fs::File, u64)> {
    let file = std::fs::File::open(path)
        .map_err(|e| crate::Error::io(format!("opening image {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| crate::Error::io(format!("reading metadata of image {}", path.display()), e))?
        .len();
    Ok((file, len))
}
