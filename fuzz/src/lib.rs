//! Fuzz targets for every parser that reads bytes someone else wrote: the
//! disk-image readers (a relocation reads disks guests write), the
//! config-file scanners and editors (files of the service being moved),
//! and the plugin protocol decoder (lines from a plugin, or from the host).
//!
//! Each target is a plain function of the input bytes, which says whether
//! the input parsed (the corpus test holds every seed to it). Any error is
//! fine; a panic, an abort, a hang or unbounded memory is a bug. `scripts/fuzz`
//! runs them under libFuzzer (the `libfuzzer` feature, built with
//! coverage instrumentation on stable Rust); `tests/corpus.rs` runs every
//! committed corpus file through them in the ordinary test suite, so a
//! fixed crash stays fixed.
//!
//! Image targets exercise reading, not just opening: after a successful
//! open they walk the extent map and read guest bytes, all bounded, so a
//! valid header announcing a huge disk does not stall the fuzzer.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fluidcloud_migrators::config::{self, EndpointMap, EntryKind, Format};
use fluidcloud_migrators::image::qcow2::Qcow2Reader;
use fluidcloud_migrators::image::vhd::VhdReader;
use fluidcloud_migrators::image::vhdx::VhdxReader;
use fluidcloud_migrators::image::vmdk::{MonolithicSparseWriter, VmdkReader};
use fluidcloud_migrators::image::{ImageReader, extents, open, probe as detect};
use fluidcloud_plugins::protocol::{
    self, CancelCall, Hello, PluginDescriptor, ReplyBody, RollbackCall, StepCall, Version,
};
use fluidcloud_plugins::wire::{Frame, read_frame};
use fluidcloud_plugins::{ConfigFormat, Diagnostic, Estimate, StepOutput};

/// Most extents looked at per input.
const MAX_EXTENTS: usize = 64;
/// Bytes read from the start of each extent.
const READ: usize = 64 * 1024;
/// Longest plugin protocol line the target frames (the protocol's own
/// limit is 16 MiB; inputs are far smaller).
const MAX_LINE: usize = 64 * 1024;

/// The per-process directory inputs are written to, with the files that
/// backing names and VMDK extent lines in an input may name: `base.raw`
/// (1 MiB, data in its first 64 KiB) and `sparse.vmdk` (a 1 MiB
/// monolithicSparse extent written by our own writer). An input naming
/// `input.img` names itself: a loop the readers must notice.
fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = workdir_path();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the fuzz directory");
        let mut data = vec![0u8; 1 << 20];
        for (i, b) in data.iter_mut().take(64 << 10).enumerate() {
            *b = (i % 251) as u8;
        }
        std::fs::write(dir.join("base.raw"), &data).expect("writing base.raw");
        let mut w = MonolithicSparseWriter::create(&dir.join("sparse.vmdk"), 1 << 20)
            .expect("creating sparse.vmdk");
        w.write_grains(0, &data[..128 << 10])
            .expect("writing sparse.vmdk");
        w.finish(false).expect("finishing sparse.vmdk");
        dir
    })
}

/// Removes the directory of [`workdir`] (the corpus test calls it when it
/// is done). A libFuzzer process exits without a hook to call it, so
/// `scripts/fuzz` points theirs into `target/fuzz/tmp` and removes that.
pub fn remove_workdir() {
    let _ = std::fs::remove_dir_all(workdir_path());
}

/// Where [`workdir`] is: one directory per process.
fn workdir_path() -> PathBuf {
    std::env::temp_dir().join(format!("fluidcloud-fuzz-{}", std::process::id()))
}

/// Writes `data` to the directory's `name` and returns its path.
fn input(name: &str, data: &[u8]) -> PathBuf {
    let path = workdir().join(name);
    std::fs::write(&path, data).expect("writing the fuzz input");
    path
}

/// VHDX payload blocks lie 1 MiB or more into the file, past what a small
/// input holds: VHDX inputs are extended to this length with a hole (it
/// reads as zeros), so that the seeds need not store the blocks.
const VHDX_MIN_LEN: u64 = 8 << 20;

/// [`input`], extended to [`VHDX_MIN_LEN`] when it is a VHDX.
fn image_input(data: &[u8]) -> PathBuf {
    let path = input("input.img", data);
    if data.starts_with(b"vhdxfile") && (data.len() as u64) < VHDX_MIN_LEN {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(VHDX_MIN_LEN))
            .expect("extending the fuzz input");
    }
    path
}

