//! Disks moved from one site agent to another, never through the
//! orchestrator. `docs/transfer.md` describes the protocol and its figures.
//!
//! The orchestrator asks the source agent for a **ticket** for one disk,
//! bound to the target agent's certificate fingerprint and short-lived,
//! then asks the target agent to **pull** the disk with it, giving the
//! source's address and pinned fingerprint. The target opens several
//! TLS connections to the source, one per **stripe** (stripe `k` of `n`
//! carries chunks `k, k+n, k+2n, …`), presenting its own certificate:
//!
//! - the target first hashes what it holds already (a resumed or repeated
//!   transfer), and sends those leaves with each stripe request; chunks
//!   that match come back as `SAME`, holes and zero chunks as `ZERO`, and
//!   only the rest as data, compressed with zstd at a level that follows
//!   the link ([`Level`]), each with its BLAKE3 hash ([`frame`]);
//! - a cut connection is opened again from the stripe's next chunk, with
//!   bounded retries and backoff; what arrived is on the target's disk;
//! - at the end the target compares the Merkle root of what it wrote with
//!   the root the source computes of its disk, the same root
//!   `volume-copy` records (`fluidcloud_migrators::volume::Manifest`).
//!
//! [`source`] is the sending half, [`pull`] the receiving half and
//! [`orchestrate`] the control half.

pub mod frame;
pub mod limit;
pub mod local;
pub mod objects;
pub mod orchestrate;
pub mod pull;
pub mod source;

use std::collections::BTreeMap;

use fluidcloud_migrators::image::{ExtentKind, ImageReader};
use fluidcloud_migrators::volume::Leaf;
pub use fluidcloud_migrators::volume::manifest::{hex, unhex32};
use fluidcloud_plugins::{Error, ImageFormat, Result};
use serde::{Deserialize, Serialize};

use crate::driver::{DiskStore, ImageRecord};

/// Chunk size of transfers: the unit of hashing, resending and resuming.
/// 4 MiB, as `volume-copy`'s default, so both give the same Merkle root.
pub const CHUNK: u64 = 4 << 20;

/// Stripes (connections) of a transfer unless the orchestrator says.
pub const DEFAULT_STREAMS: u32 = 4;

/// Most stripes of one transfer.
pub const MAX_STREAMS: u32 = 16;

/// A disk at a site: which store, its name, its format there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    /// Image or block store.
    pub store: DiskStore,
    /// Name in the store.
    pub name: String,
    /// Its format: at the source, how to read it (as the site declares);
    /// at the target, how to keep it.
    pub format: ImageFormat,
}

impl std::fmt::Display for DiskRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.store.as_str(), self.name, self.format)
    }
}

/// Orchestrator → source agent: a ticket to read one disk or one bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    /// The disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskRef>,
    /// Or the bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    /// Fingerprint (`sha256:HEX`) of the agent that will pull it.
    pub peer: String,
    /// How long the ticket admits new connections, in seconds.
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// Source agent → orchestrator: the ticket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketGrant {
    /// The secret the pulling agent presents (`Authorization: Ticket …`).
    pub ticket: String,
    /// Size of the disk.
    pub virtual_size: u64,
    /// Bytes of data (allocated, not holes) in the disk.
    pub data_bytes: u64,
    /// Seconds the ticket admits new connections.
    pub ttl_s: u64,
}

/// Target agent → source agent: one stripe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeRequest {
    /// Stripe number.
    pub stripe: u64,
    /// Stripes in all.
    pub stripes: u64,
    /// First chunk index to send (a resumed stripe starts past what it has).
    pub from: u64,
    /// Leaves of the chunks the target holds with data, by index, hex.
    #[serde(default)]
    pub have: BTreeMap<u64, String>,
    /// Seconds the source may idle waiting for the receiver before it
    /// gives up the stripe.
    #[serde(default)]
    pub idle_s: Option<u64>,
    /// Only these chunks of the stripe, at or after `from`, in increasing
    /// order: the target knows every other chunk is unchanged (a change
    /// set after a verified transfer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Vec<u64>>,
}

