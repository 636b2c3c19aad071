//! The sending half: tickets, and the stripes a source agent streams.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fluidcloud_migrators::image::ImageReader;
use fluidcloud_migrators::volume::{Leaf, Manifest};
use fluidcloud_plugins::{Error, Result};
use tokio::sync::mpsc;

use super::frame::{self, Marker};
use super::{
    CHUNK, DiskRef, Level, RootReply, StripeRequest, TicketGrant, TicketRequest, chunks_of, hex,
    read_leaf, unhex32, worth_compressing,
};
use crate::driver::Disks;

/// How long a ticket admits new connections unless the orchestrator says.
pub const DEFAULT_TICKET_TTL: Duration = Duration::from_secs(3600);
/// The longest ticket lifetime an agent grants.
const MAX_TICKET_TTL: Duration = Duration::from_secs(24 * 3600);

/// A granted ticket.
#[derive(Debug)]
pub struct Ticket {
    /// The disk it reads.
    pub disk: Option<DiskRef>,
    /// Or the bucket.
    pub bucket: Option<String>,
    /// The certificate fingerprint the pulling agent must present.
    pub peer: String,
    /// Until when it admits new connections.
    pub expires: Instant,
    /// Size of the disk when granted.
    pub virtual_size: u64,
    /// Leaves the stripes computed, for the root.
    leaves: Mutex<BTreeMap<u64, Leaf>>,
}

impl Ticket {
    /// The disk of a disk ticket.
    ///
    /// # Errors
    /// `Precondition` for a bucket ticket.
    pub fn disk(&self) -> Result<&DiskRef> {
        self.disk.as_ref().ok_or_else(|| {
            Error::Precondition("this transfer ticket is for a bucket, not a disk".into())
        })
    }

    /// The bucket of a bucket ticket.
    ///
    /// # Errors
    /// `Precondition` for a disk ticket.
    pub fn bucket(&self) -> Result<&str> {
        self.bucket.as_deref().ok_or_else(|| {
            Error::Precondition("this transfer ticket is for a disk, not a bucket".into())
        })
    }
}

/// Why a ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such ticket (never granted, or the agent restarted).
    Unknown,
    /// It expired.
    Expired,
    /// The connection's certificate is not the one it was granted for.
    WrongPeer {
        /// The fingerprint presented, if any.
        presented: Option<String>,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown => f.write_str("unknown transfer ticket (never granted here, or this agent restarted since)"),
            Self::Expired => f.write_str("the transfer ticket expired"),
            Self::WrongPeer { presented: Some(p) } => write!(
                f,
                "the transfer ticket was granted to another agent, not to the certificate {p}"
            ),
            Self::WrongPeer { presented: None } => f.write_str(
                "the transfer ticket is for an agent's certificate, and this connection presented none",
            ),
        }
    }
}

/// The tickets an agent granted, by the hash of their secret.
#[derive(Debug, Default)]
pub struct Tickets {
    map: Mutex<HashMap<[u8; 32], Arc<Ticket>>>,
}

pub(crate) fn random_secret() -> Result<String> {
    use std::io::Read as _;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(hex(&b))
}

impl Tickets {
    /// Grants a ticket for `req`: its disk, opened as `reader`, or its
    /// bucket (no reader).
    ///
    /// # Errors
    /// Reading the disk's extent map.
    pub fn grant(
        &self,
        req: &TicketRequest,
        reader: Option<&dyn ImageReader>,
    ) -> Result<TicketGrant> {
        let ttl = req
            .ttl_s
            .map_or(DEFAULT_TICKET_TTL, Duration::from_secs)
            .min(MAX_TICKET_TTL);
        let (virtual_size, data_bytes) = match reader {
            Some(r) => (
                r.virtual_size(),
                fluidcloud_migrators::image::data_bytes(r).map_err(Error::from)?,
            ),
            None => (0, 0),
        };
        let secret = random_secret()?;
        let ticket = Arc::new(Ticket {
            disk: req.disk.clone(),
            bucket: req.bucket.clone(),
            peer: req.peer.to_ascii_lowercase(),
            expires: Instant::now() + ttl,
            virtual_size,
            leaves: Mutex::new(BTreeMap::new()),
        });
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, t| t.expires > Instant::now());
        map.insert(*blake3::hash(secret.as_bytes()).as_bytes(), ticket);
        Ok(TicketGrant {
            ticket: secret,
            virtual_size,
            data_bytes,
            ttl_s: ttl.as_secs(),
        })
    }

    /// The ticket `secret` names, if the connection's certificate
    /// (`presented`) is the one it was granted to and it has not expired.
    ///
    /// # Errors
    /// Why it is refused.
    pub fn check(
        &self,
        secret: &str,
        presented: Option<&str>,
    ) -> std::result::Result<Arc<Ticket>, Refusal> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let t = map
            .get(blake3::hash(secret.as_bytes()).as_bytes())
            .ok_or(Refusal::Unknown)?;
        if t.expires <= Instant::now() {
            return Err(Refusal::Expired);
        }
        if presented.map(str::to_ascii_lowercase).as_deref() != Some(t.peer.as_str()) {
            return Err(Refusal::WrongPeer {
                presented: presented.map(str::to_owned),
            });
        }
        Ok(t.clone())
    }
}

/// What one stripe sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct StripeStats {
    /// Data frames.
    pub data: u64,
    /// Of which compressed.
    pub compressed: u64,
}