/// Walks at most [`MAX_EXTENTS`] extents and reads the head of each, plus
/// the last bytes of the disk and an unaligned window; checks what the
/// trait promises about extents.
pub fn exercise(reader: &dyn ImageReader) {
    let size = reader.virtual_size();
    let mut buf = vec![0u8; READ];
    let mut expected = 0;
    for extent in extents(reader).take(MAX_EXTENTS) {
        let Ok(extent) = extent else { break };
        assert!(
            extent.length > 0 && extent.offset == expected && extent.end() <= size,
            "bad extent {extent:?} (expected one at {expected}, size {size})"
        );
        expected = extent.end();
        let n = usize::try_from(extent.length).unwrap_or(READ).min(READ);
        if let Some(b) = buf.get_mut(..n) {
            let _ = reader.read_at(extent.offset, b);
        }
    }
    if size > 0 {
        let n = usize::try_from(size).unwrap_or(READ).min(READ);
        if let Some(b) = buf.get_mut(..n) {
            let _ = reader.read_at(size - n as u64, b);
        }
        let n = n.min(4097);
        let at = ((size - n as u64) / 3) | 1;
        if let Some(b) = buf.get_mut(..n) {
            let _ = reader.read_at(at.min(size - n as u64), b);
        }
        // Past the end: an error, never a panic.
        let _ = reader.read_at(size, &mut buf[..1]);
        let _ = reader.extent_at(size - 1);
    }
}

/// Format detection, then `open` on what was detected, as the CLI does
/// with an image it knows nothing about.
pub fn probe(data: &[u8]) -> bool {
    let path = image_input(data);
    let _ = detect(&path);
    open(&path).map(|r| exercise(r.as_ref())).is_ok()
}

/// The qcow2 reader: header, extensions, backing names, snapshot table,
/// L1/L2 tables, compressed and extended-L2 clusters; the first snapshot
/// too when there is one.
pub fn qcow2(data: &[u8]) -> bool {
    let path = input("input.img", data);
    let Ok(r) = Qcow2Reader::open(&path, None) else {
        return false;
    };
    exercise(&r);
    if let Some(s) = r.details().snapshots.first()
        && let Ok(snap) = Qcow2Reader::open(&path, Some(&s.id))
    {
        exercise(&snap);
    }
    true
}

/// A VMDK text descriptor naming FLAT, SPARSE, ZERO and VMFS extents
/// (`base.raw` and `sparse.vmdk` exist beside it).
pub fn vmdk_descriptor(data: &[u8]) -> bool {
    let path = input("input.vmdk", data);
    VmdkReader::open(&path).map(|r| exercise(&r)).is_ok()
}

/// A VMDK sparse extent file (monolithicSparse, streamOptimized): header,
/// footer, embedded descriptor, grain directory and tables, markers and
/// compressed grains.
pub fn vmdk_sparse(data: &[u8]) -> bool {
    let path = input("input.img", data);
    VmdkReader::open(&path).map(|r| exercise(&r)).is_ok()
}

/// The VHD reader: footer (at the end or its copy at the start), dynamic
/// header and BAT.
pub fn vhd(data: &[u8]) -> bool {
    let path = input("input.img", data);
    VhdReader::open(&path).map(|r| exercise(&r)).is_ok()
}

/// The VHDX reader: headers, region tables, metadata and BAT (inputs
/// extended to [`VHDX_MIN_LEN`]).
pub fn vhdx(data: &[u8]) -> bool {
    let path = image_input(data);
    VhdxReader::open(&path).map(|r| exercise(&r)).is_ok()
}

/// The endpoint map the config target edits with.
fn endpoint_map() -> &'static EndpointMap {
    static MAP: OnceLock<EndpointMap> = OnceLock::new();
    MAP.get_or_init(|| {
        EndpointMap::new()
            .with(EntryKind::Host, "db.old.internal", "db.new.internal")
            .with(EntryKind::Ip, "10.0.0.5", "10.9.0.5")
            .with(
                EntryKind::Url,
                "https://s3.old.example",
                "https://s3.new.example",
            )
            .with(EntryKind::Bucket, "old-bucket", "new-bucket")
            .with(EntryKind::Path, "/run/secrets/old", "/run/secrets/new")
    })
}

