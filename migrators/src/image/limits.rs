//! Every cap on what an image header may ask of us, in one place.
//!
//! Image headers are bytes a guest can write (a raw disk that begins with a
//! qcow2 header *is* a qcow2 image by content), so every size and count
//! read from one is checked against the file's length and against a cap
//! below *before* anything is allocated. The caps are the format's own
//! limit where its specification or QEMU states one, so no image QEMU
//! opens or creates is refused for being too large.
//!
//! Top-level tables (qcow2 L1, VMDK grain directory, VHD and VHDX BAT) are
//! not loaded whole: they are read in pages of [`TABLE_PAGE_BYTES`] on
//! demand and at most [`TABLE_CACHE_BYTES`] of pages are kept, like the
//! second-level tables (qcow2 L2, VMDK grain tables). So a reader's
//! metadata memory is bounded by these caches whatever the virtual size:
//! an image claiming 2^61 bytes costs what its allocated tables cost, up
//! to the caches, not what its virtual size would need. Conversion and
//! volume copy walk the extent map and keep state only for ranges that
//! hold data (see `convert` and `crate::volume`).
//!
//! Writers hold their top-level table (or, for qcow2, one entry per L2
//! table written) in memory; each refuses a virtual size past its format's
//! limit with [`crate::Error::InvalidArgument`] naming the output file and
//! the limit, before it creates the file. A raw or fixed-VHD output has no
//! table: a size the file system cannot hold fails at `set_len` (`EFBIG`).
//!
//! `docs/images.md` ("Limits and fuzzing") lists the same numbers.

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

// --- Shared by every reader -------------------------------------------

/// Bytes of a top-level table read at once (one cached page).
pub const TABLE_PAGE_BYTES: u64 = 64 * KIB;
/// Pages of one top-level table kept in memory, in bytes (whole tables up
/// to this size stay cached after their first use).
pub const TABLE_CACHE_BYTES: u64 = 4 * MIB;
/// Backing chains deeper than this are refused (QEMU's own limit is in the
/// same range); it also bounds memory and open files.
pub const MAX_CHAIN_DEPTH: usize = 32;

// --- qcow2 ---------------------------------------------------------------

