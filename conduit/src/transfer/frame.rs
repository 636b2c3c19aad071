//! The frames of a transfer stream, and their checked decoding.
//!
//! ```text
//! frame  = kind:u8  index:u64le  length:u32le  payload[length]
//! kind 1 DATA_ZSTD  payload = raw_len:u32le  blake3[32]  zstd(bytes)
//! kind 2 DATA_RAW   payload = blake3[32]  bytes
//! kind 3 ZERO       chunk `index` reads as zeros (no payload)
//! kind 4 SAME       the receiver's chunk `index` is equal (no payload)
//! kind 5 END        the stripe is complete (index = chunks of the disk)
//! kind 6 ERROR      payload = UTF-8 message of the sender's failure
//! ```
//!
//! A receiver trusts nothing: the kind, the index (inside the disk, in the
//! stripe, after the previous one), the lengths (a chunk at most; the
//! decompressed size exactly the chunk's) and the hash of the bytes are all
//! checked, and each refusal names the offset.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// Bytes of a frame header.
pub(crate) const HEADER: usize = 13;

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A chunk's bytes and their BLAKE3 hash.
    Data {
        /// Chunk index.
        index: u64,
        /// BLAKE3 of `bytes`, as the sender computed it.
        hash: [u8; 32],
        /// The chunk's guest bytes.
        bytes: Bytes,
        /// Bytes this frame took on the wire.
        wire: u64,
    },
    /// A chunk of zeros.
    Zero {
        /// Chunk index.
        index: u64,
    },
    /// A chunk the receiver holds already.
    Same {
        /// Chunk index.
        index: u64,
    },
    /// The end of a stripe.
    End,
    /// The sender failed.
    Error(String),
}

const DATA_ZSTD: u8 = 1;
const DATA_RAW: u8 = 2;
const ZERO: u8 = 3;
const SAME: u8 = 4;
const END: u8 = 5;
const ERROR: u8 = 6;

fn header(out: &mut BytesMut, kind: u8, index: u64, len: usize) {
    out.put_u8(kind);
    out.put_u64_le(index);
    out.put_u32_le(u32::try_from(len).unwrap_or(u32::MAX));
}

/// A data frame: compressed with zstd at `level` when that saves at least
/// 1/32 of the chunk, raw otherwise (random data, media). Returns the
/// frame and whether it was compressed.
pub(crate) fn data(index: u64, hash: &[u8; 32], bytes: &[u8], level: i32) -> (Bytes, bool) {
    if level > 0
        && let Ok(z) = zstd::bulk::compress(bytes, level)
        && z.len() < bytes.len() - bytes.len() / 32
    {
        let mut out = BytesMut::with_capacity(HEADER + 36 + z.len());
        header(&mut out, DATA_ZSTD, index, 36 + z.len());
        out.put_u32_le(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
        out.put_slice(hash);
        out.put_slice(&z);
        return (out.freeze(), true);
    }
    let mut out = BytesMut::with_capacity(HEADER + 32 + bytes.len());
    header(&mut out, DATA_RAW, index, 32 + bytes.len());
    out.put_slice(hash);
    out.put_slice(bytes);
    (out.freeze(), false)
}

/// A frame without payload.
pub(crate) fn marker(kind: Marker, index: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER);
    let k = match kind {
        Marker::Zero => ZERO,
        Marker::Same => SAME,
        Marker::End => END,
    };
    header(&mut out, k, index, 0);
    out.freeze()
}

/// Frames without payload.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Marker {
    /// [`Frame::Zero`].
    Zero,
    /// [`Frame::Same`].
    Same,
    /// [`Frame::End`].
    End,
}

/// An error frame.
pub(crate) fn error(message: &str) -> Bytes {
    let msg = message.as_bytes();
    let msg = msg.get(..msg.len().min(4096)).unwrap_or_default();
    let mut out = BytesMut::with_capacity(HEADER + msg.len());
    header(&mut out, ERROR, 0, msg.len());
    out.put_slice(msg);
    out.freeze()
}