/// Source agent → target agent: the source disk's Merkle root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootReply {
    /// `Manifest::root_hex` of the source disk.
    pub root: String,
    /// Chunks holding data.
    pub data_chunks: u64,
}

/// Where a pull reads from.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRef {
    /// The source agent's URL (`https://HOST:PORT`).
    pub url: String,
    /// Its pinned certificate fingerprint.
    pub fingerprint: String,
    /// The ticket it granted.
    pub ticket: String,
}

/// Orchestrator → target agent: pull one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// The source agent and ticket.
    pub source: PeerRef,
    /// The disk at the source (for messages).
    pub from: DiskRef,
    /// The disk to write.
    pub into: DiskRef,
    /// Size of the disk.
    pub virtual_size: u64,
    /// Creator tag of the written disk (`RELOCATION/STEP`).
    pub owner: String,
    /// Stripes (connections).
    #[serde(default)]
    pub streams: Option<u32>,
    /// Bytes per second on the wire, for this pull and every other pull
    /// naming the same `limit_key`.
    #[serde(default)]
    pub bwlimit: Option<u64>,
    /// What the limit is shared by (a relocation, a site pair).
    #[serde(default)]
    pub limit_key: Option<String>,
    /// The only chunks that can differ from what the target's last
    /// verified pull of this disk (by the same relocation) left: the
    /// source's change set since. Without the leaves of that pull the
    /// target looks at every chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only: Option<Vec<u64>>,
}

/// Where a pull is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullState {
    /// Hashing what the target has, or moving chunks.
    Running,
    /// Done and verified.
    Succeeded,
    /// Stopped; `error` says why.
    Failed,
}

/// A pull's progress and outcome, as the target agent reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PullStatus {
    /// Its id at the target agent.
    pub id: String,
    /// Where it is.
    pub state: Option<PullState>,
    /// Chunks of the disk.
    pub chunks: u64,
    /// Chunks settled (written, zero or equal).
    pub done: u64,
    /// Chunks that came as data.
    pub data_chunks: u64,
    /// Guest bytes that came as data.
    pub data_bytes: u64,
    /// Bytes of frames received.
    pub wire_bytes: u64,
    /// Chunks that came as data more than once (after a cut connection).
    pub resent_chunks: u64,
    /// Connections opened again after a failure.
    pub reconnects: u64,
    /// Chunks the target held already (sent as `SAME`).
    pub same_chunks: u64,
    /// Seconds since the pull started.
    pub elapsed_s: f64,
    /// Whether only the chunks of the change set were looked at.
    #[serde(default)]
    pub tracked: bool,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The kind of that error (as in an agent's problem documents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// The verified Merkle root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// The written disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<ImageRecord>,
}

/// Chunks of a disk of `size` bytes.
pub fn chunks_of(size: u64) -> u64 {
    size.div_ceil(CHUNK)
}

/// Bytes of chunk `index` of a disk of `size` bytes.
pub fn chunk_len(size: u64, index: u64) -> u64 {
    CHUNK.min(size.saturating_sub(index.saturating_mul(CHUNK)))
}

/// The leaf of chunk `index` of `reader`, reading only its data ranges
/// into `buf` (which then holds the chunk, zeros in its holes). `Zero`
/// leaves may leave `buf` unread.
///
/// # Errors
/// The reader's errors; an extent map that does not advance.
pub fn read_leaf(reader: &dyn ImageReader, index: u64, buf: &mut Vec<u8>) -> Result<Leaf> {
    let size = reader.virtual_size();
    let off = index.saturating_mul(CHUNK);
    let len = chunk_len(size, index);
    let end = off + len;
    let mut ranges = Vec::new();
    let mut pos = off;
    while pos < end {
        let e = reader.extent_at(pos).map_err(Error::from)?;
        let e_end = e.end().min(end);
        if e.offset > pos || e_end <= pos {
            return Err(Error::Corrupt {
                what: format!("extent map of {}", reader.path().display()),
                offset: pos,
            });
        }
        if e.kind == ExtentKind::Data {
            ranges.push((pos, e_end));
        }
        pos = e_end;
    }
    if ranges.is_empty() {
        return Ok(Leaf::Zero);
    }
    buf.clear();
    buf.resize(len as usize, 0);
    for (a, b) in ranges {
        let slice = buf
            .get_mut((a - off) as usize..(b - off) as usize)
            .unwrap_or_default();
        reader.read_at(a, slice).map_err(Error::from)?;
    }
    if buf.iter().all(|&b| b == 0) {
        return Ok(Leaf::Zero);
    }
    Ok(Leaf::Data(*blake3::hash(buf).as_bytes()))
}