/// Largest qcow2 L1 table, in bytes: QEMU's `QCOW_MAX_L1_SIZE` (32 MiB).
/// It bounds the virtual size: 2^61 bytes (2 EiB) with 2 MiB clusters, 2
/// PiB with 64 KiB clusters.
pub const QCOW2_MAX_L1_BYTES: u64 = 32 * MIB;
/// Largest qcow2 refcount table, in bytes: QEMU's `QCOW_MAX_REFTABLE_SIZE`
/// (8 MiB). Only the writer uses it (readers never read refcounts).
pub const QCOW2_MAX_REFTABLE_BYTES: u64 = 8 * MIB;
/// Most internal snapshots: QEMU's `QCOW_MAX_SNAPSHOTS` (65536).
pub const QCOW2_MAX_SNAPSHOTS: u32 = 65536;
/// Largest extra data of one snapshot entry: QEMU's
/// `QCOW_MAX_SNAPSHOT_EXTRA_DATA` (1 KiB).
pub const QCOW2_MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Largest snapshot table, in bytes: QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`
/// (1 KiB per snapshot on average, 64 MiB). Ids and names are held in
/// memory, so this bounds them.
pub const QCOW2_MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * QCOW2_MAX_SNAPSHOTS as u64;
/// Longest backing file name: QEMU's limit (1023 bytes).
pub const QCOW2_MAX_BACKING_NAME: u32 = 1023;
/// qcow2 L2 tables kept in memory, in bytes.
pub const QCOW2_L2_CACHE_BYTES: u64 = 32 * MIB;

// --- VMDK ------------------------------------------------------------------

/// Longest text descriptor read (a separate descriptor file or the one
/// embedded in a sparse extent), in bytes.
pub const VMDK_MAX_DESCRIPTOR: u64 = MIB;
/// Most extent lines in a descriptor. A twoGbMaxExtent image of VMware's
/// largest disk (62 TB) has 31 744; each extent holds an open file.
pub const VMDK_MAX_EXTENTS: usize = 32 * 1024;
/// Largest VMDK virtual size (all extents, or one sparse extent's
/// capacity): 64 TiB, above VMware's limit of 62 TB per virtual disk and
/// QEMU's "slightly less than 64 TB" for seSparse. ZERO extents, which
/// cost nothing to describe, are held to it like every other.
pub const VMDK_MAX_SIZE: u64 = 64 * TIB;
/// Largest grain, in sectors: 2 MiB, the largest qcow2 cluster. VMware and
/// QEMU write 64 KiB grains; a compressed grain is inflated into a buffer
/// of this size on every read, so it is kept small.
pub const VMDK_MAX_GRAIN_SECTORS: u64 = 4096;
/// Most entries per grain table: QEMU's limit (512, what VMware writes).
pub const VMDK_MAX_GT_ENTRIES: u64 = 512;
/// Most grain directory entries: QEMU's limit (32 Mi entries).
pub const VMDK_MAX_GD_ENTRIES: u64 = 32 * MIB;
/// VMDK grain tables kept in memory per image, in bytes (shared out
/// between the sparse extents of a descriptor).
pub const VMDK_GT_CACHE_BYTES: u64 = 16 * MIB;
/// Largest monolithicSparse VMDK we write: one hosted sparse extent, QEMU's
/// `VMDK_EXTENT_MAX_SECTORS` (2^32 sectors, 2 TiB; grain offsets are
/// 32-bit sector numbers).
pub const VMDK_MAX_SPARSE_EXTENT: u64 = 2 * TIB;

// --- VHD -------------------------------------------------------------------

/// Largest dynamic VHD: the specification's 2040 GiB (QEMU's
/// `VHD_MAX_SECTORS`). Fixed VHDs have no table and are held only by the
/// file system, like raw output.
pub const VHD_MAX_DYNAMIC_SIZE: u64 = 2040 * GIB;
/// Largest VHD block we read (the format allows any power of two; 2 MiB is
/// the norm).
pub const VHD_MAX_BLOCK: u64 = 256 * MIB;
/// Most BAT entries of a dynamic VHD we read: 16 Mi (64 MiB of table).
/// 2040 GiB in blocks of 512 KiB, QEMU's smallest, needs 4 Mi.
pub const VHD_MAX_BAT_ENTRIES: u64 = 16 * MIB;

// --- VHDX ------------------------------------------------------------------

/// Largest VHDX virtual size: the specification's 64 TiB.
pub const VHDX_MAX_SIZE: u64 = 64 * TIB;
/// Smallest and largest VHDX block: the specification's 1 MiB and 256 MiB.
pub const VHDX_MIN_BLOCK: u64 = MIB;
/// See [`VHDX_MIN_BLOCK`].
pub const VHDX_MAX_BLOCK: u64 = 256 * MIB;
/// Largest VHDX BAT, in bytes: what the largest legal image needs (64 TiB
/// in 1 MiB blocks with 512-byte sectors: 2^26 payload entries and one
/// sector-bitmap entry per 4096 of them), rounded up to a MiB.
pub const VHDX_MAX_BAT_BYTES: u64 = {
    let payload = VHDX_MAX_SIZE / VHDX_MIN_BLOCK;
    let chunk_ratio = (1 << 23) * 512 / VHDX_MIN_BLOCK;
    let entries = payload + payload.div_ceil(chunk_ratio);
    (entries * 8).div_ceil(MIB) * MIB
};
/// Largest VHDX metadata region we accept (the specification's is 1 MiB
/// in practice; only its first 64 KiB, the table, are read).
pub const VHDX_MAX_METADATA_BYTES: u64 = 256 * MIB;

// The caps hold the largest legal images (checked at compile time).
const _: () = {
    // qcow2 with 2 MiB clusters: 2^18 entries per L2 table, each mapping
    // 512 GiB; 2^61 bytes need exactly the whole L1 cap.
    let per_l1_entry = (2 * MIB) * (2 * MIB / 8);
    assert!((1u64 << 61) / per_l1_entry * 8 == QCOW2_MAX_L1_BYTES);
    // VHDX: 64 TiB in 1 MiB blocks, with its sector-bitmap entries.
    assert!(VHDX_MAX_BAT_BYTES >= (64 * TIB / MIB) * 8);
    assert!(VHDX_MAX_BAT_BYTES < 520 * MIB);
};