/// What a receiver expects of one stripe's frames.
#[derive(Debug, Clone)]
pub(crate) struct Expect {
    /// Chunk size.
    pub(crate) chunk: u64,
    /// Size of the disk.
    pub(crate) virtual_size: u64,
    /// This stripe's number, of `stripes`.
    pub(crate) stripe: u64,
    /// Stripes in all.
    pub(crate) stripes: u64,
    /// The next chunk index may not be below this.
    pub(crate) next: u64,
}

impl Expect {
    fn chunks(&self) -> u64 {
        self.virtual_size.div_ceil(self.chunk)
    }

    fn chunk_len(&self, index: u64) -> u64 {
        self.chunk
            .min(self.virtual_size.saturating_sub(index * self.chunk))
    }
}

/// Decodes the next frame of `buf`, if it holds a whole one; consumes it.
///
/// # Errors
/// A message naming the offending offset of the disk (or the frame kind).
pub(crate) fn decode(buf: &mut BytesMut, expect: &mut Expect) -> Result<Option<Frame>, String> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let mut h = buf.get(..HEADER).unwrap_or_default();
    let kind = h.get_u8();
    let index = h.get_u64_le();
    let len = h.get_u32_le() as usize;
    let limit = usize::try_from(expect.chunk).unwrap_or(usize::MAX) + 64;
    if len > limit.max(4096) {
        return Err(format!(
            "a frame of {len} bytes for chunk {index} (at most {limit})"
        ));
    }
    if buf.len() < HEADER + len {
        buf.reserve(HEADER + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER);
    let mut payload = buf.split_to(len).freeze();
    let chunked = matches!(kind, DATA_ZSTD | DATA_RAW | ZERO | SAME);
    if chunked {
        check_index(index, expect)?;
        expect.next = index + 1;
    }
    let offset = index.saturating_mul(expect.chunk);
    let wire = (HEADER + len) as u64;
    let frame = match kind {
        DATA_ZSTD | DATA_RAW => {
            let want = expect.chunk_len(index);
            let (hash, bytes) = if kind == DATA_ZSTD {
                if payload.len() < 36 {
                    return Err(format!("a short compressed frame at offset {offset}"));
                }
                let raw_len = u64::from(payload.get_u32_le());
                let hash = take_hash(&mut payload);
                if raw_len != want {
                    return Err(format!(
                        "chunk at offset {offset} claims {raw_len} bytes, the chunk has {want}"
                    ));
                }
                let bytes = zstd::bulk::decompress(&payload, want as usize)
                    .map_err(|e| format!("chunk at offset {offset} does not decompress: {e}"))?;
                (hash, Bytes::from(bytes))
            } else {
                if payload.len() < 32 {
                    return Err(format!("a short data frame at offset {offset}"));
                }
                let hash = take_hash(&mut payload);
                (hash, payload)
            };
            if bytes.len() as u64 != want {
                return Err(format!(
                    "chunk at offset {offset} has {} bytes, the chunk {want}",
                    bytes.len()
                ));
            }
            if *blake3::hash(&bytes).as_bytes() != hash {
                return Err(format!(
                    "chunk at offset {offset} does not match its BLAKE3 hash"
                ));
            }
            Frame::Data {
                index,
                hash,
                bytes,
                wire,
            }
        }
        ZERO => Frame::Zero { index },
        SAME => Frame::Same { index },
        END => Frame::End,
        ERROR => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
        other => return Err(format!("an unknown frame kind {other}")),
    };
    Ok(Some(frame))
}

fn take_hash(payload: &mut Bytes) -> [u8; 32] {
    let mut hash = [0u8; 32];
    payload.copy_to_slice(&mut hash);
    hash
}