/// The config-file scanners and editors: the first byte picks the format
/// (YAML, JSON, TOML, INI, `.env`, text), the rest is the file. Scans it
/// for endpoints (introspection), lists leftover references and adapts it
/// to the endpoint map (the config migrator).
pub fn config_scan(data: &[u8]) -> bool {
    let Some((&pick, content)) = data.split_first() else {
        return false;
    };
    let (cf, f) = match pick % 6 {
        0 => (ConfigFormat::Yaml, Format::Yaml),
        1 => (ConfigFormat::Json, Format::Json),
        2 => (ConfigFormat::Toml, Format::Toml),
        3 => (ConfigFormat::Ini, Format::Ini),
        4 => (ConfigFormat::Env, Format::Env),
        _ => (ConfigFormat::Text, Format::Text),
    };
    let scanned = fluidcloud_conduit::scan::scan("fuzz.conf", cf, content).is_ok();
    let Ok(text) = std::str::from_utf8(content) else {
        return scanned;
    };
    let map = endpoint_map();
    let _ = config::leftovers("fuzz.conf", text, f, map);
    // Adapting may refuse a value it cannot rewrite safely: still parsed.
    let _ = config::adapt("fuzz.conf", text, f, map, &[]);
    scanned
}

/// The plugin protocol decoder, both directions: the input is framed into
/// lines as the host and `serve` frame a plugin's stdout and stdin (the
/// first byte sets the read buffer's size, so lines straddle reads), and
/// each line is decoded as a reply and as a request, then as the typed
/// values the host and the SDK expect for each method.
pub fn plugin_protocol(data: &[u8]) -> bool {
    let Some((&cap, rest)) = data.split_first() else {
        return false;
    };
    let mut r = std::io::BufReader::with_capacity(usize::from(cap).max(1), rest);
    let mut line = Vec::new();
    let me = Hello::current(&[protocol::FEATURE_PROGRESS]);
    let mut decoded = false;
    loop {
        match read_frame(&mut r, MAX_LINE, &mut line) {
            Ok(Frame::Line) => {}
            Ok(Frame::Eof | Frame::TooLong) | Err(_) => return decoded,
        }
        let reply = protocol::decode_reply(&line);
        decoded |= reply.is_ok();
        match reply {
            Ok((_, ReplyBody::Result(v))) => {
                if let Ok(h) = serde_json::from_value::<Hello>(v.clone()) {
                    let _ = me.check_peer(&h);
                    let _ = h.has(protocol::FEATURE_CANCEL);
                }
                let _ = serde_json::from_value::<PluginDescriptor>(v.clone());
                let _ = serde_json::from_value::<Vec<Diagnostic>>(v.clone());
                let _ = serde_json::from_value::<Estimate>(v.clone());
                let _ = serde_json::from_value::<StepOutput>(v);
            }
            Ok((_, ReplyBody::Error(e))) => {
                let _ = e.to_diagnostic("fuzz");
                let _ = e.into_error("fuzz");
            }
            Ok(_) | Err(_) => {}
        }
        if let Ok(req) = protocol::decode_request(&line) {
            decoded = true;
            let p = req.params;
            match req.method.as_str() {
                protocol::method::HELLO => {
                    if let Ok(h) = serde_json::from_value::<Hello>(p) {
                        let _ = me.check_peer(&h);
                    }
                }
                protocol::method::ROLLBACK => {
                    let _ = serde_json::from_value::<RollbackCall>(p);
                }
                protocol::method::CANCEL => {
                    let _ = serde_json::from_value::<CancelCall>(p);
                }
                _ => {
                    let _ = serde_json::from_value::<StepCall>(p);
                }
            }
        }
        if let Ok(s) = std::str::from_utf8(&line) {
            let _ = Version::parse(s);
        }
    }
}

/// A fuzz target: a function of the input bytes, true if it parsed.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name, for the corpus test and tools.
pub const TARGETS: &[(&str, Target)] = &[
    ("probe", probe),
    ("qcow2", qcow2),
    ("vmdk_descriptor", vmdk_descriptor),
    ("vmdk_sparse", vmdk_sparse),
    ("vhd", vhd),
    ("vhdx", vhdx),
    ("config_scan", config_scan),
    ("plugin_protocol", plugin_protocol),
];
