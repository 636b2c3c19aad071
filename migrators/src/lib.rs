//! # fluidcloud migrators and their disk-image tooling
//!
//! Moving a service between sites means moving its disks, and sites disagree
//! on disk formats. This crate holds the image tooling the migrators share:
//!
//! - [`image::probe`] tells what an image file is (qcow2, VMDK, VHD, VHDX or
//!   raw) from its content, never its name, and reads the header: virtual
//!   size, backing file, cluster size. It only reads headers, so it is cheap,
//!   and it bounds-checks every field, so a hostile file gives a typed
//!   [`Error`] rather than a panic.
//! - [`image::qcow2::Qcow2Writer`] writes a qcow2 v3 image in one sequential
//!   pass from guest data that arrives in offset order (what a converter
//!   reading a source disk front to back produces), optionally with zlib or
//!   zstd compressed clusters and a backing file.
//! - [`image::open`] opens any raw, qcow2, VMDK or VHD image, with its
//!   backing chain, as an [`image::ImageReader`]: random access plus an
//!   extent map (data / zero / unallocated), `Send + Sync` so several
//!   threads read (and decompress) at once.
//! - [`image::convert`] streams a reader into a raw, qcow2, fixed VHD or
//!   streamOptimized VMDK file with bounded memory, reading and
//!   (de)compressing on every core; [`image::check`] and
//!   [`image::compare`] verify images.
//! - [`ImageConvert`] is the `image-convert` migrator built on them.
//! - [`config`] adapts configuration files (YAML, JSON, TOML, INI, `.env`,
//!   plain text) to a new site from an endpoint map and explicit rules,
//!   editing values in place; [`ConfigAdapt`] is the `config-adapt`
//!   migrator built on it (`docs/config-adapt.md`).
//! - [`volume::copy`] copies a block volume (raw file or any image) into a
//!   sparse raw file in BLAKE3-hashed chunks with a Merkle manifest beside
//!   it: resumable after a crash, and incremental (only changed chunks are
//!   written) on a second run; [`VolumeCopy`] is the `volume-copy` migrator.
//!   `docs/volumes.md` describes the manifest and progress-log formats.
//! - [`objects`] copies buckets (S3-compatible or directories) with
//!   verification, skipping and retries; [`ObjectCopy`] is the
//!   `object-copy` migrator built on it.
//!
//! `docs/images.md` lists every format and feature with its status and the
//! qemu-img differential tests behind each.
//! - [`error`] is the crate's error type; it maps into the SDK's
//!   [`fluidcloud_plugins::Error`] and says whether a retry may help.
//!
//! ## Why the qcow2 writer computes refcounts at the end
//!
//! qcow2 keeps a reference count for every cluster of the file, including
//! the clusters holding the refcounts themselves. Updating them as data
//! arrives (as QEMU does) means rewriting refcount blocks in place and
//! growing the refcount table when it fills, which costs random writes. The
//! writer instead appends every cluster exactly once — data clusters in guest
//! order, each L2 table after the data it maps, then the L1 table — so that
//! when the data ends, every cluster of the file has refcount 1 and the
//! refcount structures depend only on how many clusters there are. `finish`
//! finds the smallest refcount table and block count that also covers
//! themselves (a fixed point reached in a few rounds), appends them, and
//! only then writes the header, so an interrupted write never leaves a file
//! that looks like a valid image.
//!
//! All-zero clusters are never stored: they stay unallocated and read as
//! zeros, so sparse disks stay small.
//!
//! ## Memory
//!
//! The writer holds one L2 table, one partial cluster (each at most 2 MiB
//! with the largest cluster size), an output buffer of about 8 MiB, and
//! 16 bytes per L2 table already written. Memory therefore does not grow
//! with the virtual size beyond those 16 bytes per `cluster_size² / 8` bytes
//! of guest data (per 512 MiB with the default 64 KiB clusters); virtual
//! sizes are bounded only by QEMU's own limits (32 MiB L1 table, 8 MiB
//! refcount table), which `create` checks.

pub mod changes;
pub mod config;
pub mod error;
pub mod fsx;
pub mod image;
pub mod image_convert;
pub mod objects;
pub mod owner;
pub mod volume;

pub use config::ConfigAdapt;
pub use error::{Error, Result};
pub use image::qcow2::{Qcow2Options, Qcow2Writer, WriteSummary};
pub use image::{ImageInfo, probe};
pub use image_convert::ImageConvert;
pub use objects::ObjectCopy;
pub use volume::VolumeCopy;