fn check_index(index: u64, expect: &Expect) -> Result<(), String> {
    if index >= expect.chunks() {
        return Err(format!(
            "chunk {index} is past the end of the disk ({} chunks)",
            expect.chunks()
        ));
    }
    if index % expect.stripes != expect.stripe {
        return Err(format!(
            "chunk {index} does not belong to stripe {} of {}",
            expect.stripe, expect.stripes
        ));
    }
    if index < expect.next {
        return Err(format!(
            "chunk {index} comes after chunk {} (out of order or repeated)",
            expect.next.saturating_sub(1)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn expect() -> Expect {
        Expect {
            chunk: 4096,
            virtual_size: 4096 * 9 + 100,
            stripe: 1,
            stripes: 2,
            next: 0,
        }
    }

    #[test]
    fn frames_round_trip_and_compress_only_when_it_pays() {
        let text = b"log line 42: all is well\n".repeat(200);
        let text = &text[..4096];
        let mut x: u64 = 7;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut buf = BytesMut::new();
        let (f1, z1) = data(1, blake3::hash(text).as_bytes(), text, 3);
        let (f3, z3) = data(3, blake3::hash(&random).as_bytes(), &random, 3);
        assert!(z1, "text compresses");
        assert!(!z3, "noise is sent raw");
        assert!(f1.len() < 1000, "{} bytes on the wire", f1.len());
        buf.extend_from_slice(&f1);
        buf.extend_from_slice(&f3);
        buf.extend_from_slice(&marker(Marker::Zero, 5));
        buf.extend_from_slice(&marker(Marker::Same, 7));
        // The last chunk is short: 100 bytes.
        let tail = vec![9u8; 100];
        buf.extend_from_slice(&data(9, blake3::hash(&tail).as_bytes(), &tail, 1).0);
        buf.extend_from_slice(&marker(Marker::End, 11));
        let mut e = expect();
        let mut got = Vec::new();
        while let Some(f) = decode(&mut buf, &mut e).unwrap() {
            got.push(f);
        }
        assert_eq!(got.len(), 6);
        assert!(matches!(&got[0], Frame::Data { index: 1, bytes, .. } if bytes[..] == text[..]));
        assert!(matches!(&got[1], Frame::Data { index: 3, bytes, .. } if bytes[..] == random[..]));
        assert_eq!(got[2], Frame::Zero { index: 5 });
        assert_eq!(got[3], Frame::Same { index: 7 });
        assert!(matches!(&got[4], Frame::Data { index: 9, bytes, .. } if bytes.len() == 100));
        assert_eq!(got[5], Frame::End);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_frame_waits_for_more() {
        let bytes = vec![1u8; 4096];
        let (f, _) = data(1, blake3::hash(&bytes).as_bytes(), &bytes, 0);
        let mut buf = BytesMut::from(&f[..100]);
        assert_eq!(decode(&mut buf, &mut expect()).unwrap(), None);
        buf.extend_from_slice(&f[100..]);
        assert!(decode(&mut buf, &mut expect()).unwrap().is_some());
    }

    #[test]
    fn hostile_frames_are_refused_naming_the_offset() {
        let bytes = vec![1u8; 4096];
        let hash = *blake3::hash(&bytes).as_bytes();
        let cases: Vec<(Bytes, &str)> = vec![
            // A flipped byte: the hash does not match.
            (
                {
                    let mut f = BytesMut::from(&data(1, &hash, &bytes, 0).0[..]);
                    let last = f.len() - 1;
                    f[last] ^= 1;
                    f.freeze()
                },
                "offset 4096 does not match its BLAKE3",
            ),
            (data(2, &hash, &bytes, 0).0, "does not belong to stripe 1"),
            (data(41, &hash, &bytes, 0).0, "past the end of the disk"),
            // Chunk 9 is 100 bytes long, not 4096.
            (data(9, &hash, &bytes, 0).0, "offset 36864 has 4096 bytes"),
            (data(9, &hash, &bytes, 5).0, "claims 4096 bytes"),
            (
                {
                    let mut f = BytesMut::new();
                    header(&mut f, 1, 1, 1 << 30);
                    f.freeze()
                },
                "a frame of 1073741824 bytes",
            ),
            (
                {
                    let mut f = BytesMut::new();
                    header(&mut f, 77, 1, 0);
                    f.freeze()
                },
                "unknown frame kind 77",
            ),
        ];
        for (frame, want) in cases {
            let mut buf = BytesMut::from(&frame[..]);
            let err = decode(&mut buf, &mut expect()).unwrap_err();
            assert!(err.contains(want), "{err:?} should say {want:?}");
        }
        // Going back is refused.
        let mut e = expect();
        let mut buf = BytesMut::from(&marker(Marker::Zero, 5)[..]);
        buf.extend_from_slice(&marker(Marker::Zero, 3));
        decode(&mut buf, &mut e).unwrap();
        let err = decode(&mut buf, &mut e).unwrap_err();
        assert!(err.contains("comes after chunk 5"), "{err}");
    }
}