/// Streams stripe `req` of `ticket`'s disk into `tx`, frame by frame;
/// returns when the stripe is sent or the receiver went away. Blocking.
///
/// # Errors
/// Opening or reading the disk (the receiver also gets an error frame).
pub fn send_stripe(
    disks: &dyn Disks,
    ticket: &Ticket,
    req: &StripeRequest,
    tx: &mpsc::Sender<Bytes>,
) -> Result<StripeStats> {
    let result = stripe_frames(disks, ticket, req, tx);
    if let Err(e) = &result {
        let _ = tx.blocking_send(frame::error(&e.to_string()));
    }
    result
}

fn stripe_frames(
    disks: &dyn Disks,
    ticket: &Ticket,
    req: &StripeRequest,
    tx: &mpsc::Sender<Bytes>,
) -> Result<StripeStats> {
    if req.stripes == 0 || req.stripe >= req.stripes || req.stripes > 64 {
        return Err(Error::Precondition(format!(
            "stripe {} of {} is not a stripe",
            req.stripe, req.stripes
        )));
    }
    let disk = ticket.disk()?;
    let reader = disks.read(disk.store, &disk.name, disk.format)?;
    if reader.virtual_size() != ticket.virtual_size {
        return Err(Error::Precondition(format!(
            "{} changed size since the ticket was granted ({} bytes, now {})",
            disk,
            ticket.virtual_size,
            reader.virtual_size()
        )));
    }
    let chunks = chunks_of(ticket.virtual_size);
    let first = first_of_stripe(req.from, req.stripe, req.stripes);
    let indices: Box<dyn Iterator<Item = u64>> = match &req.only {
        Some(only) => {
            let ordered = only.windows(2).all(|w| w.first() < w.get(1));
            let ours = only
                .iter()
                .all(|i| *i < chunks && *i >= req.from && i % req.stripes == req.stripe);
            if !ordered || !ours {
                return Err(Error::Precondition(format!(
                    "the chunks asked of stripe {} of {} are not its own, past {}, in order",
                    req.stripe, req.stripes, req.from
                )));
            }
            Box::new(only.clone().into_iter())
        }
        None => Box::new((first..chunks).step_by(usize::try_from(req.stripes).unwrap_or(1))),
    };
    let mut buf = Vec::with_capacity(CHUNK as usize);
    let mut level = Level::default();
    let mut stats = StripeStats::default();
    for index in indices {
        let leaf = read_leaf(reader.as_ref(), index, &mut buf)?;
        ticket
            .leaves
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(index, leaf);
        let have = req.have.get(&index).and_then(|h| unhex32(h));
        let mut compress_time = None;
        let bytes = match leaf {
            Leaf::Zero => frame::marker(Marker::Zero, index),
            Leaf::Data(h) if have == Some(h) => frame::marker(Marker::Same, index),
            Leaf::Data(h) => {
                let started = Instant::now();
                let l = if worth_compressing(&buf) {
                    level.now()
                } else {
                    0
                };
                let (f, z) = frame::data(index, &h, &buf, l);
                stats.data += 1;
                stats.compressed += u64::from(z);
                if z {
                    compress_time = Some(started.elapsed());
                }
                f
            }
        };
        let sending = Instant::now();
        if tx.blocking_send(bytes).is_err() {
            return Ok(stats);
        }
        if let Some(c) = compress_time {
            level.learn(c, sending.elapsed());
        }
    }
    let _ = tx.blocking_send(frame::marker(Marker::End, chunks));
    Ok(stats)
}

/// The first chunk index of stripe `stripe` of `stripes` at or after `from`.
pub fn first_of_stripe(from: u64, stripe: u64, stripes: u64) -> u64 {
    let base = from - from % stripes;
    let first = base + stripe;
    if first < from { first + stripes } else { first }
}

/// The Merkle root of `ticket`'s disk: the leaves the stripes computed,
/// and any chunk they did not reach hashed now. Blocking.
///
/// # Errors
/// Opening or reading the disk.
pub fn root(disks: &dyn Disks, ticket: &Ticket) -> Result<RootReply> {
    let known = ticket
        .leaves
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let chunks = chunks_of(ticket.virtual_size);
    let mut manifest = Manifest::zero(CHUNK, ticket.virtual_size);
    let mut reader = None;
    let mut buf = Vec::new();
    for index in 0..chunks {
        let leaf = match known.get(&index) {
            Some(l) => *l,
            None => {
                if reader.is_none() {
                    let disk = ticket.disk()?;
                    reader = Some(disks.read(disk.store, &disk.name, disk.format)?);
                }
                let r = reader
                    .as_deref()
                    .ok_or_else(|| Error::Precondition("the disk could not be opened".into()))?;
                read_leaf(r, index, &mut buf)?
            }
        };
        manifest.set(index, leaf);
    }
    Ok(RootReply {
        root: manifest.root_hex(),
        data_chunks: manifest.data.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_start_at_their_own_chunks() {
        assert_eq!(first_of_stripe(0, 0, 4), 0);
        assert_eq!(first_of_stripe(0, 3, 4), 3);
        assert_eq!(first_of_stripe(5, 1, 4), 5);
        assert_eq!(first_of_stripe(6, 1, 4), 9);
        assert_eq!(first_of_stripe(8, 3, 4), 11);
    }
}
