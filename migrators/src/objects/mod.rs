//! Object-storage buckets: locations, a verified resumable bucket copy, and
//! the `object-copy` migrator built on them.
//!
//! ## Locations
//!
//! A bucket is named by one URL, which becomes an artifact's locator and so
//! never holds a secret:
//!
//! - `file:///ABS/DIR`: a directory; object keys are paths relative to it.
//! - `s3://BUCKET[/PREFIX]?endpoint=URL&region=R&access_key_id_env=VAR&secret_access_key_env=VAR[&session_token_env=VAR]`:
//!   an S3-compatible bucket (path-style requests, plain http allowed for
//!   loopback servers). The credentials are read from the *named*
//!   environment variables when the bucket is opened; an unset one is an
//!   error naming it. Defaults: region `us-east-1`, the AWS endpoint of the
//!   region, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
//!
//! ## What a copy does, and why
//!
//! [`copy_bucket`] lists both sides once, then works on many objects at a
//! time (48 by default): small objects are read whole and written in one
//! PUT; objects of 64 MiB or more are read by 16 MiB ranges and uploaded as
//! multipart parts, four in flight per object, with a global memory budget.
//! Throughput on many small objects is bound by request latency, not
//! bandwidth, hence the wide fan-out.
//!
//! - **Same server**: when source and target are the same S3 endpoint and
//!   key, objects are copied server-side (`CopyObject`, or `UploadPartCopy`
//!   above 5 GiB), so no data crosses the network.
//! - **Skip**: an object is skipped when the target already holds the same
//!   size and the same BLAKE3. The BLAKE3 of every object we write is stored
//!   in its user metadata `x-amz-meta-fluidcloud-blake3` (and, for a
//!   single PUT, its MD5 in `fluidcloud-md5`, checked against the ETag so an
//!   object rewritten behind our back with our metadata is still noticed).
//!   Sources without that metadata are hashed, except when both ETags are
//!   equal plain MD5s. Directories are hashed on both sides.
//! - **Verify** ([`Verify`]): by default the ETag the server returns for a
//!   PUT (the MD5 it computed of what it stored) must equal the MD5 of the
//!   bytes read from the source; for multipart uploads, the MD5 of the parts'
//!   MD5s with the part count. A server-side copy is checked by the target's
//!   size, ETag and BLAKE3 metadata. Directory targets are re-read and
//!   BLAKE3-compared; [`Verify::Reread`] does that for S3 too. A mismatch is
//!   re-copied once, then reported as a failure.
//! - **Metadata**: content type, encoding, disposition, language, cache
//!   control and user metadata go with each object (S3 to S3; directories
//!   hold none).
//! - **Resumable**: a re-run skips what is already identical and aborts
//!   incomplete multipart uploads left under the target prefix.
//! - **Failures**: one bad object does not stop the others; each is retried
//!   with exponential backoff ([`next_delay`]) while its failures are
//!   transient (connection refused, timeouts, 5xx), within a budget (60 s by
//!   default), and then listed in [`ObjectCopySummary::failures`].
//! - **Manifest**: the summary's `manifest` is `blake3-manifest:<hex>` over
//!   the sorted `(key, size, blake3)` list; [`manifest`] computes the same
//!   digest for any location by reading every object, so a caller can compare
//!   source and target independently of the copy.
//!
//! S3 calls that `object_store` does not make (bucket creation, server-side
//! copies across buckets, multipart clean-up) are signed with its own SigV4
//! signer and sent through its HTTP client rather than pulling in a second
//! S3 SDK.

mod copy;
mod location;
mod migrator;
mod s3;

pub use copy::{
    META_BLAKE3, META_MD5, META_STEP, Manifest, ManifestEntry, ObjectCopyOptions,
    ObjectCopySummary, ObjectFailure, Verify, copy_bucket, delete_objects, keys_tagged, manifest,
    next_delay, usage,
};
pub use location::{BucketLocation, S3Location, open_store};
pub use migrator::ObjectCopy;
pub use s3::{bucket_exists, create_bucket, delete_bucket, list_buckets};