/// The zstd level of one stripe, following the link. After each
/// compressed chunk it compares the time the chunk took to compress with
/// the time the stripe then waited for the link to take it: waiting more
/// than twice as long as compressing means the link is the bottleneck and
/// the CPU has time to spare, so the level goes up one step; waiting less
/// than half as long means the CPU is the bottleneck (the link idles while
/// we compress), so it goes down one. Whether a chunk is worth compressing
/// at all is decided per chunk from samples ([`worth_compressing`]), so a
/// disk's random half costs little CPU and its text half still shrinks.
#[derive(Debug, Clone)]
pub struct Level {
    level: i32,
}

/// Highest zstd level the adaptation uses: above it, compression costs
/// far more CPU per byte than it saves on any link (zstd -6 compresses at
/// about a fifth of -1's speed for a few per cent more).
const MAX_LEVEL: i32 = 6;

impl Default for Level {
    fn default() -> Self {
        Self { level: 1 }
    }
}

impl Level {
    /// The level for the next chunk.
    pub fn now(&self) -> i32 {
        self.level
    }

    /// Learns from one compressed chunk: how long compressing it took,
    /// and how long sending it then waited for the link.
    pub fn learn(&mut self, compress: std::time::Duration, waited: std::time::Duration) {
        if waited > compress * 2 {
            self.level = (self.level + 1).min(MAX_LEVEL);
        } else if waited * 2 < compress {
            self.level = (self.level - 1).max(1);
        }
    }
}

/// Bytes of each sample [`worth_compressing`] tries.
const SAMPLE: usize = 16 << 10;

/// Whether zstd would shrink `bytes`: three samples (start, middle, end)
/// compressed at level 1, and any that saves 1/16 says yes. Costs about
/// 1 % of compressing the whole chunk; random data and media say no.
pub fn worth_compressing(bytes: &[u8]) -> bool {
    let n = bytes.len();
    if n <= SAMPLE {
        return zstd::bulk::compress(bytes, 1).is_ok_and(|z| z.len() < n - n / 16);
    }
    [0, n / 2 - SAMPLE / 2, n - SAMPLE].iter().any(|&at| {
        let sample = bytes.get(at..at + SAMPLE).unwrap_or_default();
        zstd::bulk::compress(sample, 1).is_ok_and(|z| z.len() < SAMPLE - SAMPLE / 16)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_level_climbs_on_a_busy_link_and_falls_when_the_cpu_lags() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let mut l = Level::default();
        // The link keeps the stripe waiting: compress harder.
        for _ in 0..20 {
            l.learn(ms(5), ms(30));
        }
        assert_eq!(l.now(), MAX_LEVEL);
        // Compressing takes longer than the link: back down.
        for _ in 0..3 {
            l.learn(ms(40), ms(1));
        }
        assert_eq!(l.now(), MAX_LEVEL - 3);
        // Balanced: stays.
        l.learn(ms(10), ms(10));
        assert_eq!(l.now(), MAX_LEVEL - 3);
        for _ in 0..20 {
            l.learn(ms(40), Duration::ZERO);
        }
        assert_eq!(l.now(), 1);
    }

    #[test]
    fn samples_tell_text_from_noise() {
        let mut x: u64 = 7;
        let noise: Vec<u8> = (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!worth_compressing(&noise));
        let text = b"GET /cart/42 200 in 17 ms\n".repeat(200_000);
        assert!(worth_compressing(&text[..CHUNK as usize]));
        // Noise with a run of zeros in the middle still compresses.
        let mut mixed = noise.clone();
        mixed[1 << 20..3 << 20].fill(0);
        assert!(worth_compressing(&mixed));
    }
}
